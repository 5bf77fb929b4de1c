// Python bindings of fastequiv._C (nanobind): every function the module exposes is
// registered here, in NB_MODULE at the bottom. Arguments are checked at this boundary and
// wrong ones raise ValueError naming the argument, what it got and what was expected.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

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
    return info;
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "fastequiv compiled extension: CPU kernels and, when built with CUDA, launchers.";

    m.def("build_info", &build_info,
          "What this build contains: {'cuda': bool, 'cuda_archs': [str], 'openmp': bool, "
          "'compiler': str}.");

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
}
