// Host entry points of the CUDA kernels in kernels/*.cu, callable from plain C++ (no CUDA
// headers needed): each returns nullptr on success or the CUDA error string.
#pragma once

#include <cstdint>

#include "rows.h"

namespace fastequiv {

// Fill out[0 .. 9n) (device memory on `device`) with rotations offset .. offset + n - 1 of
// the stream `seed`, launched on `stream` (a cudaStream_t; nullptr is the legacy default).
const char* launch_random_rotations(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream);
const char* launch_random_rotations(double* out, int64_t n, uint64_t seed, uint64_t offset,
                                    bool improper, int device, void* stream);

// The same, keyed by the int64 seed in device memory at `seed` (read by the kernel: no
// host sync, so the launch can be captured in a CUDA graph and replayed with a new seed).
const char* launch_random_rotations_seeded(float* out, int64_t n, const int64_t* seed, uint64_t offset,
                                           bool improper, int device, void* stream);
const char* launch_random_rotations_seeded(double* out, int64_t n, const int64_t* seed, uint64_t offset,
                                           bool improper, int device, void* stream);

// The row contract (fastequiv/ops/layout.py) on arrays in device memory of `device`
// (kernels/rotate_copies.cu, kernels/twirl_reduce.cu, kernels/wigner_d.cu). For
// reduce_rows, args.sums must be zero on entry (the kernel adds to it with atomics).
const char* launch_rotate_rows(const RotateRowsArgs& args, int device, void* stream);
const char* launch_rotate_rows_backward(const RotateRowsBackwardArgs& args, int device, void* stream);
const char* launch_reduce_rows(const ReduceRowsArgs& args, int device, void* stream);
const char* launch_reduce_rows_backward(const ReduceRowsBackwardArgs& args, int device, void* stream);
const char* launch_wigner_blocks(const WignerBlocksArgs& args, int device, void* stream);

}  // namespace fastequiv
