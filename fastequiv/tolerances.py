"""The tolerance table: how close a result must be to the torch reference, and why.

One table for the project: ``fastequiv check`` holds every backend to it and the tests
import it (tests/conftest.py). :data:`TOL` is the bound of a result of each dtype against
the reference computed from the same inputs, on data of scale ~1; the named entries below
it are the cases that need another bound, each with its reason. The tests compare element
by element (``torch.testing.assert_close(got, want, **TOL[dtype])``); ``fastequiv check``
compares ``max |got - want| / max |want|`` with the ``rtol`` of the same entry.

Measured (2-core x86-64 CPU, the C++ kernels and Triton's interpreter, no GPU): the worst
error of the row kernels, the Wigner-D blocks and the voxel kernels against the reference
over ``fastequiv check``'s cases (5 input seeds C++, 2 Triton), relative to the largest
reference value: float64 1.3e-15, float32 1.4e-6, float16 7.6e-5, bfloat16 7.7e-3 (one
bfloat16 rounding apart). No bound here was measured on a GPU: GPU_FLOAT32 and GPU_SUMS
are the bounds the GPU tests held before this table, kept as they were.
"""

from __future__ import annotations

import torch

__all__ = ["TOL", "ROTATIONS", "MANY_ROW_SUMS", "STEP", "GPU_FLOAT32", "GPU_SUMS", "tol", "check_bound"]

#: ``rtol`` and ``atol`` of a result of each dtype against the reference on the same inputs
#: (or, for a result rounded to a narrower dtype, against the exact float64 value):
TOL = {
    # a few float64 roundings of values ~1 (2**-52 = 2.2e-16 each); measured 1.3e-15
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    # float32 math in another order than the reference's (2**-23 = 1.2e-7 per rounding, a
    # few tens of roundings in the widest rows); measured 1.4e-6
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # two float16 ulps at 1 (2**-10 each); the sums are float32, only the storage rounds;
    # measured 7.6e-5
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    # one bfloat16 rounding (an ulp is at most 2**-7 = 0.0078 of the value): a kernel and the
    # reference that sum in float32 in different orders may round the same value to
    # neighbouring bfloat16 numbers; measured 7.7e-3
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}

#: rotations drawn in float32 against the float64 stream of the same seed: the float32
#: quaternion math (sqrt, sin, cos) is a few float32 roundings on entries at most 1;
#: measured 1.8e-7 (Triton), 3e-8 (C++). float64: TOL's.
ROTATIONS = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}

#: per-sample sums over many rows (the graph-layout reduction of ``fastequiv check``: about
#: N / 7 rows a sample, 2e5 rows on a GPU) added in another order than the reference's,
#: with atomics on a GPU: float32 rounding grows with the number of terms. Measured on the
#: CPU (512 rows): 3.3e-7; not measured on a GPU.
MANY_ROW_SUMS = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

#: a whole training step computed another way (``torch.compile``, a replayed CUDA graph)
#: against the eager step: inductor fuses and reorders float32 math across the model, the
#: loss and the gradients. float64 runs through aot_eager (the same ops): measured 0.
STEP = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

#: float32 results of the CUDA and CuPy kernels in the tests that need a GPU: the bound those
#: tests held before this table, kept as it was: NOT re-measured (no GPU was available to
#: this work). The same kernels/*.cuh math compiled for the CPU is within TOL[float32].
GPU_FLOAT32 = dict(rtol=1e-4, atol=1e-4)

#: the unnormalised per-sample sums of the CuPy reduction on CuPy arrays (values up to ~50):
#: as GPU_FLOAT32, the bound its test held before, NOT re-measured on a GPU.
GPU_SUMS = dict(rtol=1e-4, atol=1e-3)


def tol(dtype: torch.dtype) -> dict:
    """``TOL[dtype]`` (``rtol``, ``atol``), for ``torch.testing.assert_close(..., **tol(dtype))``."""
    return TOL[dtype]


def check_bound(dtype: torch.dtype, table: dict = TOL) -> float:
    """The bound ``fastequiv check`` holds ``max |got - want| / max |want|`` to for ``dtype``:
    the entry's ``rtol`` (its metric is relative to the reference's scale)."""
    return table[dtype]["rtol"]
