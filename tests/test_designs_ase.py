"""TwirledCalculator over a rotation design on real calculators (MACE's, NequIP's): the
batched route (the calculator's model adapted, K copies in one call, the design's weighted
average) against the serial one (K calculator calls), closed forms of the design average
of a MACE broken by a constant force field and an anisotropic harmonic well, and the
design the calculator reports.

tests/test_designs.py covers the designs themselves and TwirledCalculator(rotations=) on a
toy calculator (serial route only); tests/test_ase_batched.py the batched route with
i.i.d. draws.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase.calculators.calculator import all_changes

# test_adapt_mace skips itself, and this module with it, without mace-torch
from test_adapt_mace import structures, tiny_mace

import fastequiv.ase as fa

FIELD = np.array([0.3, -0.1, 0.2])  # eV/A, on every atom
WELL = np.array([[0.08, 0.01, -0.02], [0.01, 0.02, 0.03], [-0.02, 0.03, -0.05]])  # symmetric, eV/A^2


def broken_forward(self, data, **kwargs):
    """MACE's forward with an external constant force field ``a`` and an anisotropic
    harmonic well ``A`` (symmetric) about each structure's centroid, ``u = x - c``:
    ``E + 1/2 sum_i u_i^T A u_i`` and ``F - A u + a``; the stress is MACE's."""
    from mace.modules import MACE

    out = dict(MACE.forward(self, data, **kwargs))
    pos, batch = data["positions"], data["batch"]
    B = data["ptr"].numel() - 1
    count = torch.zeros(B, dtype=pos.dtype, device=pos.device).index_add(0, batch, torch.ones_like(pos[:, 0]))
    centroid = torch.zeros(B, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, pos) / count[:, None]
    u = pos - centroid[batch]
    A = torch.as_tensor(self.well, dtype=pos.dtype, device=pos.device)
    well = torch.zeros(B, dtype=pos.dtype, device=pos.device).index_add(0, batch, 0.5 * ((u @ A) * u).sum(-1))
    out["energy"] = out["energy"] + well
    out["forces"] = out["forces"] - u @ A + torch.as_tensor(self.field, dtype=pos.dtype, device=pos.device)
    return out


def broken_mace(field=FIELD, well=WELL):
    """tiny_mace() (the same weights) as a MACE subclass whose forward is
    :func:`broken_forward`: the broken outputs reach both the MACE calculator (which calls
    the model) and the batched route (which adapts the calculator's model)."""
    mace = tiny_mace()
    mace.__class__ = type("BrokenMACE", (type(mace),), {"forward": broken_forward})
    mace.field, mace.well = np.asarray(field, dtype=np.float64), np.asarray(well, dtype=np.float64)
    return mace


def mace_calculator(models):
    from mace.calculators import MACECalculator

    return MACECalculator(models=models, device="cpu", default_dtype="float64")


@pytest.fixture(scope="module", autouse=True)
def mace_settings():
    """The MACEs here run e3nn's code eagerly: TorchScript would specialise (slowly) on the
    first calls of every new shape, and K copies of a structure is a new shape for every
    design. MACECalculator sets torch's default dtype to float64 for good. Both put back
    after."""
    import e3nn

    before, e3nn_defaults = torch.get_default_dtype(), e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(jit_script_fx=False)
    yield
    torch.set_default_dtype(before)
    e3nn.set_optimization_defaults(**e3nn_defaults)


@pytest.fixture(scope="module")
def exact(mace_settings):
    return mace_calculator(tiny_mace())


@pytest.fixture(scope="module")
def broken(mace_settings):
    return mace_calculator(broken_mace())


@pytest.fixture(scope="module")
def field_only(mace_settings):
    return mace_calculator(broken_mace(well=np.zeros((3, 3))))


def compute(calc, atoms) -> dict:
    """energy, forces and (periodic) the Voigt stress of ``calc`` on a copy of ``atoms``, in
    one calculation."""
    a = atoms.copy()
    props = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
    calc.calculate(a, props, all_changes)
    return {p: np.array(calc.results[p], dtype=np.float64) for p in props}


def assert_same(got: dict, want: dict, rtol: float, msg: str = ""):
    assert set(got) == set(want), msg
    for p, value in want.items():
        scale = max(float(np.abs(value).max()), 1e-300)
        err = float(np.abs(got[p] - value).max()) / scale
        assert err <= rtol, f"{msg} {p}: {err:.2e} relative > {rtol:.0e}"


def atoms_of(periodic: bool):
    return structures(periodic, 2, seed=4)[1]  # 5 atoms; the cell's faces are crossed by edges


def centred(atoms) -> np.ndarray:
    pos = atoms.get_positions()
    return pos - pos.mean(axis=0)


# --- (a) the batched route equals the serial one ---------------------------------------------------

@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "cell"])
@pytest.mark.parametrize("rotations,group", [("design:1", "O3"), ("design:2", "SO3")])
def test_batched_design_average_equals_the_serial_one(broken, periodic, rotations, group):
    """The same design, both routes: energy, forces and (periodic) stress to float rounding,
    on a MACE whose broken symmetry the design does not fully remove (design:1 leaves the
    well's degree-2 part), so the routes' weights and rotations are seen."""
    atoms = atoms_of(periodic)
    twirled = {b: fa.TwirledCalculator(broken, rotations=rotations, group=group, batched=b) for b in (True, False)}
    assert twirled[True].twirled is not None and twirled[False].twirled is None  # the two routes
    got = {b: compute(c, atoms) for b, c in twirled.items()}
    assert_same(got[True], got[False], 1e-12, f"{rotations} {group}")
    plain = compute(broken, atoms)
    assert np.abs(got[True]["forces"] - plain["forces"]).max() > 0.05  # the average changed the forces
    # design:1 twirls the field away, not the well: F0 - sum_k w_k R_k^T A R_k u (closed form)
    if rotations == "design:1":
        d = twirled[True].design
        R, w = d.rotations.numpy(), d.weights.numpy()
        assert np.abs(np.einsum("k,kji->ij", w, R)).max() < 1e-15  # degree 1: sum_k w_k R_k = 0
        well = np.einsum("k,kji,jl,klm->im", w, R, WELL, R)
        f0 = compute(mace_calculator(tiny_mace()), atoms)["forces"]
        np.testing.assert_allclose(got[True]["forces"], f0 - centred(atoms) @ well.T, rtol=0, atol=1e-12)


def test_design_2_twirls_the_well_exactly(broken, exact):
    """A degree-2 design averages ``R^T A R`` to the Haar average ``tr(A)/3 I``: the twirled
    broken MACE is MACE plus the isotropic well, ``E0 + tr(A)/6 sum |u|^2``,
    ``F0 - tr(A)/3 u``, and the field is gone (batched route, a periodic cell)."""
    atoms = atoms_of(True)
    got = compute(fa.TwirledCalculator(broken, rotations="design:2", batched=True), atoms)
    want = compute(exact, atoms)
    c, u = np.trace(WELL) / 3, centred(atoms)
    want["energy"] = want["energy"] + c / 2 * (u ** 2).sum()
    want["forces"] = want["forces"] - c * u
    assert_same(got, want, 1e-12)


# --- (b) a constant field: design:1 removes it, i.i.d. draws do not ---------------------------------

def test_design_1_cancels_a_constant_field_and_iid_draws_leave_it(field_only, exact):
    """Forces ``F0 + a``: the design of degree 1 (4 rotations) averages ``R_k^T a`` to 0, so the
    twirled forces are MACE's own to float rounding; 4 i.i.d. Haar draws (as many
    rotations) leave ``mean_k R_k^T a``, of the field's size. Batched route, a periodic cell."""
    atoms = atoms_of(True)
    f0 = compute(exact, atoms)["forces"]
    plain = compute(field_only, atoms)["forces"]
    np.testing.assert_allclose(plain, f0 + FIELD, rtol=0, atol=1e-12)  # the field reached the calculator
    design = fa.TwirledCalculator(field_only, rotations="design:1", batched=True)
    assert design.samples == 4 and design.twirled is not None
    np.testing.assert_allclose(compute(design, atoms)["forces"], f0, rtol=0, atol=1e-12)
    draws = fa.TwirledCalculator(field_only, samples=4, batched=True)
    forces = compute(draws, atoms)["forces"]
    left = np.einsum("kji,j->i", draws.rotations, FIELD) / 4  # mean_k R_k^T a, the rotations it drew
    np.testing.assert_allclose(forces, f0 + left, rtol=0, atol=1e-12)
    assert np.linalg.norm(left) > 0.1 * np.linalg.norm(FIELD)
    assert np.abs(forces - f0).max() > 100 * np.abs(compute(design, atoms)["forces"] - f0).max() + 0.01


# --- (c) the design the calculator reports -----------------------------------------------------------

def _haar_moment(order: int, group: str) -> np.ndarray:
    """The Haar average of ``R^{(x) order}`` (entries ``R_ij R_kl ...``) over SO(3) or O(3):
    0 for order 1 (and every odd order over O(3)); ``delta_ik delta_jl / 3`` for 2;
    ``eps_ikm eps_jln / 6`` for 3 over SO(3)."""
    if order == 1 or (order % 2 and group == "O3"):
        return np.zeros((3,) * (2 * order))
    if order == 2:
        return np.einsum("ik,jl->ijkl", np.eye(3), np.eye(3)) / 3
    eps = np.zeros((3, 3, 3))
    for i, j, k in itertools.permutations(range(3)):
        eps[i, j, k] = np.linalg.det(np.eye(3)[[i, j, k]])
    return np.einsum("ikm,jln->ijklmn", eps, eps) / 6


def _moment(R: np.ndarray, w: np.ndarray, order: int) -> np.ndarray:
    letters = "abcdef"[:2 * order]
    terms = ",".join(f"k{letters[2 * i:2 * i + 2]}" for i in range(order))
    return np.einsum(f"k,{terms}->{letters}", w, *([R] * order))


@pytest.mark.parametrize("group", ["SO3", "O3"])
def test_the_calculator_reports_its_design(exact, group):
    """``.design`` (its size and degree) is what both routes average over: ``samples`` and
    the batched Twirled's ``K`` are its size, its weights sum to one, and its rotations
    integrate every degree up to the reported one exactly (the Haar moments of ``R``,
    ``R x R``, ``R x R x R`` in closed form) and, for design:1, not degree 2."""
    for L, size in ((1, 4), (2, 12), (3, 24)):
        calc = fa.TwirledCalculator(exact, rotations=f"design:{L}", group=group)
        d = calc.design
        n = size * (2 if group == "O3" else 1)
        assert (d.size, d.degree, d.group) == (n, L, group)
        assert calc.samples == n and calc.rotations.shape == (n, 3, 3)
        assert calc.twirled is not None and calc.twirled.K == n  # batched by default for MACE's calculator
        assert calc.twirled.design.degree == L and calc.twirled.design.name == d.name
        assert f"degree={L}" in repr(calc.twirled)
        R, w = d.rotations.numpy(), d.weights.numpy()
        np.testing.assert_array_equal(calc.rotations, R)
        assert (w > 0).all() and abs(w.sum() - 1) < 1e-15
        dets = np.linalg.det(R)
        assert np.allclose(dets, 1) if group == "SO3" else np.isclose(dets, -1).sum() == n // 2
        for order in range(1, L + 1):
            np.testing.assert_allclose(_moment(R, w, order), _haar_moment(order, group), rtol=0, atol=1e-14,
                                       err_msg=f"design:{L} {group} order {order}")
        if L == 1:
            assert np.abs(_moment(R, w, 2) - _haar_moment(2, group)).max() > 0.05
    with pytest.raises(ValueError, match="a design fixes"):
        fa.TwirledCalculator(exact, rotations="design:2", samples=4)


# --- (d) an exactly equivariant model is unchanged ------------------------------------------------

@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "cell"])
def test_an_equivariant_mace_is_unchanged_by_the_design_average(exact, periodic):
    """The float64 MACE is exactly O(3)-equivariant: its design average (any degree, proper
    and improper rotations) is the plain calculator's energy, forces and (periodic) stress,
    on the batched route (and the serial one, for one design: test (a) has the others)."""
    atoms = atoms_of(periodic)
    plain = compute(exact, atoms)
    for rotations, group, batched in (("design:1", "O3", True), ("design:2", "SO3", True), ("design:3", "SO3", True),
                                      ("design:1", "O3", False)):
        got = compute(fa.TwirledCalculator(exact, rotations=rotations, group=group, batched=batched), atoms)
        assert_same(got, plain, 1e-12, f"{rotations} {group} batched={batched}")


@pytest.fixture
def nequip_state():
    """nequip sets torch's default dtype, TorchScript's fusion strategy and e3nn's code
    generation for good (as tests/test_adapt_nequip.py says): each is put back after."""
    pytest.importorskip("nequip")
    import e3nn

    before = torch.get_default_dtype()
    fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])  # returns the one in force
    torch.jit.set_fusion_strategy(fusion)
    e3nn_defaults = e3nn.get_optimization_defaults()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
    torch.jit.set_fusion_strategy(fusion)
    e3nn.set_optimization_defaults(**e3nn_defaults)


def test_nequip_calculator_with_units_is_unchanged_by_the_design_average(nequip_state):
    """NequIP's calculator (its units converted: energy x2, lengths x0.5) over an O(3)
    design, both routes: NequIP is exactly O(3)-equivariant, so its energy, forces and
    stress stay the plain calculator's, on a periodic cell."""
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms
    from test_adapt_nequip import R_MAX, TYPES, tiny_nequip

    nequip = tiny_nequip().eval()
    calc = NequIPCalculator(nequip, device="cpu", energy_units_to_eV=2.0, length_units_to_A=0.5,
                            transforms=basic_transforms(nequip.metadata, R_MAX, TYPES, {t: t for t in TYPES}))
    atoms = atoms_of(True)
    plain = compute(calc, atoms)
    for batched in (True, False):
        twirled = fa.TwirledCalculator(calc, rotations="design:1", group="O3", batched=batched)
        assert (twirled.twirled is not None) == batched and twirled.samples == 8
        assert_same(compute(twirled, atoms), plain, 1e-12, f"batched={batched}")


# --- the batched route stands for the calculator -------------------------------------------------

def test_a_committee_is_twirled_as_the_calculator_averages_it():
    """A committee MACECalculator returns its models' mean; the batched route would run one
    model (fe.adapt takes the first), so it is not taken: by default TwirledCalculator and
    equivariance_error go serial (the committee's twirled energy is its own, the model
    being exactly equivariant), and batched=True says why not."""
    committee = mace_calculator([tiny_mace(0), tiny_mace(1)])
    atoms = atoms_of(False)
    plain = compute(committee, atoms)
    first = compute(mace_calculator(tiny_mace(0)), atoms)
    assert abs(plain["energy"] - first["energy"]) > 1e-3  # the members differ
    twirled = fa.TwirledCalculator(committee, rotations="design:1")
    assert twirled.twirled is None
    assert_same(compute(twirled, atoms), plain, 1e-12)
    with pytest.raises(ValueError, match="committee of 2 models"):
        fa.TwirledCalculator(committee, rotations="design:1", batched=True)
    target = [{"energy": 0.0, "forces": np.zeros((len(atoms), 3))}]
    d = fa.equivariance_error(committee, [atoms], target, samples=2, seed=0)
    serial = fa.equivariance_error(committee, [atoms], target, samples=2, seed=0, batched=False)
    for head, want in (("energy", plain["energy"] ** 2), ("forces", (plain["forces"] ** 2).mean())):
        # an equivariant committee: every copy's back-rotated values are its own, the target 0
        torch.testing.assert_close(d.heads[head].total, serial.heads[head].total, rtol=1e-12, atol=0)
        np.testing.assert_allclose(float(d.heads[head].total), want, rtol=1e-10)
    with pytest.raises(ValueError, match="committee of 2 models"):
        fa.equivariance_error(committee, [atoms], target, samples=2, batched=True)


def test_one_batched_call_gives_energy_forces_and_stress(exact):
    """On a periodic cell the batched route's one model call (K copies) yields the stress
    with the energy and forces: asking for the stress after the energy runs no second call."""
    atoms = atoms_of(True)
    a = atoms.copy()
    a.calc = fa.TwirledCalculator(exact, rotations="design:2")
    calls = []
    hook = exact.models[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
    finally:
        hook.remove()
    assert len(calls) == 1
    assert_same({"energy": np.array(e), "forces": f, "stress": s}, compute(exact, atoms), 1e-12)
    m = atoms_of(False)
    m.calc = fa.TwirledCalculator(exact, rotations="design:2")
    m.get_potential_energy()
    assert "stress" not in m.calc.results  # a molecule has none


# --- fastequiv.ase.equivariance_error over a design --------------------------------------------

def _labelled(periodic: bool, count: int = 3) -> list:
    """Structures with the float64 exact MACE's own predictions as labels."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    calc = mace_calculator(tiny_mace())
    for a in structures(periodic, count, seed=6):
        out.append(a.copy())
        out[-1].calc = SinglePointCalculator(out[-1], **compute(calc, a))
    return out


@pytest.mark.parametrize("periodic", [False, True])
def test_equivariance_error_over_a_design_batched_equals_serial_and_the_closed_form(periodic, field_only):
    """Both routes turn structure b's design by rotation r * B + b of the seed's stream: the
    same numbers rotation for rotation. The constant field a is degree 1 in the rotation: the
    degree-1 design's average cancels it and every turn's spread is |a|^2 / 3 per force
    component, so the forces' L_equiv is exactly that; the energy and stress have none."""
    atoms = _labelled(periodic)
    kw = {"rotations": "design:1", "replicates": 3, "seed": 7}
    serial = fa.equivariance_error(field_only, atoms, batched=False, **kw)
    batched = fa.equivariance_error(field_only, atoms, batched=True, **kw)
    assert serial.replicates == batched.replicates == 3 and serial.samples == batched.samples == 12
    for name in ("total", "mean", "equiv"):
        torch.testing.assert_close(getattr(batched, name), getattr(serial, name), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(getattr(batched.rotation_stderr, name), getattr(serial.rotation_stderr, name),
                                   rtol=1e-6, atol=1e-15)
    want = float((FIELD ** 2).sum() / 3)
    for d in (serial, batched):
        torch.testing.assert_close(d.heads["forces"].per_sample.equiv, torch.full((3,), want, dtype=torch.float64),
                                   rtol=1e-10, atol=0)
        assert float(d.heads["energy"].equiv) < 1e-20 and float(d.rotation_stderr.equiv) < 1e-10 * want
        if periodic:
            assert float(d.heads["stress"].equiv) < 1e-20


def test_chunks_of_a_design_pool_their_rotation_stderr(broken):
    """Chunks draw their own turns: the pooled values are the chunks' per-structure values,
    and the rotation standard errors add in quadrature, each weighted by its structures."""
    atoms = _labelled(False, 4)
    kw = {"rotations": "design:1", "replicates": 3, "seed": 2, "batched": True}
    whole = fa.equivariance_error(broken, atoms, chunk_size=2, **kw)
    parts = [fa.equivariance_error(broken, atoms[i:i + 2], **{**kw, "seed": 2 + c})
             for c, i in enumerate((0, 2))]
    torch.testing.assert_close(whole.per_sample.equiv, torch.cat([p.per_sample.equiv for p in parts]))
    for name in ("total", "equiv"):
        want = torch.sqrt(sum((2 * getattr(p.rotation_stderr, name)) ** 2 for p in parts)) / 4
        torch.testing.assert_close(getattr(whole.rotation_stderr, name), want, rtol=1e-12, atol=0)
        assert float(want) > 0  # the well's degree-2 content is not cancelled by the degree-1 design
    assert whole.design.size == 4 and whole.replicates == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"replicates": 2}, "replicates=2 without rotations="),
    ({"rotations": "design:1", "samples": 4}, "a design fixes the number of rotations"),
    ({"rotations": "design:1", "group": "octahedral"}, "but group='octahedral' is a finite group"),
    ({"rotations": "design:1", "replicates": 0}, "replicates must be a positive int"),
])
def test_bad_design_arguments_of_the_calculator_measurement(kwargs, match, exact):
    with pytest.raises(ValueError, match=match):
        fa.equivariance_error(exact, _labelled(False, 1), **kwargs)
