// CPU kernels of the row contract: rotate_rows, rotate_rows_backward, reduce_rows and
// reduce_rows_backward. Each loops over rows (OpenMP, static schedule) and calls the
// per-row functions of kernels/twirl_math.cuh that the CUDA kernels call, with the row
// size fixed at compile time for d = 1 and d = 3. Rows of three (vectors, positions) go in
// tiles of runs of rows of one sample instead (RowTiles; *_tiled3), split into component
// arrays, where the loops vectorise.
//
// reduce_rows sums per sample: every thread adds its rows into its own (3, B) partial
// sums (in double), then the partials are added in thread order, so the result does not
// depend on timing.
//
// This file is compiled once per CPU variant (CMakeLists.txt): FASTEQUIV_CPU_VARIANT names
// the namespace of its entry points (cpu_default; cpu_avx2 with -mavx2 on x86-64), and
// csrc/cpu_dispatch.cpp picks one at run time. No variant enables FMA contraction, so they
// agree bit for bit.
#if !defined(FASTEQUIV_CPU_VARIANT)
#define FASTEQUIV_CPU_VARIANT cpu_default
#endif
#include <algorithm>
#include <vector>

#if defined(FASTEQUIV_OPENMP)
#include <omp.h>
#endif

#include "cpu_kernels.h"
#include "twirl_math.cuh"

namespace fastequiv {
namespace {

int max_threads() {
#if defined(FASTEQUIV_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int thread_id() {
#if defined(FASTEQUIV_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Below this many elements the threads cost more than they save.
constexpr int64_t kParallelElements = 1 << 15;

// Calls fn(float{}) or fn(double{}) for an f32 or f64 array.
template <typename Fn>
void with_float_type(Dtype t, Fn&& fn) {
    if (t == Dtype::f64) {
        fn(double{});
    } else {
        fn(float{});
    }
}

// Calls fn(std::integral_constant<int, D>) with D = d for d = 1 or 3, else D = 0 (run time).
template <int D>
struct RowDim {
    static constexpr int value = D;
};
template <typename Fn>
void with_row_dim(int d, Fn&& fn) {
    if (d == 3) {
        fn(RowDim<3>{});
    } else if (d == 1) {
        fn(RowDim<1>{});
    } else {
        fn(RowDim<0>{});
    }
}

const char* check_sample_indices(const RowLayout& L) {
    if (!L.sample) return nullptr;
    int64_t bad = 0;
    const bool parallel = L.N >= kParallelElements;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) reduction(+ : bad) if (parallel)
#endif
    for (int64_t r = 0; r < L.N; ++r) bad += (L.sample[r] < 0) | (L.sample[r] >= L.B);
    (void)parallel;
    return bad ? "sample: expected every index in [0, B) (B = M.shape[1])" : nullptr;
}

// The (3, B) sums of reduce_rows from every thread's partial sums (thread t's slice of
// `partial` starts at t * 3 * B), added in thread order so that timing does not change them.
template <typename Acc>
void combine_partials(const std::vector<double>& partial, int threads, int64_t B, Acc* sums) {
    for (int64_t q = 0; q < 3 * B; ++q) {
        double v = 0.0;
        for (int t = 0; t < threads; ++t) v += partial[static_cast<size_t>(t) * 3 * B + q];
        sums[q] = static_cast<Acc>(v);
    }
}

// Rows in tiles of at most T, each cut into runs of rows of one sample: fn(s, r0, n) for
// rows r0 .. r0 + n - 1 of sample s. Dense layout (P rows a sample, the last sample maybe
// short): a tile is part of one sample. Graph layout: tile t is rows t T .. t T + T - 1,
// cut where the sample index changes (a sorted batch index, as PyG and MACE batches have,
// gives one or two runs a tile; an unsorted one runs of a few rows).
struct RowTiles {
    const int64_t* sample;
    int64_t N, P, T, per_sample, count;
    RowTiles(const RowLayout& L, int64_t tile)
        : sample(L.sample), N(L.N), P(L.P), T(tile),
          per_sample(L.sample ? 1 : (L.P + tile - 1) / tile),
          count(L.sample ? (L.N + tile - 1) / tile : std::min(L.B, (L.N + L.P - 1) / L.P) * per_sample) {}
    template <typename Fn>
    void each(int64_t t, Fn&& fn) const {
        if (!sample) {
            const int64_t s = t / per_sample, r0 = s * P + (t % per_sample) * T;
            fn(s, r0, static_cast<int>(std::min({r0 + T, (s + 1) * P, N}) - r0));
            return;
        }
        const int64_t end = std::min(t * T + T, N);
        for (int64_t r = t * T; r < end;) {
            const int64_t s = sample[r];
            int64_t q = r + 1;
            while (q < end && sample[q] == s) ++q;
            fn(s, r, static_cast<int>(q - r));
            r = q;
        }
    }
};

// Whether the tiled kernels suit this layout: rows of three, dense, or a graph batch whose
// sample index comes in runs (sorted, as PyG and MACE batches are). Judged on the first
// rows; an unsorted index (runs of one or two rows) goes row by row, which is faster there.
bool tiled3(const RowLayout& L) {
    if (L.d != 3) return false;
    if (!L.sample) return L.P > 0;  // P = 0: no rows at all
    const int64_t n = std::min<int64_t>(L.N, 8192);
    int64_t runs = n > 0;
    for (int64_t r = 1; r < n; ++r) runs += L.sample[r] != L.sample[r - 1];
    return runs * 8 <= n;  // runs of 8 rows or more on average
}

// Tiles of rows of three as component arrays (the tiled kernels' layout): split3 reads n
// interleaved rows minus the centre c into u[0..3)[0..n); join3 writes them back
// interleaved in T's type; back_rotate3 is component i of M^T u + c for the n rows, in
// back_rotate_component's order.
template <int T, typename Acc, typename X>
void split3(const X* rows, const Acc* c, int n, Acc (&u)[3][T]) {
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < 3; ++i) u[i][j] = to_acc<Acc>(rows[j * 3 + i]) - c[i];
    }
}

template <int T, typename Acc, typename X>
void join3(const Acc (&v)[3][T], int n, X* rows) {
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < 3; ++i) rows[j * 3 + i] = from_acc<X>(v[i][j]);
    }
}

template <int T, typename Acc>
void back_rotate3(const Acc* m, const Acc* c, const Acc (&u)[3][T], int n, int i, Acc* a) {
    const Acc m0 = m[i], m1 = m[3 + i], m2 = m[6 + i], ci = c[i];
    for (int j = 0; j < n; ++j) {
        Acc v = 0;
        v += m0 * u[0][j];
        v += m1 * u[1][j];
        v += m2 * u[2][j];
        a[j] = v + ci;
    }
}

template <int D, typename TX, typename Acc>
void rotate_rows_impl(const RotateRowsArgs& a) {
    const RowLayout L = a.rows;
    const int d = L.d;
    const TX* x = static_cast<const TX*>(a.x);
    const Acc* M = static_cast<const Acc*>(a.M);
    const Acc* c = static_cast<const Acc*>(a.center);
    TX* out = static_cast<TX*>(a.out);
    const bool parallel = L.K * L.N * d >= kParallelElements;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t r = 0; r < L.N; ++r) {
        const int64_t s = row_sample(r, L.sample, L.P);
        for (int64_t k = 0; k < L.K; ++k) {
            rotate_row<D>(x + r * d, M + (k * L.B + s) * d * d, c + s * d, d, out + (k * L.N + r) * d);
        }
    }
    (void)parallel;
}

// rotate_rows for rows of three components, in tiles of runs of rows of one sample. A tile's
// rows are split into three component arrays once (minus the centre) and reused for every
// copy: the loops over the tile's rows then vectorise, where a loop over rows of three
// interleaved components does not. The arithmetic per element is rotate_row's, in its order.
template <typename TX, typename Acc>
void rotate_rows_tiled3(const RotateRowsArgs& a) {
    constexpr int T = 256;
    const RowLayout L = a.rows;
    const int64_t N = L.N, B = L.B, K = L.K;
    const TX* x = static_cast<const TX*>(a.x);
    const Acc* M = static_cast<const Acc*>(a.M);
    const Acc* c = static_cast<const Acc*>(a.center);
    TX* out = static_cast<TX*>(a.out);
    const RowTiles tiles(L, T);
    const bool parallel = K * N * 3 >= kParallelElements;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel if (parallel)
#endif
    {
        Acc u[3][T], y[3][T];
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < tiles.count; ++t) {
            tiles.each(t, [&](int64_t s, int64_t r0, int n) {
                const Acc* cs = c + s * 3;
                split3(x + r0 * 3, cs, n, u);
                for (int64_t k = 0; k < K; ++k) {
                    const Acc* mk = M + (k * B + s) * 9;
                    for (int i = 0; i < 3; ++i) {  // row i of M (x - c) + c, in rotate_row's order
                        const Acc m0 = mk[i * 3], m1 = mk[i * 3 + 1], m2 = mk[i * 3 + 2], ci = cs[i];
                        for (int j = 0; j < n; ++j) {
                            Acc v = 0;
                            v += m0 * u[0][j];
                            v += m1 * u[1][j];
                            v += m2 * u[2][j];
                            y[i][j] = v + ci;
                        }
                    }
                    join3(y, n, out + (k * N + r0) * 3);
                }
            });
        }
    }
    (void)parallel;
}

template <int D, typename TG, typename Acc>
void rotate_rows_backward_impl(const RotateRowsBackwardArgs& a) {
    const RowLayout L = a.rows;
    const int d = L.d;
    const TG* grad = static_cast<const TG*>(a.grad);
    const Acc* M = static_cast<const Acc*>(a.M);
    Acc* out = static_cast<Acc*>(a.out);
    const bool parallel = L.K * L.N * d >= kParallelElements;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t r = 0; r < L.N; ++r) {
        const int64_t s = row_sample(r, L.sample, L.P);
        rotate_row_backward<D>(grad + r * d, L.N * d, M + s * d * d, L.B * d * d, static_cast<int>(L.K), d,
                               out + r * d);
    }
    (void)parallel;
}

// reduce_rows for rows of three components, in tiles of runs of rows of one sample. Each
// copy's rows are split into component arrays and back-rotated once (the loops over the
// tile's rows vectorise); the K back-rotated tiles stay in a per-thread buffer for the
// second pass (the deviations from the twirled mean, so the spread has no cancellation).
// The arithmetic per element is back_rotate_component's, in its order.
template <typename TO, typename TY, typename Acc>
void reduce_rows_tiled3(const ReduceRowsArgs& a) {
    constexpr int T = 128;
    const RowLayout L = a.rows;
    const int64_t N = L.N, B = L.B, K = L.K;
    const TO* out = static_cast<const TO*>(a.out);
    const Acc* M = static_cast<const Acc*>(a.M);
    const TY* y = static_cast<const TY*>(a.target);
    const Acc* c = static_cast<const Acc*>(a.center);
    Acc* mean = static_cast<Acc*>(a.mean);
    Acc* sums = static_cast<Acc*>(a.sums);
    const RowTiles tiles(L, T);
    const bool parallel = K * N * 3 >= kParallelElements;
    const int nt = parallel ? max_threads() : 1;
    std::vector<double> partial(static_cast<size_t>(nt) * 3 * B, 0.0);
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel num_threads(nt) if (parallel)
#endif
    {
        double* local = partial.data() + static_cast<size_t>(thread_id()) * 3 * B;
        std::vector<Acc> back(static_cast<size_t>(K) * 3 * T);  // the K back-rotated tiles
        Acc abar[3][T], yt[3][T], u[3][T], total[T], spread[T];
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < tiles.count; ++t) {
            tiles.each(t, [&](int64_t s, int64_t r0, int n) {
                for (int j = 0; j < n; ++j) {
                    for (int i = 0; i < 3; ++i) {
                        abar[i][j] = 0;
                        yt[i][j] = to_acc<Acc>(y[(r0 + j) * 3 + i]);
                    }
                    total[j] = 0;
                    spread[j] = 0;
                }
                for (int64_t k = 0; k < K; ++k) {
                    const Acc* mk = M + (k * B + s) * 9;
                    const Acc* ck = c + (k * B + s) * 3;
                    split3(out + (k * N + r0) * 3, ck, n, u);
                    Acc* bk = back.data() + k * 3 * T;
                    for (int i = 0; i < 3; ++i) {
                        Acc* bi = bk + i * T;
                        back_rotate3(mk, ck, u, n, i, bi);
                        for (int j = 0; j < n; ++j) abar[i][j] += bi[j];
                    }
                    for (int j = 0; j < n; ++j) {
                        Acc e2 = 0;
                        for (int i = 0; i < 3; ++i) e2 += (bk[i * T + j] - yt[i][j]) * (bk[i * T + j] - yt[i][j]);
                        total[j] += e2;
                    }
                }
                const Acc inv_k = Acc(1) / static_cast<Acc>(K);
                for (int i = 0; i < 3; ++i) {
                    for (int j = 0; j < n; ++j) abar[i][j] *= inv_k;
                }
                join3(abar, n, mean + r0 * 3);
                for (int64_t k = 0; k < K; ++k) {
                    const Acc* bk = back.data() + k * 3 * T;
                    for (int j = 0; j < n; ++j) {
                        Acc e2 = 0;
                        for (int i = 0; i < 3; ++i) e2 += (bk[i * T + j] - abar[i][j]) * (bk[i * T + j] - abar[i][j]);
                        spread[j] += e2;
                    }
                }
                double t_sum = 0, b_sum = 0, s_sum = 0;
                for (int j = 0; j < n; ++j) {
                    if (a.valid && !a.valid[r0 + j]) continue;
                    Acc bias = 0;
                    for (int i = 0; i < 3; ++i) bias += (abar[i][j] - yt[i][j]) * (abar[i][j] - yt[i][j]);
                    t_sum += total[j] * inv_k;
                    b_sum += bias;
                    s_sum += spread[j] * inv_k;
                }
                local[s] += t_sum;
                local[B + s] += b_sum;
                local[2 * B + s] += s_sum;
            });
        }
    }
    combine_partials(partial, nt, B, sums);
}

template <int D, typename TO, typename TY, typename Acc>
void reduce_rows_impl(const ReduceRowsArgs& a) {
    const RowLayout L = a.rows;
    const int d = L.d;
    const int64_t B = L.B;
    const TO* out = static_cast<const TO*>(a.out);
    const Acc* M = static_cast<const Acc*>(a.M);
    const TY* y = static_cast<const TY*>(a.target);
    const Acc* c = static_cast<const Acc*>(a.center);
    Acc* mean = static_cast<Acc*>(a.mean);
    Acc* sums = static_cast<Acc*>(a.sums);
    const Acc* w = static_cast<const Acc*>(a.weights);
    const bool parallel = L.K * L.N * d >= kParallelElements;
    const int nt = parallel ? max_threads() : 1;
    std::vector<double> partial(static_cast<size_t>(nt) * 3 * B, 0.0);
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel num_threads(nt) if (parallel)
#endif
    {
        double* local = partial.data() + static_cast<size_t>(thread_id()) * 3 * B;
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < L.N; ++r) {
            const int64_t s = row_sample(r, L.sample, L.P);
            Acc terms[3];
            reduce_row<D>(out + r * d, L.N * d, M + s * d * d, B * d * d, c + s * d, B * d, y + r * d,
                          static_cast<int>(L.K), d, mean + r * d, terms, w);
            if (!a.valid || a.valid[r]) {
                local[s] += terms[0];
                local[B + s] += terms[1];
                local[2 * B + s] += terms[2];
            }
        }
    }
    combine_partials(partial, nt, B, sums);
}

// reduce_rows_backward for rows of three components, in tiles of runs of rows of one sample,
// as component arrays (see rotate_rows_tiled3): the target, the twirled mean, grad_mean and
// each copy's rows are split once, and the loops over the tile's rows vectorise. The
// arithmetic per element is reduce_row_backward's, in its order.
template <typename TO, typename TY, typename Acc>
void reduce_rows_backward_tiled3(const ReduceRowsBackwardArgs& a) {
    constexpr int T = 128;
    const RowLayout L = a.rows;
    const int64_t N = L.N, B = L.B, K = L.K;
    const TO* out = static_cast<const TO*>(a.out);
    const Acc* M = static_cast<const Acc*>(a.M);
    const TY* y = static_cast<const TY*>(a.target);
    const Acc* c = static_cast<const Acc*>(a.center);
    const Acc* mean = static_cast<const Acc*>(a.mean);
    const Acc* gm = static_cast<const Acc*>(a.grad_mean);
    const Acc* gs = static_cast<const Acc*>(a.grad_sums);
    TO* go = static_cast<TO*>(a.grad_out);
    const RowTiles tiles(L, T);
    const bool parallel = K * N * 3 >= kParallelElements;
    const Acc two_over_k = static_cast<Acc>(2.0 / K);
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel if (parallel)
#endif
    {
        Acc yt[3][T], ab[3][T], gmk[3][T], g0[T], g1[T], g2[T], u[3][T], ga[3][T];
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < tiles.count; ++t) {
            tiles.each(t, [&](int64_t s, int64_t r0, int n) {
                for (int j = 0; j < n; ++j) {
                    const bool valid = !a.valid || a.valid[r0 + j];
                    g0[j] = valid ? gs[s] : Acc(0);
                    g1[j] = valid ? gs[B + s] : Acc(0);
                    g2[j] = valid ? gs[2 * B + s] : Acc(0);
                    for (int i = 0; i < 3; ++i) {
                        yt[i][j] = to_acc<Acc>(y[(r0 + j) * 3 + i]);
                        ab[i][j] = mean[(r0 + j) * 3 + i];
                        gmk[i][j] = gm ? gm[(r0 + j) * 3 + i] / static_cast<Acc>(K) : Acc(0);
                    }
                }
                for (int64_t k = 0; k < K; ++k) {
                    const Acc* mk = M + (k * B + s) * 9;
                    const Acc* ck = c + (k * B + s) * 3;
                    split3(out + (k * N + r0) * 3, ck, n, u);
                    for (int i = 0; i < 3; ++i) {
                        back_rotate3(mk, ck, u, n, i, ga[i]);  // a_k, then dL/da_k in place
                        for (int j = 0; j < n; ++j) {
                            const Acc av = ga[i][j];
                            Acc v = two_over_k * (g0[j] * (av - yt[i][j]) + g1[j] * (ab[i][j] - yt[i][j]) +
                                                  g2[j] * (av - ab[i][j]));
                            if (gm) v += gmk[i][j];
                            ga[i][j] = v;
                        }
                    }
                    for (int i = 0; i < 3; ++i) {
                        const Acc m0 = mk[i * 3], m1 = mk[i * 3 + 1], m2 = mk[i * 3 + 2];
                        for (int j = 0; j < n; ++j) {
                            Acc v = 0;
                            v += m0 * ga[0][j];
                            v += m1 * ga[1][j];
                            v += m2 * ga[2][j];
                            u[i][j] = v;  // u is free again: the gradient, component-wise
                        }
                    }
                    join3(u, n, go + (k * N + r0) * 3);
                }
            });
        }
    }
    (void)parallel;
}

template <int D, typename TO, typename TY, typename Acc>
void reduce_rows_backward_impl(const ReduceRowsBackwardArgs& a) {
    const RowLayout L = a.rows;
    const int d = L.d;
    const int64_t B = L.B;
    const TO* out = static_cast<const TO*>(a.out);
    const Acc* M = static_cast<const Acc*>(a.M);
    const TY* y = static_cast<const TY*>(a.target);
    const Acc* c = static_cast<const Acc*>(a.center);
    const Acc* mean = static_cast<const Acc*>(a.mean);
    const Acc* gm = static_cast<const Acc*>(a.grad_mean);
    const Acc* gs = static_cast<const Acc*>(a.grad_sums);
    TO* go = static_cast<TO*>(a.grad_out);
    const Acc* w = static_cast<const Acc*>(a.weights);
    const bool parallel = L.K * L.N * d >= kParallelElements;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel if (parallel)
#endif
    {
        std::vector<Acc> work(D > 0 ? 1 : d);
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < L.N; ++r) {
            const int64_t s = row_sample(r, L.sample, L.P);
            const bool ok = !a.valid || a.valid[r];
            const Acc g0 = ok ? gs[s] : Acc(0), g1 = ok ? gs[B + s] : Acc(0), g2 = ok ? gs[2 * B + s] : Acc(0);
            reduce_row_backward<D>(out + r * d, L.N * d, M + s * d * d, B * d * d, c + s * d, B * d, y + r * d,
                                   mean + r * d, gm ? gm + r * d : nullptr, g0, g1, g2, static_cast<int>(L.K), d,
                                   work.data(), go + r * d, w);
        }
    }
    (void)parallel;
}

}  // namespace

namespace FASTEQUIV_CPU_VARIANT {

const char* rotate_rows_cpu(const RotateRowsArgs& a) {
    if (const char* err = check_sample_indices(a.rows)) return err;
    with_float_type(a.x_type, [&](auto tx) {
        with_float_type(a.acc_type, [&](auto acc) {
            if (tiled3(a.rows)) {
                rotate_rows_tiled3<decltype(tx), decltype(acc)>(a);
                return;
            }
            with_row_dim(a.rows.d, [&](auto D) {
                rotate_rows_impl<decltype(D)::value, decltype(tx), decltype(acc)>(a);
            });
        });
    });
    return nullptr;
}

const char* rotate_rows_backward_cpu(const RotateRowsBackwardArgs& a) {
    if (const char* err = check_sample_indices(a.rows)) return err;
    with_float_type(a.grad_type, [&](auto tg) {
        with_float_type(a.acc_type, [&](auto acc) {
            with_row_dim(a.rows.d, [&](auto D) {
                rotate_rows_backward_impl<decltype(D)::value, decltype(tg), decltype(acc)>(a);
            });
        });
    });
    return nullptr;
}

const char* reduce_rows_cpu(const ReduceRowsArgs& a) {
    if (const char* err = check_sample_indices(a.rows)) return err;
    with_float_type(a.out_type, [&](auto to) {
        with_float_type(a.target_type, [&](auto ty) {
            with_float_type(a.acc_type, [&](auto acc) {
                if (tiled3(a.rows) && !a.weights) {  // weighted calls take the row-at-a-time path
                    reduce_rows_tiled3<decltype(to), decltype(ty), decltype(acc)>(a);
                    return;
                }
                with_row_dim(a.rows.d, [&](auto D) {
                    reduce_rows_impl<decltype(D)::value, decltype(to), decltype(ty), decltype(acc)>(a);
                });
            });
        });
    });
    return nullptr;
}

const char* reduce_rows_backward_cpu(const ReduceRowsBackwardArgs& a) {
    if (const char* err = check_sample_indices(a.rows)) return err;
    with_float_type(a.out_type, [&](auto to) {
        with_float_type(a.target_type, [&](auto ty) {
            with_float_type(a.acc_type, [&](auto acc) {
                if (tiled3(a.rows) && !a.weights) {
                    reduce_rows_backward_tiled3<decltype(to), decltype(ty), decltype(acc)>(a);
                    return;
                }
                with_row_dim(a.rows.d, [&](auto D) {
                    reduce_rows_backward_impl<decltype(D)::value, decltype(to), decltype(ty), decltype(acc)>(a);
                });
            });
        });
    });
    return nullptr;
}

}  // namespace FASTEQUIV_CPU_VARIANT
}  // namespace fastequiv
