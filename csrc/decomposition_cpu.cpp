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
        T n_any = 0;
        for (int64_t b = 0; b < B; ++b) n_any += any[b] ? T(1) : T(0);
        for (int t = 0; t < 3; ++t) {
            T* top = hs.per_sample(0, t);
            for (int64_t b = 0; b < B; ++b) top[b] = T(0);
            for (int h = 0; h < H; ++h) {
                T n_h = 0;
                for (int64_t b = 0; b < B; ++b) n_h += valid[h * B + b] ? T(1) : T(0);
                const T ratio = n_any / n_h, w = static_cast<T>(a.weight[h]);
                const T* x = hs.per_sample(hs.first + h, t);
                for (int64_t b = 0; b < B; ++b) top[b] = top[b] + (w * (valid[h * B + b] ? x[b] : T(0))) * ratio;
            }
        }
    }
    batch_stats(hs.per_sample(0, 0), hs.per_sample(0, 1), hs.per_sample(0, 2), top_valid, B,
                static_cast<T*>(a.scalars));
    if (a.valid_out) {
        for (int64_t b = 0; b < B; ++b) a.valid_out[b] = top_valid[b];
        if (a.combine) {
            for (int64_t q = 0; q < static_cast<int64_t>(H) * B; ++q) a.valid_out[B + q] = valid[q];
        }
    }
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
    std::vector<uint8_t> any(static_cast<size_t>(B), 0);
    for (int h = 0; h < H; ++h) {
        for (int64_t b = 0; b < B; ++b) any[b] |= hs.count(h)[b] > T(0);
    }
    T n_any = 0;
    for (int64_t b = 0; b < B; ++b) n_any += any[b] ? T(1) : T(0);
    const T gt = g_total / n_any, ge = g_equiv / n_any;
    for (int h = 0; h < H; ++h) {
        const T* count = hs.count(h);
        T n_h = 0;
        for (int64_t b = 0; b < B; ++b) n_h += count[b] > T(0) ? T(1) : T(0);
        const T ratio = n_any / n_h, w = static_cast<T>(a.weight[h]);
        T* g = grad_sums + h * 3 * B;
        for (int64_t b = 0; b < B; ++b) {
            const bool top = any[b] != 0, mine = count[b] > T(0);
            T dt = top ? gt : T(0), de = top ? ge : T(0);
            if (a.combine) {
                dt = mine ? (dt * ratio) * w : T(0);
                de = mine ? (de * ratio) * w : T(0);
            }
            if (!a.exhaustive) de = de * kf;
            const T nb = count[b] < T(1) ? T(1) : count[b];
            g[b] = dt / nb;
            g[B + b] = T(0);
            g[2 * B + b] = de / nb;
        }
    }
}

}  // namespace

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
