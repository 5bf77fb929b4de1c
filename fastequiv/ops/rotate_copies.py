"""rotate_copies: K rotated copies of an input, stacked along dim 0.

Copy ``k`` of sample ``b`` is row ``k * B + b`` and is rotated by ``R[k, b]``; with the
Philox stream of :mod:`fastequiv.groups`, that is rotation number ``k * B + b``. In the
graph layout (``batch=``), copy ``k`` of node ``i`` is row ``k * N + i`` and is rotated by
``R[k, batch[i]]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reps import Rep
from . import _library
from ._interop import accepts_arrays
from ._layout import action_matrices, centroids, rows_of
from ._masks import check_batch, mask_for, tile
from .twirl_reduce import accumulate_dtype


def _rotate_copies_act(x: torch.Tensor, R: torch.Tensor, rep: Rep, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The definition, through ``Rep.act`` (dense layout): the reference the row kernels are
    tested against, and the path for reps that are not rows (voxel grids)."""
    K, B = R.shape[:2]
    return rep.act(tile(x, K), R.reshape(K * B, 3, 3), mask=tile(mask, K))


@accepts_arrays
def rotate_copies(
    x: torch.Tensor,
    R: torch.Tensor,
    rep: Rep,
    mask: Optional[torch.Tensor] = None,
    *,
    batch: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Stack ``rho(R[k, b]) x[b]`` for every copy ``k`` and sample ``b``.

    Args:
        x: ``(B, *inner, d)``, one sample per row; with ``batch``, ``(N, *inner, d)`` nodes.
        R: ``(K, B, 3, 3)``, the group element of each copy (float32 or float64: the math
            runs in ``R.dtype``).
        rep: how ``x`` transforms (:class:`fastequiv.reps.Rep`).
        mask: optional bool ``(B, *inner)`` (``(N, *inner)`` with ``batch``); positions
            rotate about the centroid of their valid points.
        batch: optional int64 ``(N,)``, the sample of each node (graph layout).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``, ``"cupy"``.
            CuPy (or NumPy) arrays in any tensor argument are taken without a copy
            (DLPack) and the results come back as arrays of the same kind.
    Returns:
        ``(K * B, *inner, d)`` (``(K * N, *inner, d)``) in ``x.dtype``.
    """
    # the math runs in float32/float64 whatever autocast region the caller is in
    with torch.autocast(x.device.type, enabled=False):
        return _rotate_copies_rows(x, R, rep, mask, batch, backend)


def _rotate_copies_rows(x, R, rep, mask, batch, backend):
    if R.dim() != 4 or R.shape[2:] != (3, 3):
        raise ValueError(f"R must have shape (K, B, 3, 3), got {tuple(R.shape)}")
    K, B = R.shape[:2]
    if batch is None and R.shape[1] != x.shape[0]:
        raise ValueError(f"R must have shape (K, B={x.shape[0]}, 3, 3), got {tuple(R.shape)}")
    check_batch(batch, x.shape[0], "x")
    if rep.kind == "voxels" and batch is None:
        from ..voxels import rotate_copies as rotate_grids  # one fused resampling pass

        return rotate_grids(x, R, rep, backend=backend)
    mask = mask_for(mask, x.shape, "x")
    rows = rows_of(x.shape, rep, mask, batch)
    if rows is None:
        if batch is not None:
            raise ValueError(f"rep {rep} supports only the dense layout (batch=None)")
        return _rotate_copies_act(x, R, rep, mask)
    if rep.kind == "scalar":
        return tile(x, K)
    R = R.to(accumulate_dtype(x, R))
    M = action_matrices(rep, R, backend)
    xr = x.reshape(rows.N, rows.d)
    center = centroids(xr.to(R.dtype), rows, B) if rep.kind == "position" else None
    out = _library.call("rotate_rows", backend, x.device, xr.contiguous(), M, rows.sample, rows.P, center)
    return out.reshape((K * x.shape[0],) + tuple(x.shape[1:]))
