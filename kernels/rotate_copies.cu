// CUDA kernels of rotate_rows and rotate_rows_backward (contract: fastequiv/ops/layout.py;
// references: fastequiv/ops/rotate_copies.py), the row primitives of rotate_copies: one
// thread per (copy, row) forward, one per row backward, each calling the per-row math of
// twirl_math.cuh that the CPU kernels call.
//
// Compiled by nvcc into fastequiv._C (with the launchers at the bottom) and by NVRTC for
// the CuPy backend. Kernel names: fe_rotate_rows_<x>_<acc> and
// fe_rotate_rows_backward_<grad>_<acc>, with <x>, <grad> in f16, bf16, f32, f64 and <acc>
// in f32, f64 (an f64 element with f32 accumulation is not instantiated).
#include "twirl_math.cuh"

namespace {

template <typename TX, typename Acc>
__device__ inline void rotate_rows_body(const TX* __restrict__ x, const Acc* __restrict__ M,
                                        const long long* __restrict__ sample, long long P,
                                        const Acc* __restrict__ center, long long K, long long N, long long B,
                                        int d, TX* __restrict__ out) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long q = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; q < K * N; q += stride) {
        const long long k = q / N, r = q - k * N;
        const long long s = fastequiv::row_sample(r, sample, P);
        const Acc* m = M + (k * B + s) * d * d;
        if (d == 3) {
            fastequiv::rotate_row<3>(x + r * 3, m, center + s * 3, 3, out + q * 3);
        } else if (d == 1) {
            fastequiv::rotate_row<1>(x + r, m, center + s, 1, out + q);
        } else {
            fastequiv::rotate_row<0>(x + r * d, m, center + s * d, d, out + q * d);
        }
    }
}

template <typename TG, typename Acc>
__device__ inline void rotate_rows_backward_body(const TG* __restrict__ grad, const Acc* __restrict__ M,
                                                 const long long* __restrict__ sample, long long P, long long K,
                                                 long long N, long long B, int d, Acc* __restrict__ out) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; r < N; r += stride) {
        const long long s = fastequiv::row_sample(r, sample, P);
        const int k = static_cast<int>(K);
        if (d == 3) {
            fastequiv::rotate_row_backward<3>(grad + r * 3, N * 3, M + s * 9, B * 9, k, 3, out + r * 3);
        } else if (d == 1) {
            fastequiv::rotate_row_backward<1>(grad + r, N, M + s, B, k, 1, out + r);
        } else {
            fastequiv::rotate_row_backward<0>(grad + r * d, N * d, M + s * d * d, B * d * d, k, d, out + r * d);
        }
    }
}

}  // namespace

#define FE_ROTATE_ROWS_KERNELS(TX, XN, ACC, AN)                                                            \
    extern "C" __global__ void fe_rotate_rows_##XN##_##AN(const TX* x, const ACC* M, const long long* sample, \
                                                          long long P, const ACC* center, long long K,       \
                                                          long long N, long long B, int d, TX* out) {         \
        rotate_rows_body<TX, ACC>(x, M, sample, P, center, K, N, B, d, out);                               \
    }                                                                                                      \
    extern "C" __global__ void fe_rotate_rows_backward_##XN##_##AN(const TX* grad, const ACC* M,           \
                                                                   const long long* sample, long long P,    \
                                                                   long long K, long long N, long long B,   \
                                                                   int d, ACC* out) {                       \
        rotate_rows_backward_body<TX, ACC>(grad, M, sample, P, K, N, B, d, out);                           \
    }

FE_ROTATE_ROWS_KERNELS(fastequiv::half_t, f16, float, f32)
FE_ROTATE_ROWS_KERNELS(fastequiv::bfloat16_t, bf16, float, f32)
FE_ROTATE_ROWS_KERNELS(float, f32, float, f32)
FE_ROTATE_ROWS_KERNELS(fastequiv::half_t, f16, double, f64)
FE_ROTATE_ROWS_KERNELS(fastequiv::bfloat16_t, bf16, double, f64)
FE_ROTATE_ROWS_KERNELS(float, f32, double, f64)
FE_ROTATE_ROWS_KERNELS(double, f64, double, f64)

#if !defined(__CUDACC_RTC__)
#include "cuda_launch.h"
#include "cuda_launchers.h"

namespace fastequiv {
namespace {

// The element types are deduced from the kernel, which the dtype switch picks.
template <typename TX, typename Acc>
const char* rotate_rows_with(void (*kernel)(const TX*, const Acc*, const long long*, long long, const Acc*,
                                            long long, long long, long long, int, TX*),
                             const RotateRowsArgs& a, cudaStream_t stream) {
    const RowLayout& L = a.rows;
    kernel<<<blocks_for(L.K * L.N), kThreads, 0, stream>>>(
        static_cast<const TX*>(a.x), static_cast<const Acc*>(a.M), reinterpret_cast<const long long*>(L.sample),
        L.P, static_cast<const Acc*>(a.center), L.K, L.N, L.B, L.d, static_cast<TX*>(a.out));
    return last_error();
}

template <typename TG, typename Acc>
const char* rotate_rows_backward_with(void (*kernel)(const TG*, const Acc*, const long long*, long long,
                                                     long long, long long, long long, int, Acc*),
                                      const RotateRowsBackwardArgs& a, cudaStream_t stream) {
    const RowLayout& L = a.rows;
    kernel<<<blocks_for(L.N), kThreads, 0, stream>>>(
        static_cast<const TG*>(a.grad), static_cast<const Acc*>(a.M), reinterpret_cast<const long long*>(L.sample),
        L.P, L.K, L.N, L.B, L.d, static_cast<Acc*>(a.out));
    return last_error();
}

}  // namespace

const char* launch_rotate_rows(const RotateRowsArgs& a, int device, void* stream) {
    if (a.rows.K * a.rows.N == 0) return nullptr;
    DeviceGuard guard(device);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
#define FE_CASE(XN, AN) \
    if (a.x_type == Dtype::XN && a.acc_type == Dtype::AN) return rotate_rows_with(fe_rotate_rows_##XN##_##AN, a, st);
    FE_CASE(f16, f32) FE_CASE(bf16, f32) FE_CASE(f32, f32)
    FE_CASE(f16, f64) FE_CASE(bf16, f64) FE_CASE(f32, f64) FE_CASE(f64, f64)
#undef FE_CASE
    return "x: float64 elements need float64 M (the accumulation dtype)";
}

const char* launch_rotate_rows_backward(const RotateRowsBackwardArgs& a, int device, void* stream) {
    if (a.rows.N * a.rows.d == 0) return nullptr;
    DeviceGuard guard(device);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
#define FE_CASE(XN, AN)                                          \
    if (a.grad_type == Dtype::XN && a.acc_type == Dtype::AN)     \
        return rotate_rows_backward_with(fe_rotate_rows_backward_##XN##_##AN, a, st);
    FE_CASE(f16, f32) FE_CASE(bf16, f32) FE_CASE(f32, f32)
    FE_CASE(f16, f64) FE_CASE(bf16, f64) FE_CASE(f32, f64) FE_CASE(f64, f64)
#undef FE_CASE
    return "grad: float64 elements need float64 M (the accumulation dtype)";
}

}  // namespace fastequiv
#endif  // !__CUDACC_RTC__
