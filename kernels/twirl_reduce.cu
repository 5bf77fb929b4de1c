// CUDA kernels of reduce_rows and reduce_rows_backward (contract: fastequiv/ops/layout.py;
// references: fastequiv/ops/twirl_reduce.py), the row primitives of twirl_reduce, calling
// the per-row math of twirl_math.cuh that the CPU kernels call.
//
// Forward: each block takes a tile of kRowsPerThread * blockDim.x consecutive rows (thread
// t takes rows t, t + blockDim.x, ...: coalesced). A thread keeps a running sum of its rows'
// terms while their sample stays the same; the sums are then combined across the warp and
// across the block when every row in it has one sample (the dense layout, and graphs with
// large samples), so a block adds to `sums` once; otherwise each run is added with atomics.
// The order of the atomic additions is not fixed: sums may differ across runs by rounding.
// Backward: one thread per row, no reduction.
// weights: (K,) in acc, the copies' weights w_k in place of 1/K, or null (uniform: the
// unweighted arithmetic of twirl_math.cuh, bit for bit), as on the CPU.
//
// Compiled by nvcc into fastequiv._C (with the launchers at the bottom) and by NVRTC for
// the CuPy backend. Kernel names: fe_reduce_rows_<out>_<target>_<acc> and
// fe_reduce_rows_backward_<out>_<target>_<acc>, where <target> is <out> or <acc> (the
// wrapper converts a target of any other dtype to acc); both take `weights` last.
#include "twirl_math.cuh"

namespace {

constexpr int kRowsPerThread = 4;

template <typename Acc>
__device__ inline void add_sums(Acc* sums, long long B, long long s, Acc v0, Acc v1, Acc v2) {
    atomicAdd(sums + s, v0);
    atomicAdd(sums + B + s, v1);
    atomicAdd(sums + 2 * B + s, v2);
}

// Adds every thread's running sums (v0, v1, v2) of sample `cur` (-1: none) to `sums`.
// Called by every thread of the block.
template <typename Acc>
__device__ inline void add_block_sums(long long cur, Acc v0, Acc v1, Acc v2, Acc* sums, long long B) {
    __shared__ long long warp_sample[32];
    __shared__ Acc warp_sums[32][3];
    const unsigned full = 0xffffffffu;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned have = __ballot_sync(full, cur >= 0);
    long long key = -1;
    if (have) {
        key = __shfl_sync(full, cur, __ffs(have) - 1);
        if (__all_sync(full, cur < 0 || cur == key)) {
            for (int off = 16; off > 0; off >>= 1) {
                v0 += __shfl_down_sync(full, v0, off);
                v1 += __shfl_down_sync(full, v1, off);
                v2 += __shfl_down_sync(full, v2, off);
            }
        } else {
            if (cur >= 0) add_sums(sums, B, cur, v0, v1, v2);
            key = -1;
        }
    }
    if (lane == 0) {
        warp_sample[warp] = key;
        warp_sums[warp][0] = v0;
        warp_sums[warp][1] = v1;
        warp_sums[warp][2] = v2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int warps = (blockDim.x + 31) / 32;
        long long block_sample = -1;
        bool one_sample = true;
        for (int w = 0; w < warps; ++w) {
            const long long s = warp_sample[w];
            if (s < 0) continue;
            if (block_sample < 0) block_sample = s;
            one_sample = one_sample && s == block_sample;
        }
        if (one_sample) {
            if (block_sample >= 0) {
                Acc t0 = 0, t1 = 0, t2 = 0;
                for (int w = 0; w < warps; ++w) {
                    if (warp_sample[w] < 0) continue;
                    t0 += warp_sums[w][0];
                    t1 += warp_sums[w][1];
                    t2 += warp_sums[w][2];
                }
                add_sums(sums, B, block_sample, t0, t1, t2);
            }
        } else {
            for (int w = 0; w < warps; ++w) {
                if (warp_sample[w] >= 0)
                    add_sums(sums, B, warp_sample[w], warp_sums[w][0], warp_sums[w][1], warp_sums[w][2]);
            }
        }
    }
}

template <typename TO, typename TY, typename Acc>
__device__ inline void reduce_rows_body(const TO* __restrict__ out, const Acc* __restrict__ M,
                                        const TY* __restrict__ target, const long long* __restrict__ sample,
                                        long long P, const unsigned char* __restrict__ valid,
                                        const Acc* __restrict__ center, long long K, long long N, long long B,
                                        int d, Acc* __restrict__ mean, Acc* __restrict__ sums,
                                        const Acc* __restrict__ weights) {
    const long long tile = static_cast<long long>(blockIdx.x) * blockDim.x * kRowsPerThread;
    long long cur = -1;
    Acc v0 = 0, v1 = 0, v2 = 0;
    const int k = static_cast<int>(K);
    for (int t = 0; t < kRowsPerThread; ++t) {
        const long long r = tile + static_cast<long long>(t) * blockDim.x + threadIdx.x;
        if (r >= N) break;
        const long long s = fastequiv::row_sample(r, sample, P);
        Acc terms[3];
        if (d == 3) {
            fastequiv::reduce_row<3>(out + r * 3, N * 3, M + s * 9, B * 9, center + s * 3, B * 3, target + r * 3,
                                     k, 3, mean + r * 3, terms, weights);
        } else if (d == 1) {
            fastequiv::reduce_row<1>(out + r, N, M + s, B, center + s, B, target + r, k, 1, mean + r, terms,
                                     weights);
        } else {
            fastequiv::reduce_row<0>(out + r * d, N * d, M + s * d * d, B * d * d, center + s * d, B * d,
                                     target + r * d, k, d, mean + r * d, terms, weights);
        }
        if (valid && !valid[r]) continue;
        if (s != cur) {
            if (cur >= 0) add_sums(sums, B, cur, v0, v1, v2);
            cur = s;
            v0 = v1 = v2 = 0;
        }
        v0 += terms[0];
        v1 += terms[1];
        v2 += terms[2];
    }
    add_block_sums(cur, v0, v1, v2, sums, B);
}

template <typename TO, typename TY, typename Acc>
__device__ inline void reduce_rows_backward_body(const Acc* __restrict__ grad_mean, const Acc* __restrict__ grad_sums,
                                                 const TO* __restrict__ out, const Acc* __restrict__ M,
                                                 const TY* __restrict__ target,
                                                 const long long* __restrict__ sample, long long P,
                                                 const unsigned char* __restrict__ valid,
                                                 const Acc* __restrict__ center, const Acc* __restrict__ mean,
                                                 long long K, long long N, long long B, int d,
                                                 TO* __restrict__ grad_out, Acc* __restrict__ work,
                                                 const Acc* __restrict__ weights) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const int k = static_cast<int>(K);
    for (long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; r < N; r += stride) {
        const long long s = fastequiv::row_sample(r, sample, P);
        const bool ok = !valid || valid[r];
        const Acc g0 = ok ? grad_sums[s] : Acc(0);
        const Acc g1 = ok ? grad_sums[B + s] : Acc(0);
        const Acc g2 = ok ? grad_sums[2 * B + s] : Acc(0);
        if (d == 3) {
            fastequiv::reduce_row_backward<3>(out + r * 3, N * 3, M + s * 9, B * 9, center + s * 3, B * 3,
                                              target + r * 3, mean + r * 3, grad_mean ? grad_mean + r * 3 : nullptr,
                                              g0, g1, g2, k, 3, static_cast<Acc*>(nullptr), grad_out + r * 3,
                                              weights);
        } else if (d == 1) {
            fastequiv::reduce_row_backward<1>(out + r, N, M + s, B, center + s, B, target + r, mean + r,
                                              grad_mean ? grad_mean + r : nullptr, g0, g1, g2, k, 1,
                                              static_cast<Acc*>(nullptr), grad_out + r, weights);
        } else {
            fastequiv::reduce_row_backward<0>(out + r * d, N * d, M + s * d * d, B * d * d, center + s * d, B * d,
                                              target + r * d, mean + r * d, grad_mean ? grad_mean + r * d : nullptr,
                                              g0, g1, g2, k, d, work + r * d, grad_out + r * d, weights);
        }
    }
}

}  // namespace

#define FE_REDUCE_ROWS_KERNELS(TO, ON, TY, YN, ACC, AN)                                                          \
    extern "C" __global__ void fe_reduce_rows_##ON##_##YN##_##AN(                                                \
        const TO* out, const ACC* M, const TY* target, const long long* sample, long long P,                    \
        const unsigned char* valid, const ACC* center, long long K, long long N, long long B, int d, ACC* mean, \
        ACC* sums, const ACC* weights) {                                                                         \
        reduce_rows_body<TO, TY, ACC>(out, M, target, sample, P, valid, center, K, N, B, d, mean, sums,        \
                                      weights);                                                                  \
    }                                                                                                            \
    extern "C" __global__ void fe_reduce_rows_backward_##ON##_##YN##_##AN(                                       \
        const ACC* grad_mean, const ACC* grad_sums, const TO* out, const ACC* M, const TY* target,              \
        const long long* sample, long long P, const unsigned char* valid, const ACC* center, const ACC* mean,   \
        long long K, long long N, long long B, int d, TO* grad_out, ACC* work, const ACC* weights) {            \
        reduce_rows_backward_body<TO, TY, ACC>(grad_mean, grad_sums, out, M, target, sample, P, valid, center,  \
                                               mean, K, N, B, d, grad_out, work, weights);                      \
    }

#define FE_HALF fastequiv::half_t
#define FE_BF16 fastequiv::bfloat16_t
FE_REDUCE_ROWS_KERNELS(FE_HALF, f16, FE_HALF, f16, float, f32)
FE_REDUCE_ROWS_KERNELS(FE_HALF, f16, float, f32, float, f32)
FE_REDUCE_ROWS_KERNELS(FE_BF16, bf16, FE_BF16, bf16, float, f32)
FE_REDUCE_ROWS_KERNELS(FE_BF16, bf16, float, f32, float, f32)
FE_REDUCE_ROWS_KERNELS(float, f32, float, f32, float, f32)
FE_REDUCE_ROWS_KERNELS(FE_HALF, f16, FE_HALF, f16, double, f64)
FE_REDUCE_ROWS_KERNELS(FE_HALF, f16, double, f64, double, f64)
FE_REDUCE_ROWS_KERNELS(FE_BF16, bf16, FE_BF16, bf16, double, f64)
FE_REDUCE_ROWS_KERNELS(FE_BF16, bf16, double, f64, double, f64)
FE_REDUCE_ROWS_KERNELS(float, f32, float, f32, double, f64)
FE_REDUCE_ROWS_KERNELS(float, f32, double, f64, double, f64)
FE_REDUCE_ROWS_KERNELS(double, f64, double, f64, double, f64)

#if !defined(__CUDACC_RTC__)
#include "cuda_launch.h"
#include "cuda_launchers.h"

namespace fastequiv {
namespace {

template <typename TO, typename TY, typename Acc>
const char* reduce_rows_with(void (*kernel)(const TO*, const Acc*, const TY*, const long long*, long long,
                                            const unsigned char*, const Acc*, long long, long long, long long,
                                            int, Acc*, Acc*, const Acc*),
                             const ReduceRowsArgs& a, cudaStream_t stream) {
    const RowLayout& L = a.rows;
    kernel<<<blocks_for(L.N, kRowsPerThread), kThreads, 0, stream>>>(
        static_cast<const TO*>(a.out), static_cast<const Acc*>(a.M), static_cast<const TY*>(a.target),
        reinterpret_cast<const long long*>(L.sample), L.P, a.valid, static_cast<const Acc*>(a.center), L.K, L.N,
        L.B, L.d, static_cast<Acc*>(a.mean), static_cast<Acc*>(a.sums), static_cast<const Acc*>(a.weights));
    return last_error();
}

template <typename TO, typename TY, typename Acc>
const char* reduce_rows_backward_with(void (*kernel)(const Acc*, const Acc*, const TO*, const Acc*, const TY*,
                                                     const long long*, long long, const unsigned char*,
                                                     const Acc*, const Acc*, long long, long long, long long,
                                                     int, TO*, Acc*, const Acc*),
                                      const ReduceRowsBackwardArgs& a, cudaStream_t stream) {
    const RowLayout& L = a.rows;
    kernel<<<blocks_for(L.N), kThreads, 0, stream>>>(
        static_cast<const Acc*>(a.grad_mean), static_cast<const Acc*>(a.grad_sums), static_cast<const TO*>(a.out),
        static_cast<const Acc*>(a.M), static_cast<const TY*>(a.target), reinterpret_cast<const long long*>(L.sample),
        L.P, a.valid, static_cast<const Acc*>(a.center), static_cast<const Acc*>(a.mean), L.K, L.N, L.B, L.d,
        static_cast<TO*>(a.grad_out), static_cast<Acc*>(a.work), static_cast<const Acc*>(a.weights));
    return last_error();
}

}  // namespace

#define FE_REDUCE_CASES(FN, WITH)                                                                     \
    FE_CASE(FN, WITH, f16, f16, f32) FE_CASE(FN, WITH, f16, f32, f32) FE_CASE(FN, WITH, bf16, bf16, f32) \
    FE_CASE(FN, WITH, bf16, f32, f32) FE_CASE(FN, WITH, f32, f32, f32)                                  \
    FE_CASE(FN, WITH, f16, f16, f64) FE_CASE(FN, WITH, f16, f64, f64)                                   \
    FE_CASE(FN, WITH, bf16, bf16, f64) FE_CASE(FN, WITH, bf16, f64, f64)                                \
    FE_CASE(FN, WITH, f32, f32, f64) FE_CASE(FN, WITH, f32, f64, f64) FE_CASE(FN, WITH, f64, f64, f64)
#define FE_CASE(FN, WITH, ON, YN, AN)                                                        \
    if (a.out_type == Dtype::ON && a.target_type == Dtype::YN && a.acc_type == Dtype::AN) \
        return WITH(FN##_##ON##_##YN##_##AN, a, st);

const char* launch_reduce_rows(const ReduceRowsArgs& a, int device, void* stream) {
    if (a.rows.N == 0) return nullptr;
    DeviceGuard guard(device);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    FE_REDUCE_CASES(fe_reduce_rows, reduce_rows_with)
    return "target: expected the dtype of out or of M (the accumulation dtype), and float64 M for float64 out";
}

const char* launch_reduce_rows_backward(const ReduceRowsBackwardArgs& a, int device, void* stream) {
    if (a.rows.N * a.rows.K == 0) return nullptr;
    DeviceGuard guard(device);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    FE_REDUCE_CASES(fe_reduce_rows_backward, reduce_rows_backward_with)
    return "target: expected the dtype of out or of M (the accumulation dtype), and float64 M for float64 out";
}

#undef FE_CASE
#undef FE_REDUCE_CASES

}  // namespace fastequiv
#endif  // !__CUDACC_RTC__
