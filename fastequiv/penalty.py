"""The L_equiv penalty of :func:`fastequiv.twirl_loss`: its weight (a number, a schedule of the
training step, or :class:`EquivWeight`'s target share) and its margin.

``twirl_loss(..., equiv_weight=w, equiv_margin=eps)`` returns::

    L_total_hat + w * relu(L_equiv_hat - eps)

with ``L_equiv_hat`` the batch mean of the unbiased per-sample estimates (the
``loss_weights``-weighted sum over heads, as :attr:`Decomposition.equiv`).

Per batch, not per sample. The margin applies to the batch mean: a constraint "mean
``L_equiv`` at most ``eps``", and its estimate is far less noisy than one sample's (with
K = 2 a per-sample estimate is one squared difference, often 0, often several times its
mean), so the ``relu`` of it is much less biased (see below). A per-sample margin would
penalise the worst samples even when the mean is well inside it; that is a different
objective, not offered.

What is and is not unbiased. ``L_equiv_hat`` is unbiased and ``>= 0``, so with ``eps = 0``
the penalty is exactly the unbiased ``w * L_equiv_hat`` (and its gradient the unbiased
gradient). With ``eps > 0``, ``relu`` is convex, so by Jensen
``E relu(L_hat - eps) >= relu(L_equiv - eps)``: the penalty is biased upward, and it is
not 0 on average when the true ``L_equiv`` is just inside the margin but the estimate
scatters above it. Its gradient, ``w * 1[L_hat > eps] * grad L_hat``, is not the gradient of
``relu(L_equiv - eps)`` either. Guaranteed, draw by draw: below the margin the penalty and
its gradient are exactly 0; above it they are ``w * (L_hat - eps)`` and ``w * grad L_hat``,
the unbiased estimate shifted by a constant. The bias is small when the estimate's spread
(:attr:`Decomposition.stderr` ``.equiv``) is small next to ``|L_equiv - eps|``: use more
copies (``samples``) or larger batches near the margin.

Schedules. ``equiv_weight`` is one of

* a number ``>= 0``;
* a callable ``step -> weight`` (a number or a 0-dim tensor), called with ``step=``
  (required then): warmups, ramps, any function of the training step;
* an :class:`EquivWeight`: a weight that follows a target share ``pct = L_equiv /
  L_total``, raised while the batches' pct is above the target and lowered while below.

One callable covers every fixed schedule without a schedule language; a target share is
the one schedule that needs the loss itself, so it is an object that keeps its state.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

__all__ = ["EquivWeight", "WeightLike", "weight_at", "check_margin", "equiv_penalty"]


class EquivWeight:
    """The weight of L_equiv in :func:`fastequiv.twirl_loss`, steered toward a target share.

    ``twirl_loss(..., equiv_weight=ew)`` uses ``ew.weight`` for the batch, then calls
    ``ew.update(d)`` with the batch's decomposition (once per call; with ``sync=True`` the
    global one, so every rank moves the same way). An update multiplies the weight by
    ``exp(rate * tanh(log(pct / target)))``: about ``(pct / target) ** rate`` near the
    target, at most ``e ** rate`` per step either way, clamped to ``[min_weight,
    max_weight]``. It stays a tensor on the loss's device: no host sync.

    Args:
        target: the share ``L_equiv / L_total`` to aim at, in (0, 1).
        initial: the starting weight (> 0).
        rate: the step of the update in log-space (> 0).
        min_weight, max_weight: the range of the weight.

    Save and restore it with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, target: float, *, initial: float = 1.0, rate: float = 0.05, min_weight: float = 1e-3,
                 max_weight: float = 1e3):
        if not _number(target) or not 0 < target < 1:
            raise ValueError(f"target must be a share L_equiv / L_total in (0, 1), got {target!r}")
        if not _number(rate) or rate <= 0:
            raise ValueError(f"rate must be a number > 0, got {rate!r}")
        if not _number(min_weight) or not _number(max_weight) or not 0 < min_weight <= max_weight:
            raise ValueError(f"min_weight and max_weight must satisfy 0 < min_weight <= max_weight, got "
                             f"{min_weight!r} and {max_weight!r}")
        if not _number(initial) or not min_weight <= initial <= max_weight:
            raise ValueError(f"initial must be in [min_weight, max_weight] = [{min_weight}, {max_weight}], "
                             f"got {initial!r}")
        self.target, self.rate, self.min_weight, self.max_weight = float(target), float(rate), min_weight, max_weight
        self._weight = torch.tensor(float(initial), dtype=torch.float64)

    @property
    def weight(self) -> torch.Tensor:
        """The current weight, a 0-dim tensor."""
        return self._weight

    def weight_on(self, like: torch.Tensor) -> torch.Tensor:
        """The current weight on ``like``'s device and in its dtype (moved there once)."""
        if self._weight.device != like.device:
            self._weight = self._weight.to(like.device)
        return self._weight.to(like.dtype)

    @torch.no_grad()
    def update(self, d) -> None:
        """Move the weight with a batch's decomposition ``d`` (reads ``d.equiv``, ``d.total``)."""
        pct = (d.equiv / d.total).to(self._weight)
        log_ratio = torch.log(pct.clamp_min(1e-30) / self.target)
        step = torch.nan_to_num(torch.tanh(log_ratio), nan=0.0)  # a NaN batch leaves it alone
        self._weight = (self._weight.to(pct.device) * torch.exp(self.rate * step)).clamp(self.min_weight,
                                                                                         self.max_weight)

    def state_dict(self) -> dict:
        return {"weight": float(self._weight)}

    def load_state_dict(self, state: dict) -> None:
        self._weight = torch.tensor(float(state["weight"]), dtype=torch.float64, device=self._weight.device)

    def __repr__(self) -> str:
        return (f"EquivWeight(target={self.target}, weight={float(self._weight):.4g}, rate={self.rate}, "
                f"range=[{self.min_weight}, {self.max_weight}])")


WeightLike = Union[float, Callable[[int], Union[float, torch.Tensor]], EquivWeight]


def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def weight_at(equiv_weight: WeightLike, step: Optional[int], like: torch.Tensor):
    """The weight of this batch: a number ``>= 0`` or a 0-dim tensor on ``like``'s device."""
    if isinstance(equiv_weight, EquivWeight):
        return equiv_weight.weight_on(like)
    if callable(equiv_weight):
        if step is None:
            raise ValueError("equiv_weight is a schedule (a callable step -> weight): pass step= (the training step) "
                             "to twirl_loss")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        w = equiv_weight(step)
        if isinstance(w, torch.Tensor):
            if w.dim() != 0:
                raise ValueError(f"equiv_weight({step}) must return a number or a 0-dim tensor, got a tensor of "
                                 f"shape {tuple(w.shape)}")
            return w.to(device=like.device, dtype=like.dtype)
        if not _number(w) or w < 0:
            raise ValueError(f"equiv_weight({step}) must return a number >= 0, got {w!r}")
        return float(w)
    if not _number(equiv_weight) or equiv_weight < 0:
        raise ValueError(f"equiv_weight must be a number >= 0, a callable step -> weight or a fe.EquivWeight, "
                         f"got {equiv_weight!r}")
    return float(equiv_weight)


def check_margin(equiv_margin) -> float:
    if not _number(equiv_margin) or equiv_margin < 0:
        raise ValueError(f"equiv_margin must be a number >= 0 (in units of L_equiv), got {equiv_margin!r}")
    return float(equiv_margin)


def equiv_penalty(equiv: torch.Tensor, weight, margin: float) -> Optional[torch.Tensor]:
    """``weight * relu(equiv - margin)``, or None where it is 0 by construction (a weight of 0)."""
    if not isinstance(weight, torch.Tensor) and weight == 0:
        return None
    if margin == 0:
        return weight * equiv  # L_equiv_hat >= 0: relu would be the identity (and the gradient the same)
    return weight * torch.relu(equiv - margin)
