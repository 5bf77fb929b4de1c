// Python bindings of fastequiv._C (nanobind): every function the module exposes is
// registered here, in NB_MODULE at the bottom. Arguments are checked at this boundary and
// wrong ones raise ValueError naming the argument, what it got and what was expected.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "philox.cuh"
#if defined(FASTEQUIV_WITH_CUDA)
#include "cuda_launchers.h"
#endif

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<>;  // unconstrained: checked below, never converted (it is an output)

std::string describe_dtype(const nb::dlpack::dtype& dt) {
    const char* kind = "?";
    switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
        case nb::dlpack::dtype_code::Int: kind = "int"; break;
        case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
        case nb::dlpack::dtype_code::Float: kind = "float"; break;
        case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
        case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
        case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
        default: break;
    }
    return std::string(kind) + std::to_string(dt.bits);
}

std::string describe_shape(const Array& a) {
    std::string s = "(";
    for (size_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// `out` must be a C-contiguous (n, 3, 3) float32/float64 array on `device_type`.
void check_rotations_out(const Array& out, int device_type, const char* device_name) {
    if (out.device_type() != device_type) {
        throw nb::value_error(("out: expected an array on the " + std::string(device_name) +
                               " (DLPack device type " + std::to_string(device_type) +
                               "), got DLPack device type " + std::to_string(out.device_type()))
                                  .c_str());
    }
    if (out.ndim() != 3 || out.shape(1) != 3 || out.shape(2) != 3) {
        throw nb::value_error(
            ("out: expected shape (n, 3, 3), got " + describe_shape(out)).c_str());
    }
    if (out.dtype() != nb::dtype<float>() && out.dtype() != nb::dtype<double>()) {
        throw nb::value_error(
            ("out: expected dtype float32 or float64, got " + describe_dtype(out.dtype())).c_str());
    }
    // An empty array has nothing to write (and exporters report arbitrary strides for it).
    const bool contiguous =
        out.shape(0) == 0 ||
        (out.stride(2) == 1 && out.stride(1) == 3 && (out.shape(0) == 1 || out.stride(0) == 9));
    if (!contiguous) {
        throw nb::value_error("out: expected a C-contiguous array (strides (9, 3, 1) elements)");
    }
}

void check_seed(uint64_t seed) {
    if (seed >> 63) {
        throw nb::value_error(
            ("seed: expected 0 <= seed < 2**63, got " + std::to_string(seed)).c_str());
    }
}

std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> philox4x32_10(
    std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> counter,
    std::tuple<uint32_t, uint32_t> key) {
    const fastequiv::Philox4x32 ctr = {
        {std::get<0>(counter), std::get<1>(counter), std::get<2>(counter), std::get<3>(counter)}};
    const fastequiv::Philox4x32 r =
        fastequiv::philox4x32_10(ctr, std::get<0>(key), std::get<1>(key));
    return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

void random_rotations_cpu(Array out, uint64_t seed, uint64_t offset, bool improper) {
    check_rotations_out(out, nb::device::cpu::value, "CPU");
    check_seed(seed);
    const int64_t n = static_cast<int64_t>(out.shape(0));
    nb::gil_scoped_release release;
    if (out.dtype() == nb::dtype<float>()) {
        fastequiv::random_rotations_cpu(static_cast<float*>(out.data()), n, seed, offset, improper);
    } else {
        fastequiv::random_rotations_cpu(static_cast<double*>(out.data()), n, seed, offset,
                                        improper);
    }
}

#if defined(FASTEQUIV_WITH_CUDA)
void random_rotations_cuda(Array out, uint64_t seed, uint64_t offset, bool improper,
                           uintptr_t stream) {
    check_rotations_out(out, nb::device::cuda::value, "CUDA device");
    check_seed(seed);
    const int64_t n = static_cast<int64_t>(out.shape(0));
    const int device = static_cast<int>(out.device_id());
    void* s = reinterpret_cast<void*>(stream);
    const char* err;
    {
        nb::gil_scoped_release release;
        if (out.dtype() == nb::dtype<float>()) {
            err = fastequiv::launch_random_rotations(static_cast<float*>(out.data()), n, seed,
                                                     offset, improper, device, s);
        } else {
            err = fastequiv::launch_random_rotations(static_cast<double*>(out.data()), n, seed,
                                                     offset, improper, device, s);
        }
    }
    if (err) throw std::runtime_error(std::string("random_rotations_cuda: ") + err);
}
#endif

// --- the row contract (fastequiv/ops/layout.py) ------------------------------------------

using OptArray = std::optional<Array>;

// Where the arrays of one call must live, and which element types its kernels read.
struct Target {
    int device_type;
    const char* device_name;
    bool half_types;  // the CUDA kernels read float16/bfloat16; the CPU ones do not
    int device_id = -1;

    void on_device(const Array& a, const char* name) {
        if (a.device_type() != device_type) {
            throw nb::value_error((std::string(name) + ": expected an array on the " + device_name +
                                   " (DLPack device type " + std::to_string(device_type) +
                                   "), got DLPack device type " + std::to_string(a.device_type()))
                                      .c_str());
        }
        if (device_type != nb::device::cpu::value) {
            if (device_id < 0) device_id = a.device_id();
            if (a.device_id() != device_id) {
                throw nb::value_error((std::string(name) + ": expected an array on device " +
                                       std::to_string(device_id) + " (as the other arrays), got device " +
                                       std::to_string(a.device_id()))
                                          .c_str());
            }
        }
    }
};

fastequiv::Dtype float_dtype(const Array& a, const char* name, bool half_types) {
    const auto dt = a.dtype();
    if (dt == nb::dtype<float>()) return fastequiv::Dtype::f32;
    if (dt == nb::dtype<double>()) return fastequiv::Dtype::f64;
    if (half_types && dt.bits == 16) {
        if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return fastequiv::Dtype::f16;
        if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return fastequiv::Dtype::bf16;
    }
    throw nb::value_error((std::string(name) + ": expected dtype " +
                           (half_types ? "float16, bfloat16, float32 or float64" : "float32 or float64") +
                           ", got " + describe_dtype(dt))
                              .c_str());
}

// `a` must have shape `want` (named `labels`, e.g. "(K, N, d)") and be C-contiguous.
void check_array(const Array& a, const char* name, const char* labels, const std::vector<int64_t>& want) {
    bool ok = a.ndim() == want.size();
    for (size_t i = 0; ok && i < want.size(); ++i) ok = static_cast<int64_t>(a.shape(i)) == want[i];
    if (!ok) {
        std::string w = "(";
        for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
        w += want.size() == 1 ? ",)" : ")";
        throw nb::value_error((std::string(name) + ": expected shape " + labels + " = " + w + ", got " +
                               describe_shape(a))
                                  .c_str());
    }
    int64_t expected = 1;
    bool empty = false;
    for (size_t i = 0; i < a.ndim(); ++i) empty |= a.shape(i) == 0;
    for (size_t i = a.ndim(); i-- > 0 && !empty;) {
        if (a.shape(i) != 1 && a.stride(i) != expected) {
            throw nb::value_error((std::string(name) + ": expected a C-contiguous array").c_str());
        }
        expected *= static_cast<int64_t>(a.shape(i));
    }
}

void check_dtype(const Array& a, const char* name, fastequiv::Dtype want, fastequiv::Dtype got,
                 const char* why) {
    if (want != got) {
        throw nb::value_error((std::string(name) + ": expected the dtype of " + why + ", got " +
                               describe_dtype(a.dtype()))
                                  .c_str());
    }
}

// The (K, B, d, d) matrices fix K, B, d and the accumulation dtype of a call.
struct Blocks {
    int64_t K, B;
    int d;
    fastequiv::Dtype acc;
};

Blocks check_matrices(Target& t, const Array& M) {
    t.on_device(M, "M");
    if (M.ndim() != 4 || M.shape(2) != M.shape(3)) {
        throw nb::value_error(("M: expected shape (K, B, d, d), got " + describe_shape(M)).c_str());
    }
    const fastequiv::Dtype acc = float_dtype(M, "M", false);
    Blocks b{static_cast<int64_t>(M.shape(0)), static_cast<int64_t>(M.shape(1)), static_cast<int>(M.shape(2)), acc};
    check_array(M, "M", "(K, B, d, d)", {b.K, b.B, b.d, b.d});
    return b;
}

// The sample of each of the N rows: the int64 array `sample` (graph layout), or r // P
// (dense layout, sample None, P >= 1, every row in one of the B samples).
fastequiv::RowLayout check_layout(Target& t, const Blocks& b, int64_t N, const OptArray& sample, int64_t P) {
    fastequiv::RowLayout L{nullptr, P, b.K, N, b.B, b.d};
    if (sample) {
        t.on_device(*sample, "sample");
        if (sample->dtype() != nb::dtype<int64_t>()) {
            throw nb::value_error(("sample: expected dtype int64, got " + describe_dtype(sample->dtype())).c_str());
        }
        check_array(*sample, "sample", "(N,)", {N});
        L.sample = static_cast<const int64_t*>(sample->data());
        L.P = 0;
    } else {
        if (P < 1) {
            throw nb::value_error(("P: expected P >= 1 rows per sample in the dense layout (sample None), got " +
                                   std::to_string(P))
                                      .c_str());
        }
        if (N > 0 && (N - 1) / P >= b.B) {
            throw nb::value_error(("P: " + std::to_string(N) + " rows of " + std::to_string(P) +
                                   " per sample need more than B = " + std::to_string(b.B) + " samples")
                                      .c_str());
        }
    }
    return L;
}

const uint8_t* check_valid(Target& t, const OptArray& valid, int64_t N) {
    if (!valid) return nullptr;
    t.on_device(*valid, "valid");
    if (valid->dtype() != nb::dtype<bool>()) {
        throw nb::value_error(("valid: expected dtype bool, got " + describe_dtype(valid->dtype())).c_str());
    }
    check_array(*valid, "valid", "(N,)", {N});
    return static_cast<const uint8_t*>(valid->data());
}

// An array in the accumulation dtype with the given shape.
const void* check_acc(Target& t, const Array& a, const char* name, const char* labels,
                      const std::vector<int64_t>& want, fastequiv::Dtype acc) {
    t.on_device(a, name);
    check_dtype(a, name, acc, float_dtype(a, name, false), "M (the accumulation dtype)");
    check_array(a, name, labels, want);
    return a.data();
}

// The CPU kernels report bad argument values (an out-of-range sample index) as
// "name: ..." messages: ValueError at this boundary.
void raise_if(const char* err) {
    if (err) throw nb::value_error(err);
}

fastequiv::RotateRowsArgs rotate_rows_args(Target& t, const Array& x, const Array& M, const OptArray& sample,
                                           int64_t P, const Array& center, const Array& out) {
    const Blocks b = check_matrices(t, M);
    t.on_device(x, "x");
    if (x.ndim() != 2) throw nb::value_error(("x: expected shape (N, d), got " + describe_shape(x)).c_str());
    const int64_t N = static_cast<int64_t>(x.shape(0));
    fastequiv::RotateRowsArgs a;
    a.rows = check_layout(t, b, N, sample, P);
    a.x_type = float_dtype(x, "x", t.half_types);
    a.acc_type = b.acc;
    check_array(x, "x", "(N, d)", {N, b.d});
    a.x = x.data();
    a.M = M.data();
    a.center = check_acc(t, center, "center", "(B, d)", {b.B, b.d}, b.acc);
    t.on_device(out, "out");
    check_dtype(out, "out", a.x_type, float_dtype(out, "out", t.half_types), "x");
    check_array(out, "out", "(K, N, d)", {b.K, N, b.d});
    a.out = out.data();
    return a;
}

fastequiv::RotateRowsBackwardArgs rotate_rows_backward_args(Target& t, const Array& grad, const Array& M,
                                                            const OptArray& sample, int64_t P, const Array& out) {
    const Blocks b = check_matrices(t, M);
    t.on_device(grad, "grad");
    if (grad.ndim() != 3) {
        throw nb::value_error(("grad: expected shape (K, N, d), got " + describe_shape(grad)).c_str());
    }
    const int64_t N = static_cast<int64_t>(grad.shape(1));
    fastequiv::RotateRowsBackwardArgs a;
    a.rows = check_layout(t, b, N, sample, P);
    a.grad_type = float_dtype(grad, "grad", t.half_types);
    a.acc_type = b.acc;
    check_array(grad, "grad", "(K, N, d)", {b.K, N, b.d});
    a.grad = grad.data();
    a.M = M.data();
    a.out = const_cast<void*>(check_acc(t, out, "out", "(N, d)", {N, b.d}, b.acc));
    return a;
}

// The arguments shared by reduce_rows and its backward.
template <typename Args>
void reduce_common(Target& t, Args& a, const Array& out, const Array& M, const Array& target,
                   const OptArray& sample, int64_t P, const OptArray& valid, const Array& center, Blocks& b) {
    b = check_matrices(t, M);
    t.on_device(out, "out");
    if (out.ndim() != 3) throw nb::value_error(("out: expected shape (K, N, d), got " + describe_shape(out)).c_str());
    const int64_t N = static_cast<int64_t>(out.shape(1));
    a.rows = check_layout(t, b, N, sample, P);
    a.out_type = float_dtype(out, "out", t.half_types);
    a.acc_type = b.acc;
    check_array(out, "out", "(K, N, d)", {b.K, N, b.d});
    t.on_device(target, "target");
    a.target_type = float_dtype(target, "target", t.half_types);
    check_array(target, "target", "(N, d)", {N, b.d});
    a.out = out.data();
    a.M = M.data();
    a.target = target.data();
    a.valid = check_valid(t, valid, N);
    a.center = check_acc(t, center, "center", "(K, B, d)", {b.K, b.B, b.d}, b.acc);
}

fastequiv::ReduceRowsArgs reduce_rows_args(Target& t, const Array& out, const Array& M, const Array& target,
                                           const OptArray& sample, int64_t P, const OptArray& valid,
                                           const Array& center, const Array& mean, const Array& sums) {
    fastequiv::ReduceRowsArgs a;
    Blocks b;
    reduce_common(t, a, out, M, target, sample, P, valid, center, b);
    const int64_t N = a.rows.N;
    a.mean = const_cast<void*>(check_acc(t, mean, "mean", "(N, d)", {N, b.d}, b.acc));
    a.sums = const_cast<void*>(check_acc(t, sums, "sums", "(3, B)", {3, b.B}, b.acc));
    return a;
}

fastequiv::ReduceRowsBackwardArgs reduce_rows_backward_args(Target& t, const OptArray& grad_mean,
                                                            const Array& grad_sums, const Array& out,
                                                            const Array& M, const Array& target,
                                                            const OptArray& sample, int64_t P,
                                                            const OptArray& valid, const Array& center,
                                                            const Array& mean, const Array& grad_out) {
    fastequiv::ReduceRowsBackwardArgs a;
    Blocks b;
    reduce_common(t, a, out, M, target, sample, P, valid, center, b);
    const int64_t N = a.rows.N;
    a.grad_mean = grad_mean ? check_acc(t, *grad_mean, "grad_mean", "(N, d)", {N, b.d}, b.acc) : nullptr;
    a.grad_sums = check_acc(t, grad_sums, "grad_sums", "(3, B)", {3, b.B}, b.acc);
    a.mean = check_acc(t, mean, "mean", "(N, d)", {N, b.d}, b.acc);
    t.on_device(grad_out, "grad_out");
    check_dtype(grad_out, "grad_out", a.out_type, float_dtype(grad_out, "grad_out", t.half_types), "out");
    check_array(grad_out, "grad_out", "(K, N, d)", {b.K, N, b.d});
    a.grad_out = grad_out.data();
    a.work = nullptr;
    return a;
}

fastequiv::WignerBlocksArgs wigner_blocks_args(Target& t, const Array& R, int lmax, const Array& term_index,
                                               const Array& term_coef, const Array& term_start,
                                               const Array& out) {
    if (lmax < 0) throw nb::value_error(("lmax: expected lmax >= 0, got " + std::to_string(lmax)).c_str());
    t.on_device(R, "R");
    if (R.ndim() != 3) throw nb::value_error(("R: expected shape (n, 3, 3), got " + describe_shape(R)).c_str());
    fastequiv::WignerBlocksArgs a;
    a.n = static_cast<int64_t>(R.shape(0));
    a.type = float_dtype(R, "R", false);
    a.lmax = lmax;
    check_array(R, "R", "(n, 3, 3)", {a.n, 3, 3});
    for (const auto* idx : {&term_index, &term_start}) {
        const char* name = idx == &term_index ? "term_index" : "term_start";
        t.on_device(*idx, name);
        if (idx->dtype() != nb::dtype<int32_t>()) {
            throw nb::value_error((std::string(name) + ": expected dtype int32, got " + describe_dtype(idx->dtype())).c_str());
        }
    }
    check_array(term_start, "term_start", "(lmax + 2,)", {lmax + 2});
    if (term_index.ndim() != 2) {
        throw nb::value_error(("term_index: expected shape (T, 3), got " + describe_shape(term_index)).c_str());
    }
    const int64_t T = static_cast<int64_t>(term_index.shape(0));
    check_array(term_index, "term_index", "(T, 3)", {T, 3});
    t.on_device(term_coef, "term_coef");
    check_dtype(term_coef, "term_coef", a.type, float_dtype(term_coef, "term_coef", false), "R");
    check_array(term_coef, "term_coef", "(T,)", {T});
    const int64_t S = (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) / 3;
    t.on_device(out, "out");
    check_dtype(out, "out", a.type, float_dtype(out, "out", false), "R");
    check_array(out, "out", "(n, S)", {a.n, S});
    a.R = R.data();
    a.term_index = static_cast<const int32_t*>(term_index.data());
    a.term_coef = term_coef.data();
    a.term_start = static_cast<const int32_t*>(term_start.data());
    a.out = out.data();
    return a;
}

Target cpu_target() { return Target{nb::device::cpu::value, "CPU", false}; }

void rotate_rows_cpu(Array x, Array M, OptArray sample, int64_t P, Array center, Array out) {
    Target t = cpu_target();
    const auto a = rotate_rows_args(t, x, M, sample, P, center, out);
    const char* err;
    {
        nb::gil_scoped_release release;
        err = fastequiv::rotate_rows_cpu(a);
    }
    raise_if(err);
}

void rotate_rows_backward_cpu(Array grad, Array M, OptArray sample, int64_t P, Array out) {
    Target t = cpu_target();
    const auto a = rotate_rows_backward_args(t, grad, M, sample, P, out);
    const char* err;
    {
        nb::gil_scoped_release release;
        err = fastequiv::rotate_rows_backward_cpu(a);
    }
    raise_if(err);
}

void reduce_rows_cpu(Array out, Array M, Array target, OptArray sample, int64_t P, OptArray valid, Array center,
                     Array mean, Array sums) {
    Target t = cpu_target();
    const auto a = reduce_rows_args(t, out, M, target, sample, P, valid, center, mean, sums);
    const char* err;
    {
        nb::gil_scoped_release release;
        err = fastequiv::reduce_rows_cpu(a);
    }
    raise_if(err);
}

void reduce_rows_backward_cpu(OptArray grad_mean, Array grad_sums, Array out, Array M, Array target,
                              OptArray sample, int64_t P, OptArray valid, Array center, Array mean,
                              Array grad_out) {
    Target t = cpu_target();
    const auto a = reduce_rows_backward_args(t, grad_mean, grad_sums, out, M, target, sample, P, valid, center,
                                             mean, grad_out);
    const char* err;
    {
        nb::gil_scoped_release release;
        err = fastequiv::reduce_rows_backward_cpu(a);
    }
    raise_if(err);
}

void wigner_blocks_cpu(Array R, int lmax, Array term_index, Array term_coef, Array term_start, Array out) {
    Target t = cpu_target();
    const auto a = wigner_blocks_args(t, R, lmax, term_index, term_coef, term_start, out);
    nb::gil_scoped_release release;
    fastequiv::wigner_blocks_cpu(a);
}

// The exact path of voxels_resample: x (B, C, n, n, n) float32/float64, M int32 (rows, 9)
// signed permutations (rows a multiple of B), out (rows, C, n, n, n) in x's dtype.
void cube_copies_cpu(Array x, Array M, Array out) {
    Target t = cpu_target();
    t.on_device(x, "x");
    t.on_device(M, "M");
    t.on_device(out, "out");
    if (x.ndim() != 5 || x.shape(2) != x.shape(3) || x.shape(3) != x.shape(4)) {
        throw nb::value_error(("x: expected shape (B, C, n, n, n), got " + describe_shape(x)).c_str());
    }
    const fastequiv::Dtype dt = float_dtype(x, "x", false);
    const int64_t B = x.shape(0), C = x.shape(1), n = x.shape(2);
    check_array(x, "x", "(B, C, n, n, n)", {B, C, n, n, n});
    if (M.dtype() != nb::dtype<int32_t>() || M.ndim() != 2) {
        throw nb::value_error(("M: expected an int32 array of shape (rows, 9), got " + describe_dtype(M.dtype()) +
                               " of shape " + describe_shape(M))
                                  .c_str());
    }
    const int64_t rows = M.shape(0);
    check_array(M, "M", "(rows, 9)", {rows, 9});
    if (rows > 0 && (B == 0 || rows % B != 0)) {
        throw nb::value_error(("M: expected a multiple of B = " + std::to_string(B) + " rows, got " +
                               std::to_string(rows))
                                  .c_str());
    }
    check_array(out, "out", "(rows, C, n, n, n)", {rows, C, n, n, n});
    check_dtype(out, "out", dt, float_dtype(out, "out", false), "x");
    const fastequiv::CubeCopiesArgs a{dt, x.data(), static_cast<const int32_t*>(M.data()), B, C, n, rows, out.data()};
    const char* err;
    {
        nb::gil_scoped_release release;
        err = fastequiv::cube_copies_cpu(a);
    }
    if (err) throw nb::value_error(err);
}

// --- the hot path: raw pointers ---------------------------------------------------------------
// The measuring functions and the op wrappers call the row kernels through these: data
// pointers (Python ints, 0 for None) and sizes, nothing converted. fastequiv/backends/native.py
// has checked every shape, dtype, device and contiguity before (once per call, or once per
// plan of equal calls): importing an array over DLPack costs about 2 us, more than the
// kernels of a small batch take. Dtypes are fastequiv::Dtype codes (2 float32, 3 float64).

template <typename P>
P* ptr(uintptr_t p) {
    return reinterpret_cast<P*>(p);
}

fastequiv::Dtype cpu_dtype(int code, const char* name) {
    if (code != static_cast<int>(fastequiv::Dtype::f32) && code != static_cast<int>(fastequiv::Dtype::f64)) {
        throw nb::value_error((std::string(name) + ": expected dtype code 2 (float32) or 3 (float64), got " +
                               std::to_string(code))
                                  .c_str());
    }
    return static_cast<fastequiv::Dtype>(code);
}

// An empty array's data pointer may be 0: no sample array then reads as the dense layout,
// with P >= 1 so that no kernel divides by it (there are no rows to place).
fastequiv::RowLayout raw_layout(uintptr_t sample, int64_t P, int64_t K, int64_t N, int64_t B, int d) {
    return fastequiv::RowLayout{ptr<const int64_t>(sample), sample ? 0 : (P < 1 ? 1 : P), K, N, B, d};
}

// The GIL is released only for work worth a thread switch (a small batch's kernels take
// less than releasing and taking it back).
constexpr int64_t kReleaseElements = 1 << 16;

template <typename Fn>
const char* run_kernel(int64_t elements, Fn&& fn) {
    if (elements < kReleaseElements) return fn();
    nb::gil_scoped_release release;
    return fn();
}

// With `centroid` (center unused), positions of a graph batch: the rows turn about the
// centroid of their sample's valid rows (`valid`, 0 for all), summed as centroids_cpu sums.
void rotate_rows_raw_cpu(uintptr_t x, uintptr_t M, uintptr_t sample, int64_t P, uintptr_t center, uintptr_t out,
                         int64_t K, int64_t N, int64_t B, int d, int x_type, int acc_type, uintptr_t valid,
                         bool centroid) {
    fastequiv::RotateRowsArgs a;
    a.rows = raw_layout(sample, P, K, N, B, d);
    a.x_type = cpu_dtype(x_type, "x");
    a.acc_type = cpu_dtype(acc_type, "M");
    a.x = ptr<const void>(x);
    a.M = ptr<const void>(M);
    a.center = ptr<const void>(center);
    a.out = ptr<void>(out);
    std::vector<double> centres;
    if (centroid) {
        if (!sample) throw nb::value_error("center: the centroids are summed here in the graph layout only (sample)");
        if (a.x_type == fastequiv::Dtype::f64 && a.acc_type != fastequiv::Dtype::f64) {
            throw nb::value_error("x: float64 rows need the float64 accumulation dtype");
        }
        centres.resize(static_cast<size_t>(B * d));  // room for B * d values of acc
        raise_if(fastequiv::centroids_cpu(a.x, a.x_type, a.acc_type, ptr<const int64_t>(sample),
                                          ptr<const uint8_t>(valid), N, B, d, centres.data()));
        a.center = centres.data();
    }
    raise_if(run_kernel(K * N * d, [&] { return fastequiv::rotate_rows_cpu(a); }));
}

void rotate_rows_backward_raw_cpu(uintptr_t grad, uintptr_t M, uintptr_t sample, int64_t P, uintptr_t out,
                                  int64_t K, int64_t N, int64_t B, int d, int grad_type, int acc_type) {
    fastequiv::RotateRowsBackwardArgs a;
    a.rows = raw_layout(sample, P, K, N, B, d);
    a.grad_type = cpu_dtype(grad_type, "grad");
    a.acc_type = cpu_dtype(acc_type, "M");
    a.grad = ptr<const void>(grad);
    a.M = ptr<const void>(M);
    a.out = ptr<void>(out);
    raise_if(run_kernel(K * N * d, [&] { return fastequiv::rotate_rows_backward_cpu(a); }));
}

void reduce_rows_raw_cpu(uintptr_t out, uintptr_t M, uintptr_t target, uintptr_t sample, int64_t P, uintptr_t valid,
                         uintptr_t center, uintptr_t mean, uintptr_t sums, int64_t K, int64_t N, int64_t B, int d,
                         int out_type, int target_type, int acc_type, uintptr_t weights) {
    fastequiv::ReduceRowsArgs a;
    a.rows = raw_layout(sample, P, K, N, B, d);
    a.out_type = cpu_dtype(out_type, "out");
    a.target_type = cpu_dtype(target_type, "target");
    a.acc_type = cpu_dtype(acc_type, "M");
    a.out = ptr<const void>(out);
    a.M = ptr<const void>(M);
    a.target = ptr<const void>(target);
    a.valid = ptr<const uint8_t>(valid);
    a.center = ptr<const void>(center);
    a.mean = ptr<void>(mean);
    a.sums = ptr<void>(sums);
    a.weights = ptr<const void>(weights);
    raise_if(run_kernel(K * N * d, [&] { return fastequiv::reduce_rows_cpu(a); }));
}

void reduce_rows_backward_raw_cpu(uintptr_t grad_mean, uintptr_t grad_sums, uintptr_t out, uintptr_t M,
                                  uintptr_t target, uintptr_t sample, int64_t P, uintptr_t valid, uintptr_t center,
                                  uintptr_t mean, uintptr_t grad_out, int64_t K, int64_t N, int64_t B, int d,
                                  int out_type, int target_type, int acc_type, uintptr_t weights) {
    fastequiv::ReduceRowsBackwardArgs a;
    a.rows = raw_layout(sample, P, K, N, B, d);
    a.out_type = cpu_dtype(out_type, "out");
    a.target_type = cpu_dtype(target_type, "target");
    a.acc_type = cpu_dtype(acc_type, "M");
    a.grad_mean = ptr<const void>(grad_mean);
    a.grad_sums = ptr<const void>(grad_sums);
    a.out = ptr<const void>(out);
    a.M = ptr<const void>(M);
    a.target = ptr<const void>(target);
    a.valid = ptr<const uint8_t>(valid);
    a.center = ptr<const void>(center);
    a.mean = ptr<const void>(mean);
    a.grad_out = ptr<void>(grad_out);
    a.work = nullptr;
    a.weights = ptr<const void>(weights);
    raise_if(run_kernel(K * N * d, [&] { return fastequiv::reduce_rows_backward_cpu(a); }));
}

void random_rotations_raw_cpu(uintptr_t out, int out_type, int64_t n, uint64_t seed, uint64_t offset,
                              bool improper) {
    check_seed(seed);
    const fastequiv::Dtype t = cpu_dtype(out_type, "out");
    run_kernel(9 * n, [&]() -> const char* {
        fastequiv::random_rotations_rounded_cpu(ptr<void>(out), t, n, seed, offset, improper);
        return nullptr;
    });
}

// The exact path of voxels_resample on data pointers: x (B, C, n, n, n), M (rows, 3, 3) in
// x's dtype (the caller has checked them: signed permutations, rounded here), out
// (rows, C, n, n, n).
void cube_copies_raw_cpu(uintptr_t x, uintptr_t M, uintptr_t out, int64_t B, int64_t C, int64_t n, int64_t rows,
                         int type) {
    const fastequiv::Dtype t = cpu_dtype(type, "x");
    std::vector<int32_t> elements(static_cast<size_t>(rows * 9));
    for (int64_t q = 0; q < rows * 9; ++q) {
        const double v = t == fastequiv::Dtype::f64 ? ptr<const double>(M)[q] : ptr<const float>(M)[q];
        elements[static_cast<size_t>(q)] = static_cast<int32_t>(std::lround(v));
    }
    const fastequiv::CubeCopiesArgs a{t, ptr<const void>(x), elements.data(), B, C, n, rows, ptr<void>(out)};
    raise_if(run_kernel(rows * C * n * n * n, [&] { return fastequiv::cube_copies_cpu(a); }));
}

void offset_copies_raw_cpu(uintptr_t x, uintptr_t out, int64_t rows, int64_t width, int64_t K, int64_t step) {
    fastequiv::offset_copies_cpu(ptr<const int64_t>(x), rows, width, K, step, ptr<int64_t>(out));
}

// The heads of one call: per-head arrays of pointers and sizes.
struct RawHeads {
    std::vector<const int64_t*> sample;
    std::vector<const uint8_t*> valid;
    fastequiv::DecomposeArgs args;
};

void decompose_args(RawHeads& r, int acc_type, int64_t B, int64_t K, bool exhaustive, bool combine,
                        const std::vector<double>& weight, const std::vector<int64_t>& N, const std::vector<int>& d,
                        const std::vector<int64_t>& P, const std::vector<uintptr_t>& sample,
                        const std::vector<uintptr_t>& valid, uintptr_t sums, uintptr_t count, uintptr_t per_sample,
                        uintptr_t scalars, uintptr_t valid_out) {
    const size_t H = weight.size();
    if (H == 0 || N.size() != H || d.size() != H || P.size() != H || sample.size() != H || valid.size() != H) {
        throw nb::value_error("heads: expected weight, N, d, P, sample and valid of one length H >= 1");
    }
    if (!combine && H != 1) throw nb::value_error("combine: a decomposition of several heads combines them");
    if (!exhaustive && K < 2) throw nb::value_error(("K: expected K >= 2 i.i.d. draws, got " + std::to_string(K)).c_str());
    for (size_t h = 0; h < H; ++h) {
        r.sample.push_back(ptr<const int64_t>(sample[h]));
        r.valid.push_back(ptr<const uint8_t>(valid[h]));
    }
    r.args = fastequiv::DecomposeArgs{cpu_dtype(acc_type, "acc"), static_cast<int>(H), B, K, exhaustive, combine,
                                      weight.data(), N.data(), d.data(), P.data(), nullptr, nullptr,
                                      ptr<const void>(sums), ptr<void>(count), ptr<void>(per_sample),
                                      ptr<void>(scalars), ptr<uint8_t>(valid_out)};
    r.args.sample = r.sample.data();
    r.args.valid = r.valid.data();
}

uint64_t decompose_raw_cpu(int acc_type, int64_t B, int64_t K, bool exhaustive, bool combine,
                           const std::vector<double>& weight, const std::vector<int64_t>& N,
                           const std::vector<int>& d, const std::vector<int64_t>& P,
                           const std::vector<uintptr_t>& sample, const std::vector<uintptr_t>& valid, uintptr_t sums,
                           uintptr_t count, uintptr_t per_sample, uintptr_t scalars, uintptr_t valid_out) {
    RawHeads r;
    decompose_args(r, acc_type, B, K, exhaustive, combine, weight, N, d, P, sample, valid, sums, count, per_sample,
                   scalars, valid_out);
    uint64_t flags = 0;
    raise_if(fastequiv::decompose_cpu(r.args, &flags));
    return flags;
}

void decompose_backward_raw_cpu(int acc_type, int64_t B, int64_t K, bool exhaustive, bool combine,
                                const std::vector<double>& weight, uintptr_t count, double g_total, double g_equiv,
                                uintptr_t grad_sums) {
    const size_t H = weight.size();
    const std::vector<int64_t> zeros(H, 0);
    const std::vector<int> ones(H, 1);
    const std::vector<uintptr_t> none(H, 0);
    RawHeads r;
    decompose_args(r, acc_type, B, K, exhaustive, combine, weight, zeros, ones, zeros, none, none, 0, count, 0, 0, 0);
    fastequiv::decompose_backward_cpu(r.args, g_total, g_equiv, ptr<void>(grad_sums));
}

}  // namespace

// The rotation designs' estimators (csrc/decomposition_cpu.cpp), on the heads of
// DecomposeArgs whose sums are (H, R, 3, B): declared here, next to their only caller.
namespace fastequiv {
const char* design_decompose_cpu(const DecomposeArgs& a, int64_t R, bool labelled, const void* const* mean,
                                 const void* const* target, uint64_t* flags);
void design_decompose_backward_cpu(const DecomposeArgs& a, int64_t R, const void* const* mean,
                                   const void* const* target, double g_total, double g_equiv, void* grad_sums,
                                   void* const* grad_mean);
}  // namespace fastequiv

namespace {

std::vector<const void*> const_pointers(const std::vector<uintptr_t>& p, size_t H, const char* name) {
    if (p.size() != H) throw nb::value_error((std::string(name) + ": expected one pointer a head").c_str());
    std::vector<const void*> out;
    for (uintptr_t q : p) out.push_back(ptr<const void>(q));
    return out;
}

uint64_t design_decompose_raw_cpu(int acc_type, int64_t B, int64_t K, int64_t R, bool combine, bool labelled,
                                  const std::vector<double>& weight, const std::vector<int64_t>& N,
                                  const std::vector<int>& d, const std::vector<int64_t>& P,
                                  const std::vector<uintptr_t>& sample, const std::vector<uintptr_t>& valid,
                                  const std::vector<uintptr_t>& mean, const std::vector<uintptr_t>& target,
                                  uintptr_t sums, uintptr_t count, uintptr_t per_sample, uintptr_t scalars,
                                  uintptr_t valid_out) {
    if (R < 1) throw nb::value_error(("R: expected R >= 1 replicates, got " + std::to_string(R)).c_str());
    RawHeads r;
    decompose_args(r, acc_type, B, K, true, combine, weight, N, d, P, sample, valid, sums, count, per_sample,
                   scalars, valid_out);
    const auto means = const_pointers(mean, weight.size(), "mean");
    const auto targets = const_pointers(target, weight.size(), "target");
    uint64_t flags = 0;
    raise_if(fastequiv::design_decompose_cpu(r.args, R, labelled, means.data(), targets.data(), &flags));
    return flags;
}

void design_decompose_backward_raw_cpu(int acc_type, int64_t B, int64_t K, int64_t R, bool combine,
                                       const std::vector<double>& weight, const std::vector<int64_t>& N,
                                       const std::vector<int>& d, const std::vector<int64_t>& P,
                                       const std::vector<uintptr_t>& sample, const std::vector<uintptr_t>& valid,
                                       const std::vector<uintptr_t>& mean, const std::vector<uintptr_t>& target,
                                       uintptr_t count, double g_total, double g_equiv, uintptr_t grad_sums,
                                       const std::vector<uintptr_t>& grad_mean) {
    RawHeads r;
    decompose_args(r, acc_type, B, K, true, combine, weight, N, d, P, sample, valid, 0, count, 0, 0, 0);
    const auto means = const_pointers(mean, weight.size(), "mean");
    const auto targets = const_pointers(target, weight.size(), "target");
    std::vector<void*> grads;
    for (uintptr_t q : grad_mean) grads.push_back(ptr<void>(q));
    if (grads.size() != weight.size()) throw nb::value_error("grad_mean: expected one pointer a head");
    fastequiv::design_decompose_backward_cpu(r.args, R, means.data(), targets.data(), g_total, g_equiv,
                                             ptr<void>(grad_sums), grads.data());
}

#if defined(FASTEQUIV_WITH_CUDA)
Target cuda_target() { return Target{nb::device::cuda::value, "CUDA device", true}; }

// Runs a launcher without the GIL and turns its error string into an exception.
template <typename Args, typename Launch>
void launch_cuda(const Args& a, int device, uintptr_t stream, Launch launch, const char* what) {
    const char* err;
    {
        nb::gil_scoped_release release;
        err = launch(a, device, reinterpret_cast<void*>(stream));
    }
    if (err) throw std::runtime_error(std::string(what) + ": " + err);
}

// The copies' weights of the reduce kernels: (K,) in the accumulation dtype on the device,
// or null for None (1/K each).
const void* cuda_weights(Target& t, const OptArray& weights, int64_t K, fastequiv::Dtype acc) {
    return weights ? check_acc(t, *weights, "weights", "(K,)", {K}, acc) : nullptr;
}

void rotate_rows_cuda(Array x, Array M, OptArray sample, int64_t P, Array center, Array out, uintptr_t stream) {
    Target t = cuda_target();
    const auto a = rotate_rows_args(t, x, M, sample, P, center, out);
    launch_cuda(a, t.device_id, stream, fastequiv::launch_rotate_rows, "rotate_rows_cuda");
}

void rotate_rows_backward_cuda(Array grad, Array M, OptArray sample, int64_t P, Array out, uintptr_t stream) {
    Target t = cuda_target();
    const auto a = rotate_rows_backward_args(t, grad, M, sample, P, out);
    launch_cuda(a, t.device_id, stream, fastequiv::launch_rotate_rows_backward, "rotate_rows_backward_cuda");
}

void reduce_rows_cuda(Array out, Array M, Array target, OptArray sample, int64_t P, OptArray valid, Array center,
                      Array mean, Array sums, OptArray weights, uintptr_t stream) {
    Target t = cuda_target();
    auto a = reduce_rows_args(t, out, M, target, sample, P, valid, center, mean, sums);
    a.weights = cuda_weights(t, weights, a.rows.K, a.acc_type);
    launch_cuda(a, t.device_id, stream, fastequiv::launch_reduce_rows, "reduce_rows_cuda");
}

void reduce_rows_backward_cuda(OptArray grad_mean, Array grad_sums, Array out, Array M, Array target,
                               OptArray sample, int64_t P, OptArray valid, Array center, Array mean,
                               Array grad_out, OptArray work, OptArray weights, uintptr_t stream) {
    Target t = cuda_target();
    auto a = reduce_rows_backward_args(t, grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean,
                                       grad_out);
    a.weights = cuda_weights(t, weights, a.rows.K, a.acc_type);
    const int d = a.rows.d;
    if (d != 1 && d != 3) {
        if (!work) throw nb::value_error("work: expected an (N, d) scratch array in the accumulation dtype for d not 1 or 3, got None");
        a.work = const_cast<void*>(check_acc(t, *work, "work", "(N, d)", {a.rows.N, d}, a.acc_type));
    }
    launch_cuda(a, t.device_id, stream, fastequiv::launch_reduce_rows_backward, "reduce_rows_backward_cuda");
}

void wigner_blocks_cuda(Array R, int lmax, Array term_index, Array term_coef, Array term_start, Array out,
                        uintptr_t stream) {
    Target t = cuda_target();
    const auto a = wigner_blocks_args(t, R, lmax, term_index, term_coef, term_start, out);
    launch_cuda(a, t.device_id, stream, fastequiv::launch_wigner_blocks, "wigner_blocks_cuda");
}

// Rotations offset .. offset + n - 1 of the stream keyed by the int64 0-dim device array
// `seed`, read by the kernel (no host sync).
void random_rotations_seeded_cuda(Array out, Array seed, uint64_t offset, bool improper, uintptr_t stream) {
    check_rotations_out(out, nb::device::cuda::value, "CUDA device");
    Target t = cuda_target();
    t.on_device(out, "out");
    t.on_device(seed, "seed");
    if (seed.dtype() != nb::dtype<int64_t>() || seed.ndim() != 0) {
        throw nb::value_error(("seed: expected a 0-dim int64 array, got " + describe_dtype(seed.dtype()) + " " +
                               describe_shape(seed))
                                  .c_str());
    }
    const int64_t n = static_cast<int64_t>(out.shape(0));
    const auto* s = static_cast<const int64_t*>(seed.data());
    void* st = reinterpret_cast<void*>(stream);
    const char* err;
    {
        nb::gil_scoped_release release;
        if (out.dtype() == nb::dtype<float>()) {
            err = fastequiv::launch_random_rotations_seeded(static_cast<float*>(out.data()), n, s, offset, improper,
                                                            t.device_id, st);
        } else {
            err = fastequiv::launch_random_rotations_seeded(static_cast<double*>(out.data()), n, s, offset,
                                                            improper, t.device_id, st);
        }
    }
    if (err) throw std::runtime_error(std::string("random_rotations_seeded_cuda: ") + err);
}
#endif

// "80;90" (CMAKE_CUDA_ARCHITECTURES) -> ["80", "90"].
nb::list cuda_archs() {
    nb::list archs;
#if defined(FASTEQUIV_WITH_CUDA)
    const std::string all = FASTEQUIV_CUDA_ARCHS;
    size_t start = 0;
    while (start <= all.size()) {
        size_t end = all.find_first_of(";,", start);
        if (end == std::string::npos) end = all.size();
        if (end > start) archs.append(all.substr(start, end - start));
        start = end + 1;
    }
#endif
    return archs;
}

std::string compiler() {
#if defined(__clang__)
    std::string s = "clang " __clang_version__;
#elif defined(__GNUC__)
    std::string s = "gcc " __VERSION__;
#elif defined(_MSC_VER)
    std::string s = "msvc " + std::to_string(_MSC_VER);
#else
    std::string s = "unknown";
#endif
#if defined(FASTEQUIV_CUDA_COMPILER)
    s += ", nvcc " FASTEQUIV_CUDA_COMPILER;
#endif
    return s;
}

nb::dict build_info() {
    nb::dict info;
#if defined(FASTEQUIV_WITH_CUDA)
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = cuda_archs();
#if defined(FASTEQUIV_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["compiler"] = compiler();
    info["cpu_capability"] = std::string(fastequiv::cpu_capability());
    // FASTEQUIV_CUDA at build time (AUTO, ON or OFF), and whether CMake found a CUDA compiler
    // (not searched for with OFF): with AUTO or ON and a compiler, the CUDA kernels are built
    info["cuda_requested"] = std::string(FASTEQUIV_CUDA_REQUESTED);
    info["cuda_compiler_found"] = FASTEQUIV_CUDA_COMPILER_FOUND != 0;
    return info;
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "fastequiv compiled extension: CPU kernels and, when built with CUDA, launchers.";

    m.def("build_info", &build_info,
          "What this build contains: {'cuda': bool, 'cuda_archs': [str], 'openmp': bool, "
          "'compiler': str, 'cpu_capability': str, 'cuda_requested': str, 'cuda_compiler_found': bool}.");

    m.def("philox4x32_10", &philox4x32_10, nb::arg("counter"), nb::arg("key"),
          "Philox-4x32-10 of a 4-word counter under a 2-word key (Random123); for tests.");

    m.def("random_rotations_cpu", &random_rotations_cpu, nb::arg("out"), nb::arg("seed"),
          nb::arg("offset") = 0, nb::arg("improper") = false,
          "Fill a C-contiguous CPU array out of shape (n, 3, 3), float32 or float64, with the "
          "rotations offset .. offset + n - 1 of the Philox stream `seed` (row-major, active, "
          "v' = R v). With improper=True, elements whose parity bit is set are -R (det -1).");

#if defined(FASTEQUIV_WITH_CUDA)
    m.def("random_rotations_cuda", &random_rotations_cuda, nb::arg("out"), nb::arg("seed"),
          nb::arg("offset") = 0, nb::arg("improper") = false, nb::arg("stream") = 0,
          "As random_rotations_cpu, for a CUDA array (e.g. a torch CUDA tensor via DLPack), "
          "launched on `stream` (a cudaStream_t as an int, e.g. "
          "torch.cuda.current_stream().cuda_stream); asynchronous.");
#endif

    // The row contract (fastequiv/ops/layout.py). Outputs are preallocated, C-contiguous;
    // `center` is always given (zeros for none); M (K, B, d, d) sets the accumulation
    // dtype, which center, mean, sums, grad_mean and grad_sums share.
    m.def("rotate_rows_cpu", &rotate_rows_cpu, nb::arg("x"), nb::arg("M"), nb::arg("sample").none(),
          nb::arg("P"), nb::arg("center"), nb::arg("out"),
          "out[k, r] = M[k, s] (x[r] - center[s]) + center[s] with s the sample of row r "
          "(sample[r], or r // P when sample is None); x, out float32/float64.");
    m.def("rotate_rows_backward_cpu", &rotate_rows_backward_cpu, nb::arg("grad"), nb::arg("M"),
          nb::arg("sample").none(), nb::arg("P"), nb::arg("out"),
          "out[r] = sum_k M[k, s]^T grad[k, r] (N, d) in M's dtype.");
    m.def("reduce_rows_cpu", &reduce_rows_cpu, nb::arg("out"), nb::arg("M"), nb::arg("target"),
          nb::arg("sample").none(), nb::arg("P"), nb::arg("valid").none(), nb::arg("center"), nb::arg("mean"),
          nb::arg("sums"),
          "Back-rotate the K copies `out` (K, N, d) and write the twirled mean (N, d) and the per-sample "
          "sums (3, B) = (total, bias, spread) of the valid rows (sums is overwritten).");
    m.def("reduce_rows_backward_cpu", &reduce_rows_backward_cpu, nb::arg("grad_mean").none(),
          nb::arg("grad_sums"), nb::arg("out"), nb::arg("M"), nb::arg("target"), nb::arg("sample").none(),
          nb::arg("P"), nb::arg("valid").none(), nb::arg("center"), nb::arg("mean"), nb::arg("grad_out"),
          "Gradient of reduce_rows with respect to `out`, written to grad_out (K, N, d) in out's dtype.");
    m.def("wigner_blocks_cpu", &wigner_blocks_cpu, nb::arg("R"), nb::arg("lmax"), nb::arg("term_index"),
          nb::arg("term_coef"), nb::arg("term_start"), nb::arg("out"),
          "Packed Wigner-D blocks D_0 .. D_lmax (e3nn basis) of proper rotations R (n, 3, 3) into out (n, S), "
          "from the Ivanic-Ruedenberg term table (see kernels/wigner.cuh).");
    m.def("cube_copies_cpu", &cube_copies_cpu, nb::arg("x"), nb::arg("M"), nb::arg("out"),
          "The cube-group copies of voxel grids: out[r] = x[r mod B] moved by the signed permutation M[r] "
          "(int32 (rows, 9), row-major): out[q] = x[M^T (q - c) + c] for every voxel q (centre c).");
    // The hot path (fastequiv/backends/native.py): raw pointers, checked by the caller.
    m.def("rotate_rows_raw_cpu", &rotate_rows_raw_cpu, nb::arg("x"), nb::arg("M"), nb::arg("sample"), nb::arg("P"),
          nb::arg("center"), nb::arg("out"), nb::arg("K"), nb::arg("N"), nb::arg("B"), nb::arg("d"),
          nb::arg("x_type"), nb::arg("acc_type"), nb::arg("valid") = 0, nb::arg("centroid") = false,
          "rotate_rows_cpu on data pointers (checked by the caller); with centroid, about the centroids of the "
          "valid rows of each sample (graph layout) instead of `center`.");
    m.def("rotate_rows_backward_raw_cpu", &rotate_rows_backward_raw_cpu, nb::arg("grad"), nb::arg("M"),
          nb::arg("sample"), nb::arg("P"), nb::arg("out"), nb::arg("K"), nb::arg("N"), nb::arg("B"), nb::arg("d"),
          nb::arg("grad_type"), nb::arg("acc_type"), "rotate_rows_backward_cpu on data pointers.");
    m.def("reduce_rows_raw_cpu", &reduce_rows_raw_cpu, nb::arg("out"), nb::arg("M"), nb::arg("target"),
          nb::arg("sample"), nb::arg("P"), nb::arg("valid"), nb::arg("center"), nb::arg("mean"), nb::arg("sums"),
          nb::arg("K"), nb::arg("N"), nb::arg("B"), nb::arg("d"), nb::arg("out_type"), nb::arg("target_type"),
          nb::arg("acc_type"), nb::arg("weights") = 0,
          "reduce_rows_cpu on data pointers (checked by the caller); weights: (K,) in M's dtype, or 0 (1/K each).");
    m.def("reduce_rows_backward_raw_cpu", &reduce_rows_backward_raw_cpu, nb::arg("grad_mean"), nb::arg("grad_sums"),
          nb::arg("out"), nb::arg("M"), nb::arg("target"), nb::arg("sample"), nb::arg("P"), nb::arg("valid"),
          nb::arg("center"), nb::arg("mean"), nb::arg("grad_out"), nb::arg("K"), nb::arg("N"), nb::arg("B"),
          nb::arg("d"), nb::arg("out_type"), nb::arg("target_type"), nb::arg("acc_type"), nb::arg("weights") = 0,
          "reduce_rows_backward_cpu on data pointers (checked by the caller); weights as in reduce_rows_raw_cpu.");
    m.def("random_rotations_raw_cpu", &random_rotations_raw_cpu, nb::arg("out"), nb::arg("out_type"), nb::arg("n"),
          nb::arg("seed"), nb::arg("offset"), nb::arg("improper"),
          "Rotations offset .. offset + n - 1 of the stream `seed` computed in float64 and rounded to out's "
          "dtype, into the C-contiguous (n, 3, 3) array at `out`.");
    m.def("cube_copies_raw_cpu", &cube_copies_raw_cpu, nb::arg("x"), nb::arg("M"), nb::arg("out"), nb::arg("B"),
          nb::arg("C"), nb::arg("n"), nb::arg("rows"), nb::arg("type"),
          "cube_copies_cpu on data pointers, M (rows, 3, 3) in x's dtype (checked by the caller).");
    m.def("offset_copies_raw_cpu", &offset_copies_raw_cpu, nb::arg("x"), nb::arg("out"), nb::arg("rows"),
          nb::arg("width"), nb::arg("K"), nb::arg("step"),
          "K copies of an int64 index (rows, width) along its last dim, copy k shifted by k * step.");
    m.def("decompose_raw_cpu", &decompose_raw_cpu, nb::arg("acc_type"), nb::arg("B"), nb::arg("K"),
          nb::arg("exhaustive"), nb::arg("combine"), nb::arg("weight"), nb::arg("N"), nb::arg("d"), nb::arg("P"),
          nb::arg("sample"), nb::arg("valid"), nb::arg("sums"), nb::arg("count"), nb::arg("per_sample"),
          nb::arg("scalars"), nb::arg("valid_out"),
          "The estimators of every head and their combination from reduce_rows' sums (csrc/decomposition_cpu.cpp); "
          "returns the flags (bit 2h: head h has a valid element; 2h + 1: its per-sample L_total is finite).");
    m.def("decompose_backward_raw_cpu", &decompose_backward_raw_cpu, nb::arg("acc_type"), nb::arg("B"), nb::arg("K"),
          nb::arg("exhaustive"), nb::arg("combine"), nb::arg("weight"), nb::arg("count"), nb::arg("g_total"),
          nb::arg("g_equiv"), nb::arg("grad_sums"),
          "The gradient (H, 3, B) of g_total L_total + g_equiv L_equiv with respect to the heads' sums.");
    m.def("design_decompose_raw_cpu", &design_decompose_raw_cpu, nb::arg("acc_type"), nb::arg("B"), nb::arg("K"),
          nb::arg("R"), nb::arg("combine"), nb::arg("labelled"), nb::arg("weight"), nb::arg("N"), nb::arg("d"),
          nb::arg("P"), nb::arg("sample"), nb::arg("valid"), nb::arg("mean"), nb::arg("target"), nb::arg("sums"),
          nb::arg("count"), nb::arg("per_sample"), nb::arg("scalars"), nb::arg("valid_out"),
          "The rotation-design estimators of every head and their combination from R replicates' reduce_rows sums "
          "(H, R, 3, B) and twirled means (csrc/decomposition_cpu.cpp); returns the flags as decompose_raw_cpu.");
    m.def("design_decompose_backward_raw_cpu", &design_decompose_backward_raw_cpu, nb::arg("acc_type"), nb::arg("B"),
          nb::arg("K"), nb::arg("R"), nb::arg("combine"), nb::arg("weight"), nb::arg("N"), nb::arg("d"), nb::arg("P"),
          nb::arg("sample"), nb::arg("valid"), nb::arg("mean"), nb::arg("target"), nb::arg("count"),
          nb::arg("g_total"), nb::arg("g_equiv"), nb::arg("grad_sums"), nb::arg("grad_mean"),
          "The gradient of g_total L_total + g_equiv L_equiv of design_decompose_raw_cpu with respect to the "
          "replicates' sums (H, R, 3, B) and twirled means (one (R, N, d) array a head, written for R >= 2).");
#if defined(FASTEQUIV_WITH_CUDA)
    m.def("rotate_rows_cuda", &rotate_rows_cuda, nb::arg("x"), nb::arg("M"), nb::arg("sample").none(),
          nb::arg("P"), nb::arg("center"), nb::arg("out"), nb::arg("stream") = 0,
          "As rotate_rows_cpu on CUDA arrays (x also float16/bfloat16), launched on `stream`.");
    m.def("rotate_rows_backward_cuda", &rotate_rows_backward_cuda, nb::arg("grad"), nb::arg("M"),
          nb::arg("sample").none(), nb::arg("P"), nb::arg("out"), nb::arg("stream") = 0,
          "As rotate_rows_backward_cpu on CUDA arrays, launched on `stream`.");
    m.def("reduce_rows_cuda", &reduce_rows_cuda, nb::arg("out"), nb::arg("M"), nb::arg("target"),
          nb::arg("sample").none(), nb::arg("P"), nb::arg("valid").none(), nb::arg("center"), nb::arg("mean"),
          nb::arg("sums"), nb::arg("weights").none() = nb::none(), nb::arg("stream") = 0,
          "As reduce_rows_cpu on CUDA arrays; `sums` must be zero on entry (the kernel adds to it); weights: "
          "(K,) in M's dtype, or None (1/K each).");
    m.def("reduce_rows_backward_cuda", &reduce_rows_backward_cuda, nb::arg("grad_mean").none(),
          nb::arg("grad_sums"), nb::arg("out"), nb::arg("M"), nb::arg("target"), nb::arg("sample").none(),
          nb::arg("P"), nb::arg("valid").none(), nb::arg("center"), nb::arg("mean"), nb::arg("grad_out"),
          nb::arg("work").none() = nb::none(), nb::arg("weights").none() = nb::none(), nb::arg("stream") = 0,
          "As reduce_rows_backward_cpu on CUDA arrays; for d not 1 or 3, `work` is an (N, d) scratch array; "
          "weights as in reduce_rows_cuda.");
    m.def("wigner_blocks_cuda", &wigner_blocks_cuda, nb::arg("R"), nb::arg("lmax"), nb::arg("term_index"),
          nb::arg("term_coef"), nb::arg("term_start"), nb::arg("out"), nb::arg("stream") = 0,
          "As wigner_blocks_cpu on CUDA arrays, launched on `stream`.");
    m.def("random_rotations_seeded_cuda", &random_rotations_seeded_cuda, nb::arg("out"), nb::arg("seed"),
          nb::arg("offset") = 0, nb::arg("improper") = false, nb::arg("stream") = 0,
          "As random_rotations_cuda, with the seed read by the kernel from the 0-dim int64 CUDA array `seed` "
          "(no host sync: capturable in a CUDA graph).");
#endif
}
