// The estimators of fastequiv/estimators.py (decompose, combine) on the CPU, from the
// per-sample sums reduce_rows leaves, for every output head of a call and their weighted
// sum at once; and the gradient of the batch means L_total and L_equiv with respect to
// those sums (what twirl_loss differentiates).
//
// Per sample, every value is the float expression estimators.py evaluates, in its order
// and in the accumulation type T (a Python float factor such as K / (K - 1) or a loss
// weight is rounded to T first, as torch does with a scalar operand), so the per-sample
// terms and the gradients equal the torch estimators' bit for bit. The batch means and
// standard errors are accumulated in double and rounded once: torch adds float32 in an
// order of its own (vectorised, machine-dependent), so the two agree to rounding only.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace fastequiv {
namespace {

template <typename T>
struct Heads {
    const DecomposeArgs& a;
    int D;  // decompositions: the heads' and, when combining, the top level (slot 0)
    int first;  // slot of head 0
    Heads(const DecomposeArgs& args) : a(args), D(args.combine ? args.H + 1 : 1), first(args.combine ? 1 : 0) {}
    T* per_sample(int slot, int term) const { return static_cast<T*>(a.per_sample) + (slot * 3 + term) * a.B; }
    const T* sums(int h, int term) const { return static_cast<const T*>(a.sums) + (h * 3 + term) * a.B; }
    T* count(int h) const { return static_cast<T*>(a.count) + h * a.B; }
};

// The valid elements of each sample of head h (d per valid row), exact in int64.
const char* count_elements(const DecomposeArgs& a, int h, std::vector<int64_t>& n) {
    n.assign(static_cast<size_t>(a.B), 0);
    const int64_t* sample = a.sample[h];
    const uint8_t* valid = a.valid[h];
    const int64_t P = a.P[h] > 0 ? a.P[h] : 1;
    for (int64_t r = 0; r < a.N[h]; ++r) {
        if (valid && !valid[r]) continue;
        const int64_t s = sample ? sample[r] : r / P;
        if (s < 0 || s >= a.B) return "sample: expected every index in [0, B)";
        n[static_cast<size_t>(s)] += a.d[h];
    }
    return nullptr;
}

// Means and standard errors of the valid samples of one decomposition (estimators'
// _batch_stats), in double, rounded once; pct = equiv / total of the rounded means.
template <typename T>
void batch_stats(const T* total, const T* mean, const T* equiv, const uint8_t* valid, int64_t B, T* out) {
    const T* terms[3] = {total, mean, equiv};
    double n = 0;
    for (int64_t b = 0; b < B; ++b) n += valid[b] ? 1.0 : 0.0;
    for (int t = 0; t < 3; ++t) {
        double sum = 0;
        for (int64_t b = 0; b < B; ++b) {
            if (valid[b]) sum += static_cast<double>(terms[t][b]);
        }
        const double m = sum / n;
        double ss = 0;
        for (int64_t b = 0; b < B; ++b) {
            if (valid[b]) {
                const double e = static_cast<double>(terms[t][b]) - m;
                ss += e * e;
            }
        }
        out[t] = static_cast<T>(m);
        out[4 + t] = static_cast<T>(std::sqrt(ss / (n - 1) / n));  // nan for one sample: honest
    }
    out[3] = out[2] / out[0];
}

// combined_per_sample's factors: n / n_h for each head, n the samples valid in any head
// (any, B) and n_h those valid in head h (valid, H x B); n itself into n_any.
template <typename T>
std::vector<T> head_ratios(const uint8_t* any, const uint8_t* valid, int H, int64_t B, T* n_any) {
    T n = 0;
    for (int64_t b = 0; b < B; ++b) n += any[b] ? T(1) : T(0);
    std::vector<T> ratio(static_cast<size_t>(H));
    for (int h = 0; h < H; ++h) {
        T n_h = 0;
        for (int64_t b = 0; b < B; ++b) n_h += valid[h * B + b] ? T(1) : T(0);
        ratio[h] = n / n_h;
    }
    *n_any = n;
    return ratio;
}

// The samples that count, out to the caller: the top level's, then each head's when combining.
void write_valid(const DecomposeArgs& a, const uint8_t* top_valid, const std::vector<uint8_t>& valid) {
    if (!a.valid_out) return;
    for (int64_t b = 0; b < a.B; ++b) a.valid_out[b] = top_valid[b];
    if (a.combine) {
        for (int64_t q = 0; q < static_cast<int64_t>(a.H) * a.B; ++q) a.valid_out[a.B + q] = valid[q];
    }
}

// The backward's first steps, shared by both estimators: d/dv of the top level's batch means
// g_total L_total + g_equiv L_equiv is g / n on the samples valid in any head; through the
// combination, times n / n_h, then times w_h, on head h's valid samples. shares(h, ...) gives
// head h's (dt, de) per sample, with respect to its per-sample total and equiv.
template <typename T>
struct TopGrad {
    const Heads<T>& hs;
    std::vector<uint8_t> any, valid;
    std::vector<T> ratio;
    T gt, ge;
    TopGrad(const Heads<T>& heads, T g_total, T g_equiv)
        : hs(heads), any(static_cast<size_t>(heads.a.B), 0), valid(static_cast<size_t>(heads.a.H) * heads.a.B) {
        const int64_t B = hs.a.B;
        for (int h = 0; h < hs.a.H; ++h) {
            for (int64_t b = 0; b < B; ++b) {
                valid[h * B + b] = hs.count(h)[b] > T(0);
                any[b] |= valid[h * B + b];
            }
        }
        T n_any;
        ratio = head_ratios(any.data(), valid.data(), hs.a.H, B, &n_any);
        gt = g_total / n_any;
        ge = g_equiv / n_any;
    }
    void shares(int h, T* dt, T* de) const {
        const int64_t B = hs.a.B;
        const T w = static_cast<T>(hs.a.weight[h]);
        for (int64_t b = 0; b < B; ++b) {
            const bool top = any[b] != 0, mine = valid[h * B + b] != 0;
            dt[b] = top ? gt : T(0);
            de[b] = top ? ge : T(0);
            if (hs.a.combine) {
                dt[b] = mine ? (dt[b] * ratio[h]) * w : T(0);
                de[b] = mine ? (de[b] * ratio[h]) * w : T(0);
            }
        }
    }
};

template <typename T>
const char* decompose_impl(const DecomposeArgs& a, uint64_t* flags) {
    const Heads<T> hs(a);
    const int64_t B = a.B;
    const int H = a.H;
    std::vector<int64_t> n;
    std::vector<uint8_t> valid(static_cast<size_t>(H) * B), any(static_cast<size_t>(B), 0);
    const T kf = static_cast<T>(static_cast<double>(a.K) / static_cast<double>(a.K - 1));
    const T k1 = static_cast<T>(a.K - 1);
    *flags = 0;
    for (int h = 0; h < H; ++h) {
        if (const char* err = count_elements(a, h, n)) return err;
        const int slot = hs.first + h;
        T* total = hs.per_sample(slot, 0);
        T* mean = hs.per_sample(slot, 1);
        T* equiv = hs.per_sample(slot, 2);
        bool some = false, finite = true;
        for (int64_t b = 0; b < B; ++b) {
            const T count = static_cast<T>(n[b]);
            const T nb = count < T(1) ? T(1) : count;  // clamp_min(1)
            const T t = hs.sums(h, 0)[b] / nb, bias = hs.sums(h, 1)[b] / nb, spread = hs.sums(h, 2)[b] / nb;
            hs.count(h)[b] = count;
            total[b] = t;
            if (a.exhaustive) {
                equiv[b] = spread;
                mean[b] = bias;
            } else {
                equiv[b] = spread * kf;
                mean[b] = bias - spread / k1;
            }
            const uint8_t v = n[b] > 0;
            valid[h * B + b] = v;
            any[b] |= v;
            some |= v != 0;
            finite &= std::isfinite(t);
        }
        *flags |= (static_cast<uint64_t>(some) | (static_cast<uint64_t>(finite) << 1)) << (2 * h);
        if (a.combine) batch_stats(total, mean, equiv, valid.data() + h * B, B, static_cast<T*>(a.scalars) + 7 * slot);
    }
    const uint8_t* top_valid = a.combine ? any.data() : valid.data();
    if (a.combine) {
        // combined_per_sample: sum_h (w_h * where(valid_h, x_h, 0)) * (n / n_h), head by head
        T n_any;
        const std::vector<T> ratio = head_ratios(any.data(), valid.data(), H, B, &n_any);
        for (int t = 0; t < 3; ++t) {
            T* top = hs.per_sample(0, t);
            for (int64_t b = 0; b < B; ++b) top[b] = T(0);
            for (int h = 0; h < H; ++h) {
                const T w = static_cast<T>(a.weight[h]);
                const T* x = hs.per_sample(hs.first + h, t);
                for (int64_t b = 0; b < B; ++b) top[b] = top[b] + (w * (valid[h * B + b] ? x[b] : T(0))) * ratio[h];
            }
        }
    }
    batch_stats(hs.per_sample(0, 0), hs.per_sample(0, 1), hs.per_sample(0, 2), top_valid, B,
                static_cast<T*>(a.scalars));
    write_valid(a, top_valid, valid);
    return nullptr;
}

// The gradient chain torch's autograd runs through estimators.py, step by step: d/dv of
// v.sum() / n is 1 / n on the valid samples; through the combination, times n / n_h, then
// times w_h, on the head's valid samples; through equiv = spread * K / (K - 1), times that
// factor; through total = sums[0] / clamp_min(count, 1), divided by it.
template <typename T>
void decompose_backward_impl(const DecomposeArgs& a, T g_total, T g_equiv, T* grad_sums) {
    const Heads<T> hs(a);
    const int64_t B = a.B;
    const int H = a.H;
    const T kf = static_cast<T>(static_cast<double>(a.K) / static_cast<double>(a.K - 1));
    const TopGrad<T> top(hs, g_total, g_equiv);
    std::vector<T> dt(static_cast<size_t>(B)), de(static_cast<size_t>(B));
    for (int h = 0; h < H; ++h) {
        const T* count = hs.count(h);
        top.shares(h, dt.data(), de.data());
        T* g = grad_sums + h * 3 * B;
        for (int64_t b = 0; b < B; ++b) {
            const T e = a.exhaustive ? de[b] : de[b] * kf;
            const T nb = count[b] < T(1) ? T(1) : count[b];
            g[b] = dt[b] / nb;
            g[B + b] = T(0);
            g[2 * B + b] = e / nb;
        }
    }
}

// --- rotation designs (fastequiv/design_twirl.py) ------------------------------------------
//
// The randomised-design estimators of Replicates.terms and jackknife, design_twirl.assemble and
// jackknife_stderr, from R replicates of a K-rotation design: each head's reduce_rows sums
// (weighted) and twirled means of every replicate. Per sample, every value is the float
// expression of design_twirl.py in its order and in T, but the sums over a sample's elements,
// which are added in double and rounded once (torch adds them in an order of its own), so the
// two agree to rounding. The batch means and standard errors are batch_stats'.

template <typename T>
struct Design {
    const DecomposeArgs& a;
    int64_t R;
    const void* const* mean;    // (H,) (R, N, d) T: each replicate's twirled mean
    const void* const* target;  // (H,) (N, d) T
    const T* sums(int h, int64_t r, int term) const {
        return static_cast<const T*>(a.sums) + ((h * R + r) * 3 + term) * a.B;
    }
};

// jackknife_stderr of the (R, B) leave-one-out values jack over the valid samples.
template <typename T>
T jackknife_stderr(const std::vector<T>& jack, int64_t R, int64_t B, const uint8_t* valid) {
    if (R < 3) return static_cast<T>(NAN);
    const T factor = static_cast<T>(static_cast<double>(R - 1) / static_cast<double>(R));
    double sum = 0, n = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (!valid[b]) continue;
        T m = 0;
        for (int64_t r = 0; r < R; ++r) m += jack[r * B + b];
        m = m / static_cast<T>(R);
        T ss = 0;
        for (int64_t r = 0; r < R; ++r) ss += (jack[r * B + b] - m) * (jack[r * B + b] - m);
        sum += static_cast<double>(factor * ss);
        n += 1;
    }
    return std::sqrt(static_cast<T>(sum)) / static_cast<T>(n);
}

// One head's per-sample design terms (total, mean, equiv into out, count into n) and, for
// R >= 3, its leave-one-out terms jack (3, R, B).
template <typename T>
const char* design_head(const Design<T>& D, int h, std::vector<int64_t>& n, T* out, std::vector<T>& jack) {
    const DecomposeArgs& a = D.a;
    const int64_t B = a.B, R = D.R, N = a.N[h];
    const int d = a.d[h];
    if (const char* err = count_elements(a, h, n)) return err;
    const T* mean = static_cast<const T*>(D.mean[h]);
    const T* y = static_cast<const T*>(D.target[h]);
    const int64_t* sample = a.sample[h];
    const uint8_t* valid = a.valid[h];
    const int64_t P = a.P[h] > 0 ? a.P[h] : 1;
    const bool jackknife = R >= 3;
    // sums over each sample's valid elements: Q (R, B) of |u_r - ubar|^2 (of u_0^2 for R = 1),
    // U (B) of |ubar|^2; left out j: QJ (R, R, B), UJ (R, B)
    std::vector<double> Q(static_cast<size_t>(R * B), 0.0), U(static_cast<size_t>(B), 0.0);
    std::vector<double> QJ(jackknife ? static_cast<size_t>(R * R * B) : 0, 0.0);
    std::vector<double> UJ(jackknife ? static_cast<size_t>(R * B) : 0, 0.0);
    std::vector<T> u(static_cast<size_t>(R));
    for (int64_t row = 0; row < N; ++row) {
        if (valid && !valid[row]) continue;
        const int64_t s = sample ? sample[row] : row / P;
        for (int i = 0; i < d; ++i) {
            const int64_t e = row * d + i;
            T sum = 0;
            for (int64_t r = 0; r < R; ++r) {
                u[r] = mean[r * N * d + e] - y[e];
                sum += u[r];
            }
            if (R == 1) {
                U[s] += static_cast<double>(u[0] * u[0]);
            } else {
                const T ubar = sum / static_cast<T>(R);
                for (int64_t r = 0; r < R; ++r) Q[r * B + s] += static_cast<double>((u[r] - ubar) * (u[r] - ubar));
                U[s] += static_cast<double>(ubar * ubar);
            }
            if (!jackknife) continue;
            for (int64_t j = 0; j < R; ++j) {
                T sj = 0;
                for (int64_t r = 0; r < R; ++r) {
                    if (r != j) sj += u[r];
                }
                const T ubj = sj / static_cast<T>(R - 1);
                for (int64_t r = 0; r < R; ++r) {
                    if (r != j) QJ[(j * R + r) * B + s] += static_cast<double>((u[r] - ubj) * (u[r] - ubj));
                }
                UJ[j * B + s] += static_cast<double>(ubj * ubj);
            }
        }
    }
    // Replicates.terms(keep): means over the kept replicates of T_r and W_r; s from Q
    auto terms = [&](int64_t left_out, int64_t b, T nb, T* t) {
        const int64_t k = left_out < 0 ? R : R - 1;
        T total = 0, within = 0, s = 0;
        for (int64_t r = 0; r < R; ++r) {
            if (r == left_out) continue;
            total += D.sums(h, r, 0)[b] / nb;
            within += D.sums(h, r, 2)[b] / nb;
            const double q = left_out < 0 ? Q[r * B + b] : QJ[(left_out * R + r) * B + b];
            s += static_cast<T>(q) / nb;
        }
        total = total / static_cast<T>(k);
        within = within / static_cast<T>(k);
        const T usum = static_cast<T>(left_out < 0 ? U[b] : UJ[left_out * B + b]);
        t[0] = total;
        if (k == 1) {
            t[1] = usum / nb;
            t[2] = within;
            return;
        }
        s = s / static_cast<T>(k);
        t[1] = usum / nb - s / static_cast<T>(k - 1);
        t[2] = within + s * static_cast<T>(k) / static_cast<T>(k - 1);
    };
    for (int64_t b = 0; b < B; ++b) {
        const T count = static_cast<T>(n[b]);
        const T nb = count < T(1) ? T(1) : count;
        T t[3];
        terms(-1, b, nb, t);
        for (int q = 0; q < 3; ++q) out[q * B + b] = t[q];
        if (!jackknife) continue;
        for (int64_t j = 0; j < R; ++j) {
            terms(j, b, nb, t);
            for (int q = 0; q < 3; ++q) jack[(q * R + j) * B + b] = t[q];
        }
    }
    return nullptr;
}

// label_free's rel, its standard error and the per-sample ratios of one slot.
template <typename T>
void label_free_slot(const T* per_sample, const T* scalars, const uint8_t* valid, int64_t B, T* rel, T* se_rel,
                     T* per_rel) {
    const T* n = per_sample + B;
    const T* e = per_sample + 2 * B;
    const T r = scalars[2] / scalars[1];
    double ss = 0, count = 0;
    for (int64_t b = 0; b < B; ++b) {
        per_rel[b] = valid[b] ? e[b] / n[b] : T(0);
        if (!valid[b]) continue;
        const T resid = e[b] - r * n[b];
        ss += static_cast<double>(resid * resid);
        count += 1;
    }
    const T c = static_cast<T>(count);
    *rel = r;
    *se_rel = std::sqrt(static_cast<T>(ss) / (c * (c - T(1)))) / std::abs(scalars[1]);
}

template <typename T>
const char* design_decompose_impl(const Design<T>& D, bool labelled, uint64_t* flags) {
    const DecomposeArgs& a = D.a;
    const Heads<T> hs(a);
    const int64_t B = a.B, R = D.R;
    const int H = a.H, slots = hs.D;
    std::vector<int64_t> n;
    std::vector<uint8_t> valid(static_cast<size_t>(H) * B), any(static_cast<size_t>(B), 0);
    std::vector<T> jack(static_cast<size_t>(H) * 3 * R * B);  // (H, 3, R, B)
    *flags = 0;
    for (int h = 0; h < H; ++h) {
        const int slot = hs.first + h;
        std::vector<T> head_jack(static_cast<size_t>(3 * R * B));
        if (const char* err = design_head(D, h, n, hs.per_sample(slot, 0), head_jack)) return err;
        std::copy(head_jack.begin(), head_jack.end(), jack.begin() + static_cast<size_t>(h) * 3 * R * B);
        bool some = false, finite = true;
        for (int64_t b = 0; b < B; ++b) {
            hs.count(h)[b] = static_cast<T>(n[b]);
            const uint8_t v = n[b] > 0;
            valid[h * B + b] = v;
            any[b] |= v;
            some |= v != 0;
            finite &= std::isfinite(hs.per_sample(slot, 0)[b]);
        }
        *flags |= (static_cast<uint64_t>(some) | (static_cast<uint64_t>(finite) << 1)) << (2 * h);
        if (a.combine) {
            batch_stats(hs.per_sample(slot, 0), hs.per_sample(slot, 1), hs.per_sample(slot, 2), valid.data() + h * B,
                        B, static_cast<T*>(a.scalars) + 7 * slot);
        }
    }
    const uint8_t* top_valid = a.combine ? any.data() : valid.data();
    // the top level's jackknife (3, R, B): the head's, or combined_per_sample of the heads'
    std::vector<T> top_jack(jack.begin(), jack.begin() + 3 * R * B);
    if (a.combine) {
        T n_any;
        const std::vector<T> ratio = head_ratios(any.data(), valid.data(), H, B, &n_any);
        std::fill(top_jack.begin(), top_jack.end(), T(0));
        for (int t = 0; t < 3; ++t) {
            T* top = hs.per_sample(0, t);
            for (int64_t b = 0; b < B; ++b) top[b] = T(0);
            for (int h = 0; h < H; ++h) {
                const T w = static_cast<T>(a.weight[h]);
                const T* x = hs.per_sample(hs.first + h, t);
                for (int64_t b = 0; b < B; ++b) top[b] = top[b] + (w * (valid[h * B + b] ? x[b] : T(0))) * ratio[h];
                if (R < 3) continue;
                const T* xj = jack.data() + (static_cast<size_t>(h) * 3 + t) * R * B;
                T* tj = top_jack.data() + t * R * B;
                for (int64_t q = 0; q < R * B; ++q) {
                    tj[q] = tj[q] + (w * (valid[h * B + q % B] ? xj[q] : T(0))) * ratio[h];
                }
            }
        }
    }
    T* scalars = static_cast<T*>(a.scalars);
    batch_stats(hs.per_sample(0, 0), hs.per_sample(0, 1), hs.per_sample(0, 2), top_valid, B, scalars);
    // after the 7 scalars a slot: the 3 rotation standard errors, then rel and se_rel a slot;
    // after the 3 per-sample rows a slot: per_rel a slot (label-free)
    T* rotation = scalars + 7 * slots;
    T* lf = rotation + 3;
    T* per_rel = static_cast<T*>(a.per_sample) + 3 * slots * B;
    auto part = [&](int t) { return std::vector<T>(top_jack.begin() + t * R * B, top_jack.begin() + (t + 1) * R * B); };
    if (labelled) {
        for (int t = 0; t < 3; ++t) rotation[t] = jackknife_stderr(part(t), R, B, top_valid);
    } else {
        for (int s = 0; s < slots; ++s) {
            const uint8_t* v = s == 0 ? top_valid : valid.data() + (s - hs.first) * B;
            label_free_slot(hs.per_sample(s, 0), scalars + 7 * s, v, B, lf + 2 * s, lf + 2 * s + 1, per_rel + s * B);
        }
        // rel = equiv / norm, linearised: the jackknife of equiv - rel * norm, over norm
        std::vector<T> je = part(2), jm = part(1), lin(static_cast<size_t>(R * B));
        for (int64_t q = 0; q < R * B; ++q) lin[q] = je[q] - lf[0] * jm[q];
        rotation[0] = jackknife_stderr(je, R, B, top_valid);
        rotation[1] = jackknife_stderr(jm, R, B, top_valid);
        rotation[2] = jackknife_stderr(lin, R, B, top_valid) / std::abs(scalars[1]);
    }
    write_valid(a, top_valid, valid);
    return nullptr;
}

// The gradient of g_total L_total + g_equiv L_equiv (the top level's batch means) with respect
// to every head's replicate sums (H, R, 3, B) and twirled means (H,) (R, N, d) (for R >= 2),
// the chain torch's autograd runs through design_twirl.py: the batch means and combination as
// decompose_backward_impl; total = mean_r sums_r[0] / n, equiv = mean_r sums_r[2] / n + s R / (R - 1)
// with s = mean_r Q_r / n, Q_r the sum of |u_r - ubar|^2 over the sample's valid elements,
// u_r = abar_r - y and ubar = mean_r u_r.
template <typename T>
void design_decompose_backward_impl(const Design<T>& D, T g_total, T g_equiv, T* grad_sums, void* const* grad_mean) {
    const DecomposeArgs& a = D.a;
    const Heads<T> hs(a);
    const int64_t B = a.B, R = D.R;
    const int H = a.H;
    const TopGrad<T> top(hs, g_total, g_equiv);
    std::vector<T> dt(static_cast<size_t>(B)), de(static_cast<size_t>(B));
    std::vector<T> dQ(static_cast<size_t>(B)), u(static_cast<size_t>(R)), g(static_cast<size_t>(R));
    for (int h = 0; h < H; ++h) {
        const T* count = hs.count(h);
        top.shares(h, dt.data(), de.data());
        for (int64_t b = 0; b < B; ++b) {
            const T nb = count[b] < T(1) ? T(1) : count[b];
            for (int64_t r = 0; r < R; ++r) {
                T* gs = grad_sums + (h * R + r) * 3 * B;
                gs[b] = dt[b] / static_cast<T>(R) / nb;
                gs[B + b] = T(0);
                gs[2 * B + b] = de[b] / static_cast<T>(R) / nb;
            }
            if (R >= 2) {
                const T ds = de[b] / static_cast<T>(R - 1) * static_cast<T>(R);
                dQ[b] = ds / static_cast<T>(R) / nb;
            }
        }
        if (R < 2) continue;
        const int64_t N = a.N[h];
        const int d = a.d[h];
        const T* mean = static_cast<const T*>(D.mean[h]);
        const T* y = static_cast<const T*>(D.target[h]);
        T* gm = static_cast<T*>(grad_mean[h]);
        const int64_t* sample = a.sample[h];
        const uint8_t* valid = a.valid[h];
        const int64_t P = a.P[h] > 0 ? a.P[h] : 1;
        for (int64_t row = 0; row < N; ++row) {
            const bool ok = !valid || valid[row];
            const int64_t s = sample ? sample[row] : row / P;
            for (int i = 0; i < d; ++i) {
                const int64_t e = row * d + i;
                if (!ok) {
                    for (int64_t r = 0; r < R; ++r) gm[r * N * d + e] = T(0);
                    continue;
                }
                T sum = 0;
                for (int64_t r = 0; r < R; ++r) {
                    u[r] = mean[r * N * d + e] - y[e];
                    sum += u[r];
                }
                const T ubar = sum / static_cast<T>(R);
                T gsum = 0;
                for (int64_t r = 0; r < R; ++r) {
                    g[r] = dQ[s] * (T(2) * (u[r] - ubar));
                    gsum += g[r];
                }
                const T back = -gsum / static_cast<T>(R);
                for (int64_t r = 0; r < R; ++r) gm[r * N * d + e] = g[r] + back;
            }
        }
    }
}

}  // namespace

const char* design_decompose_cpu(const DecomposeArgs& a, int64_t R, bool labelled, const void* const* mean,
                                 const void* const* target, uint64_t* flags) {
    if (a.acc == Dtype::f64) return design_decompose_impl<double>(Design<double>{a, R, mean, target}, labelled, flags);
    return design_decompose_impl<float>(Design<float>{a, R, mean, target}, labelled, flags);
}

void design_decompose_backward_cpu(const DecomposeArgs& a, int64_t R, const void* const* mean,
                                   const void* const* target, double g_total, double g_equiv, void* grad_sums,
                                   void* const* grad_mean) {
    if (a.acc == Dtype::f64) {
        design_decompose_backward_impl<double>(Design<double>{a, R, mean, target}, g_total, g_equiv,
                                               static_cast<double*>(grad_sums), grad_mean);
    } else {
        design_decompose_backward_impl<float>(Design<float>{a, R, mean, target}, static_cast<float>(g_total),
                                              static_cast<float>(g_equiv), static_cast<float*>(grad_sums), grad_mean);
    }
}

const char* decompose_cpu(const DecomposeArgs& a, uint64_t* flags) {
    if (a.acc == Dtype::f64) return decompose_impl<double>(a, flags);
    return decompose_impl<float>(a, flags);
}

void decompose_backward_cpu(const DecomposeArgs& a, double g_total, double g_equiv, void* grad_sums) {
    if (a.acc == Dtype::f64) {
        decompose_backward_impl<double>(a, g_total, g_equiv, static_cast<double*>(grad_sums));
    } else {
        decompose_backward_impl<float>(a, static_cast<float>(g_total), static_cast<float>(g_equiv),
                                       static_cast<float*>(grad_sums));
    }
}

}  // namespace fastequiv
