// CUDA kernel: out[j] = random_rotation(seed, offset + j), one thread per rotation.
// Compiled by nvcc into fastequiv._C (with the host launcher below) and, without the
// launcher, by NVRTC for the CuPy backend (kernels are extern "C" so they can be looked
// up by name).
#include "rotations.cuh"

template <typename T>
__device__ inline void random_rotations_body(T* __restrict__ out, long long n,
                                             unsigned long long seed,
                                             unsigned long long offset, bool improper) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
         j += stride) {
        T R[9];
        fastequiv::random_rotation<T>(seed, offset + static_cast<unsigned long long>(j),
                                      improper, R);
        T* dst = out + 9 * j;
#pragma unroll
        for (int k = 0; k < 9; ++k) dst[k] = R[k];
    }
}

extern "C" __global__ void fe_random_rotations_f32(float* out, long long n,
                                                   unsigned long long seed,
                                                   unsigned long long offset, bool improper) {
    random_rotations_body<float>(out, n, seed, offset, improper);
}

extern "C" __global__ void fe_random_rotations_f64(double* out, long long n,
                                                   unsigned long long seed,
                                                   unsigned long long offset, bool improper) {
    random_rotations_body<double>(out, n, seed, offset, improper);
}

// The same, keyed by the int64 seed at `seed` in device memory: no host sync, so the launch
// can be captured in a CUDA graph and replayed with whatever seed the array then holds.
extern "C" __global__ void fe_random_rotations_seeded_f32(float* out, long long n, const long long* seed,
                                                          unsigned long long offset, bool improper) {
    random_rotations_body<float>(out, n, static_cast<unsigned long long>(*seed), offset, improper);
}

extern "C" __global__ void fe_random_rotations_seeded_f64(double* out, long long n, const long long* seed,
                                                          unsigned long long offset, bool improper) {
    random_rotations_body<double>(out, n, static_cast<unsigned long long>(*seed), offset, improper);
}

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "cuda_launchers.h"

namespace {

// One thread per rotation on a grid-stride grid; `seed` is the key itself or the device
// address of the int64 key (the seeded kernels).
template <typename T, typename Seed, typename Kernel>
const char* launch(Kernel kernel, T* out, int64_t n, Seed seed, uint64_t offset, bool improper, int device,
                   void* stream) {
    if (n == 0) return nullptr;
    fastequiv::DeviceGuard guard(device);
    kernel<<<fastequiv::blocks_for(n), fastequiv::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        out, static_cast<long long>(n), seed, static_cast<unsigned long long>(offset), improper);
    return fastequiv::last_error();
}

}  // namespace

namespace fastequiv {

const char* launch_random_rotations_seeded(float* out, int64_t n, const int64_t* seed, uint64_t offset,
                                           bool improper, int device, void* stream) {
    return launch(fe_random_rotations_seeded_f32, out, n, reinterpret_cast<const long long*>(seed), offset, improper,
                  device, stream);
}

const char* launch_random_rotations_seeded(double* out, int64_t n, const int64_t* seed, uint64_t offset,
                                           bool improper, int device, void* stream) {
    return launch(fe_random_rotations_seeded_f64, out, n, reinterpret_cast<const long long*>(seed), offset, improper,
                  device, stream);
}

const char* launch_random_rotations(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream) {
    return launch(fe_random_rotations_f32, out, n, static_cast<unsigned long long>(seed), offset, improper, device,
                  stream);
}

const char* launch_random_rotations(double* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream) {
    return launch(fe_random_rotations_f64, out, n, static_cast<unsigned long long>(seed), offset, improper, device,
                  stream);
}

}  // namespace fastequiv
#endif  // !__CUDACC_RTC__
