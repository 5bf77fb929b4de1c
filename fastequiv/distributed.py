"""The decomposition of a batch split across ranks (DistributedDataParallel).

Each rank decomposes its own shard; :func:`all_reduce` turns the per-rank results into
the values of the global batch, exactly as if one process had decomposed the union of the
shards: the global means are ``sum of per-sample values / number of valid samples``
(every rank's samples weigh the same, whatever the shard sizes), ``pct`` is the ratio
of the global means, and the standard errors come from the global per-sample variance
(two-pass: the squared deviations from the global mean are summed after the means are
known, so nothing cancels). It costs two ``all_reduce`` calls of a few numbers each and
never copies to the host.

``per_sample`` stays the rank's own ``(B_rank,)`` values. A decomposition from a rotation
design (:mod:`fastequiv.design_twirl`) also carries ``rotation_stderr``, the standard error
the rotations alone leave given the batch: the samples' rotations are independent, so its
square times the squared number of samples adds over ranks (folded into the first
``all_reduce``). The reduced decomposition is
detached: use the rank-local decomposition for the training loss (DDP averages the
gradients itself) and the reduced one for logging.

:func:`fastequiv.equivariance_error`, :func:`fastequiv.twirl_loss` and
:class:`fastequiv.EquivarianceMonitor` call this for you with ``sync=True``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .estimators import Decomposition, Terms, combined_per_sample

__all__ = ["all_reduce", "is_distributed"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised (with any world size)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _valid_of(d: Decomposition, valid: Optional[torch.Tensor]) -> torch.Tensor:
    B = d.per_sample.total.shape[0]
    if valid is None:
        return torch.ones(B, dtype=torch.bool, device=d.total.device)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B,):
        got = f"{valid.dtype} tensor of shape {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor of shape (B={B},), got {got}")
    return valid


def all_reduce(d: Decomposition, *, valid: Optional[torch.Tensor] = None, head_valid: Optional[dict] = None,
               group=None) -> Decomposition:
    """The decomposition of the union of every rank's batch (see module docs).

    Args:
        d: this rank's decomposition.
        valid: bool ``(B,)``, the samples that count (those with at least one valid
            element); default all. The API passes the right one; only masks that leave a
            sample with no valid element make it matter.
        head_valid: the same per head of a multi-head decomposition (default ``valid``).
        group: the process group (default: the whole world).
    Returns:
        a detached :class:`Decomposition` with global ``total``, ``mean``, ``equiv``,
        ``pct`` and ``stderr`` (and likewise for each head); ``d`` itself when
        ``torch.distributed`` is not initialised.
    """
    if not isinstance(d, Decomposition):
        raise ValueError(f"d must be a fastequiv.Decomposition, got {type(d).__name__}")
    d = d.detach()
    if not is_distributed():
        return d
    top_valid = _valid_of(d, valid)
    parts = [(d, top_valid)]
    for name, h in d.heads.items():
        hv = (head_valid or {}).get(name, valid)
        parts.append((h, _valid_of(h, hv)))

    # pass 1: number of valid samples and the sums of the per-sample values
    dtype = d.per_sample.total.dtype
    first = []
    for part, v in parts:
        w = v.to(dtype)
        first.append(w.sum().reshape(1))
        first.extend((torch.where(v, x, torch.zeros_like(x)).sum().reshape(1) for x in part.per_sample))
    rot = getattr(d, "rotation_stderr", None)
    if rot is not None:  # n^2 se^2 = the sum of the samples' jackknife variances: adds over ranks
        n_here = top_valid.sum().to(dtype)
        first.extend((n_here * x.to(dtype)) ** 2 for x in (t.reshape(1) for t in rot))
    sums = torch.cat(first)
    torch.distributed.all_reduce(sums, group=group)
    if rot is not None:
        rot_sums, sums = sums[len(parts) * 4:], sums[:len(parts) * 4]
    sums = sums.reshape(len(parts), 4)
    n, means = sums[:, 0], sums[:, 1:] / sums[:, :1]
    if d.heads and d.weights:
        # the top level is the weighted sum of the global head means (estimators.combine); its
        # per-sample terms are rebuilt with the global numbers of valid samples
        names = list(d.heads)
        per = combined_per_sample(d.heads, d.weights, {h: parts[i][1] for i, h in enumerate(names, start=1)}, n[0],
                                  {h: n[i] for i, h in enumerate(names, start=1)})
        parts[0] = (dataclasses.replace(d, per_sample=per), top_valid)
        weights = torch.tensor([d.weights[h] for h in d.heads], dtype=dtype, device=means.device)
        means = torch.cat([(weights[:, None] * means[1:]).sum(0, keepdim=True), means[1:]])

    # pass 2: squared deviations from the global means
    second = []
    for i, (part, v) in enumerate(parts):
        w = v.to(dtype)
        second.extend((w * (torch.where(v, x, torch.zeros_like(x)) - means[i, j]) ** 2).sum().reshape(1)
                      for j, x in enumerate(part.per_sample))
    dev = torch.cat(second)
    torch.distributed.all_reduce(dev, group=group)
    var = dev.reshape(len(parts), 3) / (n[:, None] - 1)  # nan for a single sample overall: honest
    err = torch.sqrt(var / n[:, None])

    reduced = [
        dataclasses.replace(part, total=means[i, 0], mean=means[i, 1], equiv=means[i, 2],
                            pct=means[i, 2] / means[i, 0], stderr=Terms(err[i, 0], err[i, 1], err[i, 2]))
        for i, (part, _) in enumerate(parts)
    ]
    top = dataclasses.replace(reduced[0], heads=dict(zip(d.heads, reduced[1:])))
    if rot is not None:
        top = dataclasses.replace(top, rotation_stderr=type(rot)(*(rot_sums.sqrt() / n[0]).unbind()))
    return top
