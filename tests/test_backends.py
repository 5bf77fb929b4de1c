"""The backends as such, apart from any one op: registration, ``"auto"``'s picks, what an
unavailable backend says, lazy imports, and the CuPy backend's NVRTC sources and array API.

What each op computes on each backend is tested in the per-op files (tests/test_<op>.py);
the compiled extension's build info and C++ entry points in tests/test_extension.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import COMPILED, GPU, backend_params
from opdata import Case

import fastequiv as fe
import fastequiv.backends.cupy as fe_cupy
import fastequiv.backends.triton
from fastequiv.backends import host, registry
from fastequiv.kernels import SOURCE_DIR
from fastequiv.ops.random_rotations import random_rotations_seeded_reference
from fastequiv.ops.twirl_reduce import reduce_rows_reference
from fastequiv.ops.wigner_d import wigner_blocks_reference
from fastequiv.tolerances import GPU_FLOAT32, GPU_SUMS

ROW_OPS = ["random_rotations_seeded", "rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward",
           "wigner_blocks"]

cupy_missing = fe_cupy.available()


def test_the_tests_parametrise_every_backend():
    """tests/conftest.py's backend list is every registered backend: a new one is tested."""
    assert registry.implemented_anywhere() == {"torch", *COMPILED}


# --- auto and the registry ------------------------------------------------------------------------


def test_triton_is_registered_for_every_op_and_auto_prefers_it_on_cuda():
    for op in ROW_OPS:
        assert "triton" in registry.implemented(op), op
        assert registry._AUTO_ORDER[op]["cuda"][0] == "triton"


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    for name in host.ROW_OPS:
        assert registry.resolve(name, "auto", "cpu")[0] == "cpu"


def test_cuda_backend_says_what_is_missing_on_cpu_tensors():
    with pytest.raises(fe.BackendUnavailableError, match="cuda"):
        registry.resolve("reduce_rows", "cuda", "cpu")


# --- triton ----------------------------------------------------------------------------------------


def test_triton_available_says_what_is_missing(monkeypatch):
    pytest.importorskip("triton")
    from fastequiv.backends.triton import available

    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", True)
    assert available(torch.device("cpu")) is None
    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in available(torch.device("cpu"))
    assert "CUDA" in available(torch.device("meta"))
    if not GPU:
        assert "CUDA" in available(torch.device("cuda"))
    with pytest.raises(fe.BackendUnavailableError, match="TRITON_INTERPRET"):
        registry.resolve("rotate_rows", "triton", "cpu")
    monkeypatch.setattr(fastequiv.backends.triton, "INSTALLED", False)
    assert "triton is not installed" in available(torch.device("cpu"))


def test_the_triton_backend_imports_triton_only_when_called(tmp_path):
    """With triton made unimportable, fastequiv and its triton backend still import, and
    the backend reports what is missing instead of failing at import time."""
    code = textwrap.dedent(
        """
        import os, sys

        sys.modules["triton"] = None  # what an install without triton looks like to importlib
        try:
            import triton
        except ImportError:
            pass
        else:
            raise AssertionError("triton still imports")
        os.environ["TRITON_INTERPRET"] = "1"
        import fastequiv, fastequiv.backends.triton
        assert not any(m.startswith("fastequiv.kernels.") for m in sys.modules)
        print(fastequiv.backends.triton.available("cpu"))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "triton is not installed" in res.stdout and "pip install triton" in res.stdout


# --- cupy ------------------------------------------------------------------------------------------


def kernel_names() -> set[str]:
    """Every kernel name the CuPy wrapper can ask for."""
    names = set()
    for acc in ("f32", "f64"):
        elems = ("f16", "bf16", "f32") + (("f64",) if acc == "f64" else ())
        for x in elems:
            names |= {f"fe_rotate_rows_{x}_{acc}", f"fe_rotate_rows_backward_{x}_{acc}"}
            for y in {x, acc}:
                names |= {f"fe_reduce_rows_{x}_{y}_{acc}", f"fe_reduce_rows_backward_{x}_{y}_{acc}"}
        names |= {f"fe_wigner_blocks_{acc}", f"fe_random_rotations_seeded_{acc}"}
    return names


def test_cupy_imports_without_cupy_and_says_what_is_missing():
    if cupy_missing is None:
        pytest.skip("cupy is installed and sees a GPU")
    assert isinstance(cupy_missing, str) and "cupy" in cupy_missing
    for name in fe_cupy._IMPLS:
        assert "cupy" in registry.implemented(name)
        with pytest.raises(fe.BackendUnavailableError, match="cupy"):
            registry.resolve(name, "cupy", "cuda")


def test_cupy_refuses_cpu_tensors():
    with pytest.raises(fe.BackendUnavailableError, match="cupy"):
        registry.resolve("reduce_rows", "cupy", "cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cupy_sources_build_without_the_fp16_headers(tmp_path):
    """The path NVRTC takes (2-byte structs and PTX conversions instead of cuda_fp16.h), built
    by nvcc to PTX; every kernel the wrapper may launch must be an entry point."""
    csrc = Path(__file__).resolve().parents[1] / "csrc"  # nvcc also builds the launchers
    entries = set()
    for source in sorted(set(fe_cupy._SOURCE.values())):
        ptx = tmp_path / (source + ".ptx")
        cmd = ["nvcc", "-std=c++17", "-arch=sm_80", "-DFE_NO_CUDA_FP16_HEADERS", f"-I{SOURCE_DIR}",
               f"-I{csrc}", "-ptx", str(SOURCE_DIR / source), "-o", str(ptx)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        text = ptx.read_text()
        entries |= set(re.findall(r"\.entry (\w+)\(", text))
        if source == "twirl_reduce.cu":
            reduce_ptx = text
    assert kernel_names() <= entries, sorted(kernel_names() - entries)
    # the CuPy wrapper hands the reduce kernels as many arguments as they take, the
    # copies' weights included (last; 0 for None)
    for name, per_thread in (("reduce_rows", 4), ("reduce_rows_backward", 1)):
        launched = cupy_launch_args(name)
        kernel_name, args = launched[0]
        params = re.search(r"\.entry " + kernel_name + r"\((.*?)\)", reduce_ptx, re.S).group(1)
        assert params.count(".param") == len(args), (kernel_name, params.count(".param"), len(args))
        weights = torch.tensor([0.2, 0.5], dtype=torch.float64)
        kernel_name, args = cupy_launch_args(name, weights)[0]
        assert args[-1] is weights and cupy_launch_args(name)[0][1][-1] is None


def cupy_launch_args(name: str, weights=None) -> list:
    """The ``(kernel, args)`` the CuPy wrapper would launch for ``name`` (float64, d = 3, one
    graph batch), recorded without a GPU."""
    c = Case(K=2, d=3, dtype=torch.float64, layout="graph", mask=True, device="cpu")
    seen = []
    record = lambda op, kernel, device, blocks, *args: seen.append((kernel, args))  # noqa: E731
    original = fe_cupy._launch
    fe_cupy._launch = record
    try:
        mean = torch.zeros(c.out.shape[1], 3, dtype=torch.float64)
        if name == "reduce_rows":
            fe_cupy._launch_binding(name, None, c.out, c.M, c.target, c.sample, 0, c.valid, c.center, mean,
                                    torch.zeros(3, c.B, dtype=torch.float64), weights)
        else:
            fe_cupy._launch_binding(name, None, None, torch.zeros(3, c.B, dtype=torch.float64), c.out, c.M,
                                    c.target, c.sample, 0, c.valid, c.center, mean, torch.empty_like(c.out), None,
                                    weights)
    finally:
        fe_cupy._launch = original
    assert len(seen) == 1
    return seen


@pytest.mark.parametrize("backend", backend_params("cupy"))
def test_cupy_array_functions(backend):
    """The CuPy backend's functions on CuPy arrays (launched on CuPy's current stream)."""
    import cupy

    c = Case(K=3, d=3, dtype=torch.float32, layout="graph", mask=True, device="cuda")
    mean, sums = fe_cupy.reduce_rows(cupy.from_dlpack(c.out), cupy.from_dlpack(c.M), cupy.from_dlpack(c.target),
                                     cupy.from_dlpack(c.sample), 0, cupy.from_dlpack(c.valid),
                                     cupy.from_dlpack(c.center), c.B)
    assert isinstance(mean, cupy.ndarray) and isinstance(sums, cupy.ndarray)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, 0, c.valid, c.center, c.B)
    # the GPU bounds of the table, not re-measured on a GPU (the same kernels through torch
    # tensors are held to TOL in tests/test_twirl_reduce.py)
    torch.testing.assert_close(torch.from_dlpack(mean), want_mean, **GPU_FLOAT32)
    torch.testing.assert_close(torch.from_dlpack(sums), want_sums, **GPU_SUMS)
    # the copies' weights (a rotation design's), not summing to one
    w = torch.tensor([0.5, 0.3, 0.4], dtype=c.M.dtype, device="cuda")
    mean, sums = fe_cupy.reduce_rows(cupy.from_dlpack(c.out), cupy.from_dlpack(c.M), cupy.from_dlpack(c.target),
                                     cupy.from_dlpack(c.sample), 0, cupy.from_dlpack(c.valid),
                                     cupy.from_dlpack(c.center), c.B, cupy.from_dlpack(w))
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, 0, c.valid, c.center, c.B, w)
    torch.testing.assert_close(torch.from_dlpack(mean), want_mean, **GPU_FLOAT32)
    torch.testing.assert_close(torch.from_dlpack(sums), want_sums, **GPU_SUMS)

    R = fe.random_rotations(100, seed=1, dtype=torch.float64)
    D = fe_cupy.wigner_blocks(cupy.asarray(R.numpy()), 6)
    torch.testing.assert_close(torch.from_dlpack(D).cpu(), wigner_blocks_reference(R, 6), atol=1e-10, rtol=0)

    seed = cupy.asarray(12345, dtype=cupy.int64)
    Q = fe_cupy.random_rotations_seeded(seed, 50, 7, True, cupy.float64)
    want = random_rotations_seeded_reference(torch.tensor(12345), 50, 7, True, torch.float64)
    torch.testing.assert_close(torch.from_dlpack(Q).cpu(), want, atol=1e-12, rtol=0)


# --- which GPUs the CUDA build runs on ---------------------------------------------------------

@pytest.mark.parametrize("capability, archs, runs", [
    ((8, 0), ["80", "90"], True),
    ((8, 6), ["80", "90"], True),  # sm_80 SASS runs on later minors of major 8
    ((8, 9), ["80", "90"], True),
    ((9, 0), ["80", "90"], True),
    ((12, 0), ["80", "90"], True),  # the compute_90 PTX that "90" embeds is compiled by the driver
    ((7, 5), ["80", "90"], False),  # older than every build
    ((9, 0), ["80-real"], False),  # SASS never crosses a major version
    ((9, 0), ["80"], True),  # ... PTX does
    ((12, 0), ["80-real", "90-real"], False),
    ((8, 6), ["90"], False),
    ((8, 6), ["89-real"], False),  # nor runs on an earlier minor
    ((8, 9), ["86-virtual"], True),
    ((8, 0), ["86-virtual"], False),
    ((9, 0), ["90a"], True),  # architecture-specific: that capability only
    ((10, 0), ["90a"], False),
    ((10, 3), ["100f"], True),  # family-specific: the same major
    ((12, 0), ["100f"], False),
    ((7, 5), ["native"], True),  # an entry the build resolved itself is not second-guessed
])
def test_the_cuda_architecture_rule(capability, archs, runs):
    from fastequiv.backends import native

    why = native.cuda_arch_mismatch(capability, archs)
    assert (why is None) is runs
    if not runs:
        assert f"compute capability {capability[0]}.{capability[1]}" in why and str(archs) in why
        assert f"CMAKE_CUDA_ARCHITECTURES={capability[0]}{capability[1]}" in why


def test_a_gpu_the_build_does_not_cover_makes_cuda_unavailable(monkeypatch):
    """A (simulated) GPU of compute capability 7.5 and kernels built for sm_80 and sm_90: the
    "cuda" backend is unavailable, build_info says why, and backend="cuda" raises it."""
    from fastequiv.backends import extension, native

    class BuiltForAmpereAndHopper:
        reduce_rows_cpu = reduce_rows_cuda = object()

        @staticmethod
        def build_info():
            return {"cuda": True, "cuda_archs": ["80", "90"], "openmp": True, "cpu_capability": "default"}

    monkeypatch.setattr(extension, "load", lambda: BuiltForAmpereAndHopper)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    native._device_mismatch.cache_clear()
    try:
        why = native.available("cuda")(torch.device("cuda"))
        assert why is not None and "compute capability 7.5" in why
        assert fe.build_info()["unavailable"]["cuda"] == why
        with pytest.raises(fe.BackendUnavailableError, match="compute capability 7.5"):
            registry.resolve_name("reduce_rows", "cuda", torch.device("cuda"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
        native._device_mismatch.cache_clear()
        assert native.available("cuda")(torch.device("cuda")) is None
    finally:
        native._device_mismatch.cache_clear()
