// Element types of the row kernels and their conversion to the accumulation type.
//
// Inputs may be float16, bfloat16, float32 or float64; the math runs in the accumulation
// type Acc (float or double, "acc" in fastequiv/ops/layout.py). `to_acc<Acc>(v)` reads an
// element and `from_acc<T>(v)` rounds a result back (round to nearest even, as torch's
// `.to(dtype)`).
//
// - nvcc: the 16-bit types are cuda_fp16.h's __half and cuda_bf16.h's __nv_bfloat16.
// - NVRTC (the CuPy backend) may run without the toolkit's headers, so there they are
//   2-byte structs converted with the same PTX instructions the headers use (nvcc compiles
//   this path too with -DFE_NO_CUDA_FP16_HEADERS, which is how it is checked without NVRTC).
// - The host C++ build (csrc/) has no 16-bit types: the Python wrapper converts fp16/bf16
//   to float32 before calling the CPU kernels.
#pragma once

#include "host_device.cuh"

#if defined(__CUDACC_RTC__) && !defined(FE_NO_CUDA_FP16_HEADERS)
#define FE_NO_CUDA_FP16_HEADERS 1
#endif

#if defined(__CUDACC__) && !defined(FE_NO_CUDA_FP16_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastequiv {

template <typename Acc>
FE_HOST_DEVICE Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc>
FE_HOST_DEVICE Acc to_acc(double v) { return static_cast<Acc>(v); }

template <typename T>
struct FromAcc {
    template <typename Acc>
    static FE_HOST_DEVICE T convert(Acc v) { return static_cast<T>(v); }
};

template <typename T, typename Acc>
FE_HOST_DEVICE T from_acc(Acc v) { return FromAcc<T>::convert(v); }

#if defined(__CUDACC__) && !defined(FE_NO_CUDA_FP16_HEADERS)

typedef __half half_t;
typedef __nv_bfloat16 bfloat16_t;

template <typename Acc>
__device__ inline Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc>
__device__ inline Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }

template <>
struct FromAcc<__half> {
    static __device__ inline __half convert(float v) { return __float2half_rn(v); }
    static __device__ inline __half convert(double v) { return __double2half(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
    static __device__ inline __nv_bfloat16 convert(float v) { return __float2bfloat16_rn(v); }
    static __device__ inline __nv_bfloat16 convert(double v) { return __double2bfloat16(v); }
};

#elif defined(__CUDACC__)

// Bit-compatible stand-ins for __half and __nv_bfloat16 (2 bytes, 2-byte aligned).
struct __align__(2) half_t { unsigned short bits; };
struct __align__(2) bfloat16_t { unsigned short bits; };

__device__ inline float half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

template <typename Acc>
__device__ inline Acc to_acc(half_t v) { return static_cast<Acc>(half_bits_to_float(v.bits)); }
template <typename Acc>
__device__ inline Acc to_acc(bfloat16_t v) {
    return static_cast<Acc>(__uint_as_float(static_cast<unsigned int>(v.bits) << 16));
}

template <>
struct FromAcc<half_t> {
    static __device__ inline half_t convert(float v) {
        half_t h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
        return h;
    }
    static __device__ inline half_t convert(double v) {
        half_t h;
        asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h.bits) : "d"(v));
        return h;
    }
};
template <>
struct FromAcc<bfloat16_t> {
    static __device__ inline bfloat16_t convert(float v) {
        bfloat16_t b;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(v));  // sm_80+
        return b;
    }
    // No f64 -> bf16 instruction: through float (a double rounding only at exact ties).
    static __device__ inline bfloat16_t convert(double v) { return convert(static_cast<float>(v)); }
};

#endif

}  // namespace fastequiv
