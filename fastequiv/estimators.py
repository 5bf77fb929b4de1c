"""The loss decomposition L_total = L_mean + L_equiv and its finite-sample estimators.

With ``a_k = rho_out(g_k)^-1 f(rho_in(g_k) x)``, ``k = 1..K``, ``abar = mean_k a_k`` and,
per sample (each term is a mean over the sample's valid elements, as
``torch.nn.functional.mse_loss`` normalises):

* ``total  = (1/K) sum_k ||a_k - y||^2``
* ``bias   = ||abar - y||^2``
* ``spread = (1/K) sum_k ||a_k - abar||^2``

so that ``total = bias + spread`` for every draw. The estimators are

=================  ====================================  ==============================
                   i.i.d. Haar draws, ``K >= 2``          exhaustive finite-group twirl
=================  ====================================  ==============================
``L_total``        ``total`` (unbiased)                   ``total`` (exact)
``L_equiv``        ``K / (K - 1) * spread`` (unbiased)    ``spread`` (exact)
``L_mean``         ``bias - spread / (K - 1)`` (unbiased) ``bias`` (exact)
=================  ====================================  ==============================

and ``L_total = L_mean + L_equiv`` holds for every draw. The unbiased ``L_mean`` can be
slightly negative on a single draw; its expectation is not. For any other convex loss
``l`` the plug-in Jensen gap ``(1/K) sum_k l(a_k, y) - l(abar, y)`` is reported with
``exact=False``: it is biased (low) for finite ``K``.

Per-sample values are averaged over the batch (samples with no valid element are left
out); ``pct = L_equiv / L_total`` is the ratio of the batch means, and each standard
error is that of a batch mean of independent per-sample values.

Several heads (energy and forces, say) are combined by :func:`combine`: each head is the
mean over the samples that have a valid element in that head, and the top level is
exactly the ``loss_weights``-weighted sum of the heads' batch means. A sample masked out
entirely in one head still counts in the others.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from .designs import Design

__all__ = ["Terms", "Decomposition", "LabelFree", "Scale", "DesignDecomposition", "DesignLabelFree", "decompose",
           "combine", "combined_per_sample", "label_free", "pool", "from_kernel", "fields_of"]


class Terms(NamedTuple):
    """One value (or one tensor) for each of L_total, L_mean and L_equiv."""

    total: torch.Tensor
    mean: torch.Tensor
    equiv: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The decomposition of a batch's loss; every number is a tensor (no host sync).

    Attributes:
        total, mean, equiv: batch means of L_total, L_mean, L_equiv (0-dim tensors).
        pct: ``equiv / total``, the share of the loss due to imperfect equivariance.
        per_sample: :class:`Terms` of per-sample values, each of shape ``(B,)``.
        stderr: :class:`Terms` of standard errors of the three batch means.
        samples: K, the number of group elements per input.
        exact: True for the MSE estimators (unbiased for i.i.d. draws) and for
            exhaustive finite-group twirls; False for a plug-in Jensen gap.
        exhaustive: True when every element of a finite group was used once.
        heads: per-head decompositions of a multi-head output (empty for one head);
            the top-level values are their ``loss_weights``-weighted sums.
        weights: the weight of each head (empty for one head).
        valid: bool ``(B,)``, the samples that count (those with a valid element; in a
            head, in that head): ``per_sample`` holds placeholders elsewhere.
    """

    total: torch.Tensor
    mean: torch.Tensor
    equiv: torch.Tensor
    pct: torch.Tensor
    per_sample: Terms
    stderr: Terms
    samples: int
    exact: bool
    exhaustive: bool
    heads: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)
    valid: Optional[torch.Tensor] = None

    def to_dict(self, prefix: str = "") -> dict:
        """Plain floats for a logger (TensorBoard, W&B, Lightning ``log_dict``).

        This copies the values to the host, so it synchronises with the device.
        """
        out = {}
        for name in ("total", "mean", "equiv", "pct"):
            out[f"{prefix}{name}"] = float(getattr(self, name))
        for name in ("total", "mean", "equiv"):
            out[f"{prefix}{name}_stderr"] = float(getattr(self.stderr, name))
        for head, d in self.heads.items():
            out.update(d.to_dict(prefix=f"{prefix}{head}/"))
        return out

    def detach(self) -> "Decomposition":
        det = lambda t: t.detach() if t.requires_grad else t  # noqa: E731
        return dataclasses.replace(
            self,
            total=det(self.total),
            mean=det(self.mean),
            equiv=det(self.equiv),
            pct=det(self.pct),
            per_sample=Terms(*map(det, self.per_sample)),
            stderr=Terms(*map(det, self.stderr)),
            heads={k: v.detach() for k, v in self.heads.items()},
        )

    def __repr__(self) -> str:
        def f(t):
            return f"{float(t):.6g}" if t.numel() == 1 else "?"

        heads = f", heads={list(self.heads)}" if self.heads else ""
        return (
            f"Decomposition(total={f(self.total)}, mean={f(self.mean)}, equiv={f(self.equiv)}, "
            f"pct={f(self.pct)}, samples={self.samples}, exact={self.exact}, "
            f"exhaustive={self.exhaustive}{heads})"
        )


def _batch_stats(per_sample: Terms, valid: torch.Tensor) -> tuple[Terms, Terms]:
    """Means and standard errors over the valid samples, without a host sync."""
    w = valid.to(per_sample.total.dtype)
    n = w.sum()
    means, errs = [], []
    for v in per_sample:
        v = torch.where(valid, v, torch.zeros_like(v))
        m = v.sum() / n
        var = (w * (v - m) ** 2).sum() / (n - 1)  # nan for a single sample: honest
        means.append(m)
        errs.append(torch.sqrt(var / n))
    return Terms(*means), Terms(*errs)


def _finish(per_sample: Terms, valid: torch.Tensor, samples: int, exact: bool, exhaustive: bool, heads=None,
            weights=None) -> Decomposition:
    means, errs = _batch_stats(per_sample, valid)
    return Decomposition(
        total=means.total,
        mean=means.mean,
        equiv=means.equiv,
        pct=means.equiv / means.total,
        per_sample=per_sample,
        stderr=errs,
        samples=samples,
        exact=exact,
        exhaustive=exhaustive,
        heads=heads or {},
        weights=weights or {},
        valid=valid,
    )


def decompose(
    total: torch.Tensor,
    bias: torch.Tensor,
    spread: torch.Tensor,
    count: torch.Tensor,
    *,
    samples: int,
    exhaustive: bool,
    exact: bool = True,
) -> Decomposition:
    """Estimators from the per-sample sums of :func:`fastequiv.ops.twirl_reduce`.

    ``total``, ``bias``, ``spread``: per-sample ``(B,)`` (see module docs); ``count``:
    valid elements per sample. ``exhaustive`` selects the exact finite-group values;
    otherwise the unbiased i.i.d. estimators, which need ``samples >= 2``.
    ``exact=False`` marks a plug-in Jensen gap (then ``bias`` is ``l(abar, y)`` and
    ``spread`` is ``total - bias``).
    """
    K = samples
    if exhaustive or not exact:
        equiv, mean = spread, bias
    else:
        if K < 2:
            raise ValueError(
                f"samples={K} cannot estimate L_equiv: the unbiased estimator needs samples >= 2 "
                "i.i.d. rotations (or an exhaustive finite-group twirl)"
            )
        equiv = spread * (K / (K - 1))
        mean = bias - spread / (K - 1)
    return _finish(Terms(total, mean, equiv), count > 0, K, exact, exhaustive)


def combined_per_sample(heads: dict, weights: dict, head_valid: dict, n: torch.Tensor, counts: dict) -> Terms:
    """The top level's per-sample terms ``sum_h weights[h] (n / counts[h]) v_h[b]`` (a head
    adds nothing where the sample is masked out), whose mean over the ``n`` samples valid
    in any head is the weighted sum of the heads' means over their ``counts[h]`` valid
    samples. :func:`combine` passes one process's counts; :func:`fastequiv.distributed.all_reduce`
    the global ones."""
    terms = []
    for t in Terms._fields:
        total = 0
        for h, d in heads.items():
            x = getattr(d.per_sample, t)
            total = total + weights[h] * torch.where(head_valid[h], x, torch.zeros_like(x)) * (n / counts[h])
        terms.append(total)
    return Terms(*terms)


def combine(heads: dict, weights: dict, head_valid: dict) -> Decomposition:
    """Weighted sum of per-head decompositions.

    ``weights[name]`` per head; ``head_valid[name]`` ``(B,)`` marks the samples that have a
    valid element in that head. The top-level batch means are exactly
    ``sum_h weights[h] * heads[h]`` (each head averaged over its own valid samples); the
    top-level samples are those valid in any head, and its per-sample values
    ``sum_h weights[h] (n / n_h) v_h[b]`` (``n``, ``n_h`` the numbers of valid samples
    overall and in head ``h``; a head adds nothing where the sample is masked out) are
    the independent terms whose mean that is, so the standard error follows from them.
    """
    first = next(iter(heads.values()))
    valid = None
    for v in head_valid.values():
        valid = v if valid is None else valid | v
    dtype = first.per_sample.total.dtype
    # int counts: divided as they are, they would round in float32
    counts = {h: v.sum().to(dtype) for h, v in head_valid.items()}
    return _finish(
        combined_per_sample(heads, weights, head_valid, valid.sum().to(dtype), counts),
        valid,
        first.samples,
        all(d.exact for d in heads.values()),
        first.exhaustive,
        heads=heads,
        weights=weights,
    )


def pool(parts) -> Decomposition:
    """One decomposition of the samples of several batches, from their per-sample values.

    ``parts`` are decompositions of disjoint batches (a validation set, say) made with the
    same spec, K and loss weights. The result is what one decomposition of all their
    samples gives from the same per-sample values: means over every valid sample (each
    sample weighs the same, whatever its batch's size), ``pct`` as the ratio of those
    means, standard errors from the pooled per-sample values, heads pooled alike and
    combined as :func:`combine` does. Each batch keeps its own rotations. Parts from the same
    rotation design (:class:`DesignDecomposition`) pool into one, whose ``rotation_stderr``
    adds theirs in quadrature, each weighted by its number of valid samples (the samples'
    turns are independent: ``n^2 se^2`` adds).
    """
    parts = list(parts)
    if not parts or not all(isinstance(p, Decomposition) and p.valid is not None for p in parts):
        got = [type(p).__name__ for p in parts]
        raise ValueError(f"parts must be a non-empty list of fastequiv.Decomposition (with labels), got {got}")
    first = parts[0]
    for p in parts[1:]:
        if (list(p.heads), p.weights, p.samples, p.exhaustive) != (list(first.heads), first.weights, first.samples,
                                                                   first.exhaustive):
            raise ValueError(f"parts must share heads, loss weights and K: got heads {list(first.heads)} and "
                             f"{list(p.heads)}, weights {first.weights} and {p.weights}, K {first.samples} and "
                             f"{p.samples}")
    if first.heads:
        heads = {h: pool([p.heads[h] for p in parts]) for h in first.heads}
        pooled = combine(heads, first.weights, {h: d.valid for h, d in heads.items()})
    else:
        per_sample = Terms(*(torch.cat([getattr(p.per_sample, t) for p in parts]) for t in Terms._fields))
        pooled = _finish(per_sample, torch.cat([p.valid for p in parts]), first.samples,
                         all(p.exact for p in parts), first.exhaustive)
    if not all(isinstance(p, DesignDecomposition) and (p.design, p.replicates) == (first.design, first.replicates)
               for p in parts):
        return pooled
    n = [p.valid.sum().to(pooled.total.dtype) for p in parts]
    se = Terms(*(torch.sqrt(sum((k * getattr(p.rotation_stderr, t)) ** 2 for k, p in zip(n, parts))) / sum(n)
                 for t in Terms._fields))
    return DesignDecomposition(**fields_of(pooled), rotation_stderr=se, design=first.design,
                               replicates=first.replicates)


def from_kernel(rows: tuple, values: tuple, valid: tuple, heads: list, weights: dict, samples: int, exhaustive: bool,
                total: torch.Tensor, equiv: torch.Tensor) -> Decomposition:
    """The :class:`Decomposition` of values computed by the estimators' kernel
    (:func:`fastequiv.ops.decomposition.decompose_heads`, the MSE estimators of this module
    in one step), slot 0 the top level and then each of ``heads`` (none for a single
    output): ``rows``, three ``(B,)`` per-sample tensors a slot (total, mean, equiv);
    ``values``, seven 0-dim tensors a slot (total, mean, equiv, pct, the three standard
    errors); ``valid``, a ``(B,)`` bool a slot; ``total`` and ``equiv`` the top level's (they
    may carry a gradient)."""

    def slot(s: int, parts: dict, head_weights: dict, t: torch.Tensor, e: torch.Tensor) -> Decomposition:
        v = values[7 * s: 7 * s + 7]
        return Decomposition(total=t, mean=v[1], equiv=e, pct=v[3], per_sample=Terms(*rows[3 * s: 3 * s + 3]),
                             stderr=Terms(v[4], v[5], v[6]), samples=samples, exact=True, exhaustive=exhaustive,
                             heads=parts, weights=head_weights, valid=valid[s])

    parts = {h: slot(s, {}, {}, values[7 * s], values[7 * s + 2]) for s, h in enumerate(heads, start=1)}
    return slot(0, parts, dict(weights) if heads else {}, total, equiv)


# --- without labels ---------------------------------------------------------------------------

class Scale(NamedTuple):
    """L_equiv, the size of the twirled prediction and their ratio (one value or tensor each)."""

    equiv: torch.Tensor
    norm: torch.Tensor
    rel: torch.Tensor


@dataclasses.dataclass(frozen=True)
class LabelFree:
    """What a batch says about a model's equivariance without labels.

    L_equiv needs no target: it is the spread of the back-rotated predictions around
    their mean. Its scale is set against the twirled prediction's own size:

    Attributes:
        equiv: batch mean of L_equiv (unbiased, or exact for a finite group).
        norm: batch mean of ``||fbar(x)||^2`` (mean over elements, as the losses), the
            unbiased estimate ``||abar||^2 - s / (K - 1)`` (L_mean against a zero target;
            exact for a finite group).
        rel: ``equiv / norm``, L_equiv relative to the twirled prediction (a ratio of batch
            means, as ``pct``). Its standard error is the ratio estimator's,
            ``sqrt(sum_b (e_b - rel n_b)^2 / (n (n - 1))) / norm``.
        per_sample: :class:`Scale` of per-sample values (``rel`` per sample: ``e_b / n_b``).
        stderr: :class:`Scale` of standard errors.
        samples, exact, exhaustive, heads, weights: as in :class:`Decomposition`.

    ``total``, ``mean`` and ``pct`` need a target: asking for them raises a ValueError.
    """

    equiv: torch.Tensor
    norm: torch.Tensor
    rel: torch.Tensor
    per_sample: Scale
    stderr: Scale
    samples: int
    exact: bool
    exhaustive: bool
    heads: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)

    FIELDS = ("equiv", "norm", "rel")

    def _needs_target(self, name: str):
        raise ValueError(f"{name} needs a target: this decomposition was made with target=None, which measures "
                         "L_equiv and its size relative to the twirled prediction (equiv, norm, rel) only; pass "
                         "target= for L_total, L_mean and pct")

    total = property(lambda self: self._needs_target("L_total (total)"))
    mean = property(lambda self: self._needs_target("L_mean (mean)"))
    pct = property(lambda self: self._needs_target("pct"))

    def to_dict(self, prefix: str = "") -> dict:
        """Plain floats for a logger (a host sync): equiv, norm, rel, their stderrs, heads."""
        out = {}
        for name in self.FIELDS:
            out[f"{prefix}{name}"] = float(getattr(self, name))
        for name in self.FIELDS:
            out[f"{prefix}{name}_stderr"] = float(getattr(self.stderr, name))
        for head, d in self.heads.items():
            out.update(d.to_dict(prefix=f"{prefix}{head}/"))
        return out

    def detach(self) -> "LabelFree":
        return dataclasses.replace(
            self, equiv=self.equiv.detach(), norm=self.norm.detach(), rel=self.rel.detach(),
            per_sample=Scale(*(t.detach() for t in self.per_sample)), stderr=Scale(*(t.detach() for t in self.stderr)),
            heads={k: v.detach() for k, v in self.heads.items()})

    def __repr__(self) -> str:
        def f(t):
            return f"{float(t):.6g}" if t.numel() == 1 else "?"

        heads = f", heads={list(self.heads)}" if self.heads else ""
        return (f"LabelFree(equiv={f(self.equiv)}, norm={f(self.norm)}, rel={f(self.rel)}, samples={self.samples}, "
                f"exhaustive={self.exhaustive}{heads})")


def label_free(d: Decomposition, valid: Optional[torch.Tensor] = None) -> LabelFree:
    """The :class:`LabelFree` view of a decomposition made against a zero target, whose
    L_mean is then the size of the twirled prediction. ``valid`` ``(B,)``: the samples that
    count (default ``d.valid``); each head counts its own (``d.heads[h].valid``)."""
    valid = d.valid if valid is None else valid
    e, n = d.per_sample.equiv, d.per_sample.mean
    rel = d.equiv / d.mean
    w = valid.to(e.dtype)
    count = w.sum()
    resid = torch.where(valid, e - rel * n, torch.zeros_like(e))
    se_rel = torch.sqrt((resid ** 2).sum() / (count * (count - 1))) / d.mean.abs()
    per_rel = torch.where(valid, e / n, torch.zeros_like(e))
    heads = {h: label_free(hd) for h, hd in d.heads.items()}
    return LabelFree(d.equiv, d.mean, rel, Scale(e, n, per_rel), Scale(d.stderr.equiv, d.stderr.mean, se_rel),
                     d.samples, d.exact, d.exhaustive, heads, d.weights)


@dataclasses.dataclass(frozen=True)
class DesignDecomposition(Decomposition):
    """A :class:`fastequiv.Decomposition` from a randomised design (:mod:`fastequiv.design_twirl`) (``samples`` counts every
    model evaluation of a sample: ``replicates * design.size``).

    Extra attributes:
        rotation_stderr: :class:`Terms` of the rotations' standard errors given the batch
            (jackknife over replicates; NaN with fewer than 3).
        design: the :class:`fastequiv.designs.Design` (``.degree``, ``.size``).
        replicates: R.
    """

    rotation_stderr: Optional[Terms] = None
    design: Optional[Design] = None
    replicates: int = 1

    def to_dict(self, prefix: str = "") -> dict:
        out = super().to_dict(prefix)
        for name in Terms._fields:
            out[f"{prefix}{name}_rotation_stderr"] = float(getattr(self.rotation_stderr, name))
        return out


@dataclasses.dataclass(frozen=True)
class DesignLabelFree(LabelFree):
    """A :class:`fastequiv.LabelFree` from a randomised design, with ``rotation_stderr``
    (:class:`fastequiv.estimators.Scale`: equiv, norm, rel), ``design`` and ``replicates``."""

    rotation_stderr: Optional[Scale] = None
    design: Optional[Design] = None
    replicates: int = 1


def fields_of(obj) -> dict:
    """A dataclass instance's fields by name (to build a subclass's instance from it)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
