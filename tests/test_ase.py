"""fastequiv.ase against ASE's own EMT calculator (exactly equivariant) and a calculator
broken on purpose, whose decomposition is recomputed here by a plain numpy loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ase")

from ase.build import bulk  # noqa: E402
from ase.calculators.calculator import Calculator, all_changes  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.cluster import Icosahedron, Octahedron  # noqa: E402
from ase.constraints import FixAtoms  # noqa: E402

import fastequiv as fe  # noqa: E402
import fastequiv.ase as fa  # noqa: E402

# measured: pct and every head's pct of EMT are 1e-28 .. 1e-25 (squared float noise of
# energies ~ 1 eV, forces ~ 1 eV/A); the bound is three orders above the largest
EMT_PCT_BOUND = 1e-22


def _perturbed(atoms, scale, rng):
    a = atoms.copy()
    a.positions = a.positions + rng.normal(scale=scale, size=a.positions.shape)
    return a


def clusters(seed=0):
    """Cu clusters of 13, 6 and 4 atoms (icosahedron, octahedron, an fcc cube), perturbed."""
    rng = np.random.default_rng(seed)
    out = []
    for a in (Icosahedron("Cu", 2), Octahedron("Cu", 2), bulk("Cu", "fcc", a=3.6, cubic=True)):
        a = _perturbed(a, 0.05, rng)
        a.pbc = False
        a.cell = None
        out.append(a)
    return out


def triclinic(seed=0):
    """Periodic Cu crystals in a sheared (genuinely triclinic) cell, 4 and 8 atoms, perturbed."""
    rng = np.random.default_rng(seed)
    c = bulk("Cu", "fcc", a=3.6, cubic=True)
    shear = np.eye(3) + np.array([[0.0, 0.08, 0.05], [0.0, 0.0, 0.1], [0.0, 0.0, 0.0]])
    c.set_cell(np.asarray(c.cell) @ shear, scale_atoms=True)
    angles = c.cell.cellpar()[3:]
    assert np.all(np.abs(angles - 90) > 2) and len(set(np.round(angles, 3))) == 3  # three different, none 90
    return [_perturbed(c, 0.05, rng), _perturbed(c.repeat((1, 1, 2)), 0.05, rng)]


def reference(atoms_list, seed=1, calc_factory=EMT):
    """Targets: EMT on slightly displaced copies of the structures."""
    rng = np.random.default_rng(seed)
    targets = []
    for a in atoms_list:
        b = _perturbed(a, 0.03, rng)
        b.calc = calc_factory()
        t = {"energy": b.get_potential_energy(), "forces": b.get_forces()}
        if a.pbc.all():
            t["stress"] = b.get_stress()
        targets.append(t)
    return targets


class Broken(Calculator):
    """EMT plus an anisotropic harmonic well about the centroid and a fixed anisotropic
    stress: energy and forces stay consistent, but nothing is rotation-equivariant."""

    implemented_properties = ["energy", "forces", "stress"]
    A = np.diag([0.08, 0.02, -0.03]) + 0.01

    def __init__(self, stress=True, **kw):
        super().__init__(**kw)
        self.emt = EMT()
        if not stress:
            self.implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        u = a.positions - a.positions.mean(0)
        self.results["energy"] = self.emt.get_property("energy", a) + 0.5 * np.einsum("ni,ij,nj->", u, self.A, u)
        self.results["forces"] = self.emt.get_property("forces", a) - u @ self.A
        if "stress" in properties:
            self.results["stress"] = self.emt.get_property("stress", a) + np.array([0.01, 0, 0, 0, 0.004, 0])


def hand_loop(calc, atoms_list, targets, K, seed, props, weights=None):
    """The decomposition by the definitions, in numpy: per structure and property the
    back-rotated predictions a_k, total = mean_k |a_k - y|^2, bias = |abar - y|^2,
    spread = mean_k |a_k - abar|^2 (each a mean over the components), the unbiased
    estimators, batch means per property, their weighted sum."""
    B = len(atoms_list)
    R = fe.random_rotations(K * B, seed=seed, dtype=torch.float64).numpy().reshape(K, B, 3, 3)
    per = {p: [] for p in props}
    for b, atoms in enumerate(atoms_list):
        preds = {p: [] for p in props}
        for k in range(K):
            Rk = R[k, b]
            a = atoms.copy()
            if atoms.pbc.any():
                a.set_cell(np.asarray(atoms.cell) @ Rk.T, scale_atoms=False)
                a.positions = atoms.positions @ Rk.T
            else:
                c = atoms.positions.mean(0)
                a.positions = (atoms.positions - c) @ Rk.T + c
            a.calc = calc
            if "energy" in props:
                preds["energy"].append(np.array([a.get_potential_energy()]))
            if "forces" in props:
                preds["forces"].append(a.get_forces() @ Rk)
            if "stress" in props:
                preds["stress"].append(Rk.T @ a.get_stress(voigt=False) @ Rk)
        for p in props:
            ak = np.stack(preds[p])
            y = np.asarray(targets[b][p], dtype=float)
            if p == "stress" and y.shape == (6,):
                y = np.array([[y[0], y[5], y[4]], [y[5], y[1], y[3]], [y[4], y[3], y[2]]])
            y = y.reshape(ak.shape[1:])
            abar = ak.mean(0)
            total = ((ak - y) ** 2).mean()
            bias = ((abar - y) ** 2).mean()
            spread = ((ak - abar) ** 2).mean()
            per[p].append((total, bias - spread / (K - 1), spread * K / (K - 1)))
    heads = {p: np.mean(per[p], axis=0) for p in props}
    w = weights or {p: 1.0 for p in props}
    top = sum(w[p] * heads[p] for p in props)
    return top, heads


def test_emt_clusters_equivariant_to_float_noise():
    atoms = clusters()
    d = fa.equivariance_error(EMT(), atoms, target=reference(atoms), samples=6, seed=3)
    assert set(d.heads) == {"energy", "forces"}  # not periodic: no stress head
    assert float(d.total) > 1e-4
    assert float(d.pct) < EMT_PCT_BOUND
    for h in d.heads.values():
        assert float(h.pct) < EMT_PCT_BOUND
    np.testing.assert_allclose(float(d.mean + d.equiv), float(d.total), rtol=1e-12)


def test_emt_triclinic_periodic_with_stress():
    atoms = triclinic()
    d = fa.equivariance_error(EMT(), atoms, target=reference(atoms), samples=6, seed=4)
    assert set(d.heads) == {"energy", "forces", "stress"}
    assert float(d.heads["stress"].total) > 1e-8
    assert float(d.pct) < EMT_PCT_BOUND
    for h in d.heads.values():
        assert float(h.pct) < EMT_PCT_BOUND


def test_broken_matches_hand_loop_mixed_batch():
    """Clusters and crystals together: the stress head covers the periodic ones only."""
    atoms = clusters() + triclinic()
    targets = reference(atoms)
    K, seed = 4, 11
    weights = {"energy": 0.5, "forces": 2.0, "stress": 100.0}
    d = fa.equivariance_error(Broken(), atoms, target=targets, samples=K, seed=seed, loss_weights=weights)
    assert set(d.heads) == {"energy", "forces", "stress"}
    assert float(d.pct) > 1e-3
    top = np.zeros(3)
    for p in ("energy", "forces"):
        _, heads = hand_loop(Broken(), atoms, targets, K, seed, (p,))
        np.testing.assert_allclose([float(d.heads[p].total), float(d.heads[p].mean), float(d.heads[p].equiv)],
                                   heads[p], rtol=1e-10, atol=1e-14)
        top += weights[p] * heads[p]
    # the stress head: the periodic structures only; same rotations (rotation k * B + b of the stream)
    periodic = [i for i, a in enumerate(atoms) if a.pbc.all()]
    B = len(atoms)
    R = fe.random_rotations(K * B, seed=seed, dtype=torch.float64).reshape(K, B, 3, 3).numpy()
    vals = []
    for b in periodic:
        ak = []
        for k in range(K):
            a = atoms[b].copy()
            a.set_cell(np.asarray(atoms[b].cell) @ R[k, b].T, scale_atoms=False)
            a.positions = atoms[b].positions @ R[k, b].T
            a.calc = Broken()
            ak.append(R[k, b].T @ a.get_stress(voigt=False) @ R[k, b])
        ak = np.stack(ak)
        s = targets[b]["stress"]
        y = np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
        abar = ak.mean(0)
        spread = ((ak - abar) ** 2).mean()
        vals.append((((ak - y) ** 2).mean(), ((abar - y) ** 2).mean() - spread / (K - 1), spread * K / (K - 1)))
    stress = np.mean(vals, axis=0)
    np.testing.assert_allclose([float(d.heads["stress"].total), float(d.heads["stress"].equiv)],
                               [stress[0], stress[2]], rtol=1e-10)
    top += weights["stress"] * stress
    np.testing.assert_allclose([float(d.total), float(d.mean), float(d.equiv)], top, rtol=1e-10)
    np.testing.assert_allclose(float(d.pct), top[2] / top[0], rtol=1e-10)


def test_broken_clusters_hand_loop_and_default_targets():
    """Targets stored on the structures (SinglePointCalculator, as read from extxyz); a
    FixAtoms constraint changes nothing (the calculator's raw outputs are measured)."""
    atoms = clusters(seed=5)
    targets = reference(atoms, seed=6)
    stored = []
    for a, t in zip(atoms, targets):
        a = a.copy()
        a.set_constraint(FixAtoms(indices=[0, 2]))
        a.calc = SinglePointCalculator(a, **t)
        stored.append(a)
    d = fa.equivariance_error(Broken(), stored, samples=3, seed=2)
    top, heads = hand_loop(Broken(), atoms, targets, 3, 2, ("energy", "forces"))
    np.testing.assert_allclose([float(d.total), float(d.mean), float(d.equiv)], top, rtol=1e-10)
    assert float(d.pct) > 1e-3
    np.testing.assert_allclose(float(d.pct), top[2] / top[0], rtol=1e-10)
    for a in stored:  # the structures are left as they were
        assert isinstance(a.calc, SinglePointCalculator)


def test_exhaustive_finite_group_is_exact():
    atoms = clusters()[1:]
    d = fa.equivariance_error(Broken(), atoms, target=reference(atoms), group="octahedral")
    assert d.samples == 24 and d.exhaustive and d.exact
    assert float(d.pct) > 1e-3


def _cube_rotation():
    g = fe.group_elements("octahedral", dtype=torch.float64).numpy()
    # a rotation that is not a symmetry of the calculator's anisotropic well
    return g[5]


def test_twirled_calculator_octahedral_cluster_invariant():
    x = clusters()[0]
    g = _cube_rotation()
    y = x.copy()
    y.positions = x.positions @ g.T
    # the broken calculator itself is not invariant under g
    e_broken = [Broken().get_property("energy", a) for a in (x, y)]
    assert abs(e_broken[0] - e_broken[1]) > 1e-3
    tw = fa.TwirledCalculator(Broken(), group="octahedral")
    assert tw.samples == 24 and set(tw.implemented_properties) == {"energy", "forces", "stress"}
    ex, fx = tw.get_property("energy", x), tw.get_property("forces", x)
    ey, fy = tw.get_property("energy", y), tw.get_property("forces", y)
    np.testing.assert_allclose(ey, ex, rtol=1e-13)
    np.testing.assert_allclose(fy, fx @ g.T, atol=1e-13)
    # through the Atoms interface too
    y.calc = tw
    np.testing.assert_allclose(y.get_potential_energy(), ex, rtol=1e-13)


def test_twirled_calculator_octahedral_periodic_stress_rotates():
    x = triclinic()[0]
    g = _cube_rotation()
    y = x.copy()
    y.set_cell(np.asarray(x.cell) @ g.T, scale_atoms=False)
    y.positions = x.positions @ g.T
    tw = fa.TwirledCalculator(Broken(), group="octahedral")
    x.calc = tw
    sx, ex, fx = x.get_stress(voigt=False), x.get_potential_energy(), x.get_forces()
    y.calc = tw
    np.testing.assert_allclose(y.get_potential_energy(), ex, rtol=1e-13)
    np.testing.assert_allclose(y.get_forces(), fx @ g.T, atol=1e-13)
    np.testing.assert_allclose(y.get_stress(voigt=False), g @ sx @ g.T, atol=1e-13)
    b = Broken()
    assert np.abs(b.get_property("stress", y) - b.get_property("stress", x)).max() > 1e-3


def test_twirled_calculator_so3_matches_mean_and_keeps_emt():
    x = triclinic()[0]
    tw = fa.TwirledCalculator(EMT(), samples=3, seed=9)
    x.calc = EMT()
    e, f, s = x.get_potential_energy(), x.get_forces(), x.get_stress()
    x.calc = tw
    np.testing.assert_allclose(x.get_potential_energy(), e, rtol=1e-12)
    np.testing.assert_allclose(x.get_forces(), f, atol=1e-11)
    np.testing.assert_allclose(x.get_stress(), s, atol=1e-12)
    # the twirled broken calculator is the mean over the same fixed rotations
    R = fe.random_rotations(3, seed=9, dtype=torch.float64).numpy()
    y = clusters()[2]
    y.calc = fa.TwirledCalculator(Broken(), samples=3, seed=9)
    es, fs = [], []
    for Rk in R:
        a = y.copy()
        c = y.positions.mean(0)
        a.positions = (y.positions - c) @ Rk.T + c
        a.calc = Broken()
        es.append(a.get_potential_energy())
        fs.append(a.get_forces() @ Rk)
    np.testing.assert_allclose(y.get_potential_energy(), np.mean(es), rtol=1e-13)
    np.testing.assert_allclose(y.get_forces(), np.mean(fs, axis=0), atol=1e-13)


def test_bad_inputs():
    atoms = clusters()
    targets = reference(atoms)
    with pytest.raises(ValueError, match=r"atoms_list is empty"):
        fa.equivariance_error(EMT(), [], target=[])
    with pytest.raises(ValueError, match=r"samples=1 cannot estimate L_equiv"):
        fa.equivariance_error(EMT(), atoms, target=targets, samples=1)
    with pytest.raises(ValueError, match=r"properties=.*cannot compute 'stress'.*implemented_properties"):
        fa.equivariance_error(Broken(stress=False), triclinic(), target=reference(triclinic()),
                              properties=("energy", "stress"))
    with pytest.raises(ValueError, match=r"properties=.*not periodic in all three directions"):
        fa.equivariance_error(EMT(), atoms, target=targets, properties=("forces", "stress"))
    with pytest.raises(ValueError, match=r"properties=.*measures .*not 'magmom'"):
        fa.equivariance_error(EMT(), atoms, target=targets, properties=("magmom",))
    with pytest.raises(ValueError, match=r"target=None .* none of the structures"):
        fa.equivariance_error(EMT(), atoms)
    with pytest.raises(ValueError, match=r"target must be a list of 3 dicts"):
        fa.equivariance_error(EMT(), atoms, target=targets[:2])
    with pytest.raises(ValueError, match=r"target\[0\]\['forces'\] must have shape \(13, 3\)"):
        fa.equivariance_error(EMT(), atoms, target=[{"energy": 0.0, "forces": np.zeros((4, 3))}] + targets[1:])
    with pytest.raises(ValueError, match=r"loss_weights"):
        fa.equivariance_error(EMT(), atoms, target=targets, loss_weights={"stress": 1.0})
    with pytest.raises(ValueError, match=r"group must be one of"):
        fa.TwirledCalculator(EMT(), group="cubic")


def test_import_fastequiv_does_not_import_ase():
    import subprocess
    import sys
    import tempfile

    code = "import sys, fastequiv; assert 'ase' not in sys.modules and 'fastequiv.ase' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir(), timeout=300)
