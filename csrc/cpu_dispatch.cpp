// Run-time choice of the CPU variant of the row kernels (csrc/rows_cpu.cpp, compiled once
// per variant), as PyTorch picks its ATen CPU kernels: the AVX2 build where the CPU has
// AVX2, else the baseline build. FASTEQUIV_CPU_CAPABILITY=default forces the baseline
// (read once, at the first call).
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace fastequiv {

#define FE_ROW_KERNELS(X)     \
    X(rotate_rows_cpu, RotateRowsArgs)                 \
    X(rotate_rows_backward_cpu, RotateRowsBackwardArgs) \
    X(reduce_rows_cpu, ReduceRowsArgs)                 \
    X(reduce_rows_backward_cpu, ReduceRowsBackwardArgs)

#define FE_DECLARE(name, Args) const char* name(const Args& args);
namespace cpu_default {
FE_ROW_KERNELS(FE_DECLARE)
}
#if defined(FASTEQUIV_CPU_AVX2)
namespace cpu_avx2 {
FE_ROW_KERNELS(FE_DECLARE)
}
#endif
#undef FE_DECLARE

namespace {

bool use_avx2() {
#if defined(FASTEQUIV_CPU_AVX2) && (defined(__GNUC__) || defined(__clang__))
    static const bool yes = [] {
        const char* forced = std::getenv("FASTEQUIV_CPU_CAPABILITY");
        if (forced && std::strcmp(forced, "default") == 0) return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }();
    return yes;
#else
    return false;
#endif
}

}  // namespace

const char* cpu_capability() { return use_avx2() ? "avx2" : "default"; }

#if defined(FASTEQUIV_CPU_AVX2)
#define FE_DISPATCH(name, Args) \
    const char* name(const Args& args) { return use_avx2() ? cpu_avx2::name(args) : cpu_default::name(args); }
#else
#define FE_DISPATCH(name, Args) \
    const char* name(const Args& args) { return cpu_default::name(args); }
#endif
FE_ROW_KERNELS(FE_DISPATCH)
#undef FE_DISPATCH

}  // namespace fastequiv
