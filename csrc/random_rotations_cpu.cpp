// CPU kernel for random rotations: the same fastequiv::random_rotation the CUDA kernel
// runs (kernels/rotations.cuh), one rotation per loop iteration.
#include "cpu_kernels.h"

#include "rotations.cuh"

namespace fastequiv {

template <typename T>
void random_rotations_cpu(T* out, int64_t n, uint64_t seed, uint64_t offset, bool improper) {
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) if (n >= 4096)
#endif
    for (int64_t j = 0; j < n; ++j) {
        random_rotation<T>(seed, offset + static_cast<uint64_t>(j), improper, out + 9 * j);
    }
}

template void random_rotations_cpu<float>(float*, int64_t, uint64_t, uint64_t, bool);
template void random_rotations_cpu<double>(double*, int64_t, uint64_t, uint64_t, bool);

}  // namespace fastequiv
