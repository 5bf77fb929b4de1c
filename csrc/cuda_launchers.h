// Host entry points of the CUDA kernels in kernels/*.cu, callable from plain C++ (no CUDA
// headers needed): each returns nullptr on success or the CUDA error string.
#pragma once

#include <cstdint>

namespace fastequiv {

// Fill out[0 .. 9n) (device memory on `device`) with rotations offset .. offset + n - 1 of
// the stream `seed`, launched on `stream` (a cudaStream_t; nullptr is the legacy default).
const char* launch_random_rotations(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream);
const char* launch_random_rotations(double* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream);

}  // namespace fastequiv
