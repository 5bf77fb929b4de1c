// Real Wigner-D blocks D_0 .. D_lmax of proper rotations in e3nn's basis by the
// Ivanic–Ruedenberg recursion, shared by the CUDA kernel (kernels/wigner_d.cu) and the C++
// CPU kernel (csrc/wigner_cpu.cpp).
//
// The recursion's term table is fastequiv.wigner._recursion_terms(l) (built once in
// Python, the same table the pure-torch reference uses), passed flattened over l:
//   term_start[l] .. term_start[l + 1]   the terms of degree l (entries for l < 2 are 0),
//   term_index[3 t + 0]   r * (2l+1) + c        the entry of D_l it adds to,
//   term_index[3 t + 1]   i * 3 + j             the entry of D_1 = R,
//   term_index[3 t + 2]   a * (2l-1) + b        the entry of D_{l-1},
//   term_coef[t]          its coefficient,
// so D_l[r, c] = sum_t coef[t] D_1[i, j] D_{l-1}[a, b]; terms are sorted by (r, c).
//
// Blocks are packed: block l is row-major at offset sum_{l' < l} (2l'+1)^2. The function
// works on W rotations at once, lane-minor (entry q of rotation w at D[q * W + w]): the
// GPU runs W = 1 on one output row per thread, the CPU W = 16 lanes that vectorise.
#pragma once

#include "host_device.cuh"

namespace fastequiv {

// Number of packed entries of D_0 .. D_lmax: sum_{l <= lmax} (2l+1)^2.
FE_HOST_DEVICE int wigner_packed_size(int lmax) {
    return (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) / 3;
}

// Fills D_0 (= 1) and D_1 (= R, 9 values per lane at R[e * W + w]) and then every block
// l = 2 .. lmax of the W lanes of D (wigner_packed_size(lmax) * W values).
template <typename T, int W>
FE_HOST_DEVICE void wigner_blocks_lanes(const T* R, int lmax, const int* term_index, const T* term_coef,
                                        const int* term_start, T* D) {
    for (int w = 0; w < W; ++w) D[w] = static_cast<T>(1);
    if (lmax < 1) return;
    for (int e = 0; e < 9; ++e)
        for (int w = 0; w < W; ++w) D[(1 + e) * W + w] = R[e * W + w];
    int prev = 1;  // offset of D_{l-1}
    for (int l = 2; l <= lmax; ++l) {
        const int off = wigner_packed_size(l - 1);
        const int size = (2 * l + 1) * (2 * l + 1);
        for (int q = 0; q < size * W; ++q) D[off * W + q] = static_cast<T>(0);  // entries with no term
        T acc[W];
        for (int w = 0; w < W; ++w) acc[w] = static_cast<T>(0);
        int cur = -1;
        for (int t = term_start[l]; t < term_start[l + 1]; ++t) {
            const int o = term_index[3 * t];
            if (o != cur) {
                if (cur >= 0)
                    for (int w = 0; w < W; ++w) D[(off + cur) * W + w] = acc[w];
                for (int w = 0; w < W; ++w) acc[w] = static_cast<T>(0);
                cur = o;
            }
            const T coef = term_coef[t];
            const T* r1 = D + (1 + term_index[3 * t + 1]) * W;
            const T* dp = D + (prev + term_index[3 * t + 2]) * W;
            for (int w = 0; w < W; ++w) acc[w] += coef * r1[w] * dp[w];
        }
        if (cur >= 0)
            for (int w = 0; w < W; ++w) D[(off + cur) * W + w] = acc[w];
        prev = off;
    }
}

}  // namespace fastequiv
