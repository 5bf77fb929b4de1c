// Arguments of the row kernels (the contract of fastequiv/ops/layout.py), shared by the CPU
// kernels (csrc/rows_cpu.cpp, csrc/wigner_cpu.cpp) and the CUDA launchers (kernels/*.cu).
// Plain C++: no CUDA headers. Arrays are C-contiguous; the bindings (csrc/bindings.cpp)
// check shapes, dtypes and devices before filling these.
#pragma once

#include <cstdint>

namespace fastequiv {

// Element type of an array. The CPU kernels take f32 and f64; the CUDA kernels all four.
enum class Dtype : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// Which sample each of the N rows belongs to: sample[r] (graph layout, int64) when sample
// is not null, else r / P (dense layout, P >= 1).
struct RowLayout {
    const int64_t* sample;
    int64_t P;
    int64_t K;  // copies
    int64_t N;  // rows
    int64_t B;  // samples
    int d;      // components per row
};

// out[k, r] = M[k, s] (x[r] - c[s]) + c[s]  ->  out (K, N, d) in x's dtype.
struct RotateRowsArgs {
    RowLayout rows;
    Dtype x_type, acc_type;
    const void* x;       // (N, d)
    const void* M;       // (K, B, d, d) acc
    const void* center;  // (B, d) acc (zeros for no centre)
    void* out;           // (K, N, d) x_type
};

// out[r] = sum_k M[k, s]^T grad[k, r]  ->  (N, d) acc.
struct RotateRowsBackwardArgs {
    RowLayout rows;
    Dtype grad_type, acc_type;
    const void* grad;  // (K, N, d)
    const void* M;     // (K, B, d, d) acc
    void* out;         // (N, d) acc
};

// mean (N, d) and sums (3, B) of reduce_rows; sums must be zero on entry.
struct ReduceRowsArgs {
    RowLayout rows;
    Dtype out_type, target_type, acc_type;
    const void* out;       // (K, N, d)
    const void* M;         // (K, B, d, d) acc
    const void* target;    // (N, d)
    const uint8_t* valid;  // (N,) bool, or null (every row valid)
    const void* center;    // (K, B, d) acc (zeros for no centre)
    void* mean;            // (N, d) acc
    void* sums;            // (3, B) acc
    const void* weights = nullptr;  // (K,) acc, the copies' weights, or null (1/K each)
};

// grad_out (K, N, d) of reduce_rows_backward, in out's dtype.
struct ReduceRowsBackwardArgs {
    RowLayout rows;
    Dtype out_type, target_type, acc_type;
    const void* grad_mean;  // (N, d) acc, or null
    const void* grad_sums;  // (3, B) acc
    const void* out;        // (K, N, d)
    const void* M;          // (K, B, d, d) acc
    const void* target;     // (N, d)
    const uint8_t* valid;   // (N,) or null
    const void* center;     // (K, B, d) acc (zeros for no centre)
    const void* mean;       // (N, d) acc
    void* grad_out;         // (K, N, d) out_type
    void* work;             // CUDA, d not 1 or 3: (N, d) acc scratch; else unused
    const void* weights = nullptr;  // (K,) acc, or null (1/K each)
};

// out (n, S): packed Wigner-D blocks D_0 .. D_lmax of R (n, 3, 3) (kernels/wigner.cuh).
struct WignerBlocksArgs {
    Dtype type;  // of R, term_coef and out: f32 or f64
    const void* R;
    int64_t n;
    int lmax;
    const int32_t* term_index;  // (T, 3)
    const void* term_coef;      // (T,)
    const int32_t* term_start;  // (lmax + 2,)
    void* out;
};

// out (rows, C, n^3) = x (B, C, n^3) of sample r mod B moved by the cube-group element
// M[r] (int32 (rows, 9), a signed permutation, row-major): out[q] = x[M^T (q - c) + c].
struct CubeCopiesArgs {
    Dtype type;  // of x and out: f32 or f64
    const void* x;
    const int32_t* M;
    int64_t B, C, n, rows;
    void* out;
};

}  // namespace fastequiv
