"""From a tensor with a representation to the rows of the kernel contract (:mod:`._rows`).

A tensor ``(B, *inner, d)`` (dense) or ``(N, *inner, d)`` with a batch index (graph) is
viewed as rows of ``d`` components; scalars and pseudoscalars are rows of one component,
so that a ``(B, n_atoms, 128)`` invariant feature costs no matrix product. The group
element of each copy becomes a ``d x d`` matrix ``M`` (see :func:`action_matrices`).
Reps the rows cannot express (e.g. voxel grids, which move data between rows) return
``None`` from :func:`rows_of` and are handled by ``Rep.act``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..groups import orientation
from ..reps import Rep
from . import _rows

ROW_KINDS = ("scalar", "pseudoscalar", "vector", "pseudovector", "position", "irreps")


class Rows(NamedTuple):
    """How one tensor maps onto rows: ``N`` rows of ``d``, ``P`` rows per sample (dense) or
    ``sample`` (graph), and the per-row validity (or None)."""

    N: int
    d: int
    P: int
    sample: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]


def rows_of(shape: torch.Size, rep: Rep, mask: Optional[torch.Tensor], batch: Optional[torch.Tensor]) -> Optional[Rows]:
    """The row view of a tensor of ``shape`` (dim 0: samples, or nodes with ``batch``).

    ``mask`` is already shaped by :func:`fastequiv.ops._masks.mask_for` (broadcastable to
    ``shape``) or None.
    """
    if rep.kind not in ROW_KINDS:
        return None
    d = 1 if rep.kind in ("scalar", "pseudoscalar") else shape[-1]
    lead = shape[0]
    P = math.prod(shape[1:]) // d if d else 0
    N = lead * P
    sample = None
    if batch is not None:
        sample = batch if P == 1 else batch.repeat_interleave(P)
    valid = None
    if mask is not None:
        m = mask.expand(shape)
        valid = (m if d == 1 else m[..., 0]).reshape(N)
    return Rows(N, d, 0 if batch is not None else P, sample, valid)


def action_matrices(rep: Rep, R: torch.Tensor, backend: str) -> torch.Tensor:
    """``M`` ``(K, B, d, d)``: how each copy's group element acts on one row of ``rep``."""
    K, B = R.shape[:2]
    if rep.kind == "scalar":
        return torch.ones(K, B, 1, 1, dtype=R.dtype, device=R.device)
    if rep.kind == "pseudoscalar":
        return orientation(R).reshape(K, B, 1, 1)
    if rep.kind in ("vector", "position"):
        return R.contiguous()
    if rep.kind == "pseudovector":
        return R * orientation(R)[..., None, None]
    from ..wigner import wigner_D_key

    if R.requires_grad and backend == "auto":
        backend = "torch"  # the compiled Wigner-D kernels do not differentiate with respect to R
    return wigner_D_key(rep.key, R, backend).contiguous()


def centroids(x: torch.Tensor, rows: Rows, B: int) -> torch.Tensor:
    """Per-sample centroid of the valid rows of ``x`` ``(..., N, 3)`` -> ``(..., B, 3)``."""
    w = torch.ones(rows.N, dtype=x.dtype, device=x.device) if rows.valid is None else rows.valid.to(x.dtype)
    total = _rows.segment_sum(x * w[:, None], rows.sample, rows.P, B)
    count = _rows.segment_sum(w[:, None], rows.sample, rows.P, B)
    return total / count.clamp_min(1)
