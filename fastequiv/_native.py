"""The ``"cpu"`` and ``"cuda"`` backends of the row contract: the kernels of ``fastequiv._C``.

Registers, for both backends, implementations of the functions of
:mod:`fastequiv.ops._rows` (``rotate_rows``, ``rotate_rows_backward``, ``reduce_rows``,
``reduce_rows_backward``, ``wigner_blocks``, ``random_rotations_seeded``) with exactly
their signatures. The per-element math is kernels/*.cuh, compiled both into the C++ CPU
kernels (csrc/) and the CUDA kernels (kernels/*.cu).

* ``"cpu"``: C++ with OpenMP. The kernels read float32 and float64; float16/bfloat16
  tensors are converted to float32 here (and results back), which rounds exactly as the
  reference does since it also accumulates them in float32.
* ``"cuda"``: launched on torch's current stream of the tensors' device, reading
  float16/bfloat16 natively and accumulating in float32. Nothing syncs with the host: the
  Philox seed of ``random_rotations_seeded`` is read by the kernel from device memory.
  ``reduce_rows``' per-sample sums are added with atomics, so they may differ between runs
  by rounding.

A "no centre" call passes zeros (``x - 0 + 0`` is ``x`` exactly). ``backend="auto"``
picks ``"cpu"`` for CPU tensors only for the ops measured faster than the torch reference
(benchmarks/test_bench_native.py): :data:`CPU_AUTO`.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from . import _backend, _extension

OPS = ("rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward", "wigner_blocks",
       "random_rotations_seeded")

#: Ops that ``backend="auto"`` runs on the C++ kernels for CPU tensors (measured faster
#: than the torch reference on a 2-core CPU; see the benchmark file).
CPU_AUTO = ("rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward", "wigner_blocks",
            "random_rotations_seeded")

_CPU_FLOATS = (torch.float32, torch.float64)


def _available(kind: str):
    def available(device: torch.device) -> Optional[str]:
        ext = _extension.load()
        if ext is None:
            return f"fastequiv._C is not importable ({_extension.load_error()})"
        if not hasattr(ext, "reduce_rows_cpu"):
            return "fastequiv._C predates the row kernels (reinstall fastequiv to rebuild it)"
        if kind == "cuda" and not hasattr(ext, "reduce_rows_cuda"):
            return "fastequiv._C was built without CUDA (reinstall with nvcc on PATH or FASTEQUIV_CUDA=ON)"
        if torch.device(device).type != kind:
            return f"it runs on {kind} tensors"
        if kind == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    return available


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _elements(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` as the kernels read it: contiguous, and float32 for fp16/bf16 on the CPU."""
    if kind == "cpu" and t.dtype not in _CPU_FLOATS:
        t = t.float()
    return t.contiguous()


def _check_acc(M: torch.Tensor, *elements: tuple[str, torch.Tensor]) -> None:
    if M.dtype not in _CPU_FLOATS:
        raise ValueError(f"M: expected float32 or float64 (the accumulation dtype), got {M.dtype}")
    for name, t in elements:
        if t.dtype == torch.float64 and M.dtype != torch.float64:
            raise ValueError(f"M: expected float64 (the accumulation dtype) for float64 {name}, got {M.dtype}")


def _target_for(target: torch.Tensor, out: torch.Tensor, acc: torch.dtype, kind: str) -> torch.Tensor:
    """The kernels read a target in out's dtype or in acc; any other is converted to acc."""
    y = _elements(target, kind)
    out_dtype = out.dtype if kind == "cuda" or out.dtype in _CPU_FLOATS else torch.float32
    return y if y.dtype in (out_dtype, acc) else y.to(acc)


def _dense_P(P: int, sample: Optional[torch.Tensor]) -> int:
    return max(int(P), 1) if sample is None else 0


def _sample(sample: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if sample is None:
        return None
    if sample.dtype != torch.int64:
        raise ValueError(f"sample: expected an int64 tensor, got {sample.dtype}")
    return sample.contiguous()


def _valid(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if valid is None else valid.to(torch.bool).contiguous()


def _native(kind: str):
    """The six implementations for ``kind`` ("cpu" or "cuda")."""

    def call(name: str, *args, device=None):
        ext = _extension.load()
        if kind == "cpu":
            getattr(ext, f"{name}_cpu")(*args)
        else:
            getattr(ext, f"{name}_cuda")(*args, _stream(device))

    def rotate_rows(x, M, sample, P, center):
        _check_acc(M, ("x", x))
        K, B, d = M.shape[0], M.shape[1], M.shape[-1]
        xe = _elements(x, kind)
        out = torch.empty((K,) + tuple(x.shape), dtype=xe.dtype, device=x.device)
        c = center.contiguous() if center is not None else M.new_zeros(B, d)
        call("rotate_rows", xe, M.contiguous(), _sample(sample), _dense_P(P, sample), c, out, device=x.device)
        return out.to(x.dtype)

    def rotate_rows_backward(grad, M, sample, P):
        _check_acc(M, ("grad", grad))
        out = torch.empty(tuple(grad.shape[1:]), dtype=M.dtype, device=grad.device)
        call("rotate_rows_backward", _elements(grad, kind), M.contiguous(), _sample(sample), _dense_P(P, sample),
             out, device=grad.device)
        return out

    def reduce_rows(out, M, target, sample, P, valid, center, B):
        _check_acc(M, ("out", out), ("target", target))
        acc = M.dtype
        K, N = out.shape[:2]
        d = M.shape[-1]
        oe = _elements(out, kind)
        mean = torch.empty(N, d, dtype=acc, device=out.device)
        sums = torch.zeros(3, B, dtype=acc, device=out.device)
        c = center.contiguous() if center is not None else M.new_zeros(K, B, d)
        call("reduce_rows", oe, M.contiguous(), _target_for(target, oe, acc, kind), _sample(sample),
             _dense_P(P, sample), _valid(valid), c, mean, sums, device=out.device)
        return mean, sums

    def reduce_rows_backward(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean):
        _check_acc(M, ("out", out), ("target", target))
        acc = M.dtype
        K, N = out.shape[:2]
        B, d = M.shape[1], M.shape[-1]
        oe = _elements(out, kind)
        grad_out = torch.empty_like(oe)
        gm = None if grad_mean is None else grad_mean.to(acc).contiguous()
        c = center.contiguous() if center is not None else M.new_zeros(K, B, d)
        args = [gm, grad_sums.to(acc).contiguous(), oe, M.contiguous(), _target_for(target, oe, acc, kind),
                _sample(sample), _dense_P(P, sample), _valid(valid), c, mean.to(acc).contiguous(), grad_out]
        if kind == "cuda":
            args.append(None if d in (1, 3) else torch.empty(N, d, dtype=acc, device=out.device))
        call("reduce_rows_backward", *args, device=out.device)
        return grad_out.to(out.dtype)

    def wigner_blocks(R, lmax):
        work = R.dtype if R.dtype in _CPU_FLOATS else torch.float32
        Rw = R.to(work).contiguous()
        index, coef, start = _wigner_tables(lmax, work, R.device)
        size = (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) // 3
        out = torch.empty(R.shape[0], size, dtype=work, device=R.device)
        call("wigner_blocks", Rw, lmax, index, coef, start, out, device=R.device)
        return out.to(R.dtype)

    def random_rotations_seeded(seed, n, offset, improper, dtype):
        # the CPU draws in float64 and rounds once, as the reference does; the GPU draws
        # float32 directly (within an ulp or two of that)
        work = torch.float64 if dtype == torch.float64 or kind == "cpu" else torch.float32
        out = torch.empty(n, 3, 3, dtype=work, device=seed.device)
        ext = _extension.load()
        if kind == "cpu":
            value = int(seed)  # a CPU tensor: reading it is no device sync
            if not 0 <= value < 2**63:
                raise ValueError(f"seed: expected 0 <= seed < 2**63, got {value}")
            ext.random_rotations_cpu(out, value, offset, improper)
        else:
            if seed.dtype != torch.int64 or seed.dim() != 0:
                raise ValueError(f"seed: expected an int64 0-dim tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
            ext.random_rotations_seeded_cuda(out, seed.contiguous(), offset, improper, _stream(seed.device))
        return out.to(dtype)

    return {
        "rotate_rows": rotate_rows,
        "rotate_rows_backward": rotate_rows_backward,
        "reduce_rows": reduce_rows,
        "reduce_rows_backward": reduce_rows_backward,
        "wigner_blocks": wigner_blocks,
        "random_rotations_seeded": random_rotations_seeded,
    }


def wigner_term_table(lmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Ivanic–Ruedenberg terms of degrees ``2 .. lmax`` flattened for the kernels
    (kernels/wigner.cuh): ``term_index`` int32 ``(T, 3)`` = (entry of D_l, entry of D_1,
    entry of D_{l-1}), ``term_coef`` float64 ``(T,)`` and ``term_start`` int32 ``(lmax + 2,)``."""
    from .wigner import _recursion_terms

    index, coef, start = [], [], [0] * min(lmax + 2, 3)
    count = 0
    for l in range(2, lmax + 1):
        r, c, k, i, j, a, b = _recursion_terms(l)
        index.append(np.stack([r * (2 * l + 1) + c, i * 3 + j, a * (2 * l - 1) + b], axis=1))
        coef.append(k)
        count += len(k)
        start.append(count)
    index = np.concatenate(index).astype(np.int32) if index else np.zeros((0, 3), np.int32)
    coef = np.concatenate(coef) if coef else np.zeros(0, np.float64)
    return np.ascontiguousarray(index), coef, np.asarray(start, dtype=np.int32)


@functools.lru_cache(maxsize=None)
def _wigner_tables(lmax: int, dtype: torch.dtype, device: torch.device):
    index, coef, start = wigner_term_table(lmax)
    return (torch.from_numpy(index).to(device), torch.from_numpy(coef).to(dtype=dtype, device=device),
            torch.from_numpy(start).to(device))


for _kind in ("cpu", "cuda"):
    _impls = _native(_kind)
    for _name in OPS:
        _backend.register(_name, _kind, available=_available(_kind))(_impls[_name])

for _name in CPU_AUTO:
    _backend.set_auto_order(_name, "cpu", ("cpu",))
