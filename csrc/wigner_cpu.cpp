// CPU kernel of wigner_blocks: kernels/wigner.cuh on 16 rotations at a time (lane-minor,
// so the inner loops over lanes vectorise), then transposed into the (n, S) output.
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "wigner.cuh"

namespace fastequiv {
namespace {

constexpr int kLanes = 16;

template <typename T>
void wigner_blocks_impl(const WignerBlocksArgs& a) {
    const int S = wigner_packed_size(a.lmax);
    const T* R = static_cast<const T*>(a.R);
    const T* coef = static_cast<const T*>(a.term_coef);
    T* out = static_cast<T*>(a.out);
    const int64_t chunks = (a.n + kLanes - 1) / kLanes;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel if (a.n * S >= (1 << 15))
#endif
    {
        std::vector<T> D(static_cast<size_t>(S) * kLanes);
        T lanes[9 * kLanes];
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            const int64_t base = chunk * kLanes;
            const int count = static_cast<int>(std::min<int64_t>(kLanes, a.n - base));
            for (int e = 0; e < 9; ++e)
                for (int w = 0; w < kLanes; ++w)  // unused lanes get the identity
                    lanes[e * kLanes + w] = w < count ? R[(base + w) * 9 + e] : T(e % 4 == 0);
            wigner_blocks_lanes<T, kLanes>(lanes, a.lmax, a.term_index, coef, a.term_start, D.data());
            for (int w = 0; w < count; ++w) {
                T* row = out + (base + w) * S;
                for (int q = 0; q < S; ++q) row[q] = D[static_cast<size_t>(q) * kLanes + w];
            }
        }
    }
}

}  // namespace

void wigner_blocks_cpu(const WignerBlocksArgs& a) {
    if (a.type == Dtype::f64) {
        wigner_blocks_impl<double>(a);
    } else {
        wigner_blocks_impl<float>(a);
    }
}

}  // namespace fastequiv
