"""ASE calculators: the loss decomposition of any ``Calculator``, and its twirled version.

    import fastequiv.ase                       # needs ASE: pip install "fastequiv[ase]"
    d = fastequiv.ase.equivariance_error(calc, structures, samples=8)
    d.pct, d.heads["forces"].equiv             # share of the error due to broken symmetry
    atoms.calc = fastequiv.ase.TwirledCalculator(calc, group="octahedral")

``import fastequiv`` does not import this module (ASE is an optional dependency).

How a structure is rotated: positions ``x -> R x``; a structure periodic in any direction
is rotated rigidly with its cell about the origin (``cell -> cell @ R.T``, rows are the
lattice vectors), one with no periodic direction about its centroid with the cell left
as it is (the molecule stays in its box). Nothing else in the ``Atoms`` is rotated
(momenta, non-collinear magnetic moments, ...), nor anything inside the calculator (an
external field): their effect counts as equivariance error, as it should. The
calculator's raw outputs are used (``calc.get_property``; no constraint is applied), and
back-rotated: ``E``, ``R^T F``, ``R^T S R`` (``S`` the 3x3 stress).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

try:
    from ase import Atoms
    from ase.calculators.calculator import (
        Calculator,
        PropertyNotImplementedError,
        all_changes,
    )
    from ase.stress import voigt_6_to_full_3x3_stress
except ImportError as e:  # pragma: no cover - the test extra installs ASE
    raise ImportError('fastequiv.ase needs ASE (the Atomic Simulation Environment): pip install "fastequiv[ase]" '
                      'or pip install ase') from e

from .design_twirl import design_plan
from .designs import design
from .estimators import Decomposition, combine, decompose
from .groups import check_group, group_elements, group_order, resolve_seed
from .ops import twirl_reduce
from .ops.random_rotations import random_rotations
from .reps import as_rep

__all__ = ["PROPERTIES", "TwirledCalculator", "equivariance_error"]

#: the properties fastequiv.ase measures and twirls, and how each transforms
PROPERTIES = {"energy": "scalar", "free_energy": "scalar", "forces": "vector", "stress": "rank2"}
#: what ``properties=None`` measures, where the calculator and the targets have it
DEFAULT_PROPERTIES = ("energy", "forces", "stress")


# --- shared pieces ---------------------------------------------------------------------------

def _plan(samples, group: str, default: int) -> tuple[int, bool]:
    """``(K, exhaustive)``: every element of a finite group once when ``samples`` is None
    or its order, else K i.i.d. draws (the rule of :func:`fastequiv.equivariance_error`)."""
    check_group(group)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive int or None, got {samples!r}")
    order = group_order(group)
    if order is not None and samples in (None, order):
        return order, True
    return (default if samples is None else samples), False


def _rotations(n: int, K: int, exhaustive: bool, group: str, seed) -> np.ndarray:
    """``(K, n, 3, 3)`` float64: rotation ``k * n + b`` of the Philox stream for copy ``k``
    of structure ``b`` (as :func:`fastequiv.equivariance_error` draws them), or every group
    element for every structure."""
    if exhaustive:
        g = group_elements(group, dtype=torch.float64)
        return g[:, None].expand(K, n, 3, 3).numpy().copy()
    return random_rotations(K * n, seed=seed, group=group, dtype=torch.float64).reshape(K, n, 3, 3).numpy()


def rotated(atoms: Atoms, R: np.ndarray) -> Atoms:
    """A copy of ``atoms`` rotated by ``R`` (see the module docs), without a calculator."""
    a = atoms.copy()
    a.calc = None
    a.set_constraint()  # a constraint (FixAtoms) would keep atoms from rotating; outputs are raw anyway
    pos = atoms.get_positions()
    if atoms.pbc.any():
        a.set_cell(np.asarray(atoms.get_cell()) @ R.T, scale_atoms=False)
        a.set_positions(pos @ R.T)
    else:
        c = pos.mean(axis=0)
        a.set_positions((pos - c) @ R.T + c)
    return a


def _implemented(calc) -> list:
    return list(getattr(calc, "implemented_properties", ()) or ())


def _as_3x3(stress, where: str) -> np.ndarray:
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (6,):
        return voigt_6_to_full_3x3_stress(s)
    if s.shape == (3, 3):
        return s
    raise ValueError(f"{where} must be a Voigt 6-vector or a 3x3 matrix, got shape {s.shape}")


def _compute(calc, atoms: Atoms, props: Sequence[str]) -> dict:
    """The calculator's raw values of ``props`` on ``atoms`` (stress as 3x3), asking for
    stress first: most calculators compute energy and forces on that one call."""
    atoms.calc = calc
    out = {}
    for p in sorted(props, key=lambda p: p != "stress"):
        v = calc.get_property(p, atoms)
        out[p] = _as_3x3(v, f"the calculator's {p!r}") if p == "stress" else np.asarray(v, dtype=np.float64)
    return out


def _back_rotate(values: dict, R: np.ndarray) -> dict:
    """``rho(R)^-1`` of each value (E, R^T F, R^T S R), as twirl_reduce does."""
    out = {}
    for p, v in values.items():
        kind = PROPERTIES[p]
        out[p] = v if kind == "scalar" else (v @ R if kind == "vector" else R.T @ v @ R)
    return out


# --- equivariance_error ----------------------------------------------------------------------

def _default_targets(atoms_list) -> list:
    """The values stored on the structures (``atoms.calc.results`` of a
    SinglePointCalculator, e.g. read from extxyz), valid for their current positions."""
    targets = []
    for atoms in atoms_list:
        t = {}
        if atoms.calc is not None:
            for p in PROPERTIES:
                try:
                    v = atoms.calc.get_property(p, atoms, allow_calculation=False)
                except PropertyNotImplementedError:  # not a property that calculator has
                    v = None
                if v is not None:
                    t[p] = v
        targets.append(t)
    if not any(targets):
        raise ValueError(
            "target=None takes the reference values stored on the structures (atoms.calc.results, e.g. of a "
            "SinglePointCalculator read from an extxyz file), but none of the structures in atoms_list has any "
            "for its current positions. Pass target=[{'energy': E, 'forces': F, 'stress': S}, ...] (one dict per "
            "structure, reference data in the frame of the unrotated structure), or attach the reference values "
            "with atoms.calc = SinglePointCalculator(atoms, energy=E, forces=F)")
    return targets


def _check_inputs(calc, atoms_list, targets):
    if not hasattr(calc, "get_property"):
        raise ValueError(f"calc must be an ASE calculator (with get_property), got {type(calc).__name__}")
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    atoms_list = list(atoms_list) if isinstance(atoms_list, (list, tuple)) else atoms_list
    if not isinstance(atoms_list, list) or not all(isinstance(a, Atoms) for a in atoms_list):
        raise ValueError(f"atoms_list must be a list of ase.Atoms, got {type(atoms_list).__name__}")
    if not atoms_list:
        raise ValueError("atoms_list is empty ([]): there is nothing to decompose; pass at least one ase.Atoms")
    if targets is None:
        targets = _default_targets(atoms_list)
    elif not isinstance(targets, (list, tuple)) or len(targets) != len(atoms_list) or \
            not all(isinstance(t, dict) for t in targets):
        raise ValueError(f"target must be a list of {len(atoms_list)} dicts (one per structure in atoms_list, "
                         f"keys among {tuple(PROPERTIES)}), got {type(targets).__name__}"
                         + (f" of length {len(targets)}" if isinstance(targets, (list, tuple)) else ""))
    for i, t in enumerate(targets):
        unknown = set(t) - set(PROPERTIES)
        if unknown:
            raise ValueError(f"target[{i}] has keys {sorted(unknown)} that fastequiv.ase does not measure; "
                             f"known properties: {tuple(PROPERTIES)}")
    return atoms_list, list(targets)


def _select(properties, calc, atoms_list, targets) -> dict:
    """``{property: (B,) bool}``: the properties measured and the structures each applies to."""
    implemented = _implemented(calc)
    periodic = np.array([bool(a.pbc.all()) for a in atoms_list])

    def has(p, idx):
        return all(p in targets[i] for i in idx)

    everyone = range(len(atoms_list))
    if properties is None:
        chosen = {}
        for p in DEFAULT_PROPERTIES:
            applies = periodic if p == "stress" else np.ones(len(atoms_list), bool)
            if p in implemented and applies.any() and has(p, np.flatnonzero(applies)):
                chosen[p] = applies
        if not chosen:
            raise ValueError(
                f"properties=None measures those of {DEFAULT_PROPERTIES} that the calculator implements "
                f"({implemented}) and every structure's target has; none qualifies (targets have keys "
                f"{sorted(set().union(*targets))}). Give the targets those values, or name properties=")
        return chosen
    if isinstance(properties, str):
        properties = (properties,)
    properties = tuple(properties)
    if not properties or len(set(properties)) != len(properties):
        raise ValueError(f"properties must be a non-empty tuple of distinct names among {tuple(PROPERTIES)} "
                         f"(or None), got {properties!r}")
    chosen = {}
    for p in properties:
        if p not in PROPERTIES:
            raise ValueError(f"properties={properties!r}: fastequiv.ase measures {tuple(PROPERTIES)}, not {p!r}")
        if p not in implemented:
            raise ValueError(f"properties={properties!r}: the calculator {type(calc).__name__} cannot compute "
                             f"{p!r} (its implemented_properties are {implemented}); leave {p!r} out, or pass "
                             "properties=None to measure what it has")
        if p == "stress" and not periodic.all():
            bad = np.flatnonzero(~periodic).tolist()
            raise ValueError(f"properties={properties!r} asks for the stress, but structures {bad} of atoms_list "
                             "are not periodic in all three directions (atoms.pbc.all() is False), so they have "
                             "none; drop 'stress', or pass properties=None to measure it on the periodic ones only")
        missing = [i for i in everyone if p not in targets[i]]
        if missing:
            raise ValueError(f"properties={properties!r} asks for {p!r}, but targets of structures {missing} have "
                             f"no {p!r}; add it to their targets, or leave {p!r} out of properties")
        chosen[p] = np.ones(len(atoms_list), bool)
    return chosen


def _target_value(p: str, value, atoms: Atoms, i: int) -> np.ndarray:
    where = f"target[{i}][{p!r}]"
    if p == "stress":
        return _as_3x3(value, where)
    v = np.asarray(value, dtype=np.float64)
    want = (len(atoms), 3) if p == "forces" else ()
    if v.shape != want:
        raise ValueError(f"{where} must have shape {want} (structure {i} has {len(atoms)} atoms), got {v.shape}")
    return v


def equivariance_error(
    calc,
    atoms_list: Sequence[Atoms],
    target: Sequence[dict] | None = None,
    *,
    samples: int | None = None,
    rotations=None,
    replicates: int | None = None,
    group: str = "SO3",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    properties: Sequence[str] | None = None,
    loss_weights: dict | None = None,
    batched: bool | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    targets: Sequence[dict] | None = None,
) -> Decomposition:
    """Decompose an ASE calculator's augmented loss on ``atoms_list`` into L_mean + L_equiv.

    Each structure ``b`` is rotated by K group elements ``R_k`` (see the module docs for
    how), the calculator evaluated on every copy, and its outputs back-rotated
    (``E``, ``R^T F``, ``R^T S R``) and compared with the targets, exactly as
    :func:`fastequiv.equivariance_error` does for a torch model: ``L_total`` is the mean
    squared error over the rotations, ``L_mean`` that of the twirled (rotation-averaged)
    prediction, ``L_equiv`` the spread of the back-rotated predictions around it, which is
    0 for an exactly equivariant calculator (up to float rounding).

    Losses per structure: energy ``(E - E_ref)^2``; forces the mean over the structure's
    ``3N`` force components (structures of any size); stress the mean over its 9
    components. Each head is averaged over the structures it applies to; the top level is
    the ``loss_weights``-weighted sum of the heads (``d.heads``).

    Two routes give the same numbers (to float rounding, rotation for rotation):

    * batched, when :func:`fastequiv.adapt` recognises the calculator (MACE's, NequIP's,
      SevenNet's, Orb's, SchNetPack's; not a committee of several models, whose mean the
      calculator returns): the structures go through the codebase's own data
      pipeline once, and the K rotated copies of all of them through its model in one
      call (per ``chunk_size`` structures): positions turned about each structure's
      centroid, cells, shifts and edges with them. No calculator call.
    * serial, for any other calculator (or ``batched=False``): ``K * len(atoms_list)``
      calculator calls on rotated copies of the structures.

    Args:
        calc: any ASE calculator (the structures themselves are left untouched).
        atoms_list: a list of ``ase.Atoms`` of any sizes, periodic or not (one Atoms
            counts as a list of one).
        samples: K per structure: default 8 i.i.d. Haar draws for ``"SO3"``/``"O3"``,
            every element once (exact values) for a finite group; K >= 2 (one rotation
            cannot estimate L_equiv).
        rotations, replicates: a rotation design turned by ``replicates`` (default 2)
            independent Haar rotations per structure instead of ``samples`` i.i.d. draws,
            as in :func:`fastequiv.equivariance_error` (``group`` ``"SO3"`` or ``"O3"``;
            turn ``r`` of structure ``b`` is rotation ``r * B + b`` of the ``seed``
            stream, on both routes): a :class:`fastequiv.design_twirl.DesignDecomposition`
            with ``rotation_stderr`` (3 or more replicates).
        group: ``"SO3"``, ``"O3"``, ``"octahedral"``, ``"octahedral_O3"``, ``"icosahedral"``.
        seed: copy ``k`` of structure ``b`` is rotated by rotation ``k * B + b`` of this
            Philox stream (``fastequiv.random_rotations(K * B, seed=seed, group=group)``);
            generator: draw the seed from it; default: a seed from torch's default generator.
        properties: names among ``"energy"``, ``"free_energy"``, ``"forces"``,
            ``"stress"``; each must be computable by ``calc`` and given in every target,
            and ``"stress"`` needs every structure periodic in all three directions.
            ``None`` (default): whichever of energy, forces and stress the calculator
            implements and the targets give, the stress over the fully periodic
            structures only (skipped when there is none).
        target: one dict per structure, with keys among the properties (energy a number,
            forces ``(N, 3)``, stress a Voigt 6-vector or ``3x3``), reference values in the
            frame of the unrotated structure (DFT labels, or another calculator's
            values). Default: the values stored on the structures themselves
            (``atoms.calc`` with results for the current positions, e.g. the
            SinglePointCalculator that ``ase.io.read`` attaches to an extxyz frame); a
            ValueError when there are none. Targets equal to ``calc``'s own unrotated
            predictions are allowed, but then an exactly equivariant calculator gives
            ``total = 0`` and ``pct = 0/0 = nan``.
        loss_weights: ``{property: weight}`` for the measured properties (others default
            to 1).
        batched: ``None`` (default): the batched route where it applies (a recognised
            calculator of one model; energy, forces and stress, the stress only if every
            structure is periodic); ``True``: require it (a ValueError says why not);
            ``False``: serial.
        chunk_size: structures per model call on the batched route (default: all in one).
            Each chunk then draws its own rotations (stream ``seed + chunk``), so only the
            one-chunk result equals the serial route rotation for rotation.
        backend: of the rotations and reductions.
        targets: the old name of ``target`` (deprecated).

    Returns:
        a :class:`fastequiv.Decomposition` (float64 tensors) with per-property ``heads``.
    """
    if targets is not None:
        warnings.warn("fastequiv.ase.equivariance_error(targets=...) is deprecated: call it target=, as "
                      "fastequiv.equivariance_error does", DeprecationWarning, stacklevel=2)
        if target is not None:
            raise ValueError("pass target= only (targets= is its deprecated name)")
        target = targets
    seed = resolve_seed(seed, generator)  # one stream for both routes
    atoms_list, targets = _check_inputs(calc, atoms_list, target)
    plan_of = design_plan(rotations, replicates, samples, group)
    K, exhaustive = (plan_of[0].size, False) if plan_of else _plan(samples, group, 8)
    if K < 2 and not exhaustive and not plan_of:
        raise ValueError(f"samples={samples!r} cannot estimate L_equiv: it needs samples >= 2 i.i.d. rotations "
                         "(or samples=None with a finite group, for the exhaustive twirl)")
    chosen = _select(properties, calc, atoms_list, targets)
    weights = {p: 1.0 for p in chosen}
    if loss_weights is not None:
        if not isinstance(loss_weights, dict) or not set(loss_weights) <= set(chosen):
            raise ValueError(f"loss_weights must be a dict whose keys are among the measured properties "
                             f"{list(chosen)}, got {loss_weights!r}")
        weights.update({p: float(w) for p, w in loss_weights.items()})
    why_not = _batched_route_refused(calc, chosen)
    if batched and why_not:
        raise ValueError(f"batched=True, but the batched route does not apply: {why_not}")
    if batched is not False and not why_not:
        from .ase_batched import decompose_batched

        return decompose_batched(calc, atoms_list, targets, list(chosen), weights,
                                 samples=None if exhaustive or plan_of else K, group=group, seed=seed,
                                 chunk_size=chunk_size, backend=backend, design=plan_of)
    if chunk_size is not None:
        raise ValueError("chunk_size= applies to the batched route only (the serial route calls the calculator "
                         "once per copy)")

    B = len(atoms_list)
    nmax = max(len(a) for a in atoms_list)
    if plan_of:  # copy r K + i of structure b turned by G_{b,r} R_i
        from .design_twirl import design_rotations

        R = design_rotations(plan_of[0], B, replicates=plan_of[1], seed=seed, dtype=torch.float64).numpy()
        K = R.shape[0]
    else:
        R = _rotations(B, K, exhaustive, group, seed)
    out = {p: np.zeros((K, B) + _shape(p, nmax)) for p in chosen}
    y = {p: np.zeros((B,) + _shape(p, nmax)) for p in chosen}
    for b, atoms in enumerate(atoms_list):
        props = [p for p in chosen if chosen[p][b]]
        for p in props:
            v = _target_value(p, targets[b][p], atoms, b)
            if p == "forces":
                y[p][b, :len(atoms)] = v
            else:
                y[p][b] = v
        for k in range(K):
            values = _compute(calc, rotated(atoms, R[k, b]), props)
            for p in props:
                if p == "forces":
                    if values[p].shape != (len(atoms), 3):
                        raise ValueError(f"the calculator's forces for structure {b} have shape "
                                         f"{values[p].shape}, expected {(len(atoms), 3)}")
                    out[p][k, b, :len(atoms)] = values[p]
                else:
                    out[p][k, b] = values[p]

    Rt = torch.from_numpy(R)
    atom_mask = torch.from_numpy(np.arange(nmax)[None, :] < np.array([len(a) for a in atoms_list])[:, None])
    heads, head_valid, reps = {}, {}, {}
    for p, applies in chosen.items():
        mask = atom_mask & torch.from_numpy(applies)[:, None] if p == "forces" else torch.from_numpy(applies)
        if p != "forces" and applies.all():
            mask = None
        if plan_of:
            from types import SimpleNamespace

            from .design_twirl import Replicates
            from .ops.action import Action

            head = SimpleNamespace(value=torch.from_numpy(out[p]), rep=as_rep(PROPERTIES[p]), mask=mask, batch=None,
                                   name=p)
            reps[p] = Replicates.of_head(head, Action(Rt, backend), plan_of[0].weights, torch.from_numpy(y[p]), B,
                                         plan_of[1], backend)
            continue
        s = twirl_reduce(torch.from_numpy(out[p]), Rt, torch.from_numpy(y[p]), as_rep(PROPERTIES[p]), mask,
                         backend=backend)
        heads[p] = decompose(s.total, s.bias, s.spread, s.count, samples=K, exhaustive=exhaustive)
        head_valid[p] = s.count > 0
    if plan_of:
        from .design_twirl import assemble

        return assemble(reps, weights, plan_of[0], plan_of[1], labelled=True, single=False)[0]
    return combine(heads, weights, head_valid)


def _calculator_refused(calc) -> str | None:
    """Why the batched route cannot stand for ``calc`` itself (None if it can): it runs the
    one model that :func:`fastequiv.adapt` takes from the calculator."""
    from .adapters import family_of

    if family_of(calc) is None:
        return f"fastequiv.adapt does not recognise the calculator {type(calc).__name__}"
    models = getattr(calc, "models", None)
    if isinstance(models, (list, tuple)) and len(models) > 1:  # MACECalculator(models=[...])
        return (f"the calculator {type(calc).__name__} is a committee of {len(models)} models and returns their "
                "mean, but the batched route runs one model (fastequiv.adapt takes the first)")
    return None


def _batched_route_refused(calc, chosen: dict) -> str | None:
    """Why the batched route cannot measure ``chosen`` with ``calc`` (None if it can)."""
    why = _calculator_refused(calc)
    if why is not None:
        return why
    if "free_energy" in chosen:
        return "it measures energy, forces and stress, not free_energy"
    if "stress" in chosen and not chosen["stress"].all():
        return "the stress is asked for on a list that mixes periodic and non-periodic structures"
    return None


def _shape(p: str, nmax: int) -> tuple:
    return {"scalar": (), "vector": (nmax, 3), "rank2": (3, 3)}[PROPERTIES[p]]


# --- TwirledCalculator -----------------------------------------------------------------------

class TwirledCalculator(Calculator):
    """Any ASE calculator averaged over rotations, at inference time.

    ``E(x) = mean_k E0(R_k x)``, ``F(x) = mean_k R_k^T F0(R_k x)``,
    ``S(x) = mean_k R_k^T S0(R_k x) R_k`` over a fixed set of K rotations (drawn once
    from ``seed``, or every element of a finite group), so the result is a deterministic
    function of the structure whose forces are exactly the negative gradient of its
    energy (usable for relaxations and MD). Over a finite group (``"octahedral"``,
    ``"icosahedral"``) it is exactly invariant (energy, stress) and equivariant (forces)
    under that group, up to float rounding; over K Haar draws it is only closer to
    SO(3)-equivariant than the wrapped calculator. It costs K calls of the wrapped one.

    Args:
        calc: the ASE calculator to twirl (shared: its cached results are overwritten).
        samples: K: default 16 Haar draws for ``"SO3"``/``"O3"``, every element of a
            finite group; ``samples=K`` with a finite group draws K elements at random.
        group: ``"SO3"``, ``"O3"``, ``"octahedral"``, ``"octahedral_O3"``, ``"icosahedral"``.
        rotations: a rotation design instead of draws (``"design:L"``, ``"lebedev:L"``,
            ``"octahedral"``, ``"icosahedral"`` or a :class:`fastequiv.designs.Design`; see
            :mod:`fastequiv.designs`), with ``group`` ``"SO3"`` or ``"O3"``: the weighted average
            over it, equal to the Haar average for every calculator whose rotated predictions
            have no content above ``self.design.degree``. Not with ``samples``.
        seed: the Philox stream of the draws (``fastequiv.random_rotations(K, seed=seed)``).
            Fixed by default (0), unlike the measuring functions' fresh draws: the twirled
            calculator must be one deterministic function for relaxations and MD.
        batched: ``None`` (default): when :func:`fastequiv.adapt` recognises ``calc`` (and it
            is not a committee of models, which it averages: a MACECalculator given several),
            the K copies go through its model in one call (:mod:`fastequiv.ase_batched`), which
            also gives a periodic structure's stress; ``False``: K calls of ``calc``; ``True``:
            require the batched route.
        backend: of the batched route's rotations and reductions.

    ``implemented_properties``: those of energy, free_energy, forces and stress that
    ``calc`` implements. Structures are rotated as described in the module docs.
    """

    def __init__(self, calc, *, samples: int | None = None, group: str = "SO3", rotations=None, seed: int = 0,
                 batched: bool | None = None, backend: str = "auto", **kwargs):
        if not hasattr(calc, "get_property"):
            raise ValueError(f"calc must be an ASE calculator (with get_property), got {type(calc).__name__}")
        self.design = self.weights = None
        if rotations is not None:
            if samples is not None:
                raise ValueError(f"samples={samples!r} with rotations={rotations!r}: a design fixes the number of "
                                 "rotations (pass one or the other)")
            self.design = design(rotations, group)
            self.weights = self.design.weights.numpy()
        K, exhaustive = (self.design.size, False) if self.design is not None else _plan(samples, group, 16)
        super().__init__(**kwargs)
        self.calc = calc
        self.group, self.samples, self.exhaustive, self.seed = group, K, exhaustive, seed
        self.rotations = self.design.rotations.numpy() if self.design is not None else \
            _rotations(1, K, exhaustive, group, seed)[:, 0]  # (K, 3, 3)
        self.implemented_properties = [p for p in PROPERTIES if p in _implemented(calc)]
        if not self.implemented_properties:
            raise ValueError(f"calc {type(calc).__name__} implements none of {tuple(PROPERTIES)} "
                             f"(its implemented_properties: {_implemented(calc)}); there is nothing to twirl")
        self.twirled = None  # the batched route: K copies in one model call
        why_not = _calculator_refused(calc)
        if batched and why_not:
            raise ValueError(f"batched=True, but the batched route does not apply: {why_not}")
        if batched is not False and not why_not:
            from .ase_batched import adapted_calculator
            from .twirl import Twirled

            heads = tuple(p for p in ("energy", "forces", "stress") if p in self.implemented_properties)
            model = adapted_calculator(calc, heads, group)
            self.twirled = Twirled(model, rotations=self.design, backend=backend) if self.design is not None else \
                Twirled(model, samples=None if exhaustive else K, seed=seed, backend=backend)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        # energy and forces come with nearly every calculation; stress only when asked for
        props = [p for p in self.implemented_properties if p in properties or p in ("energy", "forces")]
        periodic = bool(self.atoms.pbc.all())
        if self.twirled is not None and "free_energy" not in props and ("stress" not in props or periodic):
            from .ase_batched import twirled_results

            # the one model call gives every head: keep the stress of a periodic structure
            # even when not asked for (a cell relaxation asks for it next)
            self.results.update({p: v for p, v in twirled_results(self.twirled, self.atoms).items()
                                 if p in props or (p == "stress" and periodic)})
            return
        acc = {p: [] for p in props}
        for R in self.rotations:
            values = _back_rotate(_compute(self.calc, rotated(self.atoms, R), props), R)
            for p in props:
                acc[p].append(values[p])
        for p in props:
            v = np.stack(acc[p])
            # math.fsum: correctly rounded, so the mean does not depend on the order of the terms
            if self.weights is None:
                flat = [math.fsum(col) / len(self.rotations) for col in v.reshape(len(v), -1).T]
            else:  # a design's weighted average
                flat = [math.fsum(self.weights * col) for col in v.reshape(len(v), -1).T]
            if PROPERTIES[p] == "scalar":
                self.results[p] = flat[0]
            elif p == "stress":
                self.results[p] = np.array(flat).reshape(3, 3).flat[[0, 4, 8, 5, 2, 1]].copy()
            else:
                self.results[p] = np.array(flat).reshape(v.shape[1:])
