"""twirl_reduce: back-rotate K stacked outputs, twirl them and form the decomposition sums.

Accumulates in float32 (float64 for float64 inputs), so bf16 and fp16 outputs lose
nothing in the sums.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..reps import Rep
from . import _library, _rows
from ._interop import accepts_arrays
from ._layout import action_matrices, centroids, rows_of
from ._masks import check_batch, mask_for, per_sample_sum, tile, valid_count


class TwirlSums(NamedTuple):
    """Per-sample results; every sum is a mean over the sample's valid elements.

    mean: ``(B, *E)`` twirled prediction ``abar = mean_k a_k`` (``(N, *E)`` in the graph layout).
    total: ``(B,)`` ``(1/K) sum_k ||a_k - y||^2``.
    bias: ``(B,)`` ``||abar - y||^2``.
    spread: ``(B,)`` ``(1/K) sum_k ||a_k - abar||^2``.
    count: ``(B,)`` number of valid elements (0 for a fully masked sample, whose sums are 0).
    """

    mean: torch.Tensor
    total: torch.Tensor
    bias: torch.Tensor
    spread: torch.Tensor
    count: torch.Tensor


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def back_rotate(out: torch.Tensor, R: torch.Tensor, rep: Rep, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``a_k = rho(R[k, b])^-1 out[k, b]`` in ``dtype``: ``(K, B, *E)`` (dense layout)."""
    K, B = out.shape[:2]
    flat = out.reshape((K * B,) + tuple(out.shape[2:])).to(dtype)
    with torch.autocast(out.device.type, enabled=False):
        a = rep.act(flat, R.reshape(K * B, 3, 3).to(dtype), mask=tile(mask, K), inverse=True)
    return a.reshape(out.shape)


def _twirl_reduce_act(out, R, target, rep, mask) -> TwirlSums:
    """The definition, through ``Rep.act`` (dense layout): the reference the row kernels are
    tested against, and the path for reps that are not rows (voxel grids)."""
    acc = accumulate_dtype(out, target)
    a = back_rotate(out, R, rep, mask, acc)
    y = target.to(acc)
    abar = a.mean(dim=0)

    count = valid_count(y, mask, acc)
    n = count.clamp_min(1)
    total = per_sample_sum(((a - y) ** 2).mean(dim=0), mask) / n
    bias = per_sample_sum((abar - y) ** 2, mask) / n
    spread = per_sample_sum(((a - abar) ** 2).mean(dim=0), mask) / n
    return TwirlSums(abar, total, bias, spread, count)


@accepts_arrays
def twirl_reduce(
    out: torch.Tensor,
    R: torch.Tensor,
    target: torch.Tensor,
    rep: Rep,
    mask: Optional[torch.Tensor] = None,
    *,
    batch: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> TwirlSums:
    """Back-rotate and reduce K stacked outputs against the target (see :class:`TwirlSums`).

    One pass over ``out`` on the compiled backends; differentiable with respect to ``out``
    and ``target`` (the compiled backends run a fused backward kernel).

    Args:
        out: ``(K, B, *E)``, the model's outputs for the rotated copies; with ``batch``,
            ``(K, N, *E)`` node outputs.
        R: ``(K, B, 3, 3)``, the group element of each copy.
        target: ``(B, *E)`` (``(N, *E)``), given in the frame of the unrotated input.
        rep: how the output transforms.
        mask: optional bool ``(B, *inner)`` (``(N, *inner)``), a prefix of the target's shape.
        batch: optional int64 ``(N,)``, the sample of each node (graph layout).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``, ``"cupy"``.
            CuPy (or NumPy) arrays in any tensor argument are taken without a copy
            (DLPack) and the results come back as arrays of the same kind.
    """
    # the math runs in float32/float64 whatever autocast region the caller is in
    with torch.autocast(out.device.type, enabled=False):
        return _twirl_reduce_rows(out, R, target, rep, mask, batch, backend)


def _twirl_reduce_rows(out, R, target, rep, mask, batch, backend):
    if out.dim() < 2 or R.dim() != 4 or R.shape[2:] != (3, 3) or R.shape[0] != out.shape[0] \
            or (batch is None and R.shape[1] != out.shape[1]):
        want = (out.shape[0], "B") if batch is not None else tuple(out.shape[:2])
        raise ValueError(f"R must have shape (K, B, 3, 3) = {want + (3, 3)}, got {tuple(R.shape)}")
    if target.shape != out.shape[1:]:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(out.shape[1:])} (the output per copy)")
    check_batch(batch, target.shape[0], "target")
    if rep.kind == "voxels" and batch is None:
        from ..voxels import twirl_reduce as reduce_grids  # one fused back-resampling pass

        return reduce_grids(out, R, target, rep, mask, backend=backend)
    mask = mask_for(mask, target.shape, "target")
    K, B = R.shape[:2]
    rows = rows_of(target.shape, rep, mask, batch)
    if rows is None:
        if batch is not None:
            raise ValueError(f"rep {rep} supports only the dense layout (batch=None)")
        return _twirl_reduce_act(out, R, target, rep, mask)

    acc = accumulate_dtype(out, target)
    R = R.to(acc)
    M = action_matrices(rep, R, backend)
    o = out.reshape(K, rows.N, rows.d)
    center = centroids(o.to(acc), rows, B) if rep.kind == "position" else None
    mean, sums = _library.call("reduce_rows", backend, out.device, o.contiguous(), M,
                               target.reshape(rows.N, rows.d).contiguous(), rows.sample, rows.P, rows.valid,
                               center, B)
    per_row = torch.full((rows.N,), float(rows.d), dtype=acc, device=out.device)
    if rows.valid is not None:
        per_row = per_row * rows.valid
    count = _rows.segment_sum(per_row[:, None], rows.sample, rows.P, B)[:, 0]
    n = count.clamp_min(1)
    return TwirlSums(mean.reshape(target.shape), sums[0] / n, sums[1] / n, sums[2] / n, count)
