"""The ``"cupy"`` backend: the CUDA kernels of ``kernels/*.cu`` compiled at run time by NVRTC.

For installs whose ``fastequiv._C`` was built without nvcc: CuPy's ``RawModule`` compiles
the same sources the nvcc build uses (shipped as ``fastequiv.kernels``; the launchers in
them are skipped under NVRTC, and the 16-bit types need no toolkit headers), so the GPU
runs the same per-element math (kernels/*.cuh) as the ``"cuda"`` and ``"cpu"`` backends.

* Registers ``"cupy"`` implementations of the row contract (:mod:`fastequiv.ops._rows`:
  ``rotate_rows``, ``rotate_rows_backward``, ``reduce_rows``, ``reduce_rows_backward``,
  ``wigner_blocks``, ``random_rotations_seeded``) taking torch CUDA tensors; they are
  handed to the kernels zero-copy through DLPack and launched on torch's current stream.
* Exposes functions of the same names taking and returning CuPy arrays (launched on
  CuPy's current stream). CuPy has no bfloat16; through torch tensors bfloat16 works.

cupy is an optional extra (``pip install fastequiv[cupy]``): this module imports without
it, and :func:`available` says what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import numpy as np
import torch

from . import _backend
from ._native import _check_acc, _dense_P, _sample, _target_for, _valid, _wigner_tables

__all__ = ["available", "rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward",
           "wigner_blocks", "random_rotations_seeded"]

_THREADS = 256  # kThreads of csrc/cuda_launch.h
_ROWS_PER_THREAD = 4  # kRowsPerThread of kernels/twirl_reduce.cu
_MAX_GRID = 65535 * 32  # grid-stride kernels need no more blocks
_TOKEN = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
_SOURCE = {
    "rotate_rows": "rotate_copies.cu",
    "rotate_rows_backward": "rotate_copies.cu",
    "reduce_rows": "twirl_reduce.cu",
    "reduce_rows_backward": "twirl_reduce.cu",
    "wigner_blocks": "wigner_d.cu",
    "random_rotations_seeded": "random_rotations.cu",
}


def available(device=None) -> Optional[str]:
    """``None`` when the CuPy backend can run (on ``device``, if given), else what is missing."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install 'fastequiv[cupy]', or cupy-cudaXXx for your CUDA)"
    try:
        import cupy
    except Exception as exc:  # a broken CUDA install raises all sorts of errors
        return f"cupy does not import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"cupy sees no CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "cupy sees no CUDA device"
    if device is not None and torch.device(device).type != "cuda":
        return "it runs on CUDA tensors"
    if device is not None and not torch.cuda.is_available():
        return "torch sees no CUDA device (the cupy backend takes torch CUDA tensors)"
    return None


@functools.lru_cache(maxsize=None)
def _module(source: str, device_index: int):
    """The NVRTC-compiled module of ``kernels/<source>`` for one device (CuPy also caches
    the binary on disk)."""
    import cupy

    from fastequiv.kernels import SOURCE_DIR, cuda_source

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source(source), options=("--std=c++17", f"-I{SOURCE_DIR}"))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _arg(a):
    """A kernel argument: tensors as CuPy arrays over the same memory (DLPack), None as a
    null pointer, numpy scalars (the C types) as they are."""
    import cupy

    if a is None:
        return np.uint64(0)
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16:  # CuPy has no bfloat16: hand over the same bytes
            a = a.view(torch.int16)
        elif a.dtype == torch.bool:
            a = a.view(torch.uint8)
        return cupy.from_dlpack(a)
    return a


def _launch(op: str, kernel: str, device: torch.device, blocks: int, *args) -> None:
    """Launch ``kernel`` of ``op``'s source on torch's current stream of ``device``."""
    import cupy

    index = _device_index(device)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        fn = _module(_SOURCE[op], index).get_function(kernel)
        fn((max(1, min(blocks, _MAX_GRID)),), (_THREADS,), tuple(_arg(a) for a in args))


def _blocks(items: int, per_thread: int = 1) -> int:
    return -(-items // (_THREADS * per_thread))


# --- the row contract on torch CUDA tensors ----------------------------------------------------


def _rotate_rows(x, M, sample, P, center):
    _check_acc(M, ("x", x))
    K, B, d = M.shape[0], M.shape[1], M.shape[-1]
    N = x.shape[0]
    out = torch.empty(K, N, d, dtype=x.dtype, device=x.device)
    if K * N:
        c = center.contiguous() if center is not None else M.new_zeros(B, d)
        _launch("rotate_rows", f"fe_rotate_rows_{_TOKEN[x.dtype]}_{_TOKEN[M.dtype]}", x.device, _blocks(K * N),
                x.contiguous(), M.contiguous(), _sample(sample), np.int64(_dense_P(P, sample)), c, np.int64(K),
                np.int64(N), np.int64(B), np.int32(d), out)
    return out


def _rotate_rows_backward(grad, M, sample, P):
    _check_acc(M, ("grad", grad))
    K, N = grad.shape[:2]
    B, d = M.shape[1], M.shape[-1]
    out = torch.empty(N, d, dtype=M.dtype, device=grad.device)
    if N * d:
        _launch("rotate_rows_backward", f"fe_rotate_rows_backward_{_TOKEN[grad.dtype]}_{_TOKEN[M.dtype]}",
                grad.device, _blocks(N), grad.contiguous(), M.contiguous(), _sample(sample),
                np.int64(_dense_P(P, sample)), np.int64(K), np.int64(N), np.int64(B), np.int32(d), out)
    return out


def _reduce_rows(out, M, target, sample, P, valid, center, B):
    _check_acc(M, ("out", out), ("target", target))
    acc = M.dtype
    K, N = out.shape[:2]
    d = M.shape[-1]
    mean = torch.empty(N, d, dtype=acc, device=out.device)
    sums = torch.zeros(3, B, dtype=acc, device=out.device)
    if N:
        y = _target_for(target, out, acc, "cuda")
        c = center.contiguous() if center is not None else M.new_zeros(K, B, d)
        name = f"fe_reduce_rows_{_TOKEN[out.dtype]}_{_TOKEN[y.dtype]}_{_TOKEN[acc]}"
        # tile-based (not grid-stride): exactly one block per tile of rows
        blocks = _blocks(N, _ROWS_PER_THREAD)
        _launch("reduce_rows", name, out.device, blocks, out.contiguous(), M.contiguous(), y, _sample(sample),
                np.int64(_dense_P(P, sample)), _valid(valid), c, np.int64(K), np.int64(N), np.int64(B),
                np.int32(d), mean, sums)
    return mean, sums


def _reduce_rows_backward(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean):
    _check_acc(M, ("out", out), ("target", target))
    acc = M.dtype
    K, N = out.shape[:2]
    B, d = M.shape[1], M.shape[-1]
    grad_out = torch.empty(K, N, d, dtype=out.dtype, device=out.device)
    if K * N:
        y = _target_for(target, out, acc, "cuda")
        c = center.contiguous() if center is not None else M.new_zeros(K, B, d)
        gm = None if grad_mean is None else grad_mean.to(acc).contiguous()
        work = None if d in (1, 3) else torch.empty(N, d, dtype=acc, device=out.device)
        name = f"fe_reduce_rows_backward_{_TOKEN[out.dtype]}_{_TOKEN[y.dtype]}_{_TOKEN[acc]}"
        _launch("reduce_rows_backward", name, out.device, _blocks(N), gm, grad_sums.to(acc).contiguous(),
                out.contiguous(), M.contiguous(), y, _sample(sample), np.int64(_dense_P(P, sample)), _valid(valid),
                c, mean.to(acc).contiguous(), np.int64(K), np.int64(N), np.int64(B), np.int32(d), grad_out, work)
    return grad_out


def _wigner_blocks(R, lmax):
    work = R.dtype if R.dtype in (torch.float32, torch.float64) else torch.float32
    n = R.shape[0]
    size = (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) // 3
    out = torch.empty(n, size, dtype=work, device=R.device)
    if n:
        index, coef, start = _wigner_tables(lmax, work, R.device)
        _launch("wigner_blocks", f"fe_wigner_blocks_{_TOKEN[work]}", R.device, _blocks(n),
                R.to(work).contiguous(), np.int64(n), np.int32(lmax), index, coef, start, out)
    return out.to(R.dtype)


def _random_rotations_seeded(seed, n, offset, improper, dtype):
    if seed.dtype != torch.int64 or seed.dim() != 0:
        raise ValueError(f"seed: expected an int64 0-dim tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(n, 3, 3, dtype=work, device=seed.device)
    if n:
        _launch("random_rotations_seeded", f"fe_random_rotations_seeded_{_TOKEN[work]}", seed.device, _blocks(n),
                out, np.int64(n), seed.contiguous(), np.uint64(offset), np.bool_(improper))
    return out.to(dtype)


_IMPLS = {
    "rotate_rows": _rotate_rows,
    "rotate_rows_backward": _rotate_rows_backward,
    "reduce_rows": _reduce_rows,
    "reduce_rows_backward": _reduce_rows_backward,
    "wigner_blocks": _wigner_blocks,
    "random_rotations_seeded": _random_rotations_seeded,
}

for _name, _fn in _IMPLS.items():
    _backend.register(_name, "cupy", available=available)(_fn)


# --- the same on CuPy arrays -------------------------------------------------------------------


def _on_cupy_arrays(fn, *args):
    """Run ``fn`` on torch views (DLPack, zero-copy) of the CuPy arrays among ``args``, on
    CuPy's current stream, and return its tensors as CuPy arrays."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    targs = [torch.from_dlpack(a) if isinstance(a, cupy.ndarray) else a for a in args]
    device = next((t.device for t in targs if isinstance(t, torch.Tensor)), torch.device("cuda"))
    with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr, device=device)):
        result = fn(*targs)
    if isinstance(result, tuple):
        return tuple(cupy.from_dlpack(r) for r in result)
    return cupy.from_dlpack(result)


def rotate_rows(x, M, sample, P: int, center):
    """:func:`fastequiv.ops._rows.rotate_rows` on CuPy arrays: ``(K, N, d)`` in x's dtype."""
    return _on_cupy_arrays(_rotate_rows, x, M, sample, P, center)


def rotate_rows_backward(grad, M, sample, P: int):
    """:func:`fastequiv.ops._rows.rotate_rows_backward` on CuPy arrays: ``(N, d)`` in M's dtype."""
    return _on_cupy_arrays(_rotate_rows_backward, grad, M, sample, P)


def reduce_rows(out, M, target, sample, P: int, valid, center, B: int):
    """:func:`fastequiv.ops._rows.reduce_rows` on CuPy arrays: ``(mean, sums)``."""
    return _on_cupy_arrays(_reduce_rows, out, M, target, sample, P, valid, center, B)


def reduce_rows_backward(grad_mean, grad_sums, out, M, target, sample, P: int, valid, center, mean):
    """:func:`fastequiv.ops._rows.reduce_rows_backward` on CuPy arrays: ``(K, N, d)`` in out's dtype."""
    return _on_cupy_arrays(_reduce_rows_backward, grad_mean, grad_sums, out, M, target, sample, P, valid, center,
                           mean)


def wigner_blocks(R, lmax: int):
    """:func:`fastequiv.ops._rows.wigner_blocks` on a CuPy array ``R`` ``(n, 3, 3)``: ``(n, S)``."""
    return _on_cupy_arrays(_wigner_blocks, R, lmax)


def random_rotations_seeded(seed, n: int, offset: int, improper: bool, dtype):
    """:func:`fastequiv.ops._rows.random_rotations_seeded` keyed by a 0-dim int64 CuPy array
    ``seed`` (read on the device); ``dtype`` a NumPy/CuPy float dtype. Returns ``(n, 3, 3)``."""
    tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
              np.dtype(np.float64): torch.float64}.get(np.dtype(dtype))
    if tdtype is None:
        raise ValueError(f"dtype: expected float16, float32 or float64, got {dtype!r}")
    return _on_cupy_arrays(_random_rotations_seeded, seed, n, offset, improper, tdtype)
