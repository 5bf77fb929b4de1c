"""The audit of a list of structures: periodic and isolated ones measured apart (with and
without the stress head), chunks of at most ``max_atoms`` atoms over the copies, the
rotations, and one table row per structure. The per-structure numbers, and the math behind
them: :mod:`fastequiv.audit.heads`.

Rotations: copy ``k`` of structure ``i`` (its index in the list) is turned by rotation
``k * N + i`` of the seed's stream over all ``N`` structures, as
:func:`fastequiv.ase.equivariance_error` turns them; with a design, copy ``r * K + k`` by
``G_{i,r} R_k``, ``G_{i,r}`` rotation ``r * N + i`` of the stream
(:func:`fastequiv.design_twirl.design_rotations`). The numbers do not depend on how the
structures are grouped and chunked. Positions turn about each structure's centroid,
periodic or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapted import Adapted
from ..adapters import adapt
from ..design_twirl import design_plan, design_rotations
from ..designs import Design
from ..groups import check_group, group_elements, group_order
from ..ops import random_rotations
from ..ops.action import Action
from ..stacking import read_inputs, stack_copies
from .heads import (FIELDS, ROUNDING_REL, as_float64, cast_inputs, float32_numbers, float64_copy, float_dtypes,
                    heads_on, measure_head, measure_head_design, model_dtype, overall, overall_design)

__all__ = ["FIELDS", "ROUNDING_REL", "Audit", "audit", "chunks", "float64_copy"]

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
        inputs = as_float64(model.prepare(builds(model).batch_from_atoms(atoms)))
        if self.dtypes is None:
            own = self.model if self.f64 is not self.model else None
            self.dtypes = float_dtypes(own.prepare(builds(own).batch_from_atoms(atoms[:1]))) if own else {}
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
            heads = heads_on(self.model, spec, batch, names, cast_inputs(names, values, self.dtypes), K)
            heads64, calls = None, 1
            if self.f64 is self.model:
                heads64 = heads
            elif self.f64 is not None:
                heads64, calls = self._float64(batch, names, values, K), 2
        if design is not None:
            weights = design.weights.to(device=batch.device, dtype=torch.float64)
            out = {name: measure_head_design(h, heads64[name] if heads64 else None, action, weights, replicates,
                                              batch.B, backend) for name, h in heads.items()}
            return out, calls
        out = {name: measure_head(h, heads64[name] if heads64 else None, action, K, exhaustive, batch.B, backend)
               for name, h in heads.items()}
        return out, calls

    def _float64(self, batch, names, values, K):
        try:
            heads = heads_on(self.f64, self.f64.spec, batch, names, values, K)
        except (RuntimeError, TypeError) as err:
            self._give_up(f"the float64 copy of the model failed ({type(err).__name__}: {str(err)[:300]})")
            return None
        wrong = {n: h.value.dtype for n, h in heads.items() if h.value.dtype != torch.float64}
        if wrong:
            self._give_up(f"the float64 copy of the model returned {wrong}: it computes in a narrower dtype inside")
            return None
        sizable = [h.value for h in heads.values() if h.value.numel() >= 8]
        if sizable and all(float32_numbers(v) for v in sizable):
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
        heads = {h: overall(parts, K, exhaustive) for h, parts in sums.items()}
        heads64 = {h: overall(parts, K, exhaustive) for h, parts in sums64.items()}
    else:
        heads = {h: overall_design(parts, K, replicates) for h, parts in sums.items()}
        heads64 = {h: overall_design(parts, K, replicates) for h, parts in sums64.items()}
    rows = [_row(i, a, results[i], list(heads)) for i, a in enumerate(atoms_list)]
    described = {} if design is None else {"rotations": design.name, "degree": design.degree,
                                            "design_size": design.size, "replicates": replicates}
    return Audit(rows, heads, heads64, K, exhaustive, seed, group, str(dtype).replace("torch.", ""), why_not, calls,
                 time.perf_counter() - start, notes, **described)


def _listed(v) -> list:
    return v if isinstance(v, list) or v is None else v.tolist()


def _row(i: int, atoms, values: dict, heads: list) -> dict:
    row = {"index": i, "atoms": len(atoms), "formula": atoms.get_chemical_formula(),
           "pbc": "".join("T" if p else "F" for p in atoms.pbc), "periodic": bool(atoms.pbc.all())}
    for h in heads:
        for f in FIELDS:
            row[f"{h}_{f}"] = values.get(h, {}).get(f)
    return row

