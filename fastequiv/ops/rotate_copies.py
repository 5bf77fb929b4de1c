"""rotate_copies: K rotated copies of an input, stacked along dim 0.

Copy ``k`` of sample ``b`` is row ``k * B + b`` and is rotated by ``R[k, b]``; with the
Philox stream of :mod:`fastequiv.groups`, that is rotation number ``k * B + b``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reps import Rep
from ._masks import mask_for, tile


@_backend.register("rotate_copies", "torch")
def _rotate_copies_torch(x: torch.Tensor, R: torch.Tensor, rep: Rep, mask: Optional[torch.Tensor]) -> torch.Tensor:
    K, B = R.shape[:2]
    copies = x.unsqueeze(0).expand((K,) + tuple(x.shape)).reshape((K * B,) + tuple(x.shape[1:]))
    return rep.act(copies, R.reshape(K * B, 3, 3), mask=tile(mask, K))


def rotate_copies(
    x: torch.Tensor,
    R: torch.Tensor,
    rep: Rep,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Stack ``rho(R[k, b]) x[b]`` for every copy ``k`` and sample ``b``.

    Args:
        x: ``(B, *inner, d)``, the input of one sample per row.
        R: ``(K, B, 3, 3)``, the group element of each copy.
        rep: how ``x`` transforms (:class:`fastequiv.reps.Rep`).
        mask: optional bool ``(B, *inner)``; positions rotate about the centroid of
            their valid points.
    Returns:
        ``(K * B, *inner, d)`` in ``x.dtype``; copy ``k`` of sample ``b`` is row ``k * B + b``.
    """
    if R.dim() != 4 or R.shape[2:] != (3, 3) or R.shape[1] != x.shape[0]:
        raise ValueError(f"R must have shape (K, B={x.shape[0]}, 3, 3), got {tuple(R.shape)}")
    mask = mask_for(mask, x.shape, "x")
    _, impl = _backend.resolve("rotate_copies", backend, x.device)
    return impl(x, R, rep, mask)
