// CUDA kernel of wigner_blocks (reference: fastequiv/ops/wigner_d.py): packed Wigner-D blocks
// D_0 .. D_lmax of proper rotations, one thread per rotation writing its own output row,
// by the recursion of kernels/wigner.cuh (the CPU kernel runs the same function on 16
// lanes). Every thread walks the same term table, so its loads are uniform across a warp.
//
// Compiled by nvcc into fastequiv._C (with the launcher at the bottom) and by NVRTC for the
// CuPy backend. Kernel names: fe_wigner_blocks_f32, fe_wigner_blocks_f64.
#include "wigner.cuh"

namespace {

template <typename T>
__device__ inline void wigner_blocks_body(const T* __restrict__ R, long long n, int lmax,
                                          const int* __restrict__ term_index, const T* __restrict__ term_coef,
                                          const int* __restrict__ term_start, T* __restrict__ out) {
    const int S = fastequiv::wigner_packed_size(lmax);
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
        fastequiv::wigner_blocks_lanes<T, 1>(R + 9 * j, lmax, term_index, term_coef, term_start, out + j * S);
    }
}

}  // namespace

extern "C" __global__ void fe_wigner_blocks_f32(const float* R, long long n, int lmax, const int* term_index,
                                                const float* term_coef, const int* term_start, float* out) {
    wigner_blocks_body<float>(R, n, lmax, term_index, term_coef, term_start, out);
}

extern "C" __global__ void fe_wigner_blocks_f64(const double* R, long long n, int lmax, const int* term_index,
                                                const double* term_coef, const int* term_start, double* out) {
    wigner_blocks_body<double>(R, n, lmax, term_index, term_coef, term_start, out);
}

#if !defined(__CUDACC_RTC__)
#include "cuda_launch.h"
#include "cuda_launchers.h"

namespace fastequiv {

const char* launch_wigner_blocks(const WignerBlocksArgs& a, int device, void* stream) {
    if (a.n == 0) return nullptr;
    DeviceGuard guard(device);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int blocks = blocks_for(a.n);
    if (a.type == Dtype::f64) {
        fe_wigner_blocks_f64<<<blocks, kThreads, 0, st>>>(static_cast<const double*>(a.R), a.n, a.lmax, a.term_index,
                                                          static_cast<const double*>(a.term_coef), a.term_start,
                                                          static_cast<double*>(a.out));
    } else {
        fe_wigner_blocks_f32<<<blocks, kThreads, 0, st>>>(static_cast<const float*>(a.R), a.n, a.lmax, a.term_index,
                                                          static_cast<const float*>(a.term_coef), a.term_start,
                                                          static_cast<float*>(a.out));
    }
    return last_error();
}

}  // namespace fastequiv
#endif  // !__CUDACC_RTC__
