// The CPU steps of stacking a batch that are not row kernels (fastequiv/stacking.py): the
// rotations of a call, the centroids positions turn about, and the offset copies of graph
// indices. Each computes what the torch steps compute, in their order, so that a call
// gives the same bits either way.
#include <vector>

#include "cpu_kernels.h"
#include "rotations.cuh"

namespace fastequiv {

void random_rotations_rounded_cpu(void* out, Dtype out_type, int64_t n, uint64_t seed, uint64_t offset,
                                  bool improper) {
    if (out_type == Dtype::f64) {
        random_rotations_cpu(static_cast<double*>(out), n, seed, offset, improper);
        return;
    }
    float* o = static_cast<float*>(out);
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) if (n >= 4096)
#endif
    for (int64_t j = 0; j < n; ++j) {
        double R[9];
        random_rotation<double>(seed, offset + static_cast<uint64_t>(j), improper, R);
        for (int i = 0; i < 9; ++i) o[9 * j + i] = static_cast<float>(R[i]);
    }
}

namespace {

template <typename X, typename Acc>
const char* centroids_impl(const X* x, const int64_t* sample, const uint8_t* valid, int64_t N, int64_t B, int d,
                           Acc* out) {
    std::vector<Acc> count(static_cast<size_t>(B), Acc(0));
    for (int64_t q = 0; q < B * d; ++q) out[q] = Acc(0);
    for (int64_t r = 0; r < N; ++r) {
        const int64_t s = sample[r];
        if (s < 0 || s >= B) return "sample: expected every index in [0, B)";
        if (valid && !valid[r]) continue;  // adds 0 in the reference
        for (int i = 0; i < d; ++i) out[s * d + i] += static_cast<Acc>(x[r * d + i]);
        count[s] += Acc(1);
    }
    for (int64_t s = 0; s < B; ++s) {
        const Acc c = count[s] < Acc(1) ? Acc(1) : count[s];
        for (int i = 0; i < d; ++i) out[s * d + i] /= c;
    }
    return nullptr;
}

}  // namespace

const char* centroids_cpu(const void* x, Dtype x_type, Dtype acc_type, const int64_t* sample,
                          const uint8_t* valid, int64_t N, int64_t B, int d, void* out) {
    if (acc_type == Dtype::f64) {
        return x_type == Dtype::f64
                   ? centroids_impl(static_cast<const double*>(x), sample, valid, N, B, d, static_cast<double*>(out))
                   : centroids_impl(static_cast<const float*>(x), sample, valid, N, B, d, static_cast<double*>(out));
    }
    return centroids_impl(static_cast<const float*>(x), sample, valid, N, B, d, static_cast<float*>(out));
}

void offset_copies_cpu(const int64_t* x, int64_t rows, int64_t width, int64_t K, int64_t step, int64_t* out) {
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < K; ++k) {
            const int64_t shift = k * step;
            const int64_t* src = x + r * width;
            int64_t* dst = out + (r * K + k) * width;
            for (int64_t e = 0; e < width; ++e) dst[e] = src[e] + shift;
        }
    }
}

}  // namespace fastequiv
