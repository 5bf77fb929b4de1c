// Philox-4x32-10 counter-based random numbers (Salmon et al., Random123), shared by the
// C++ CPU code in csrc/ and the CUDA kernels: one definition, so every backend draws
// the same bits. Checked against the Random123 known-answer vectors in
// tests/test_extension.py.
#pragma once

#include "host_device.cuh"

#if defined(__CUDACC_RTC__)
// NVRTC (the CuPy backend) has no standard headers.
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

namespace fastequiv {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplier of counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplier of counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // Weyl increment of key word 0 (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // Weyl increment of key word 1 (sqrt(3) - 1)

struct Philox4x32 {
    uint32_t v[4];
};

FE_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    hi = __umulhi(a, b);
    lo = a * b;
#else
    const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
    hi = static_cast<uint32_t>(p >> 32);
    lo = static_cast<uint32_t>(p);
#endif
}

// Ten rounds; the key is bumped by the Weyl constants between rounds (not after the last).
FE_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += kPhiloxW0;
            k1 += kPhiloxW1;
        }
        uint32_t hi0, lo0, hi1, lo1;
        mulhilo32(kPhiloxM0, ctr.v[0], hi0, lo0);
        mulhilo32(kPhiloxM1, ctr.v[2], hi1, lo1);
        const Philox4x32 next = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
        ctr = next;
    }
    return ctr;
}

// The draw of rotation number `index` under user seed `seed` (0 <= seed < 2^63):
// key = (seed low word, seed high word), counter = (index low word, index high word, 0, 0).
// Matches Triton's tl.randint4x(seed, index) for index < 2^32.
FE_HOST_DEVICE Philox4x32 philox_draw(uint64_t seed, uint64_t index) {
    const Philox4x32 ctr = {{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u}};
    return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform in [0, 1) from the top 24 bits of a word: exact in float32 and float64.
template <typename T>
FE_HOST_DEVICE T uniform24(uint32_t x) {
    return static_cast<T>(x >> 8) * static_cast<T>(5.9604644775390625e-08);  // 2^-24
}

}  // namespace fastequiv
