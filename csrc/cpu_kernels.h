// CPU kernels of fastequiv._C: the shared host-device math of kernels/*.cuh run over
// arrays, in parallel with OpenMP when the build found it.
#pragma once

#include <cstdint>

#include "rows.h"

namespace fastequiv {

// out[9j .. 9j+9) = rotation number offset + j of the stream `seed` (row-major 3x3).
template <typename T>
void random_rotations_cpu(T* out, int64_t n, uint64_t seed, uint64_t offset, bool improper);

// The row contract (fastequiv/ops/layout.py) on the CPU, for f32/f64 arrays. Each returns
// nullptr on success or a message naming the bad argument (an out-of-range sample index).
const char* rotate_rows_cpu(const RotateRowsArgs& args);
const char* rotate_rows_backward_cpu(const RotateRowsBackwardArgs& args);
const char* reduce_rows_cpu(const ReduceRowsArgs& args);
const char* reduce_rows_backward_cpu(const ReduceRowsBackwardArgs& args);
void wigner_blocks_cpu(const WignerBlocksArgs& args);
// The exact path of voxels_resample (csrc/voxels_cpu.cpp); nullptr, or what is wrong with M.
const char* cube_copies_cpu(const CubeCopiesArgs& args);

// The CPU variant the row kernels run: "avx2" or "default" (csrc/cpu_dispatch.cpp).
const char* cpu_capability();

}  // namespace fastequiv
