// CPU kernels of fastequiv._C: the shared host-device math of kernels/*.cuh run over
// arrays, in parallel with OpenMP when the build found it.
#pragma once

#include <cstdint>

namespace fastequiv {

// out[9j .. 9j+9) = rotation number offset + j of the stream `seed` (row-major 3x3).
template <typename T>
void random_rotations_cpu(T* out, int64_t n, uint64_t seed, uint64_t offset, bool improper);

}  // namespace fastequiv
