// CPU kernel of the exact (cube-group) path of voxels_resample: every element of the
// cube group moves voxels onto voxels, so copy r of a grid is a strided copy of sample
// r mod B. For output voxel q = (i, j, l) the source is p = M_r^T (q - c) + c, which for a
// signed permutation M is p_a = q_b (M[b][a] = +1) or n - 1 - q_b (M[b][a] = -1): the
// source offset is base + i t0 + j t1 + l t2 with t_b = +-(stride of axis a). The output is
// written in order; each (row, channel) source grid is read from cache.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace fastequiv {
namespace {

template <typename T>
void cube_copies_impl(const CubeCopiesArgs& a, const int64_t* base, const int64_t* steps) {
    const int64_t n = a.n, V = n * n * n, C = a.C, rows = a.rows, B = a.B;
    const T* x = static_cast<const T*>(a.x);
    T* out = static_cast<T*>(a.out);
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel for schedule(static) if (rows * C * V >= (1 << 15))
#endif
    for (int64_t rc = 0; rc < rows * C; ++rc) {
        const int64_t r = rc / C, ch = rc % C;
        const T* src = x + ((r % B) * C + ch) * V + base[r];
        const int64_t t0 = steps[r * 3], t1 = steps[r * 3 + 1], t2 = steps[r * 3 + 2];
        T* dst = out + rc * V;
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t j = 0; j < n; ++j) {
                const T* line = src + i * t0 + j * t1;
                T* o = dst + (i * n + j) * n;
                if (t2 == 1) {
                    for (int64_t l = 0; l < n; ++l) o[l] = line[l];
                } else if (t2 == -1) {
                    for (int64_t l = 0; l < n; ++l) o[l] = line[-l];
                } else {
                    for (int64_t l = 0; l < n; ++l) o[l] = line[l * t2];
                }
            }
        }
    }
}

}  // namespace

const char* cube_copies_cpu(const CubeCopiesArgs& a) {
    const int64_t n = a.n;
    const int64_t stride[3] = {n * n, n, 1};
    // per row: the source offset of voxel (0, 0, 0) and the steps along the output axes
    std::vector<int64_t> base(static_cast<size_t>(a.rows)), steps(static_cast<size_t>(3 * a.rows));
    const char* err = nullptr;
    for (int64_t r = 0; r < a.rows && !err; ++r) {
        const int32_t* m = a.M + r * 9;
        base[r] = 0;
        int used = 0;
        for (int b = 0; b < 3 && !err; ++b) {  // output axis b reads source axis a with sign s
            int found = 0;
            for (int ax = 0; ax < 3; ++ax) {
                const int32_t s = m[b * 3 + ax];
                if (s == 0) continue;
                if ((s != 1 && s != -1) || found || (used >> ax) & 1) {
                    err = "M: expected signed permutation matrices (entries 0, 1 or -1, one non-zero a row and column)";
                    break;
                }
                found = 1;
                used |= 1 << ax;
                steps[r * 3 + b] = s * stride[ax];
                if (s < 0) base[r] += (n - 1) * stride[ax];
            }
            if (!found && !err) err = "M: expected signed permutation matrices (a row of zeros)";
        }
    }
    if (!err) {
        if (a.type == Dtype::f64) {
            cube_copies_impl<double>(a, base.data(), steps.data());
        } else {
            cube_copies_impl<float>(a, base.data(), steps.data());
        }
    }
    return err;
}

}  // namespace fastequiv
