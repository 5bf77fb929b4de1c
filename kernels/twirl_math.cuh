// Per-row math of the row contract (fastequiv/ops/layout.py), shared by the CUDA kernels
// (kernels/rotate_copies.cu, kernels/twirl_reduce.cu) and the C++ CPU kernels
// (csrc/rows_cpu.cpp): one definition, so the CPU tests check the GPU's arithmetic.
//
// Conventions (as in layout.py):
// - a row has n components; M (one d x d block per copy and sample) is row-major;
// - rotation:      y = M (x - c) + c            (rotate_rows)
// - back-rotation: a = M^T (o - c) + c          (reduce_rows)
// - copies are copy-major: copy k of a row lies `o_step` elements after copy k - 1, its
//   matrix `m_step` after the previous matrix, its centre `c_step` after the previous one.
// - centres are always given (the wrapper passes zeros for "no centre": x - 0 + 0 is x
//   exactly, so the result is bit-identical to the formula without a centre).
// - D > 0 is the row size known at compile time (kept in registers; d == 1 and d == 3 are
//   specialised); D == 0 is "n = d at run time", which keeps no per-component arrays and
//   uses the caller's memory where it needs one (`mean` in reduce_row, `work` in
//   reduce_row_backward).
// Everything is computed in the accumulation type Acc; elements of other types are read
// with to_acc and written with from_acc (kernels/scalar_types.cuh).
#pragma once

#include "scalar_types.cuh"

namespace fastequiv {

// The sample of row r: sample[r] in the graph layout, r / P in the dense layout (P >= 1).
template <typename Index>
FE_HOST_DEVICE long long row_sample(long long r, const Index* sample, long long P) {
    return sample ? static_cast<long long>(sample[r]) : r / P;
}

// Component i of the back-rotation a = M^T (o - c) + c of one row.
template <int D, typename Acc, typename T>
FE_HOST_DEVICE Acc back_rotate_component(const T* o, const Acc* m, const Acc* c, int d, int i) {
    const int n = D > 0 ? D : d;
    Acc s = 0;
    for (int j = 0; j < n; ++j) s += m[j * n + i] * (to_acc<Acc>(o[j]) - c[j]);
    return s + c[i];
}

// y = M (x - c) + c for one row, written in x's type.
template <int D, typename Acc, typename T>
FE_HOST_DEVICE void rotate_row(const T* x, const Acc* m, const Acc* c, int d, T* y) {
    const int n = D > 0 ? D : d;
    for (int i = 0; i < n; ++i) {
        Acc s = 0;
        for (int j = 0; j < n; ++j) s += m[i * n + j] * (to_acc<Acc>(x[j]) - c[j]);
        y[i] = from_acc<T>(s + c[i]);
    }
}

// g = sum_k M_k^T grad_k for one row (the gradient of rotate_row for a fixed centre).
template <int D, typename Acc, typename T>
FE_HOST_DEVICE void rotate_row_backward(const T* grad, long long g_step, const Acc* m, long long m_step,
                                        int K, int d, Acc* g) {
    const int n = D > 0 ? D : d;
    Acc reg[D > 0 ? D : 1];
    Acc* s = D > 0 ? reg : g;  // copies outermost: one pass over the row's K copies
    for (int i = 0; i < n; ++i) s[i] = 0;
    for (int k = 0; k < K; ++k) {
        const T* gk = grad + k * g_step;
        const Acc* mk = m + k * m_step;
        for (int j = 0; j < n; ++j) {
            const Acc v = to_acc<Acc>(gk[j]);
            for (int i = 0; i < n; ++i) s[i] += mk[j * n + i] * v;
        }
    }
    if (D > 0) {
        for (int i = 0; i < n; ++i) g[i] = s[i];
    }
}

// One row of reduce_rows: the twirled mean abar = (1/K) sum_k a_k into `mean` (n values)
// and the row's terms (1/K) sum_k |a_k - y|^2, |abar - y|^2, (1/K) sum_k |a_k - abar|^2
// into terms[0..3). abar is formed first and the spread from the deviations a_k - abar
// (a second pass over the copies), so it has no cancellation. With weights w (K values,
// null for 1/K each), every (1/K) sum_k is sum_k w_k.
template <int D, typename Acc, typename TO, typename TY>
FE_HOST_DEVICE void reduce_row(const TO* o, long long o_step, const Acc* m, long long m_step, const Acc* c,
                               long long c_step, const TY* y, int K, int d, Acc* mean, Acc* terms,
                               const Acc* w = nullptr) {
    const int n = D > 0 ? D : d;
    Acc abar_reg[D > 0 ? D : 1];
    Acc* abar = D > 0 ? abar_reg : mean;
    for (int i = 0; i < n; ++i) abar[i] = 0;
    Acc total = 0;
    for (int k = 0; k < K; ++k) {
        for (int i = 0; i < n; ++i) {
            const Acc a = back_rotate_component<D>(o + k * o_step, m + k * m_step, c + k * c_step, n, i);
            const Acc e = a - to_acc<Acc>(y[i]);
            if (w) {
                abar[i] += w[k] * a;
                total += w[k] * (e * e);
            } else {
                abar[i] += a;
                total += e * e;
            }
        }
    }
    Acc bias = 0;
    for (int i = 0; i < n; ++i) {
        if (!w) abar[i] /= static_cast<Acc>(K);
        const Acc e = abar[i] - to_acc<Acc>(y[i]);
        bias += e * e;
    }
    Acc spread = 0;
    for (int k = 0; k < K; ++k) {
        for (int i = 0; i < n; ++i) {
            const Acc e =
                back_rotate_component<D>(o + k * o_step, m + k * m_step, c + k * c_step, n, i) - abar[i];
            spread += w ? w[k] * (e * e) : e * e;
        }
    }
    if (D > 0) {
        for (int i = 0; i < n; ++i) mean[i] = abar[i];
    }
    terms[0] = w ? total : total / static_cast<Acc>(K);
    terms[1] = bias;
    terms[2] = w ? spread : spread / static_cast<Acc>(K);
}

// One row of reduce_rows_backward: with g = (g_total, g_bias, g_spread) of the row's
// sample (zero for an invalid row),
//   dL/da_k = (2/K) (g_total (a_k - y) + g_bias (abar - y) + g_spread (a_k - abar))
//             + grad_mean / K                      (grad_mean may be null)
//   dL/dout_k = M_k dL/da_k                        written in out's type at go + k o_step.
// `work` holds n values of Acc (used only when D == 0). With weights w (null for 1/K each),
// 1/K is w_k and the spread term is g_spread (a_k - abar - (1 - S) abar), S = sum_k w_k
// (sum_k w_k (a_k - abar) = (1 - S) abar, zero for weights summing to one).
template <int D, typename Acc, typename TO, typename TY>
FE_HOST_DEVICE void reduce_row_backward(const TO* o, long long o_step, const Acc* m, long long m_step,
                                        const Acc* c, long long c_step, const TY* y, const Acc* abar,
                                        const Acc* grad_mean, Acc g_total, Acc g_bias, Acc g_spread, int K,
                                        int d, Acc* work, TO* go, const Acc* w = nullptr) {
    const int n = D > 0 ? D : d;
    Acc ga_reg[D > 0 ? D : 1];
    Acc* ga = D > 0 ? ga_reg : work;
    const Acc two_over_k = static_cast<Acc>(2.0 / K);
    Acc one_minus_s = 1;
    if (w) {
        for (int k = 0; k < K; ++k) one_minus_s -= w[k];
    }
    for (int k = 0; k < K; ++k) {
        const Acc* mk = m + k * m_step;
        for (int j = 0; j < n; ++j) {
            const Acc a = back_rotate_component<D>(o + k * o_step, mk, c + k * c_step, n, j);
            const Acc yj = to_acc<Acc>(y[j]);
            Acc v;
            if (w) {
                const Acc spread = a - abar[j] - one_minus_s * abar[j];
                v = (2 * w[k]) * (g_total * (a - yj) + g_bias * (abar[j] - yj) + g_spread * spread);
                if (grad_mean) v += w[k] * grad_mean[j];
            } else {
                v = two_over_k * (g_total * (a - yj) + g_bias * (abar[j] - yj) + g_spread * (a - abar[j]));
                if (grad_mean) v += grad_mean[j] / static_cast<Acc>(K);
            }
            ga[j] = v;
        }
        TO* gk = go + k * o_step;
        for (int i = 0; i < n; ++i) {
            Acc s = 0;
            for (int j = 0; j < n; ++j) s += mk[i * n + j] * ga[j];
            gk[i] = from_acc<TO>(s);
        }
    }
}

}  // namespace fastequiv
