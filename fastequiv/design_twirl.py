"""Rotation designs in the measuring functions: the twirled average over a design, and the
loss decomposition from randomised designs, unbiased for any model, with the rotations' own
standard error.

    d = fe.design_error(model, inputs, target, spec=spec, rotations="design:5", replicates=2)
    d.total, d.mean, d.equiv, d.pct, d.stderr      # as fe.equivariance_error
    d.rotation_stderr                              # what the rotations alone leave (replicates >= 3)
    d.design.degree, d.design.size                 # what is exact, at what cost

Randomised designs. A design ``{(R_i, w_i)}``, ``i = 1..K``, ``sum_i w_i = 1``
(:mod:`fastequiv.designs`), is turned by an independent Haar rotation ``G_{b,r}`` for each
sample ``b`` and replicate ``r = 1..R``: copy ``(r, i)`` of sample ``b`` is rotated by
``G_{b,r} R_i`` (row ``(r K + i) B + b`` of the stacked batch). With ``a_ri = f_{G_r R_i}(x)``,
``abar_r = sum_i w_i a_ri``, ``u_r = abar_r - y``, ``ubar = mean_r u_r``, and every norm a mean
over the sample's valid elements (as ``mse_loss``):

* ``total = (1/R) sum_r T_r``, ``T_r = sum_i w_i ||a_ri - y||^2``. Unbiased for any design:
  ``G R_i`` is Haar distributed, so ``E ||a_ri - y||^2 = L_total`` for every ``i``.
* ``mean = ||ubar||^2 - s / (R - 1)`` with ``s = (1/R) sum_r ||u_r - ubar||^2``, which is
  ``(1 / (R (R - 1))) sum_{r != r'} <u_r, u_r'>``. Unbiased for any design when ``R >= 2``:
  the replicates are independent and ``E abar_r = sum_i w_i fbar = fbar``, so
  ``E <u_r, u_r'> = ||fbar - y||^2 = L_mean``.
* ``equiv = total - mean = (1/R) sum_r W_r + R / (R - 1) s``, ``W_r = sum_i w_i ||a_ri - abar_r||^2``
  (both from deviations: no cancellation when L_equiv is tiny). Unbiased, any band limit.

One replicate (``replicates=1``): ``mean = ||u||^2`` and ``equiv = W``. Since ``T = W + ||u||^2``
and ``E ||u||^2 = L_mean + V`` with ``V = E_G ||abar - fbar||^2``, ``E W = L_equiv - V`` for any
design. Expanding the twisted prediction ``a(g) = fbar + sum_{l >= 1} C_l vec D^l(g)`` and using
``E_G vec D^l(G) vec D^l(G)^T = I / (2l+1)`` (Schur orthogonality),
``V = sum_l ||C_l (S_l^T (x) I)||^2 / (2l+1)`` with ``S_l = sum_i w_i D^l(R_i)``: ``W`` is
unbiased iff ``S_l`` cancels every degree ``l`` where the model's twisted prediction has
content, i.e. when the design's degree reaches the model's band limit. Otherwise ``W`` is low
(and ``mean`` high) by ``V``, the power of the degrees the design does not cancel (at most
``||S_l||^2`` times the power at ``l``; for ``K`` i.i.d. draws ``V = L_equiv / K``, which the
``K / (K - 1)`` of the i.i.d. estimator undoes). Such estimates are marked ``exact=False``;
the default, ``replicates=2``, is unbiased.

Standard errors. ``stderr``: over the batch's samples, as :func:`fastequiv.equivariance_error`
(what the batch says about the data's mean; it holds the rotations' noise too).
``rotation_stderr``: given the batch, what the rotations alone leave: the jackknife over
replicates (leave one replicate out) of each sample's estimates, summed over the samples,
whose rotations are independent. It needs ``replicates >= 3`` (NaN below). The jackknife
variance is conservative (Efron-Stein): in expectation it errs high, not low.

Weights. Every sum over copies here is weighted: each replicate's block of ``K`` copies is one
``twirl_reduce(..., weights=design.weights)`` call (back-rotation and weighted sums in its
kernels, on the backends that take weights; ``backend="auto"`` picks one), and the small
between-replicate terms are formed in torch.

The hot path: on the ``"cpu"`` backend a design call is planned like an i.i.d. one
(:mod:`fastequiv.design_planned`); the steps here stay its reference. The result types,
:class:`DesignDecomposition` and :class:`DesignLabelFree`, live in
:mod:`fastequiv.estimators` with the other results.
"""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import torch

from . import designs
from .adapted import bind
from .design_planned import decompose_planned
from .designs import Design
from .estimators import (Decomposition, DesignDecomposition, DesignLabelFree, Scale, Terms, combine,
                         combined_per_sample, decompose, fields_of, label_free)
from .ops import random_rotations
from .ops.action import Action
from .ops.layout import accumulate_dtype, mask_for
from .ops.twirl_reduce import TwirlSums, back_rotate, twirl_reduce
from .reps import Voigt, as_rep
from .spec import Spec
from .stacking import Head, Stacked, call_model, call_plan, read_inputs, split_heads, stack_copies
from .stacking import eval_mode as stacking_eval_mode

__all__ = ["DesignDecomposition", "DesignLabelFree", "Replicates", "assemble", "check_replicates", "decomposition_of",
           "design_average", "design_decompose", "design_error", "design_for", "design_plan", "design_rotations",
           "jackknife_stderr", "replicates_of", "stack_design", "weighted_heads"]


def design_for(rotations: Union[str, Design], spec: Spec, *, samples=None, seed=None) -> Design:
    """The design ``rotations`` names (see :func:`fastequiv.designs.design`) on ``spec.group``,
    which must be ``"SO3"`` or ``"O3"``; a design fixes K, so ``samples`` and ``seed`` must be None."""
    if samples is not None:
        raise ValueError(f"samples={samples!r} with rotations={rotations!r}: a design fixes the number of rotations "
                         "(pass one or the other)")
    if seed is not None:
        raise ValueError(f"seed={seed!r} with rotations={rotations!r}: a design is a fixed set of rotations, there is "
                         "nothing to draw")
    if spec.group not in ("SO3", "O3"):
        raise ValueError(f"rotations={rotations!r} averages over SO(3) or O(3), but spec.group is {spec.group!r}, a "
                         "finite group that is twirled exactly by its own elements (leave rotations=None)")
    return designs.design(rotations, spec.group)


def design_rotations(design: Design, B: int, *, replicates: int = 1, turn: bool = True, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, device=None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(replicates * K, B, 3, 3)``: copy ``r K + i`` of sample ``b`` turned by ``G_{b,r} R_i``.

    ``G_{b,r}`` is Haar rotation ``r B + b`` of the Philox stream ``seed`` (or one drawn from
    ``generator``); ``turn=False`` uses the design as it is (one replicate)."""
    R = design.rotations.to(device=device, dtype=torch.float64)
    K = R.shape[0]
    if not turn:
        if replicates != 1:
            raise ValueError(f"replicates={replicates}: a design that is not turned has one replicate")
        out = R[:, None].expand(K, B, 3, 3)
    else:
        G = random_rotations(replicates * B, seed=seed, generator=generator, device=device, dtype=torch.float64)
        out = (G.reshape(replicates, 1, B, 3, 3) @ R.reshape(1, K, 1, 3, 3)).reshape(replicates * K, B, 3, 3)
    return out.to(dtype or torch.get_default_dtype())


def stack_design(model: Callable, inputs, spec: Spec, design: Design, *, replicates: int = 1, turn: bool = True,
                 mask=None, seed=None, generator=None, chunk_size=None, backend: str = "auto",
                 check_finite: bool = True) -> Stacked:
    """The stacking pipeline (:mod:`fastequiv.stacking`) with the rotations of
    :func:`design_rotations`: ``replicates * K`` copies of every sample in one model call."""
    batch = read_inputs(inputs, spec, mask, chunk_size)
    R = design_rotations(design, batch.B, replicates=replicates, turn=turn, seed=seed, generator=generator,
                         device=batch.device, dtype=batch.dtype)
    action = Action(R, backend)
    names, values = stack_copies(batch, action, backend)
    K = R.shape[0]
    out = call_model(model, spec, batch, names, values, K, chunk_size)
    return Stacked(action, split_heads(out, spec, batch, K, check_finite), batch, K, False)


def back_rotated(head: Head, action: Action, dtype: torch.dtype):
    """``(a, m)``: the head's copies back-rotated, ``(K, rows, *E)`` in ``dtype``, and its mask
    broadcast to one copy's shape (or None). A per-node head of a graph batch is turned by its
    graph's rotation."""
    m = mask_for(head.mask, head.value.shape[1:], f"output {head.name!r}")
    if head.batch is None:
        return back_rotate(head.value, action, head.rep, m, dtype), m
    if head.rep.kind == "position":
        raise ValueError(f"output {head.name!r} is a per-node position of a graph batch: a design averages it only in "
                         "the dense layout (turn it about its graph's centroid yourself, or return vectors)")
    nodes = Action(action.R[:, head.batch], action.backend)
    return back_rotate(head.value, nodes, head.rep, m, dtype), m


#: how :class:`Replicates` reduces copies that are already back-rotated: element by element
INVARIANT = as_rep("scalar")


def _sample_sums(x: torch.Tensor, m: Optional[torch.Tensor], index: Optional[torch.Tensor], B: int) -> torch.Tensor:
    """``(L, B)``: ``x`` ``(L, rows, *E)`` summed over each sample's valid elements (``m``
    selects; a masked-out value never reaches a sum, whatever it holds)."""
    if m is not None:
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    per_row = x.reshape(x.shape[0], x.shape[1], -1).sum(-1)
    if index is None:
        return per_row
    return per_row.new_zeros(x.shape[0], B).index_add_(1, index, per_row)


class Replicates:
    """One head's weighted sums over ``R`` replicates of a ``K``-rotation design, each
    replicate's block of copies reduced by one ``twirl_reduce(weights=)`` call.

    Args:
        a: ``(R * K, rows, *E)`` back-rotated copies (copy ``r K + i``), accumulation dtype
            (reduced as invariants: every element on its own). :meth:`of_head` takes the
            model's outputs instead and back-rotates them in the same call.
        weights: ``(K,)`` the design's weights.
        target: ``(rows, *E)``.
        m: the mask broadcast to ``(rows, *E)``, or None.
        index: ``(rows,)`` the sample of each row (graph layout), or None (row = sample).
        B: samples.
        replicates: ``R``.
        backend: of the ``twirl_reduce`` calls.

    Attributes (per sample, means over its valid elements): ``twirled`` ``(R, rows, *E)``,
    ``abar_r``; ``total`` ``(R, B)``, ``T_r``; ``within`` ``(R, B)``, ``W_r``; ``count`` ``(B,)``.
    """

    def __init__(self, a: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, m: Optional[torch.Tensor],
                 index: Optional[torch.Tensor], B: int, replicates: int, backend: str = "auto"):
        K = a.shape[0] // replicates
        identity = torch.eye(3, dtype=a.dtype, device=a.device).expand(K, B, 3, 3)
        full = None if m is None else m.expand(target.shape)  # twirl_reduce takes a prefix of the shape
        blocks = [twirl_reduce(a[r * K:(r + 1) * K], identity, target.to(a.dtype), INVARIANT, full, batch=index,
                               backend=backend, weights=weights.to(device=a.device, dtype=a.dtype))
                  for r in range(replicates)]
        self._collect(blocks, target.to(a.dtype), m, index, B)

    @classmethod
    def of_head(cls, head: Head, action: Action, weights: torch.Tensor, target: torch.Tensor, B: int,
                replicates: int, backend: str = "auto") -> "Replicates":
        """The replicates of one output head from the model's outputs on the ``replicates * K``
        copies: back-rotation and weighted sums in one ``twirl_reduce`` call per replicate (a
        per-node head of a graph batch with its batch index; voxel grids back-rotated first)."""
        acc = accumulate_dtype(head.value, target)
        if head.rep.kind == "voxels":  # the grids' reduction averages uniformly: back-rotate, then reduce
            a, m = back_rotated(head, action, acc)
            return cls(a, weights, target, m, head.batch, B, replicates, backend)
        if head.batch is not None and head.rep.kind == "position":
            back_rotated(head, action, acc)  # raises: positions of a graph are not averaged here
        K = weights.shape[0]
        w = weights.to(device=head.value.device, dtype=acc)
        R = action.R
        blocks = [twirl_reduce(head.value[r * K:(r + 1) * K], R[r * K:(r + 1) * K], target, head.rep, head.mask,
                               batch=head.batch, backend=backend, weights=w) for r in range(replicates)]
        self = cls.__new__(cls)
        self._collect(blocks, target.to(acc), mask_for(head.mask, head.value.shape[1:], f"output {head.name!r}"),
                      head.batch, B)
        return self

    def _collect(self, blocks: list[TwirlSums], y: torch.Tensor, m: Optional[torch.Tensor],
                 index: Optional[torch.Tensor], B: int) -> None:
        self.y, self.m, self.index, self.B, self.R = y, m, index, B, len(blocks)
        self.count = blocks[0].count
        self.n = self.count.clamp_min(1)
        self.twirled = torch.stack([s.twirled for s in blocks])
        self.total = torch.stack([s.total for s in blocks])
        self.within = torch.stack([s.spread for s in blocks])

    def _sums(self, x: torch.Tensor) -> torch.Tensor:
        return _sample_sums(x, self.m, self.index, self.B) / self.n

    def terms(self, keep: Optional[list] = None) -> Terms:
        """Per-sample ``(B,)`` estimates of L_total, L_mean, L_equiv from the replicates
        ``keep`` (default all): unbiased with two or more, the plug-in values with one."""
        keep = list(range(self.R)) if keep is None else list(keep)
        u = self.twirled[keep] - self.y
        total = self.total[keep].mean(0)
        within = self.within[keep].mean(0)
        k = len(keep)
        if k == 1:
            return Terms(total, self._sums(u ** 2)[0], within)
        ubar = u.mean(0, keepdim=True)
        s = self._sums((u - ubar) ** 2).mean(0)
        return Terms(total, self._sums(ubar ** 2)[0] - s / (k - 1), within + s * k / (k - 1))

    def jackknife(self) -> Terms:
        """``(R, B)``: the estimates with replicate ``r`` left out, for each ``r``."""
        rows = [self.terms([j for j in range(self.R) if j != r]) for r in range(self.R)]
        return Terms(*(torch.stack(col) for col in zip(*rows)))


def jackknife_stderr(jack: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The standard error of the batch mean of per-sample estimates from their leave-one-out
    values ``jack`` ``(R, B)``: ``sqrt(sum_b (R-1)/R sum_r (jack_rb - mean_r jack_rb)^2) / n``
    over the ``n`` valid samples (independent rotations per sample). NaN for ``R < 3`` (a
    leave-one-out estimate of L_mean needs two replicates)."""
    R = jack.shape[0]
    if R < 3:
        return torch.full((), float("nan"), dtype=jack.dtype, device=jack.device)
    var = (R - 1) / R * ((jack - jack.mean(0)) ** 2).sum(0)
    var = torch.where(valid, var, torch.zeros_like(var))
    return var.sum().sqrt() / valid.sum().to(jack.dtype)


def check_replicates(replicates) -> int:
    """``replicates`` checked: a positive int."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be a positive int (2 or more for unbiased estimates, 3 or more for "
                         f"rotation_stderr), got {replicates!r}")
    return replicates


def replicates_of(rotations, replicates) -> Optional[int]:
    """The replicates of a call with ``rotations=`` (``None``: 2), checked; None without a
    design, where ``replicates`` must be None too (the rule of every function that takes
    both)."""
    if rotations is None:
        if replicates is not None:
            raise ValueError(f"replicates={replicates!r} without rotations=: replicates are independent turns of a "
                             "rotation design (pass rotations='design:L' too, or leave replicates out)")
        return None
    return check_replicates(2 if replicates is None else replicates)


def design_plan(rotations, replicates, samples, group: str) -> Optional[tuple]:
    """``(design, replicates)`` for a call that takes ``rotations=`` on ``group`` (the ASE
    measurement, the audit), checked against ``samples``; None without a design."""
    R = replicates_of(rotations, replicates)
    if R is None:
        return None
    if samples is not None:
        raise ValueError(f"samples={samples!r} with rotations={rotations!r}: a design fixes the number of rotations "
                         "(pass one or the other)")
    if group not in ("SO3", "O3"):
        raise ValueError(f"rotations={rotations!r} averages over SO(3) or O(3), but group={group!r} is a finite group, "
                         "twirled exactly by its own elements (leave rotations=None)")
    return designs.design(rotations, group), R


def _head_targets(spec: Spec, target, st: Stacked) -> list:
    """Each head's target in the frame of the unrotated input (zeros for ``target=None``)."""
    ys = [None] * len(st.heads) if target is None else [y for _, y, _ in spec.output_leaves(target, "target")]
    out = []
    for head, y in zip(st.heads, ys):
        one = head.value.shape[1:]
        if y is None:
            y = torch.zeros(one, dtype=head.value.dtype, device=head.value.device)
        elif isinstance(head.declared, Voigt):  # reduced as the 3 x 3 tensor it stands for
            y = head.declared.to_matrix(y)
        if y.shape != one:
            where = "target" if head.name == "output" else f"target[{head.name!r}]"
            raise ValueError(f"{where} has shape {tuple(y.shape)}, but the model's output for it has shape "
                             f"{tuple(one)} (batch {st.B})")
        out.append(y)
    return out


def design_error(
    model: Callable,
    inputs: Any,
    target: Any = None,
    *,
    spec: Optional[Spec] = None,
    rotations: Union[str, Design] = "design:3",
    replicates: int = 2,
    mask: Optional[torch.Tensor] = None,
    loss_weights=None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    check_finite: bool = True,
    eval_mode: bool = True,
) -> Union[DesignDecomposition, DesignLabelFree]:
    """Decompose the augmented loss into L_mean + L_equiv with a randomised rotation design
    (no grad): ``replicates`` independent Haar turns of the design per sample, all
    ``replicates * K`` copies in one model call (see the module docs for the estimators).
    ``fe.equivariance_error(..., rotations=, replicates=)`` is the same measurement.

    Args:
        model, inputs, target, spec, mask, loss_weights, chunk_size, backend, eval_mode: as in
            :func:`fastequiv.equivariance_error` (MSE only); ``target=None`` measures
            L_equiv and its size relative to the twirled prediction.
        rotations: the design (:func:`fastequiv.designs.design`): ``"design:L"``,
            ``"lebedev:L"``, ``"octahedral"``, ``"icosahedral"`` or a ``Design``; on
            ``spec.group`` (``"SO3"`` or ``"O3"``). Default ``"design:3"``, the cube's 24
            rotations.
        replicates: R: 2 (default) or more give unbiased estimates for any model; 3 or more
            also ``rotation_stderr``; 1 gives the plug-in values, unbiased only where the
            design's degree reaches the model's band limit (``exact=False``).
        seed, generator: the Philox stream of the turns ``G_{b,r}`` (rotation ``r B + b``).
        check_finite: raise a ValueError on a NaN or inf at a valid output element, or a head
            with no valid element.

    Returns:
        a :class:`DesignDecomposition` (a :class:`fastequiv.Decomposition` with
        ``rotation_stderr``, ``design``, ``replicates``), or a :class:`DesignLabelFree`
        for ``target=None``.
    """
    if not isinstance(eval_mode, bool):
        raise ValueError(f"eval_mode must be a bool, got {eval_mode!r}")
    with torch.no_grad(), (stacking_eval_mode(model) if eval_mode else contextlib.nullcontext()):
        d, _ = design_decompose(model, inputs, target, spec, rotations, replicates, mask=mask,
                                loss_weights=loss_weights, seed=seed, generator=generator, chunk_size=chunk_size,
                                backend=backend, check_finite=check_finite)
    return d


def design_decompose(model: Callable, inputs: Any, target: Any, spec: Optional[Spec], rotations, replicates, *,
                     mask=None, loss_weights=None, seed=None, generator=None, chunk_size=None, backend: str = "auto",
                     check_finite: bool = True, samples=None) -> tuple:
    """What :func:`design_error` computes, ``(decomposition, head_valid)``, differentiable with
    respect to the model's parameters where grad is enabled (the training loss of
    :func:`fastequiv.twirl_loss` with ``rotations=``; the jackknife ``rotation_stderr`` is
    computed without grad). ``head_valid``: ``{"": (B,) bool, head: (B,) bool}``, the samples
    that count, as :func:`fastequiv.distributed.all_reduce` takes them."""
    R = check_replicates(replicates)
    spec, inputs = bind(model, inputs, spec)
    design = design_for(rotations, spec, samples=samples)
    weights = spec.head_weights(loss_weights)
    planned = call_plan(spec, inputs, R * design.size, False, mask=mask, chunk_size=chunk_size, backend=backend)
    if planned is None:
        st = stack_design(model, inputs, spec, design, replicates=R, mask=mask, seed=seed, generator=generator,
                          chunk_size=chunk_size, backend=backend, check_finite=check_finite)
    else:
        st, done = decompose_planned(planned, model, inputs, target, design, R, mask, weights, seed, generator,
                                      check_finite)
        if done is not None:
            return done
    reps = {head.name: Replicates.of_head(head, st.action, design.weights, y, st.B, R, backend)
            for head, y in zip(st.heads, _head_targets(spec, target, st))}
    single = len(reps) == 1 and not isinstance(spec.output, (dict, tuple))
    return assemble(reps, weights, design, R, labelled=target is not None, single=single,
                    check_finite=check_finite)


def decomposition_of(t: Terms, count: torch.Tensor, K: int, R: int) -> Decomposition:
    """The :class:`fastequiv.Decomposition` of per-sample design estimates ``t`` (of
    :meth:`Replicates.terms`; ``count`` valid elements a sample): batch means and standard
    errors over the samples, ``samples = R * K`` evaluations a sample, ``exact`` (unbiased)
    from two replicates on."""
    d = decompose(t.total, t.mean, t.equiv, count, samples=R * K, exhaustive=True)  # the terms are final
    return dataclasses.replace(d, exhaustive=False, exact=R >= 2)


def assemble(reps: dict, weights: dict, design: Design, R: int, *, labelled: bool, single: bool,
             check_finite: bool = True) -> tuple:
    """``(decomposition, head_valid)`` from each head's :class:`Replicates` (``{name: reps}``):
    the per-head decompositions, their ``weights``-weighted combination (unless ``single``),
    the jackknife ``rotation_stderr`` (R >= 3, without grad) and, unless ``labelled``, the
    label-free values. Shared by :func:`design_decompose` and the ASE calculators' serial
    route (:func:`fastequiv.ase.equivariance_error`)."""
    heads, jacks, head_valid = {}, {}, {}
    for name, rep in reps.items():
        t = rep.terms()
        heads[name] = decomposition_of(t, rep.count, design.size, R)
        with torch.no_grad():
            jacks[name] = rep.jackknife() if R >= 3 else None
        head_valid[name] = rep.count > 0
    if check_finite:
        empty = [h for h, v in head_valid.items() if not bool(v.any())]
        if empty:
            raise ValueError(f"every element of output head(s) {empty} is masked out: there is nothing to decompose")
    if single:
        d, jack = next(iter(heads.values())), next(iter(jacks.values()))
        valid = next(iter(head_valid.values()))
        valid_of = {"": valid}
    else:
        d = combine(heads, weights, head_valid)
        valid = torch.stack(list(head_valid.values())).any(0)
        valid_of = {"": valid, **head_valid}
        jack = None
        if R >= 3:
            dtype = d.total.dtype
            with torch.no_grad():
                jack = combined_per_sample({h: SimpleNamespace(per_sample=j) for h, j in jacks.items()}, weights,
                                           head_valid, valid.sum().to(dtype),
                                           {h: v.sum().to(dtype) for h, v in head_valid.items()})
    nan = torch.full((), float("nan"), dtype=d.total.dtype, device=d.total.device)
    if not labelled:
        lf = label_free(d, valid)
        if jack is None:
            se = Scale(nan, nan, nan)
        else:  # rel = equiv / norm, linearised: the jackknife of equiv - rel * norm, over norm
            rel = lf.rel.detach()
            se = Scale(jackknife_stderr(jack.equiv, valid), jackknife_stderr(jack.mean, valid),
                       jackknife_stderr(jack.equiv - rel * jack.mean, valid) / lf.norm.detach().abs())
        return DesignLabelFree(**fields_of(lf), rotation_stderr=se, design=design, replicates=R), valid_of
    se = Terms(nan, nan, nan) if jack is None else Terms(*(jackknife_stderr(j, valid) for j in jack))
    return DesignDecomposition(**fields_of(d), rotation_stderr=se, design=design, replicates=R), valid_of


def weighted_heads(st: Stacked, weights: torch.Tensor, backend: str = "auto") -> list:
    """Every output head of ``st`` (one replicate of a design) back-rotated and averaged with
    the design's ``weights`` (the twirled value of one ``twirl_reduce`` call against a zero
    target), in the model's dtype and form (a Voigt head averaged as its 3 x 3 tensor and
    given back in Voigt form): the list :meth:`Spec.build_output` takes. Differentiable with
    respect to the model's outputs."""
    out = []
    for head in st.heads:
        zero = head.value.new_zeros(head.value.shape[1:])
        v = Replicates.of_head(head, st.action, weights, zero, st.B, 1, backend).twirled[0].to(head.value.dtype)
        out.append(head.declared.from_matrix(v) if isinstance(head.declared, Voigt) else v)
    return out


def design_average(model: Callable, inputs, spec: Spec, design: Design, *, turn: bool = False,
                   seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   chunk_size: Optional[int] = None, backend: str = "auto", check_finite: bool = True):
    """The model averaged over ``design``, shaped like the model's output: exactly the twirled
    prediction ``fbar(x)`` where the model's twisted prediction has no content above
    ``design.degree`` (to float rounding), and a deterministic function of the input.
    ``turn=True`` turns each sample's design by a fresh Haar rotation (from ``seed`` or
    ``generator``): an unbiased estimate of ``fbar(x)`` for any model, no longer deterministic."""
    st = stack_design(model, inputs, spec, design, turn=turn, seed=seed, generator=generator,
                      chunk_size=chunk_size, backend=backend, check_finite=check_finite)
    return spec.build_output(weighted_heads(st, design.weights, backend))
