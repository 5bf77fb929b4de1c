"""fastequiv audit with a rotation design (``rotations=``, ``replicates=``) on a real (tiny)
MACE model: exact where the design is (a uniform field on the forces against its closed
form), a hand computation of the randomised-design estimator over the same turned
copies, the numbers independent of chunking, the refusals, and the command line end to
end."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from adapters import Broken, require

import fastequiv as fe
from fastequiv import designs

require("mace")
ase = require("ase")
from test_adapt_mace import tiny_mace
from test_audit import HEADS, O_COLUMN, assert_files_hold, field_models, has_oxygen, molecules_and_crystals

from fastequiv.audit import audit


def isolated(count: int, seed: int) -> list:
    return [a for a in molecules_and_crystals(2 * count, seed=seed) if not a.pbc.any()]


class Skewed(Broken):
    """Forces plus ``a tanh(r_i - c)`` (``c`` the structure's centroid), element by
    element: not equivariant, with content at every degree, so no design averages it
    exactly and the turns matter; the energy and stress are the wrapped model's."""

    def forward(self, inputs):
        out = dict(self.model(inputs))
        pos, batch = inputs[self.positions], inputs[self.spec.graph["batch"]]
        B = out["energy"].shape[0]
        n = torch.zeros(B, dtype=pos.dtype, device=pos.device).index_add(0, batch, torch.ones_like(pos[:, 0]))
        c = torch.zeros(B, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, pos) / n[:, None]
        out["forces"] = out["forces"] + self.strength * torch.tanh(pos - c[batch]).to(out["forces"].dtype)
        return out


class DipoleEnergy(Broken):
    """Energy plus ``a e_z . d``, ``d = sum over the oxygen atoms of (r_i - c)``: a twisted
    prediction of degree 1 whose squared deviation ``a^2 (e_z . g d)^2`` has degree 2, with
    ``L_equiv = a^2 ||d||^2 / 3``; the forces and stress are the wrapped model's."""

    def forward(self, inputs):
        out = dict(self.model(inputs))
        pos, batch = inputs[self.positions], inputs[self.spec.graph["batch"]]
        B = out["energy"].shape[0]
        n = torch.zeros(B, dtype=pos.dtype).index_add(0, batch, torch.ones_like(pos[:, 0]))
        c = torch.zeros(B, 3, dtype=pos.dtype).index_add(0, batch, pos) / n[:, None]
        q = (inputs["node_attrs"][:, O_COLUMN] > 0).to(pos.dtype)
        d = torch.zeros(B, 3, dtype=pos.dtype).index_add(0, batch, q[:, None] * (pos - c[batch]))
        out["energy"] = out["energy"] + self.strength * d[:, 2].to(out["energy"].dtype)
        return out


def test_an_exactly_equivariant_model_in_float64_is_rounding_with_a_design():
    atoms = molecules_and_crystals(4)
    a = audit(tiny_mace(), atoms, rotations="design:2", replicates=2, seed=1)
    name = designs.design("design:2").name  # a sphere rule times 3 in-plane angles
    assert (a.rotations, a.degree, a.design_size, a.replicates) == (name, 2, 12, 2)
    assert a.samples == 24 and not a.exhaustive and a.calls == 2 and a.float64 is None
    assert list(a.heads) == list(HEADS) and all(a.heads[h].exact for h in HEADS)
    for r in a.rows:
        for h in HEADS if r["periodic"] else HEADS[:2]:
            assert 0 <= r[f"{h}_rel"] < 1e-20, (r["index"], h, r[f"{h}_rel"])
            assert r[f"{h}_floor"] == 0.0 and r[f"{h}_equiv_f64"] == r[f"{h}_equiv"]
            assert r[f"{h}_verdict"] == "rounding" and r[f"{h}_max_dev"] < 1e-12
            assert math.isnan(r[f"{h}_stderr"])  # R = 2: no jackknife over replicates
    assert f"design {name} (12 SO3 rotations, degree 2) turned by R=2" in a.describe()


@pytest.mark.parametrize("replicates", [1, 2, 3])
def test_a_uniform_field_is_measured_exactly_by_a_design_of_degree_one(replicates):
    """``a_k = f + a (G R_k)^T e_z``: the design of degree 1 averages ``R_k^T`` to 0, so
    every replicate's average is the twirled prediction (``s = 0``), and each deviation has
    norm ``a`` whatever the turn: L_equiv = a^2 / 3 on each oxygen structure, to float
    rounding, for any R (not only in expectation), and the jackknife over replicates 0."""
    atoms = molecules_and_crystals(6, seed=4)
    assert 0 < sum(map(has_oxygen, atoms)) < len(atoms)
    a_field = 0.2
    a = audit(field_models(tiny_mace(), a_field), atoms, rotations="design:1", replicates=replicates, seed=2)
    assert (a.design_size, a.degree, a.samples) == (4, 1, 4 * replicates)
    size = a_field ** 2 / 3
    for r, at in zip(a.rows, atoms):
        if has_oxygen(at):
            assert r["forces_equiv"] == pytest.approx(size, rel=1e-12)
            assert r["forces_max_dev"] == pytest.approx(a_field, rel=1e-12)
            assert r["forces_verdict"] == "learned"
        else:
            assert 0 <= r["forces_equiv"] < 1e-25 * size and r["forces_verdict"] == "rounding"
        if replicates >= 3:
            assert 0 <= r["forces_stderr"] < 1e-12 * size  # finite, and 0 to rounding: nothing random is left
        else:
            assert math.isnan(r["forces_stderr"])
    # the batch level: the mean of the per-structure values (every structure has forces)
    assert float(a.heads["forces"].equiv) == pytest.approx(np.mean([r["forces_equiv"] for r in a.rows]), rel=1e-12)
    assert a.heads["forces"].exact == (replicates >= 2) and a.heads["forces"].samples == 4 * replicates


def test_exactness_needs_the_squared_deviation_within_the_degree():
    """An energy field of degree 1 (:class:`DipoleEnergy`): a design of degree 1 averages the
    prediction exactly but not its squared deviation (degree 2), so its per-structure L_equiv
    is off by tens of percent (unbiased over the turns only); degree 2 is exact."""
    atoms = isolated(4, seed=4)
    strength = 0.5
    want = []
    for at in atoms:
        p = at.get_positions()
        d = ((at.numbers == 8)[:, None] * (p - p.mean(0))).sum(0)
        want.append(strength ** 2 * float(d @ d) / 3)
    assert sum(w > 0 for w in want) >= 2
    model = DipoleEnergy(fe.adapt(tiny_mace()), strength)
    exact = audit(model, atoms, rotations="design:2", replicates=2, seed=0, float64=False)
    rough = audit(model, atoms, rotations="design:1", replicates=2, seed=0, float64=False)
    errors = []
    for r, s, w in zip(exact.rows, rough.rows, want):
        if w > 0:
            assert r["energy_equiv"] == pytest.approx(w, rel=1e-12)
            errors.append(abs(s["energy_equiv"] / w - 1))
    assert max(errors) > 0.05, errors


def _copies(model, atoms, rotations: np.ndarray) -> dict:
    """Each head's back-rotated output on each copy ``(C, ...)``: ASE rotates the structure
    (fastequiv.ase.rotated), the wrapped adapter builds a batch of that one copy, numpy
    turns the forces back."""
    from fastequiv.ase import rotated

    energy, forces = [], []
    for R in rotations:
        batch = model.model.batch_from_atoms([rotated(atoms, R)])
        with torch.enable_grad():
            out = model(model.prepare(batch))
        energy.append(out["energy"].detach().double().numpy().reshape(1))
        forces.append(out["forces"].detach().double().numpy().reshape(len(atoms), 3) @ R)  # R^T F row by row
    return {"energy": np.stack(energy), "forces": np.stack(forces)}


def _by_hand(a: np.ndarray, w: np.ndarray, R: int) -> tuple:
    """``(equiv, norm)`` of the randomised-design estimator from the copies ``a`` ``(R K, ...)``
    (copy ``r K + k``) and the design's weights: means over the output elements."""
    K = len(w)
    a = a.reshape((R, K) + a.shape[1:])
    n = a[0, 0].size
    wk = w.reshape((1, K) + (1,) * (a.ndim - 2))
    abar = (wk * a).sum(1)  # (R, ...)
    within = np.array([sum(w[k] * ((a[r, k] - abar[r]) ** 2).sum() for k in range(K)) / n for r in range(R)])
    ubar = abar.mean(0)
    s = np.mean([((abar[r] - ubar) ** 2).sum() / n for r in range(R)])
    equiv = within.mean() + R / (R - 1) * s
    norm = (ubar ** 2).sum() / n - s / (R - 1)
    return equiv, norm


def test_the_numbers_equal_a_hand_computation_over_the_same_turned_copies():
    atoms = isolated(3, seed=5)
    N, R, seed = len(atoms), 3, 7
    model = Skewed(fe.adapt(tiny_mace()), 0.3)
    a = audit(model, atoms, rotations="design:1", replicates=R, seed=seed)
    design = designs.design("design:1")
    D, w = design.rotations.numpy(), design.weights.numpy()
    G = fe.random_rotations(R * N, seed=seed, dtype=torch.float64).reshape(R, N, 3, 3).numpy()  # G[r, i]: r N + i
    for i, at in enumerate(atoms):
        turns = np.stack([G[r, i] @ D[k] for r in range(R) for k in range(len(w))])  # copy r K + k
        copies = _copies(model, at, turns)
        x, row, K = copies["forces"], a.rows[i], len(w)
        equiv, norm = _by_hand(x, w, R)
        assert equiv > 1e-4  # the skew's, far above rounding
        assert row["forces_equiv"] == pytest.approx(equiv, rel=1e-9)
        assert row["forces_rel"] == pytest.approx(equiv / norm, rel=1e-9)
        by_replicate = x.reshape((R, K) + x.shape[1:])
        leave = np.array([_by_hand(np.delete(by_replicate, r, axis=0).reshape((-1,) + x.shape[1:]), w, R - 1)[0]
                          for r in range(R)])
        stderr = np.sqrt((R - 1) / R * ((leave - leave.mean()) ** 2).sum())
        assert stderr > 1e-3 * equiv and row["forces_stderr"] == pytest.approx(stderr, rel=1e-7)
        twirled = (w[None, :, None, None] * by_replicate).sum(1).mean(0)
        assert row["forces_max_dev"] == pytest.approx(np.linalg.norm(x - twirled, axis=-1).max(), rel=1e-9)
        # the energy is MACE's own, invariant: rounding
        assert 0 <= row["energy_rel"] < 1e-20 and _by_hand(copies["energy"], w, R)[0] < 1e-20


def test_chunks_and_grouping_do_not_change_the_numbers():
    atoms = molecules_and_crystals(6, seed=7)
    mace = tiny_mace()
    models = {"isolated": Skewed(fe.adapt(mace), 0.2), "periodic": Skewed(fe.adapt(mace, stress=True), 0.2)}
    R, K = 3, 4
    whole = audit(models, atoms, rotations="design:1", replicates=R, seed=5)
    pieces = audit(models, atoms, rotations="design:1", replicates=R, seed=5, max_atoms=R * K * 8)  # 1-2 a call
    assert pieces.calls > whole.calls == 2
    for r, s in zip(whole.rows, pieces.rows):
        assert r["forces_equiv"] > 1e-4
        for f in ("equiv", "rel", "stderr", "max_dev"):
            assert r[f"forces_{f}"] == pytest.approx(s[f"forces_{f}"], rel=1e-10), f
    torch.testing.assert_close(whole.heads["forces"].equiv, pieces.heads["forces"].equiv, rtol=1e-10, atol=0)


def test_bad_arguments_are_refused():
    atoms = molecules_and_crystals(2)
    mace = tiny_mace()
    with pytest.raises(ValueError, match="samples=8 with rotations='design:3'"):
        audit(mace, atoms, rotations="design:3", samples=8)
    with pytest.raises(ValueError, match="rotations=.design:3. averages over SO.3. or O.3., but group=.octahedral. is a finite group"):
        audit(mace, atoms, rotations="design:3", group="octahedral")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="replicates must be a positive int"):
            audit(mace, atoms, rotations="design:3", replicates=bad)
    with pytest.raises(ValueError, match="replicates=3 without rotations=: replicates are independent turns"):
        audit(mace, atoms, samples=4, replicates=3)
    with pytest.raises(ValueError, match="rotations must be 'design:L' or 'lebedev:L'"):
        audit(mace, atoms, rotations="design")
    with pytest.raises(ValueError, match="rotations is a design on SO3, but the group is O3"):
        audit(mace, atoms, rotations=designs.design("design:1"), group="O3")


def test_the_command_line_with_a_design_writes_it_into_the_table_and_the_summary(tmp_path, capsys):
    import ase.io

    from fastequiv.__main__ import main

    model_file, data_file, out = tmp_path / "tiny.model", tmp_path / "structures.xyz", tmp_path / "audit"
    torch.save(tiny_mace().float(), model_file)
    ase.io.write(data_file, molecules_and_crystals(4, seed=8), format="extxyz")
    assert main(["audit", str(model_file), str(data_file), "--rotations", "design:3", "--replicates", "3",
                 "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "design octahedral (24 SO3 rotations, degree 3) turned by R=3 Haar rotations: 72 copies" in printed
    api = audit(torch.load(model_file, weights_only=False), ase.io.read(data_file, ":"), rotations="design:3",
                replicates=3, seed=3)
    doc = assert_files_hold(out, api.rows)
    assert len(api.rows) == 4
    for want in api.rows:
        for h in HEADS if want["periodic"] else HEADS[:2]:
            # float32 model: a_k = a_k^(64) + d_k and equiv is a positive quadratic form in the copies, so
            # equiv = equiv_f64 + floor + 2 cov with |cov| <= sqrt(equiv_f64 floor)
            equiv, floor, learned = want[f"{h}_equiv"], want[f"{h}_floor"], want[f"{h}_equiv_f64"]
            assert abs(equiv - floor - learned) <= 2 * math.sqrt(learned * floor) + 1e-12 * equiv, h
            assert want[f"{h}_verdict"] == "rounding" and math.isfinite(want[f"{h}_stderr"])
    meta = doc["meta"]
    assert (meta["rotations"], meta["degree"], meta["design_size"], meta["replicates"], meta["samples"]) == \
        ("octahedral", 3, 24, 3, 72)
    assert "R Haar turns of the design" in doc["columns"]["stderr"]
    report = (out / "report.md").read_text()
    assert "design octahedral" in report and "R Haar turns of the design" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "distribution.png").stat().st_size > 0 and (out / "size.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--samples 8 with --rotations design:3"):
        main(["audit", str(model_file), str(data_file), "--rotations", "design:3", "--samples", "8", "--out", str(out)])
    with pytest.raises(ValueError, match="--replicates 3 turns a rotation design: pass --rotations"):
        main(["audit", str(model_file), str(data_file), "--replicates", "3", "--out", str(out)])
