// FE_HOST_DEVICE marks the per-element math that both nvcc (and NVRTC, for the CuPy
// backend) and the host C++ compiler build: __host__ __device__ inline under CUDA, plain
// inline in the CPU build of csrc/.
#pragma once

#if defined(__CUDACC__)
#define FE_HOST_DEVICE __host__ __device__ inline
#else
#define FE_HOST_DEVICE inline
#endif
