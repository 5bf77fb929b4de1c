// CPU kernel of the exact (cube-group) path of voxels_resample: every element of the
// cube group moves voxels onto voxels, so copy r of a grid is a strided copy of sample
// r mod B. For output voxel q = (i, j, l) the source is p = M_r^T (q - c) + c, which for a
// signed permutation M is p_a = q_b (M[b][a] = +1) or n - 1 - q_b (M[b][a] = -1): the
// source offset is base + i t0 + j t1 + l t2 with t_b = +-(stride of axis a). The output is
// written in order. Each source grid is read in the layout where the copy's innermost
// source axis is contiguous (the grid, or one of two transposed copies of it made once per
// grid), so every copy is a run of forward or backward contiguous line copies.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace fastequiv {
namespace {

// Where a copy reads: the source grid in one of three layouts, each with one source axis
// innermost (layout a: axis a has stride 1), so that every copy's innermost loop runs over
// consecutive source voxels, forwards or backwards. Layout 2 is the grid itself; layouts 1
// and 0 are transposed copies made once per source grid (a gather of n^3 voxels each,
// instead of one strided gather in every copy that reads along that axis).
struct Layouts {
    int64_t stride[3][3];  // [layout][source axis]
    Layouts(int64_t n) {
        const int64_t n2 = n * n;
        const int64_t s[3][3] = {{1, n2, n}, {n2, 1, n}, {n2, n, 1}};
        for (int l = 0; l < 3; ++l) {
            for (int ax = 0; ax < 3; ++ax) stride[l][ax] = s[l][ax];
        }
    }
};

template <typename T>
void transpose_into(const T* src, int64_t n, int layout, T* dst) {
    const int64_t n2 = n * n;
    if (layout == 1) {  // dst[p0][p2][p1] = src[p0][p1][p2]
        for (int64_t p0 = 0; p0 < n; ++p0) {
            for (int64_t p2 = 0; p2 < n; ++p2) {
                T* d = dst + p0 * n2 + p2 * n;
                const T* c = src + p0 * n2 + p2;
                for (int64_t p1 = 0; p1 < n; ++p1) d[p1] = c[p1 * n];
            }
        }
    } else {  // layout 0: dst[p1][p2][p0] = src[p0][p1][p2]
        for (int64_t p1 = 0; p1 < n; ++p1) {
            for (int64_t p2 = 0; p2 < n; ++p2) {
                T* d = dst + p1 * n2 + p2 * n;
                const T* c = src + p1 * n + p2;
                for (int64_t p0 = 0; p0 < n; ++p0) d[p0] = c[p0 * n2];
            }
        }
    }
}

// Per row r: the layout it reads (the source axis of its innermost output axis), the source
// offset of output voxel (0, 0, 0) and the steps along the two outer output axes; the
// innermost step is +1 or -1 (`forward`).
struct RowPlan {
    int layout;
    bool forward;
    int64_t base, t0, t1;
};

template <typename T>
void cube_copies_impl(const CubeCopiesArgs& a, const std::vector<RowPlan>& plan, const bool (&needed)[3]) {
    const int64_t n = a.n, V = n * n * n, C = a.C, rows = a.rows, B = a.B;
    const T* x = static_cast<const T*>(a.x);
    T* out = static_cast<T*>(a.out);
    const int64_t grids = B * C;
#if defined(FASTEQUIV_OPENMP)
#pragma omp parallel if (rows * C * V >= (1 << 16) && grids > 1)
#endif
    {
        std::vector<T> scratch(static_cast<size_t>((needed[0] ? V : 0) + (needed[1] ? V : 0)));
        T* moved[3] = {nullptr, nullptr, nullptr};
        moved[0] = needed[0] ? scratch.data() : nullptr;
        moved[1] = needed[1] ? scratch.data() + (needed[0] ? V : 0) : nullptr;
#if defined(FASTEQUIV_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t g = 0; g < grids; ++g) {  // source grid g = (sample b, channel ch)
            const int64_t b = g / C, ch = g % C;
            const T* src = x + g * V;
            for (int l = 0; l < 2; ++l) {
                if (needed[l]) transpose_into(src, n, l, moved[l]);
            }
            const T* from[3] = {moved[0], moved[1], src};
            for (int64_t r = b; r < rows; r += B) {
                const RowPlan& p = plan[static_cast<size_t>(r)];
                const T* base = from[p.layout] + p.base;
                T* dst = out + (r * C + ch) * V;
                for (int64_t i = 0; i < n; ++i) {
                    for (int64_t j = 0; j < n; ++j) {
                        const T* line = base + i * p.t0 + j * p.t1;
                        T* o = dst + (i * n + j) * n;
                        if (p.forward) {
                            for (int64_t l = 0; l < n; ++l) o[l] = line[l];
                        } else {
                            for (int64_t l = 0; l < n; ++l) o[l] = line[-l];
                        }
                    }
                }
            }
        }
    }
}

}  // namespace

const char* cube_copies_cpu(const CubeCopiesArgs& a) {
    const int64_t n = a.n;
    const Layouts layouts(n);
    std::vector<RowPlan> plan(static_cast<size_t>(a.rows));
    bool needed[3] = {false, false, false};
    for (int64_t r = 0; r < a.rows; ++r) {
        const int32_t* m = a.M + r * 9;
        int axis[3], sign[3], used = 0;
        for (int b = 0; b < 3; ++b) {  // output axis b reads source axis axis[b] with sign sign[b]
            int found = 0;
            for (int ax = 0; ax < 3; ++ax) {
                const int32_t s = m[b * 3 + ax];
                if (s == 0) continue;
                if ((s != 1 && s != -1) || found || (used >> ax) & 1) {
                    return "M: expected signed permutation matrices (entries 0, 1 or -1, one non-zero a row and column)";
                }
                found = 1;
                used |= 1 << ax;
                axis[b] = ax;
                sign[b] = s;
            }
            if (!found) return "M: expected signed permutation matrices (a row of zeros)";
        }
        RowPlan& p = plan[static_cast<size_t>(r)];
        p.layout = axis[2];
        needed[p.layout] = true;
        const int64_t* st = layouts.stride[p.layout];
        p.base = 0;
        for (int b = 0; b < 3; ++b) {
            if (sign[b] < 0) p.base += (n - 1) * st[axis[b]];
        }
        p.t0 = sign[0] * st[axis[0]];
        p.t1 = sign[1] * st[axis[1]];
        p.forward = sign[2] > 0;
    }
    needed[2] = false;  // the grid itself
    if (a.type == Dtype::f64) {
        cube_copies_impl<double>(a, plan, needed);
    } else {
        cube_copies_impl<float>(a, plan, needed);
    }
    return nullptr;
}

}  // namespace fastequiv
