"""The host side of the compiled kernels, written once for every backend that runs them.

The ``"cpu"`` and ``"cuda"`` backends (:mod:`.native`, the kernels of ``fastequiv._C``) and
the ``"cupy"`` backend (:mod:`.cupy`, the same ``kernels/*.cu`` compiled by NVRTC) run the
same kernels with the same arguments. What differs is only how a kernel is launched, so
each backend hands :func:`row_ops` a ``launch(name, device, *args)`` that takes the
arguments of ``fastequiv._C``'s ``<name>_cpu`` / ``<name>_cuda`` bindings, and gets back
implementations of the row-level contract with exactly the signatures of the torch
references in :mod:`fastequiv.ops` (``rotate_rows``, ``rotate_rows_backward``,
``reduce_rows``, ``reduce_rows_backward``, ``wigner_blocks``, ``random_rotations_seeded``).

Element types: the CPU kernels read float32 and float64 (float16/bfloat16 are converted
to float32 here, which rounds exactly as the reference does since it also accumulates
them in float32); the GPU kernels read float16/bfloat16 natively and accumulate in
float32. A "no centre" call passes zeros (``x - 0 + 0`` is ``x`` exactly).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch

from .. import grid
from ..groups import refuse_during_capture
from ..wigner import packed_width, recursion_terms

ROW_OPS = ("rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward", "wigner_blocks",
           "random_rotations_seeded")

CPU_FLOATS = (torch.float32, torch.float64)


def elements(t: torch.Tensor, device_type: str) -> torch.Tensor:
    """``t`` as the kernels read it: contiguous, and float32 for fp16/bf16 on the CPU."""
    if device_type == "cpu" and t.dtype not in CPU_FLOATS:
        t = t.float()
    return t.contiguous()


def check_acc(M: torch.Tensor, *named: tuple[str, torch.Tensor]) -> None:
    """Raise a ValueError unless ``M`` is in the accumulation dtype of the ``named`` tensors."""
    if M.dtype not in CPU_FLOATS:
        raise ValueError(f"M: expected float32 or float64 (the accumulation dtype), got {M.dtype}")
    for name, t in named:
        if t.dtype == torch.float64 and M.dtype != torch.float64:
            raise ValueError(f"M: expected float64 (the accumulation dtype) for float64 {name}, got {M.dtype}")


def target_for(target: torch.Tensor, out: torch.Tensor, acc: torch.dtype, device_type: str) -> torch.Tensor:
    """The kernels read a target in out's dtype or in acc; any other is converted to acc."""
    y = elements(target, device_type)
    out_dtype = out.dtype if device_type != "cpu" or out.dtype in CPU_FLOATS else torch.float32
    return y if y.dtype in (out_dtype, acc) else y.to(acc)


def check_arrays(device: torch.device, *arrays: tuple) -> None:
    """Raise a ValueError unless every ``(name, tensor, shape, dtypes)`` (a None tensor: not
    given) is a contiguous tensor on ``device`` with ``shape`` and a dtype of ``dtypes``.

    The bindings check the same on every DLPack import; the CPU kernels take data pointers
    (:mod:`.native`), so the checks are made here, once a call, from the tensors' metadata."""
    for name, t, shape, dtypes in arrays:
        if t is None:
            continue
        if t.device != device or tuple(t.shape) != shape or t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {'/'.join(str(d) for d in dtypes)} tensor of shape "
                             f"{shape} on {device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
                             + ("" if t.is_contiguous() else " (not contiguous)"))


def check_rows(M: torch.Tensor, N: int, sample: Optional[torch.Tensor], P: int, valid: Optional[torch.Tensor]):
    """``(K, B, d)`` of the row contract's matrices ``M`` ``(K, B, d, d)`` after checking
    them and the layout of ``N`` rows: ``sample`` int64 ``(N,)``, or ``P >= 1`` rows a sample
    covering the rows with ``B`` samples; ``valid`` bool ``(N,)`` or None."""
    if M.dim() != 4 or M.shape[2] != M.shape[3]:
        raise ValueError(f"M: expected shape (K, B, d, d), got {tuple(M.shape)}")
    K, B, d = M.shape[0], M.shape[1], M.shape[2]
    check_arrays(M.device, ("M", M, (K, B, d, d), CPU_FLOATS), ("sample", sample, (N,), (torch.int64,)),
                 ("valid", valid, (N,), (torch.bool,)))
    if sample is None and P < 1:
        raise ValueError(f"P: expected P >= 1 rows per sample in the dense layout (sample None), got {P}")
    if sample is None and N > 0 and (N - 1) // P >= B:
        raise ValueError(f"P: {N} rows of {P} per sample need more than B = {B} samples")
    return K, B, d


def dense_P(P: int, sample: Optional[torch.Tensor]) -> int:
    """Rows per sample for the kernels: ``P`` in the dense layout, 0 in the graph layout."""
    return max(int(P), 1) if sample is None else 0


def sample_arg(sample: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if sample is None:
        return None
    if sample.dtype != torch.int64:
        raise ValueError(f"sample: expected an int64 tensor, got {sample.dtype}")
    return sample.contiguous()


def valid_arg(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if valid is None else valid.to(torch.bool).contiguous()


def wigner_term_table(lmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Ivanic–Ruedenberg terms of degrees ``2 .. lmax`` flattened for the kernels
    (kernels/wigner.cuh): ``term_index`` int32 ``(T, 3)`` = (entry of D_l, entry of D_1,
    entry of D_{l-1}), ``term_coef`` float64 ``(T,)`` and ``term_start`` int32 ``(lmax + 2,)``."""
    index, coef, start = [], [], [0] * min(lmax + 2, 3)
    count = 0
    for l in range(2, lmax + 1):
        r, c, k, i, j, a, b = recursion_terms(l)
        index.append(np.stack([r * (2 * l + 1) + c, i * 3 + j, a * (2 * l - 1) + b], axis=1))
        coef.append(k)
        count += len(k)
        start.append(count)
    index = np.concatenate(index).astype(np.int32) if index else np.zeros((0, 3), np.int32)
    coef = np.concatenate(coef) if coef else np.zeros(0, np.float64)
    return np.ascontiguousarray(index), coef, np.asarray(start, dtype=np.int32)


@functools.lru_cache(maxsize=None)
def wigner_tables(lmax: int, dtype: torch.dtype, device: torch.device):
    """:func:`wigner_term_table` as tensors on ``device`` (built once per device, by
    ``fastequiv.warmup`` or the first eager step; refused during CUDA-graph capture)."""
    refuse_during_capture(f"the Wigner-D term tables (lmax={lmax}) on {device}")
    index, coef, start = wigner_term_table(lmax)
    return (torch.from_numpy(index).to(device), torch.from_numpy(coef).to(dtype=dtype, device=device),
            torch.from_numpy(start).to(device))


def row_ops(device_type: str, launch: Callable) -> dict[str, Callable]:
    """The six row-contract implementations of a backend on ``device_type`` ("cpu" or
    "cuda") whose kernels are started by ``launch(name, device, *binding_args)``."""

    floats = CPU_FLOATS if device_type == "cpu" else CPU_FLOATS + (torch.float16, torch.bfloat16)

    def rotate_rows(x, M, sample, P, center):
        check_acc(M, ("x", x))
        M, sample = M.contiguous(), sample_arg(sample)
        xe = elements(x, device_type)
        N = xe.shape[0] if xe.dim() == 2 else -1
        K, B, d = check_rows(M, N, sample, dense_P(P, sample), None)
        c = center.contiguous() if center is not None else M.new_zeros(B, d)
        check_arrays(M.device, ("x", xe, (N, d), floats), ("center", c, (B, d), (M.dtype,)))
        out = torch.empty((K,) + tuple(x.shape), dtype=xe.dtype, device=x.device)
        launch("rotate_rows", x.device, xe, M, sample, dense_P(P, sample), c, out)
        return out.to(x.dtype)

    def rotate_rows_backward(grad, M, sample, P):
        check_acc(M, ("grad", grad))
        M, sample = M.contiguous(), sample_arg(sample)
        ge = elements(grad, device_type)
        N = ge.shape[1] if ge.dim() == 3 else -1
        K, B, d = check_rows(M, N, sample, dense_P(P, sample), None)
        check_arrays(M.device, ("grad", ge, (K, N, d), floats))
        out = torch.empty(tuple(grad.shape[1:]), dtype=M.dtype, device=grad.device)
        launch("rotate_rows_backward", grad.device, ge, M, sample, dense_P(P, sample), out)
        return out

    def reduce_args(out, M, target, sample, P, valid, center):
        """The checked arguments shared by reduce_rows and its backward."""
        check_acc(M, ("out", out), ("target", target))
        M, sample, valid = M.contiguous(), sample_arg(sample), valid_arg(valid)
        oe = elements(out, device_type)
        N = oe.shape[1] if oe.dim() == 3 else -1
        K, B, d = check_rows(M, N, sample, dense_P(P, sample), valid)
        y = target_for(target, oe, M.dtype, device_type)
        c = center.contiguous() if center is not None else M.new_zeros(K, B, d)
        check_arrays(M.device, ("out", oe, (K, N, d), floats), ("target", y, (N, d), (oe.dtype, M.dtype)),
                     ("center", c, (K, B, d), (M.dtype,)))
        return oe, M, y, sample, valid, c, (K, N, B, d)

    def weights_arg(weights, M):
        """The copies' weights as the kernels take them: ``(K,)`` in M's dtype on M's device,
        or None (``1/K`` each: the kernels' unweighted arithmetic)."""
        if weights is None:
            return None
        w = weights.contiguous()
        check_arrays(M.device, ("weights", w, (M.shape[0],), (M.dtype,)))
        return w

    def reduce_rows(out, M, target, sample, P, valid, center, B, weights=None):
        oe, M, y, sample, valid, c, (K, N, B_M, d) = reduce_args(out, M, target, sample, P, valid, center)
        if B != B_M:
            raise ValueError(f"B: expected M.shape[1] = {B_M} samples, got {B}")
        acc = M.dtype
        w = weights_arg(weights, M)
        mean = torch.empty(N, d, dtype=acc, device=out.device)
        sums = torch.zeros(3, B, dtype=acc, device=out.device)
        launch("reduce_rows", out.device, oe, M, y, sample, dense_P(P, sample), valid, c, mean, sums, w)
        return mean, sums

    def reduce_rows_backward(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, weights=None):
        oe, M, y, sample, valid, c, (K, N, B, d) = reduce_args(out, M, target, sample, P, valid, center)
        w = weights_arg(weights, M)
        acc = M.dtype
        grad_out = torch.empty_like(oe)
        gm = None if grad_mean is None else grad_mean.to(acc).contiguous()
        gs, mean = grad_sums.to(acc).contiguous(), mean.to(acc).contiguous()
        check_arrays(M.device, ("grad_mean", gm, (N, d), (acc,)), ("grad_sums", gs, (3, B), (acc,)),
                     ("mean", mean, (N, d), (acc,)))
        args = [gm, gs, oe, M, y, sample, dense_P(P, sample), valid, c, mean, grad_out]
        if device_type == "cuda":  # the GPU kernel's scratch for the twirled mean of wide rows
            args.append(None if d in (1, 3) else torch.empty(N, d, dtype=acc, device=out.device))
        launch("reduce_rows_backward", out.device, *args, w)
        return grad_out.to(out.dtype)

    def wigner_blocks(R, lmax):
        work = R.dtype if R.dtype in CPU_FLOATS else torch.float32
        index, coef, start = wigner_tables(lmax, work, R.device)
        out = torch.empty(R.shape[0], packed_width(lmax), dtype=work, device=R.device)
        launch("wigner_blocks", R.device, R.to(work).contiguous(), lmax, index, coef, start, out)
        return out.to(R.dtype)

    def random_rotations_seeded(seed, n, offset, improper, dtype):
        # the CPU draws in float64 and rounds once, as the reference does; the GPU draws
        # float32 directly (within an ulp or two of that)
        work = torch.float64 if dtype == torch.float64 or device_type == "cpu" else torch.float32
        out = torch.empty(n, 3, 3, dtype=work, device=seed.device)
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise ValueError(f"seed: expected an int64 0-dim tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        if device_type == "cpu":
            value = int(seed)  # a CPU tensor: reading it is no device sync
            if not 0 <= value < 2**63:
                raise ValueError(f"seed: expected 0 <= seed < 2**63, got {value}")
            launch("random_rotations", seed.device, out, value, offset, improper)
        else:
            launch("random_rotations_seeded", seed.device, out, seed.contiguous(), offset, improper)
        return out.to(dtype)

    impls = {
        "rotate_rows": rotate_rows,
        "rotate_rows_backward": rotate_rows_backward,
        "reduce_rows": reduce_rows,
        "reduce_rows_backward": reduce_rows_backward,
        "wigner_blocks": wigner_blocks,
        "random_rotations_seeded": random_rotations_seeded,
    }
    return impls


def voxels_resample(launch: Callable) -> Callable:
    """``voxels_resample`` with its exact (cube-group) path in the ``cube_copies`` kernel
    started by ``launch``; the trilinear path is the reference's, torch's ``grid_sample``."""

    def resample(x, M, vec, exact):
        if not exact or M.shape[0] == 0 or x.numel() == 0:
            return grid.resample(x, M, vec, exact)
        acc = M.dtype
        src = x.to(acc).contiguous()  # what the reference moves: exact in any dtype
        B, rows = src.shape[0], M.shape[0]
        if src.dim() != 5 or not src.shape[2] == src.shape[3] == src.shape[4] or rows % B:
            raise ValueError(f"x, M: expected x (B, C, n, n, n) and M (rows, 3, 3) with rows a multiple of B, got "
                             f"{tuple(x.shape)} and {tuple(M.shape)}")
        M = M.contiguous()
        check_arrays(x.device, ("M", M, (rows, 3, 3), CPU_FLOATS))
        out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=acc, device=x.device)
        launch("cube_copies", x.device, src, M, out)  # M: signed permutations, rounded by the kernel
        return grid.mix_vectors(out, M, vec).to(x.dtype)

    return resample

