"""The "cupy" backend (kernels/*.cu compiled by NVRTC at run time).

Without cupy and a GPU only the import, the error messages and the NVRTC-compatible build of
the sources (through nvcc, when it is on PATH) are checked here; the arithmetic the kernels
run is kernels/*.cuh, which tests/test_native.py checks on the CPU (the CPU counterpart of
the GPU tests below)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastequiv as fe
import fastequiv.backends.cupy as fe_cupy
from fastequiv.backends import registry as _backend
from fastequiv.kernels import SOURCE_DIR
from fastequiv.ops.layout import sample_index
from fastequiv.ops.random_rotations import random_rotations_seeded_reference
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference
from fastequiv.ops.wigner_d import wigner_blocks_reference

cupy_missing = fe_cupy.available()
needs_cupy_gpu = pytest.mark.skipif(cupy_missing is not None or not torch.cuda.is_available(),
                                    reason=f"needs cupy and a CUDA GPU ({cupy_missing})")


def kernel_names() -> set[str]:
    """Every kernel name the wrapper can ask for."""
    names = set()
    for acc in ("f32", "f64"):
        elems = ("f16", "bf16", "f32") + (("f64",) if acc == "f64" else ())
        for x in elems:
            names |= {f"fe_rotate_rows_{x}_{acc}", f"fe_rotate_rows_backward_{x}_{acc}"}
            for y in {x, acc}:
                names |= {f"fe_reduce_rows_{x}_{y}_{acc}", f"fe_reduce_rows_backward_{x}_{y}_{acc}"}
        names |= {f"fe_wigner_blocks_{acc}", f"fe_random_rotations_seeded_{acc}"}
    return names


def test_imports_without_cupy_and_says_what_is_missing():
    if cupy_missing is None:
        pytest.skip("cupy is installed and sees a GPU")
    assert isinstance(cupy_missing, str) and "cupy" in cupy_missing
    for name in fe_cupy._IMPLS:
        assert "cupy" in _backend.implemented(name)
        with pytest.raises(fe.BackendUnavailableError, match="cupy"):
            _backend.resolve(name, "cupy", "cuda")


def test_cpu_tensors_are_refused():
    with pytest.raises(fe.BackendUnavailableError, match="cupy"):
        _backend.resolve("reduce_rows", "cupy", "cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_sources_build_without_the_fp16_headers(tmp_path):
    """The path NVRTC takes (2-byte structs and PTX conversions instead of cuda_fp16.h), built
    by nvcc to PTX; every kernel the wrapper may launch must be an entry point."""
    csrc = Path(__file__).resolve().parents[1] / "csrc"  # nvcc also builds the launchers
    entries = set()
    for source in sorted(set(fe_cupy._SOURCE.values())):
        ptx = tmp_path / (source + ".ptx")
        cmd = ["nvcc", "-std=c++17", "-arch=sm_80", "-DFE_NO_CUDA_FP16_HEADERS", f"-I{SOURCE_DIR}",
               f"-I{csrc}", "-ptx", str(SOURCE_DIR / source), "-o", str(ptx)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        entries |= set(re.findall(r"\.entry (\w+)\(", ptx.read_text()))
    assert kernel_names() <= entries, sorted(kernel_names() - entries)


# --- on a GPU with cupy ---------------------------------------------------------------------


@needs_cupy_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 9])
def test_cupy_backend_matches_reference(dtype, layout, d):
    from test_native import TOL, Case, check_row_ops

    check_row_ops(Case(d=d, dtype=dtype, layout=layout, mask=True, device="cuda"), "cupy", TOL[dtype])


@needs_cupy_gpu
@pytest.mark.gpu
def test_cupy_array_functions():
    import cupy

    from test_native import Case

    c = Case(K=3, d=3, dtype=torch.float32, layout="graph", mask=True, device="cuda")
    mean, sums = fe_cupy.reduce_rows(cupy.from_dlpack(c.out), cupy.from_dlpack(c.M), cupy.from_dlpack(c.target),
                                     cupy.from_dlpack(c.sample), 0, cupy.from_dlpack(c.valid),
                                     cupy.from_dlpack(c.center), c.B)
    assert isinstance(mean, cupy.ndarray) and isinstance(sums, cupy.ndarray)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, 0, c.valid, c.center, c.B)
    torch.testing.assert_close(torch.from_dlpack(mean), want_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_dlpack(sums), want_sums, atol=1e-3, rtol=1e-4)

    R = fe.random_rotations(100, seed=1, dtype=torch.float64)
    D = fe_cupy.wigner_blocks(cupy.asarray(R.numpy()), 6)
    torch.testing.assert_close(torch.from_dlpack(D).cpu(), wigner_blocks_reference(R, 6), atol=1e-10, rtol=0)

    seed = cupy.asarray(12345, dtype=cupy.int64)
    Q = fe_cupy.random_rotations_seeded(seed, 50, 7, True, cupy.float64)
    want = random_rotations_seeded_reference(torch.tensor(12345), 50, 7, True, torch.float64)
    torch.testing.assert_close(torch.from_dlpack(Q).cpu(), want, atol=1e-12, rtol=0)
