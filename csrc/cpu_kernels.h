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

// --- the measuring functions' own steps (csrc/stacking_cpu.cpp, csrc/decomposition_cpu.cpp)

// out[9j .. 9j+9) = rotation offset + j of the stream `seed`, computed in double and
// rounded to `out_type` (f32 or f64): what the reference draws and then casts.
void random_rotations_rounded_cpu(void* out, Dtype out_type, int64_t n, uint64_t seed, uint64_t offset,
                                  bool improper);

// The per-sample centroid of the valid rows of x (N, d) in the graph layout (sample[r]),
// summed in row order in acc (as torch's index_add_ adds them) and divided by the count
// (at least 1): out (B, d) acc. nullptr, or what is wrong with `sample`.
const char* centroids_cpu(const void* x, Dtype x_type, Dtype acc_type, const int64_t* sample,
                          const uint8_t* valid, int64_t N, int64_t B, int d, void* out);

// K copies of an int64 index (rows, width), copy k shifted by k * step and placed after
// copy k - 1 along the last dim: out (rows, K * width).
void offset_copies_cpu(const int64_t* x, int64_t rows, int64_t width, int64_t K, int64_t step, int64_t* out);

// The estimators of fastequiv/estimators.py from reduce_rows' raw sums of H heads (see
// csrc/decomposition_cpu.cpp). Decomposition `slot` 0 is the top level: the combination of
// the heads (combine, heads in slots 1..H) or the one head itself (H = 1, no combine).
struct DecomposeArgs {
    Dtype acc;  // of every array below: f32 or f64
    int H;
    int64_t B, K;
    bool exhaustive, combine;
    const double* weight;          // (H,) loss weights
    const int64_t* N;              // (H,) rows of each head
    const int* d;                  // (H,) components a row
    const int64_t* P;              // (H,) rows a sample (dense layout)
    const int64_t* const* sample;  // (H,) the sample of each row (graph layout), or null
    const uint8_t* const* valid;   // (H,) the valid rows, or null (every row)
    const void* sums;              // (H, 3, B) reduce_rows' sums (total, bias, spread)
    void* count;                   // (H, B) out: valid elements a sample
    void* per_sample;              // (slots, 3, B) out: total, mean, equiv a sample
    void* scalars;                 // (slots, 7) out: total, mean, equiv, pct, their 3 standard errors
    uint8_t* valid_out;            // (slots, B) out: the samples that count; or null
};
// flags: bit 2h set when head h has a valid element, bit 2h + 1 when its per-sample
// L_total is finite everywhere. nullptr, or what is wrong with a head's `sample`.
const char* decompose_cpu(const DecomposeArgs& args, uint64_t* flags);
// grad_sums (H, 3, B) of g_total L_total + g_equiv L_equiv (the top level's batch means),
// from the counts decompose_cpu wrote.
void decompose_backward_cpu(const DecomposeArgs& args, double g_total, double g_equiv, void* grad_sums);

}  // namespace fastequiv
