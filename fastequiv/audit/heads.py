"""Measurement: each structure's L_equiv, with its rounding floor told apart from what
the model learned.

For every structure ``b`` and output head, K rotated copies are built once in float64
(the stacking pipeline: :func:`~fastequiv.stacking.read_inputs`,
:func:`~fastequiv.stacking.stack_copies`, :func:`~fastequiv.stacking.call_model`,
:func:`~fastequiv.stacking.split_heads`) and evaluated by the model as given (the copies
cast to the dtype its own batches have) and by a float64 copy of it. With ``a_k`` the
back-rotated outputs of copy ``k`` (``abar`` their mean) and the sums over the
structure's ``n`` output elements:

* ``equiv``: L_equiv of the model as given, ``sum_k ||a_k - abar||^2 / ((K - 1) n)``
  (unbiased; exact, with ``K`` in place of ``K - 1``, over every element of a finite
  group);
* ``rel``: ``equiv / ||fbar||^2`` (the unbiased size of the twirled prediction, as in
  :class:`fastequiv.LabelFree`);
* ``stderr``: the jackknife standard error of ``equiv`` over the K copies: with
  ``q_k = ||a_k - abar||^2``, leaving copy ``j`` out gives
  ``(sum_k q_k - K q_j / (K - 1)) / ((K - 2) n)``, hence
  ``stderr = K / ((K - 1)(K - 2) n) * sqrt((K - 1) / K * sum_j (q_j - qbar)^2)``
  (NaN for K = 2; 0 for an exhaustive finite group, which has no sampling error). The
  jackknife errs on the large side (Efron-Stein); for a constant field on the forces,
  whose error is known in closed form, it gave 1.3-1.5 times the true standard error
  (K = 16, tests/test_audit.py);
* ``max_dev``: the largest deviation over the sampled rotations,
  ``max_k max_i ||a_k,i - abar_i||``, the Euclidean norm of one atom's force vector
  (of the 3 x 3 stress: its Frobenius norm; of the energy: its absolute value), taken
  over copies and atoms. This is the "maximum force error" of leaderboards, measured
  against the rotation-averaged prediction rather than the unrotated one;
* ``floor``: the rounding part, the L_equiv estimator applied to ``d_k = a_k - a_k^(64)``,
  the model's outputs minus the float64 copy's on the same copies, back-rotated. Since
  ``a_k = a_k^(64) + d_k``, ``equiv = equiv_f64 + floor + 2 cov``: the floor is what the
  model's precision alone contributes;
* ``equiv_f64``, ``rel_f64``: L_equiv of the float64 copy, the learned part, and its
  ratio to the float64 copy's ``||fbar||^2``. A float64 copy of a float32 model keeps the
  float32 values of its constants (a MACE model's Clebsch-Gordan coefficients, rounded
  once by ``.float()``, are equivariant only to float32 precision): their effect, about
  1e-22 relative for a tiny MACE, counts here.

``verdict`` is ``"learned"`` where ``equiv_f64`` exceeds the floor and ``rel_f64``
exceeds :data:`ROUNDING_REL`, else ``"rounding"``.

Rotations: copy ``k`` of structure ``i`` (its index in the list) is turned by rotation
``k * N + i`` of the seed's stream over all ``N`` structures, as
:func:`fastequiv.ase.equivariance_error` turns them: the numbers do not depend on how the
structures are grouped and chunked. (The stacking pipeline's own
:func:`~fastequiv.stacking.draw_rotations` numbers them within one batch.) Positions turn
about each structure's centroid, periodic or not.

Rotation designs (``rotations="design:L"``, ``"lebedev:L"``, ``"octahedral"``,
``"icosahedral"`` or a :class:`fastequiv.designs.Design`, on ``group`` ``"SO3"`` or
``"O3"``): in place of K i.i.d. draws, a design ``{(R_k, w_k)}``, ``k = 1..K``, whose
weighted average is the Haar average exactly for every function of the rotation up to its
degree L, turned by ``replicates`` (``R``) independent Haar rotations per structure.
``G_{i,r}``, the turn of structure ``i`` in replicate ``r``, is rotation ``r * N + i`` of
the seed's SO(3) stream (chunking does not change it); copy ``(r, k)`` is rotated by
``G_{i,r} R_k`` (copy ``r * K + k``), ``R * K`` copies per structure in the model call
(``samples`` counts them; ``max_atoms`` counts every one). With ``abar_r = sum_k w_k a_rk``
the replicate's weighted average, ``W_r = sum_k w_k ||a_rk - abar_r||^2 / n`` and
``s = (1/R) sum_r ||abar_r - mean_r abar_r||^2 / n``, the estimators of
:mod:`fastequiv.design_twirl` (:class:`~fastequiv.design_twirl.Replicates`, against a zero
target):

* ``equiv = (1/R) sum_r W_r + R / (R - 1) s``: unbiased for any model when ``R >= 2``
  (each ``G_{i,r} R_k`` is Haar distributed and the replicates are independent). Where
  the model's twisted prediction ``a(g) = f_g(x)`` has no content above degree L, every
  ``abar_r`` is the twirled prediction ``fbar(x)`` exactly and ``s = 0``; each ``W_r`` is
  then the design's average of ``||a(g) - fbar||^2``, which has content up to twice the
  twisted prediction's degree: ``equiv`` is exact, with no sampling error, where that is
  at most L too (a twisted prediction of degree ``<= L / 2``, or a deviation of constant
  norm: a uniform field on the forces, ``a(g) = f + a g^T e_z``, is measured exactly by
  ``"design:1"``'s 4 rotations, a field on the energy of degree 1 only from degree 2 on;
  tests/test_audit_design.py). With ``R = 1``: ``equiv = W_1``, unbiased only where the
  degree reaches the model's band limit (low otherwise);
* ``rel``: ``equiv`` over ``||fbar||^2 = ||mean_r abar_r||^2 - s / (R - 1)`` (unbiased for
  ``R >= 2``; ``||abar_1||^2`` for ``R = 1``);
* ``stderr``: the jackknife over the replicates, ``sqrt((R - 1) / R sum_r (j_r - jbar)^2)``
  with ``j_r`` the ``equiv`` of the other ``R - 1`` replicates: NaN for ``R < 3``, 0 to
  float rounding where ``equiv`` is exact;
* ``max_dev``: over all ``R * K`` copies, against the replicate-averaged twirled
  prediction ``mean_r abar_r``;
* ``floor``, ``equiv_f64``, ``rel_f64``, ``verdict``: as above, the same estimator applied to
  the difference of the two precisions and to the float64 copy.

The batch-level :attr:`Audit.heads` (``heads_f64``) are the :class:`fastequiv.LabelFree`
of these per-structure estimates (``exact`` for ``R >= 2``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..adapted import Adapted
from ..design_twirl import Replicates, decomposition_of
from ..estimators import LabelFree, Terms, decompose, label_free
from ..ops import twirl_reduce
from ..ops.action import Action
from ..ops.twirl_reduce import back_rotate
from ..stacking import call_model, eval_mode, split_heads

__all__ = ["FIELDS", "ROUNDING_REL", "HeadChunk", "as_float64", "cast_inputs", "float32_numbers", "float64_copy",
           "float_dtypes", "heads_on", "measure_head", "measure_head_design", "model_dtype", "overall",
           "overall_design"]

#: the per-structure numbers of each head, in the table's order
FIELDS = ("equiv", "rel", "stderr", "max_dev", "floor", "equiv_f64", "rel_f64", "verdict")

#: ``rel_f64`` at or below which the float64 L_equiv is not called learned. Measured: an
#: exactly equivariant model in float64 gives 1e-33 to 1e-29 (float64 rounding); a float64
#: copy of a float32 MACE up to 6e-19 (its e3nn constants stay rounded to float32, which
#: the float64 copy cannot undo; benchmarks/audit_vs_serial.py); float32 rounding itself
#: 1e-15 to 1e-11. Symmetry breaking below 1e-16 relative is not worth the name.
ROUNDING_REL = 1e-16

# --- the two precisions -------------------------------------------------------------------------

def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def float64_copy(model: Adapted, memo: dict | None = None) -> tuple[Adapted | None, str | None]:
    """``(copy, None)``: a float64 deep copy of ``model`` (the model itself if it is float64
    already), or ``(None, why)`` where one cannot be made. Copies made with the same
    ``memo`` share what the originals share (the codebase's model under two adapters is
    copied once)."""
    if model_dtype(model) == torch.float64:
        return model, None
    try:
        twin = copy.deepcopy(model, memo if memo is not None else {})
        twin.to(torch.float64)
    except Exception as err:  # noqa: BLE001 (a scripted or compiled model, a non-copyable attribute: reported)
        return None, f"a float64 copy of the model could not be made ({type(err).__name__}: {err})"
    return twin, None


def cast_inputs(names: list, values: list, dtypes: dict) -> list:
    """The stacked float64 inputs in the dtypes the model's own batches have."""
    return [v.to(dtypes[n]) if isinstance(v, torch.Tensor) and v.is_floating_point() and n in dtypes else v
            for n, v in zip(names, values)]


def float_dtypes(inputs: dict) -> dict:
    return {k: v.dtype for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def as_float64(inputs: Any) -> dict:
    if not isinstance(inputs, dict):
        why = f"the audit needs an adapted model whose prepare() returns a dict of tensors, got {type(inputs).__name__}"
        raise ValueError(why)  # noqa: TRY004 (a bad argument)
    return {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


# --- one chunk ----------------------------------------------------------------------------------

def heads_on(model, spec, batch, names, values, K):
    with eval_mode(model):
        out = call_model(model, spec, batch, names, values, K, None)
    return {h.name: h for h in split_heads(out, spec, batch, K, check_finite=True)}


def float32_numbers(x: torch.Tensor) -> bool:
    """Whether every element of float64 ``x`` is a float32 number, which a float64
    computation gives by chance with odds of about 2^-29 per element."""
    return bool((x.float().double() == x).all())


def _per_structure_max(values: torch.Tensor, index: torch.Tensor | None, B: int) -> torch.Tensor:
    """``values`` ``(rows,)`` -> its maximum over each structure's rows ``(B,)``."""
    if index is None:
        return values
    out = torch.full((B,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index, values, reduce="amax")


def _per_structure_sum(values: torch.Tensor, index: torch.Tensor | None, B: int) -> torch.Tensor:
    """``values`` ``(K, rows)`` -> summed over each structure's rows ``(K, B)``."""
    if index is None:
        return values
    return torch.zeros(values.shape[0], B, dtype=values.dtype, device=values.device).index_add_(1, index, values)


def _sums(out: torch.Tensor, head, action: Action, backend: str):
    zero = torch.zeros(out.shape[1:], dtype=torch.float64, device=out.device)
    return twirl_reduce(out, action, zero, head.rep, head.mask, batch=head.batch, backend=backend)


def _deviations(head, twirled: torch.Tensor, action: Action, backend: str) -> torch.Tensor:
    """``||a_k,i - abar_i||`` squared, ``(K, rows)``: each row's output (an atom's force
    vector, a structure's stress or energy) back-rotated, against the twirled one."""
    R = action.R if head.batch is None else action.R[:, head.batch]
    a = back_rotate(head.value, R, head.rep, None, torch.float64, backend)
    K, rows = a.shape[:2]
    sq = (a - twirled[None]).reshape(K, rows, -1).pow(2).sum(-1)
    if head.mask is not None:
        valid = head.mask.reshape(rows, -1).all(-1)
        sq = torch.where(valid[None], sq, torch.zeros_like(sq))
    return sq


def _jackknife(q: torch.Tensor, n: torch.Tensor, K: int, exhaustive: bool) -> torch.Tensor:
    """The jackknife standard error of L_equiv from the per-copy ``q_k`` ``(K, B)`` (see
    module docs)."""
    if exhaustive:
        return torch.zeros_like(n)
    if K < 3:
        return torch.full_like(n, float("nan"))
    spread = (q - q.mean(0)).pow(2).sum(0)
    return K / ((K - 1) * (K - 2) * n.clamp_min(1)) * torch.sqrt((K - 1) / K * spread)


@dataclass
class HeadChunk:
    """One head's per-structure numbers on one chunk (float64 tensors ``(B,)``)."""

    # of the model as given, for the overall LabelFree: (total, bias, spread, count) of twirl_reduce, or with a
    # design the estimates (total, mean, equiv, count)
    sums: tuple
    sums64: tuple | None
    values: dict  # FIELDS -> (B,) tensor (or a list of verdicts)


def measure_head(head, head64, action: Action, K: int, exhaustive: bool, B: int, backend: str) -> HeadChunk:
    s = _sums(head.value, head, action, backend)
    d = label_free(decompose(s.total, s.bias, s.spread, s.count, samples=K, exhaustive=exhaustive), s.count > 0)
    sq = _deviations(head, s.twirled, action, backend)
    q = _per_structure_sum(sq, head.batch, B)
    worst = _per_structure_max(sq.max(0).values.sqrt(), head.batch, B)
    values = {"equiv": d.per_sample.equiv, "rel": d.per_sample.rel, "stderr": _jackknife(q, s.count, K, exhaustive),
              "max_dev": worst, "floor": None, "equiv_f64": None, "rel_f64": None, "verdict": None}
    sums64 = None
    if head64 is not None:
        s64 = _sums(head64.value, head64, action, backend)
        d64 = label_free(decompose(s64.total, s64.bias, s64.spread, s64.count, samples=K, exhaustive=exhaustive),
                         s64.count > 0)
        diff = head.value.to(torch.float64) - head64.value  # back-rotation is linear: d_k's sums
        sf = _sums(diff, head, action, backend)
        floor = decompose(sf.total, sf.bias, sf.spread, sf.count, samples=K, exhaustive=exhaustive).per_sample.equiv
        learned = (d64.per_sample.equiv > floor) & (d64.per_sample.rel > ROUNDING_REL)
        values.update(floor=floor, equiv_f64=d64.per_sample.equiv, rel_f64=d64.per_sample.rel,
                      verdict=["learned" if x else "rounding" for x in learned.tolist()])
        sums64 = (s64.total, s64.bias, s64.spread, s64.count)
    return HeadChunk((s.total, s.bias, s.spread, s.count), sums64, values)


def _replicates(head, action: Action, weights: torch.Tensor, R: int, B: int, backend: str) -> Replicates:
    """The design's per-replicate sums of one head against a zero target, in float64."""
    zero = torch.zeros(head.value.shape[1:], dtype=torch.float64, device=head.value.device)
    return Replicates.of_head(head, action, weights, zero, B, R, backend)


def _design_label_free(total, mean, equiv, count, samples: int, R: int) -> LabelFree:
    """The :class:`LabelFree` of per-sample design estimates (``samples = R * K``)."""
    return label_free(decomposition_of(Terms(total, mean, equiv), count, samples // R, R), count > 0)


def measure_head_design(head, head64, action: Action, weights: torch.Tensor, R: int, B: int,
                         backend: str) -> HeadChunk:
    """:func:`measure_head` with a design turned ``R`` times (see module docs)."""
    K = weights.shape[0]
    rep = _replicates(head, action, weights, R, B, backend)
    t = rep.terms()
    d = _design_label_free(t.total, t.mean, t.equiv, rep.count, R * K, R)
    if R >= 3:
        j = rep.jackknife().equiv
        stderr = torch.sqrt((R - 1) / R * (j - j.mean(0)).pow(2).sum(0))
    else:
        stderr = torch.full_like(t.equiv, float("nan"))
    sq = _deviations(head, rep.twirled.mean(0), action, backend)
    worst = _per_structure_max(sq.max(0).values.sqrt(), head.batch, B)
    values = {"equiv": d.per_sample.equiv, "rel": d.per_sample.rel, "stderr": stderr, "max_dev": worst,
              "floor": None, "equiv_f64": None, "rel_f64": None, "verdict": None}
    sums64 = None
    if head64 is not None:
        rep64 = _replicates(head64, action, weights, R, B, backend)
        t64 = rep64.terms()
        d64 = _design_label_free(t64.total, t64.mean, t64.equiv, rep64.count, R * K, R)
        diff = dataclasses.replace(head, value=head.value.to(torch.float64) - head64.value)
        floor = _replicates(diff, action, weights, R, B, backend).terms().equiv
        learned = (d64.per_sample.equiv > floor) & (d64.per_sample.rel > ROUNDING_REL)
        values.update(floor=floor, equiv_f64=d64.per_sample.equiv, rel_f64=d64.per_sample.rel,
                      verdict=["learned" if x else "rounding" for x in learned.tolist()])
        sums64 = (t64.total, t64.mean, t64.equiv, rep64.count)
    return HeadChunk((t.total, t.mean, t.equiv, rep.count), sums64, values)


def overall(parts: list, K: int, exhaustive: bool) -> LabelFree:
    total, bias, spread, count = (torch.cat(c) for c in zip(*parts))
    d = decompose(total, bias, spread, count, samples=K, exhaustive=exhaustive)
    return label_free(d, count > 0)


def overall_design(parts: list, samples: int, R: int) -> LabelFree:
    total, mean, equiv, count = (torch.cat(c) for c in zip(*parts))
    return _design_label_free(total, mean, equiv, count, samples, R)
