"""The ``"cupy"`` backend: the CUDA kernels of ``kernels/*.cu`` compiled at run time by NVRTC.

For installs whose ``fastequiv._C`` was built without nvcc: CuPy's ``RawModule`` compiles
the same sources the nvcc build uses (shipped as ``fastequiv.kernels``; the launchers in
them are skipped under NVRTC, and the 16-bit types need no toolkit headers), so the GPU
runs the same per-element math (kernels/*.cuh) as the ``"cuda"`` and ``"cpu"`` backends.

* Registers ``"cupy"`` implementations of the row contract (the host side of
  :mod:`.host`, shared with the ``"cpu"``/``"cuda"`` backends) taking torch CUDA tensors;
  they are handed to the kernels zero-copy through DLPack and launched on torch's current
  stream. This module only maps each ``fastequiv._C`` binding to its NVRTC kernel.
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

from . import host, registry

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
    the binary on disk, keyed on the source text and options)."""
    import cupy

    from fastequiv.kernels import SOURCE_DIR, nvrtc_source

    # nvrtc_source ends with a hash of the headers: CuPy's cache is keyed on the text
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=nvrtc_source(source), options=("--std=c++17", f"-I{SOURCE_DIR}"))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _arg(a):
    """A kernel argument: tensors as CuPy arrays over the same memory (DLPack), None as a
    null pointer, numpy scalars (the C types) as they are."""
    import cupy

    if a is None:
        return np.uint64(0)
    if isinstance(a, torch.Tensor):
        # inside a torch.library op inputs keep requires_grad, which DLPack refuses to export
        a = a.detach()
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


def _launch_binding(name: str, device: torch.device, *args) -> None:
    """Start the NVRTC kernel that does what ``fastequiv._C.<name>_cuda(*args)`` does."""
    if name == "rotate_rows":
        x, M, sample, P, c, out = args
        K, N, B, d = M.shape[0], x.shape[0], M.shape[1], M.shape[-1]
        if K * N:
            _launch(name, f"fe_rotate_rows_{_TOKEN[x.dtype]}_{_TOKEN[M.dtype]}", device, _blocks(K * N),
                    x, M, sample, np.int64(P), c, np.int64(K), np.int64(N), np.int64(B), np.int32(d), out)
    elif name == "rotate_rows_backward":
        grad, M, sample, P, out = args
        K, N, B, d = grad.shape[0], grad.shape[1], M.shape[1], M.shape[-1]
        if N * d:
            _launch(name, f"fe_rotate_rows_backward_{_TOKEN[grad.dtype]}_{_TOKEN[M.dtype]}", device, _blocks(N),
                    grad, M, sample, np.int64(P), np.int64(K), np.int64(N), np.int64(B), np.int32(d), out)
    elif name == "reduce_rows":
        out, M, y, sample, P, valid, c, mean, sums, weights = args
        K, N, B, d = out.shape[0], out.shape[1], M.shape[1], M.shape[-1]
        if N:
            # tile-based (not grid-stride): exactly one block per tile of rows
            _launch(name, f"fe_reduce_rows_{_TOKEN[out.dtype]}_{_TOKEN[y.dtype]}_{_TOKEN[M.dtype]}", device,
                    _blocks(N, _ROWS_PER_THREAD), out, M, y, sample, np.int64(P), valid, c, np.int64(K),
                    np.int64(N), np.int64(B), np.int32(d), mean, sums, weights)
    elif name == "reduce_rows_backward":
        gm, gsums, out, M, y, sample, P, valid, c, mean, grad_out, work, weights = args
        K, N, B, d = out.shape[0], out.shape[1], M.shape[1], M.shape[-1]
        if K * N:
            _launch(name, f"fe_reduce_rows_backward_{_TOKEN[out.dtype]}_{_TOKEN[y.dtype]}_{_TOKEN[M.dtype]}", device,
                    _blocks(N), gm, gsums, out, M, y, sample, np.int64(P), valid, c, mean, np.int64(K),
                    np.int64(N), np.int64(B), np.int32(d), grad_out, work, weights)
    elif name == "wigner_blocks":
        R, lmax, index, coef, start, out = args
        n = R.shape[0]
        if n:
            _launch(name, f"fe_wigner_blocks_{_TOKEN[R.dtype]}", device, _blocks(n), R, np.int64(n),
                    np.int32(lmax), index, coef, start, out)
    elif name == "random_rotations_seeded":
        out, seed, offset, improper = args
        n = out.shape[0]
        if n:
            _launch(name, f"fe_random_rotations_seeded_{_TOKEN[out.dtype]}", device, _blocks(n), out, np.int64(n),
                    seed, np.uint64(offset), np.bool_(improper))
    else:
        raise KeyError(f"no NVRTC kernel for {name!r}")


_IMPLS = host.row_ops("cuda", _launch_binding)
for _name, _fn in _IMPLS.items():
    _fn.__name__ = _fn.__qualname__ = f"{_name}_cupy"
    registry.register(_name, "cupy", available=available)(_fn)



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
    """:func:`fastequiv.ops.rotate_rows` on CuPy arrays: ``(K, N, d)`` in x's dtype."""
    return _on_cupy_arrays(_IMPLS["rotate_rows"], x, M, sample, P, center)


def rotate_rows_backward(grad, M, sample, P: int):
    """:func:`fastequiv.ops.rotate_rows_backward` on CuPy arrays: ``(N, d)`` in M's dtype."""
    return _on_cupy_arrays(_IMPLS["rotate_rows_backward"], grad, M, sample, P)


def reduce_rows(out, M, target, sample, P: int, valid, center, B: int, weights=None):
    """:func:`fastequiv.ops.reduce_rows` on CuPy arrays: ``(mean, sums)``; ``weights``
    ``(K,)`` in M's dtype, or None (``1/K`` each)."""
    return _on_cupy_arrays(_IMPLS["reduce_rows"], out, M, target, sample, P, valid, center, B, weights)


def reduce_rows_backward(grad_mean, grad_sums, out, M, target, sample, P: int, valid, center, mean, weights=None):
    """:func:`fastequiv.ops.reduce_rows_backward` on CuPy arrays: ``(K, N, d)`` in out's dtype
    (``weights`` as in :func:`reduce_rows`)."""
    return _on_cupy_arrays(_IMPLS["reduce_rows_backward"], grad_mean, grad_sums, out, M, target, sample, P, valid, center,
                           mean, weights)


def wigner_blocks(R, lmax: int):
    """:func:`fastequiv.ops.wigner_blocks` on a CuPy array ``R`` ``(n, 3, 3)``: ``(n, S)``."""
    return _on_cupy_arrays(_IMPLS["wigner_blocks"], R, lmax)


def random_rotations_seeded(seed, n: int, offset: int, improper: bool, dtype):
    """:func:`fastequiv.ops.random_rotations_seeded` keyed by a 0-dim int64 CuPy array
    ``seed`` (read on the device); ``dtype`` a NumPy/CuPy float dtype. Returns ``(n, 3, 3)``."""
    tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
              np.dtype(np.float64): torch.float64}.get(np.dtype(dtype))
    if tdtype is None:
        raise ValueError(f"dtype: expected float16, float32 or float64, got {dtype!r}")
    return _on_cupy_arrays(_IMPLS["random_rotations_seeded"], seed, n, offset, improper, tdtype)
