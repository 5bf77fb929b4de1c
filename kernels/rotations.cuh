// Haar-uniform random rotations, shared host-device math (csrc/ CPU code and CUDA
// kernels compile these same functions).
//
// Conventions (the pure-torch reference implements the same):
// - quaternions are (w, x, y, z), drawn with Shoemake's method from the first three
//   Philox words: no acos/atan2, only sqrt, sin, cos;
// - matrices are active rotations of column vectors, v' = R v, stored row-major (3x3);
// - for O(3) sampling the low bit of the fourth word flags an improper element, whose
//   matrix is -R(q) (det -1);
// - arithmetic is done in the output's scalar type T (float or double).
#pragma once

#include "philox.cuh"

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace fastequiv {

// Overloads so templates call sqrtf/sinf/cosf for float and sqrt/sin/cos for double on
// both host and device.
FE_HOST_DEVICE float fe_sqrt(float x) { return sqrtf(x); }
FE_HOST_DEVICE double fe_sqrt(double x) { return sqrt(x); }
FE_HOST_DEVICE float fe_sin(float x) { return sinf(x); }
FE_HOST_DEVICE double fe_sin(double x) { return sin(x); }
FE_HOST_DEVICE float fe_cos(float x) { return cosf(x); }
FE_HOST_DEVICE double fe_cos(double x) { return cos(x); }

template <typename T>
struct Quaternion {
    T w, x, y, z;
};

// Shoemake (1992): u0, u1, u2 uniform in [0, 1) give a uniform unit quaternion.
template <typename T>
FE_HOST_DEVICE Quaternion<T> shoemake_quaternion(uint32_t x0, uint32_t x1, uint32_t x2) {
    const T two_pi = static_cast<T>(6.283185307179586476925286766559);
    const T u0 = uniform24<T>(x0);
    const T u1 = uniform24<T>(x1);
    const T u2 = uniform24<T>(x2);
    const T a = fe_sqrt(static_cast<T>(1) - u0);
    const T b = fe_sqrt(u0);
    const T t1 = two_pi * u1;
    const T t2 = two_pi * u2;
    Quaternion<T> q;
    q.w = a * fe_sin(t1);
    q.x = a * fe_cos(t1);
    q.y = b * fe_sin(t2);
    q.z = b * fe_cos(t2);
    return q;
}

// Active rotation matrix of a unit quaternion, row-major into R[0..8].
template <typename T>
FE_HOST_DEVICE void quaternion_to_matrix(const Quaternion<T>& q, T* R) {
    const T one = static_cast<T>(1);
    const T two = static_cast<T>(2);
    R[0] = one - two * (q.y * q.y + q.z * q.z);
    R[1] = two * (q.x * q.y - q.w * q.z);
    R[2] = two * (q.x * q.z + q.w * q.y);
    R[3] = two * (q.x * q.y + q.w * q.z);
    R[4] = one - two * (q.x * q.x + q.z * q.z);
    R[5] = two * (q.y * q.z - q.w * q.x);
    R[6] = two * (q.x * q.z - q.w * q.y);
    R[7] = two * (q.y * q.z + q.w * q.x);
    R[8] = one - two * (q.x * q.x + q.y * q.y);
}

// Rotation number `index` of the stream `seed`, row-major into R[0..8]. With
// `improper`, the element is an O(3) sample: -R(q) when the parity bit is set.
template <typename T>
FE_HOST_DEVICE void random_rotation(uint64_t seed, uint64_t index, bool improper, T* R) {
    const Philox4x32 r = philox_draw(seed, index);
    quaternion_to_matrix(shoemake_quaternion<T>(r.v[0], r.v[1], r.v[2]), R);
    if (improper && (r.v[3] & 1u)) {
        for (int k = 0; k < 9; ++k) R[k] = -R[k];
    }
}

}  // namespace fastequiv
