"""Where a per-element mask applies, shared by the ops."""

from __future__ import annotations

import math
from typing import Optional

import torch


def mask_for(mask: Optional[torch.Tensor], shape: torch.Size, name: str) -> Optional[torch.Tensor]:
    """``mask`` reshaped to broadcast against a tensor of ``shape``, or None.

    A mask ``(B, *inner)`` applies to a tensor whose shape starts with ``(B, *inner)``
    (e.g. per-atom forces ``(B, N, 3)`` under an atom mask ``(B, N)``); a tensor with no
    more dims than the mask is per-sample (e.g. energies ``(B, 1)``) and is not masked.
    Any other shape is a mismatch.
    """
    if mask is None:
        return None
    if tuple(shape[: mask.dim()]) == tuple(mask.shape):
        return mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - mask.dim()))
    if len(shape) <= mask.dim() and shape[0] == mask.shape[0]:
        return None
    raise ValueError(
        f"mask has shape {tuple(mask.shape)}, which does not match the leading dims of {name} "
        f"{tuple(shape)}: expected {name} of shape {tuple(mask.shape)} + (...)"
    )


def tile(mask: Optional[torch.Tensor], K: int) -> Optional[torch.Tensor]:
    """A per-sample tensor ``(B, ...)`` (a mask, or the scalars of an input) repeated for
    K stacked copies, copy-major: ``(K * B, ...)``; None stays None."""
    if mask is None:
        return None
    return mask.unsqueeze(0).expand((K,) + tuple(mask.shape)).reshape((K * mask.shape[0],) + tuple(mask.shape[1:]))


def per_sample_sum(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` sum of ``t`` ``(B, *E)`` over each sample's valid elements (``mask`` from :func:`mask_for`)."""
    if mask is not None:
        t = t * mask
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(dim=1)


def valid_count(y: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` number of valid elements of each sample of ``y`` ``(B, *E)``."""
    if mask is None:
        return torch.full((y.shape[0],), math.prod(y.shape[1:]), dtype=dtype, device=y.device)
    return per_sample_sum(torch.ones(y.shape, dtype=dtype, device=y.device), mask)


def check_batch(batch: Optional[torch.Tensor], n: int, name: str) -> None:
    """Raise a ValueError unless ``batch`` is None or an int64 ``(n,)`` index vector.

    Its values (each node's sample, in ``[0, B)``) are not checked: that would sync with
    the device.
    """
    if batch is None:
        return
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.int64 or batch.dim() != 1 or batch.shape[0] != n:
        got = f"{batch.dtype} tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"batch must be an int64 tensor of shape ({n},) (one sample index per row of {name}), got {got}")
