"""twirl_reduce: back-rotate K stacked outputs, twirl them and form the decomposition sums.

Accumulates in float32 (float64 for float64 inputs), so bf16 and fp16 outputs lose
nothing in the sums.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _backend
from ..reps import Rep
from ._masks import mask_for, per_sample_sum, tile, valid_count


class TwirlSums(NamedTuple):
    """Per-sample results; every sum is a mean over the sample's valid elements.

    mean: ``(B, *E)`` twirled prediction ``abar = mean_k a_k``.
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
    """``a_k = rho(R[k, b])^-1 out[k, b]`` in ``dtype``: ``(K, B, *E)``."""
    K, B = out.shape[:2]
    flat = out.reshape((K * B,) + tuple(out.shape[2:])).to(dtype)
    a = rep.act(flat, R.reshape(K * B, 3, 3).to(dtype), mask=tile(mask, K), inverse=True)
    return a.reshape(out.shape)


@_backend.register("twirl_reduce", "torch")
def _twirl_reduce_torch(out, R, target, rep, mask) -> TwirlSums:
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


def twirl_reduce(
    out: torch.Tensor,
    R: torch.Tensor,
    target: torch.Tensor,
    rep: Rep,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> TwirlSums:
    """Back-rotate and reduce K stacked outputs against the target (see :class:`TwirlSums`).

    Args:
        out: ``(K, B, *E)``, the model's outputs for the rotated copies.
        R: ``(K, B, 3, 3)``, the group element of each copy.
        target: ``(B, *E)``, given in the frame of the unrotated input.
        rep: how the output transforms.
        mask: optional bool ``(B, *inner)``, a prefix of ``(B, *E)``.
    """
    if out.dim() < 2 or R.shape != out.shape[:2] + (3, 3):
        raise ValueError(f"R must have shape (K, B, 3, 3) = {tuple(out.shape[:2]) + (3, 3)}, got {tuple(R.shape)}")
    if target.shape != out.shape[1:]:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(out.shape[1:])} (the output per copy)")
    mask = mask_for(mask, target.shape, "target")
    _, impl = _backend.resolve("twirl_reduce", backend, out.device)
    return impl(out, R, target, rep, mask)
