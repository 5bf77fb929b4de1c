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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapted import Adapted
from ..adapters import adapt
from ..design_twirl import Replicates, design_plan, design_rotations
from ..designs import Design
from ..estimators import LabelFree, decompose, label_free
from ..groups import check_group, group_elements, group_order
from ..ops import random_rotations, twirl_reduce
from ..ops.action import Action
from ..ops.twirl_reduce import back_rotate
from ..stacking import call_model, eval_mode, read_inputs, split_heads, stack_copies

__all__ = ["FIELDS", "ROUNDING_REL", "Audit", "audit", "chunks", "float64_copy"]

#: the per-structure numbers of each head, in the table's order
FIELDS = ("equiv", "rel", "stderr", "max_dev", "floor", "equiv_f64", "rel_f64", "verdict")

#: ``rel_f64`` at or below which the float64 L_equiv is not called learned. Measured: an
#: exactly equivariant model in float64 gives 1e-33 to 1e-29 (float64 rounding); a float64
#: copy of a float32 MACE up to 6e-19 (its e3nn constants stay rounded to float32, which
#: the float64 copy cannot undo; benchmarks/audit_vs_serial.py); float32 rounding itself
#: 1e-15 to 1e-11. Symmetry breaking below 1e-16 relative is not worth the name.
ROUNDING_REL = 1e-16

#: atoms per model call, summed over the K copies, by default
MAX_ATOMS = 20000


@dataclass
class Audit:
    """What :func:`audit` measured.

    Attributes:
        rows: one dict per structure, in the order given: ``index``, ``atoms``,
            ``formula``, ``pbc`` (e.g. ``"TTT"``), ``periodic``, and for each head ``h``
            the :data:`FIELDS` as ``h_equiv``, ``h_rel``, ... (None where the head does
            not apply, or the float64 copy could not run).
        heads: per head, the :class:`fastequiv.LabelFree` over the structures that have
            it (the model as given); ``heads_f64``: the same for the float64 copy.
        samples: model evaluations per structure: K (i.i.d. draws or every element of a
            finite group), or ``replicates * design_size`` with a design.
        exhaustive, seed, group: the rotations.
        dtype: the model's own floating dtype.
        float64: None where the float64 copy ran, else why it could not.
        calls: model calls made (each over many structures' copies).
        seconds: wall time of the measurement.
        notes: what else the reader should know (a head left out, ...).
        rotations: the design's name (e.g. ``"octahedral"``), or None for i.i.d. draws or
            a finite group.
        degree, design_size, replicates: the design's degree, its number of rotations K
            and the Haar turns R of it per structure (None without a design).
    """

    rows: list
    heads: dict
    heads_f64: dict
    samples: int
    exhaustive: bool
    seed: int
    group: str
    dtype: str
    float64: str | None
    calls: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    rotations: str | None = None
    degree: int | None = None
    design_size: int | None = None
    replicates: int | None = None

    def describe(self, short: bool = False) -> str:
        """The rotations in words: ``"K=8 SO3 rotations, seed 0"``, ``"every element of
        octahedral"`` or the design, its degree and R (``short``: for a plot's title)."""
        if self.rotations is None:
            if short:
                return f"K={self.samples}"
            return f"every element of {self.group}" if self.exhaustive else \
                f"K={self.samples} {self.group} rotations, seed {self.seed}"
        if short:
            return f"design {self.rotations} (degree {self.degree}) x R={self.replicates}"
        return (f"design {self.rotations} ({self.design_size} {self.group} rotations, degree {self.degree}) turned by "
                f"R={self.replicates} Haar rotations: {self.samples} copies a structure, seed {self.seed}")


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


def _cast(names: list, values: list, dtypes: dict) -> list:
    """The stacked float64 inputs in the dtypes the model's own batches have."""
    return [v.to(dtypes[n]) if isinstance(v, torch.Tensor) and v.is_floating_point() and n in dtypes else v
            for n, v in zip(names, values)]


def _float_dtypes(inputs: dict) -> dict:
    return {k: v.dtype for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _as_float64(inputs: Any) -> dict:
    if not isinstance(inputs, dict):
        why = f"the audit needs an adapted model whose prepare() returns a dict of tensors, got {type(inputs).__name__}"
        raise ValueError(why)  # noqa: TRY004 (a bad argument)
    return {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


# --- one chunk ----------------------------------------------------------------------------------

def _heads_on(model, spec, batch, names, values, K):
    with eval_mode(model):
        out = call_model(model, spec, batch, names, values, K, None)
    return {h.name: h for h in split_heads(out, spec, batch, K, check_finite=True)}


def _float32_numbers(x: torch.Tensor) -> bool:
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


def _measure_head(head, head64, action: Action, K: int, exhaustive: bool, B: int, backend: str) -> HeadChunk:
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
    """The :class:`LabelFree` of per-sample design estimates (as
    :func:`fastequiv.design_twirl.design_error` builds its decomposition)."""
    d = decompose(total, mean, equiv, count, samples=samples, exhaustive=True)
    return label_free(dataclasses.replace(d, exhaustive=False, exact=R >= 2), count > 0)


def _measure_head_design(head, head64, action: Action, weights: torch.Tensor, R: int, B: int,
                         backend: str) -> HeadChunk:
    """:func:`_measure_head` with a design turned ``R`` times (see module docs)."""
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


# --- chunks and groups ------------------------------------------------------------------------

def chunks(sizes: list, K: int, max_atoms: int) -> list:
    """Consecutive runs of ``sizes`` (atoms per structure) whose K copies hold at most
    ``max_atoms`` atoms; a structure over the budget alone is a run of its own."""
    out, current, atoms = [], [], 0
    for i, n in enumerate(sizes):
        if current and (atoms + n) * K > max_atoms:
            out.append(current)
            current, atoms = [], 0
        current.append(i)
        atoms += n
    if current:
        out.append(current)
    return out


def builds(model: Adapted) -> Adapted:
    """The adapter that builds ``model``'s batches from ase.Atoms: the model itself, or
    the adapted model a wrapper (an :class:`~fastequiv.adapted.Adapted` around another,
    ``Twirled``) holds as ``.model``."""
    inner = model
    while not callable(getattr(inner, "batch_from_atoms", None)):
        inner = getattr(inner, "model", None)
        if not isinstance(inner, torch.nn.Module):
            why = (f"model: the audit builds batches from ase.Atoms with an adapter's batch_from_atoms, which "
                   f"{type(model).__name__} neither has nor wraps")
            raise ValueError(why)  # noqa: TRY004 (a bad argument)
    return inner


class _Group:
    """The structures of one kind (periodic or not) and the models that measure them."""

    def __init__(self, model: Adapted, float64: bool, memo: dict):
        builds(model)  # checked before any copy is made
        self.model = model
        self.dtype = model_dtype(model)
        self.f64, self.why_not = float64_copy(model, memo) if float64 else (None, "not asked for (float64=False)")
        self.dtypes = None  # the dtypes of the model's own batches, read on the first chunk

    def batch(self, atoms: list) -> dict:
        model = self.f64 if self.f64 is not None else self.model
        inputs = _as_float64(model.prepare(builds(model).batch_from_atoms(atoms)))
        if self.dtypes is None:
            own = self.model if self.f64 is not self.model else None
            self.dtypes = _float_dtypes(own.prepare(builds(own).batch_from_atoms(atoms[:1]))) if own else {}
        return inputs

    def run(self, atoms: list, R: torch.Tensor, K: int, exhaustive: bool, backend: str,
            design: Design | None = None, replicates: int = 1) -> tuple[dict, int]:
        """``({head: HeadChunk}, model calls)`` for one chunk of structures: ``R`` ``(K, B, 3, 3)``
        the rotations of its copies (with a design, ``K = replicates * design.size``)."""
        inputs = self.batch(atoms)
        spec = self.model.spec
        batch = read_inputs(inputs, spec, None, None)
        action = Action(R.to(batch.device), backend)
        names, values = stack_copies(batch, action, backend)
        with torch.no_grad():
            heads = _heads_on(self.model, spec, batch, names, _cast(names, values, self.dtypes), K)
            heads64, calls = None, 1
            if self.f64 is self.model:
                heads64 = heads
            elif self.f64 is not None:
                heads64, calls = self._float64(batch, names, values, K), 2
        if design is not None:
            weights = design.weights.to(device=batch.device, dtype=torch.float64)
            out = {name: _measure_head_design(h, heads64[name] if heads64 else None, action, weights, replicates,
                                              batch.B, backend) for name, h in heads.items()}
            return out, calls
        out = {name: _measure_head(h, heads64[name] if heads64 else None, action, K, exhaustive, batch.B, backend)
               for name, h in heads.items()}
        return out, calls

    def _float64(self, batch, names, values, K):
        try:
            heads = _heads_on(self.f64, self.f64.spec, batch, names, values, K)
        except (RuntimeError, TypeError) as err:
            self._give_up(f"the float64 copy of the model failed ({type(err).__name__}: {str(err)[:300]})")
            return None
        wrong = {n: h.value.dtype for n, h in heads.items() if h.value.dtype != torch.float64}
        if wrong:
            self._give_up(f"the float64 copy of the model returned {wrong}: it computes in a narrower dtype inside")
            return None
        sizable = [h.value for h in heads.values() if h.value.numel() >= 8]
        if sizable and all(_float32_numbers(v) for v in sizable):
            self._give_up("every output of the float64 copy of the model is a float32 number: it computes in float32 "
                          "inside and casts its results")
            return None
        return heads

    def _give_up(self, why: str) -> None:
        self.f64, self.why_not = None, why


def _adapted_for(model, periodic: bool, notes: list) -> Adapted:
    """The adapted model measuring the periodic (with the stress where the model has one)
    or the isolated structures."""
    if isinstance(model, dict):
        key = "periodic" if periodic else "isolated"
        if key not in model:
            raise ValueError(f"model: a dict of adapted models needs the key {key!r}, got keys {sorted(model)}")
        return adapt(model[key])
    if isinstance(model, Adapted):
        if "stress" in model.spec.output_names() and not periodic:
            raise ValueError("model: the adapted model has a stress head, which isolated structures do not have; pass "
                             "the codebase's own model (the audit adapts it with and without the stress), or a dict "
                             "{'isolated': ..., 'periodic': ...} of adapted models")
        return model
    if not periodic:
        return adapt(model)
    try:
        return adapt(model, stress=True)
    except ValueError as err:
        notes.append(f"stress not measured: {err}")
        return adapt(model)


def _rotations(N: int, K: int, exhaustive: bool, group: str, seed: int) -> torch.Tensor:
    """``(K, N, 3, 3)`` float64: rotation ``k * N + i`` of the stream for copy ``k`` of
    structure ``i``, or every group element for every structure."""
    if exhaustive:
        return group_elements(group, dtype=torch.float64)[:, None].expand(K, N, 3, 3)
    return random_rotations(K * N, seed=seed, group=group, dtype=torch.float64).reshape(K, N, 3, 3)


def _plan(samples: int | None, group: str) -> tuple[int, bool]:
    check_group(group)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 2):
        raise ValueError(f"samples must be an int >= 2 (one rotation cannot estimate L_equiv) or None, got {samples!r}")
    order = group_order(group)
    if order is not None and samples in (None, order):
        return order, True
    return (8 if samples is None else samples), False


def _check(atoms_list, seed, max_atoms) -> list:
    from ase import Atoms

    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    if not isinstance(atoms_list, (list, tuple)) or not all(isinstance(a, Atoms) for a in atoms_list):
        raise ValueError(f"atoms_list must be a list of ase.Atoms, got {type(atoms_list).__name__}")
    if not atoms_list:
        raise ValueError("atoms_list is empty ([]): there is no structure to audit")
    empty = [i for i, a in enumerate(atoms_list) if len(a) == 0]
    if empty:
        raise ValueError(f"atoms_list: structures {empty[:10]} have no atom")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(max_atoms, bool) or not isinstance(max_atoms, int) or max_atoms < 1:
        raise ValueError(f"max_atoms must be a positive int (atoms per model call over the K copies), got {max_atoms!r}")
    return list(atoms_list)


# --- the audit ----------------------------------------------------------------------------------

def audit(model: Any, atoms_list: list, *, samples: int | None = None, seed: int = 0, group: str = "SO3",
          max_atoms: int = MAX_ATOMS, float64: bool = True, backend: str = "auto",
          progress: Callable[[int], None] | None = None, rotations: str | Design | None = None,
          replicates: int | None = None) -> Audit:
    """How equivariant ``model`` is on each structure of ``atoms_list`` (see module docs).

    Args:
        model: anything :func:`fastequiv.adapt` takes (a MACE, NequIP, SevenNet,
            SchNetPack, ... model or its ASE calculator), adapted with the stress head for
            the periodic structures where it has one; an adapted model (used as is for
            every structure); or a dict ``{"isolated": ..., "periodic": ...}`` of them.
        atoms_list: ``ase.Atoms`` of any sizes, periodic (``pbc`` all True: energy, forces,
            stress) and not (energy, forces) mixed; measured in separate batches.
        samples: K rotated copies per structure (>= 2; None: 8, or every element of a
            finite group). Not with ``rotations``.
        seed: the Philox stream of the rotations (see module docs).
        group: ``"SO3"``, ``"O3"`` or a finite group (``"SO3"`` or ``"O3"`` with
            ``rotations``).
        max_atoms: atoms per model call, summed over the K copies (with a design, the
            ``replicates * K``) of the structures in it; a structure whose copies hold
            more is measured alone.
        float64: also run a float64 copy of the model on the same copies (the floor and
            the learned part); where one cannot run, :attr:`Audit.float64` says why.
        backend: of the rotations and reductions.
        progress: called with the number of structures each chunk measured.
        rotations: a rotation design in place of i.i.d. draws: ``"design:L"``,
            ``"lebedev:L"``, ``"octahedral"``, ``"icosahedral"`` (see
            :func:`fastequiv.designs.design`) or a :class:`fastequiv.designs.Design`;
            None (default): ``samples`` i.i.d. draws.
        replicates: R, the independent Haar turns of the design per structure (None:
            2): 2 or more give unbiased estimates for any model, 3 or more a
            ``stderr``, 1 the plug-in values (see module docs). Only with ``rotations``.
    """
    atoms_list = _check(atoms_list, seed, max_atoms)
    check_group(group)
    design, replicates = design_plan(rotations, replicates, samples, group) or (None, None)
    N = len(atoms_list)
    if design is None:
        K, exhaustive = _plan(samples, group)
        start = time.perf_counter()
        R = _rotations(N, K, exhaustive, group, seed)
    else:
        K, exhaustive = replicates * design.size, False
        start = time.perf_counter()
        R = design_rotations(design, N, replicates=replicates, seed=seed, dtype=torch.float64)
    notes: list = []
    results = [{} for _ in range(N)]  # index -> {head: {field: value}}
    sums: dict = {}
    sums64: dict = {}
    calls, dtype, why_not = 0, None, None
    memo: dict = {}  # one float64 copy of what both kinds' models share
    for periodic in (False, True):
        members = [i for i, a in enumerate(atoms_list) if bool(a.pbc.all()) == periodic]
        if not members:
            continue
        g = _Group(_adapted_for(model, periodic, notes), float64, memo)
        dtype = dtype or g.dtype
        for run in chunks([len(atoms_list[i]) for i in members], K, max_atoms):
            idx = [members[j] for j in run]
            heads, n = g.run([atoms_list[i] for i in idx], R[:, idx], K, exhaustive, backend, design, replicates)
            calls += n
            for name, hc in heads.items():
                sums.setdefault(name, []).append(hc.sums)
                if hc.sums64 is not None:
                    sums64.setdefault(name, []).append(hc.sums64)
                listed = {f: _listed(v) for f, v in hc.values.items()}
                for b, i in enumerate(idx):
                    results[i][name] = {f: None if v is None else v[b] for f, v in listed.items()}
            if progress is not None:
                progress(len(idx))
        why_not = why_not or g.why_not
    if why_not is not None:  # one precision pair for the whole table: no column half-filled
        sums64 = {}
        for r in results:
            for values in r.values():
                values.update(floor=None, equiv_f64=None, rel_f64=None, verdict=None)
    if design is None:
        heads = {h: _overall(parts, K, exhaustive) for h, parts in sums.items()}
        heads64 = {h: _overall(parts, K, exhaustive) for h, parts in sums64.items()}
    else:
        heads = {h: _overall_design(parts, K, replicates) for h, parts in sums.items()}
        heads64 = {h: _overall_design(parts, K, replicates) for h, parts in sums64.items()}
    rows = [_row(i, a, results[i], list(heads)) for i, a in enumerate(atoms_list)]
    described = {} if design is None else {"rotations": design.name, "degree": design.degree,
                                            "design_size": design.size, "replicates": replicates}
    return Audit(rows, heads, heads64, K, exhaustive, seed, group, str(dtype).replace("torch.", ""), why_not, calls,
                 time.perf_counter() - start, notes, **described)


def _listed(v) -> list:
    return v if isinstance(v, list) or v is None else v.tolist()


def _overall(parts: list, K: int, exhaustive: bool) -> LabelFree:
    total, bias, spread, count = (torch.cat(c) for c in zip(*parts))
    d = decompose(total, bias, spread, count, samples=K, exhaustive=exhaustive)
    return label_free(d, count > 0)


def _overall_design(parts: list, samples: int, R: int) -> LabelFree:
    total, mean, equiv, count = (torch.cat(c) for c in zip(*parts))
    return _design_label_free(total, mean, equiv, count, samples, R)


def _row(i: int, atoms, values: dict, heads: list) -> dict:
    row = {"index": i, "atoms": len(atoms), "formula": atoms.get_chemical_formula(),
           "pbc": "".join("T" if p else "F" for p in atoms.pbc), "periodic": bool(atoms.pbc.all())}
    for h in heads:
        for f in FIELDS:
            row[f"{h}_{f}"] = values.get(h, {}).get(f)
    return row

