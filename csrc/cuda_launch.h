// Host-side helpers shared by the launchers in kernels/*.cu (nvcc only; NVRTC never sees
// them): run on the array's device, size a grid-stride launch, report the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastequiv {

// Runs on `device` (the arrays'), restoring the caller's current device afterwards.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        cudaGetDevice(&previous_);
        if (previous_ != device) cudaSetDevice(device);
    }
    ~DeviceGuard() { cudaSetDevice(previous_); }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int previous_ = 0;
};

constexpr int kThreads = 256;

// Blocks for `items` work items at `per_thread` items per thread (grid-stride kernels
// accept fewer blocks than items: the grid is capped).
inline int blocks_for(int64_t items, int64_t per_thread = 1) {
    const int64_t per_block = kThreads * per_thread;
    const int64_t wanted = (items + per_block - 1) / per_block;
    return static_cast<int>(wanted < (int64_t{1} << 30) ? wanted : (int64_t{1} << 30));
}

inline const char* last_error() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastequiv
