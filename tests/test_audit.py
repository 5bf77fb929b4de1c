"""fastequiv audit: per-structure L_equiv of a real (tiny) MACE model, its rounding floor
and its float64 value, against closed forms, an injected symmetry breaking of known size,
a hand loop over single-structure batches, fe.equivariance_error, and the command line
end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import Broken, require

require("mace")
ase = require("ase")
from fastequiv.audit import audit  # noqa: E402
from test_adapt_mace import mace_batch, tiny_mace  # noqa: E402

HEADS = ("energy", "forces", "stress")
O_COLUMN = 2  # MACE's one-hot node_attrs over the atomic numbers [1, 6, 8]: oxygen


def molecules_and_crystals(count: int = 8, seed: int = 0) -> list:
    """Isolated H/C/O molecules and triclinic H/C/O cells, alternately; every third of each
    kind has no oxygen (its numbers from H and C only), with labels as extxyz stores them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = 4 + i % 5
        periodic = i % 2 == 1
        oxygen = (i // 2) % 3 != 0
        numbers = rng.choice([1, 6, 8] if oxygen else [1, 6], n)
        numbers[0] = 8 if oxygen else numbers[0]
        pos = rng.normal(size=(n, 3)) * 1.3
        kwargs = dict(numbers=numbers, positions=pos)
        if periodic:
            cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
            kwargs.update(positions=pos % 4.0, cell=cell, pbc=True)
        atoms = ase.Atoms(**kwargs)
        labels = dict(energy=float(rng.normal()), forces=rng.normal(size=(n, 3)))
        if periodic:
            labels["stress"] = rng.normal(size=6) * 0.01
        atoms.calc = SinglePointCalculator(atoms, **labels)
        out.append(atoms)
    return out


class FieldOnOxygen(Broken):
    """An external field on the forces of the structures that hold an oxygen atom only:
    ``F_i + a e_z`` for every atom of such a structure, whose L_equiv is then ``a^2 / 3``
    in expectation (``R^T e_z`` is uniform on the sphere, each component has variance 1/3);
    the energy and stress are the wrapped model's."""

    def forward(self, inputs):
        out = dict(self.model(inputs))
        batch = inputs["batch"]
        B = out["energy"].shape[0]
        has_o = torch.zeros(B, dtype=torch.bool, device=batch.device).index_put_(
            (batch,), inputs["node_attrs"][:, O_COLUMN] > 0, accumulate=True)
        pull = torch.zeros_like(out["forces"])
        pull[:, 2] = self.strength * has_o[batch].to(pull.dtype)
        out["forces"] = out["forces"] + pull
        return out


def has_oxygen(atoms) -> bool:
    return bool((atoms.numbers == 8).any())


def field_models(mace, strength: float) -> dict:
    return {"isolated": FieldOnOxygen(fe.adapt(mace), strength),
            "periodic": FieldOnOxygen(fe.adapt(mace, stress=True), strength)}


def values(a, head: str, field: str) -> list:
    return [r[f"{head}_{field}"] for r in a.rows]


def test_an_exactly_equivariant_model_in_float64_is_rounding_on_every_structure():
    atoms = molecules_and_crystals(8)
    a = audit(tiny_mace(), atoms, samples=6, seed=1)
    assert a.dtype == "float64" and a.float64 is None and a.calls == 2  # one call per kind: the model is float64
    assert list(a.heads) == list(HEADS)
    for r in a.rows:
        heads = HEADS if r["periodic"] else HEADS[:2]
        for h in heads:
            assert 0 <= r[f"{h}_rel"] < 1e-20, (r["index"], h, r[f"{h}_rel"])
            assert r[f"{h}_floor"] == 0.0 and r[f"{h}_equiv_f64"] == r[f"{h}_equiv"]  # the model is its float64 copy
            assert r[f"{h}_verdict"] == "rounding"
            assert r[f"{h}_max_dev"] < 1e-12
        if not r["periodic"]:
            assert all(r[f"stress_{f}"] is None for f in ("equiv", "rel", "floor", "verdict"))


def test_in_float32_the_floor_accounts_for_the_whole_l_equiv():
    atoms = molecules_and_crystals(8)
    a = audit(tiny_mace().float(), atoms, samples=6, seed=1)
    assert a.dtype == "float32" and a.float64 is None and a.calls == 4
    positive = 0
    for r in a.rows:
        for h in (HEADS if r["periodic"] else HEADS[:2]):
            equiv, floor, learned = r[f"{h}_equiv"], r[f"{h}_floor"], r[f"{h}_equiv_f64"]
            # a_k = a_k^(64) + d_k, so equiv = learned + floor + 2 cov with |cov| <= sqrt(learned floor)
            # (Cauchy-Schwarz over the copies): equality up to that bound, whatever the sizes
            assert abs(equiv - floor - learned) <= 2 * math.sqrt(learned * floor) + 1e-12 * equiv, (r["index"], h)
            assert r[f"{h}_rel_f64"] < 1e-20, (r["index"], h, r[f"{h}_rel_f64"])  # learned: nothing
            assert r[f"{h}_verdict"] == "rounding"
            if equiv > 0:
                positive += 1
                assert abs(floor / equiv - 1) < 1e-3, (r["index"], h, floor, equiv)
                assert 1e-10 < r[f"{h}_rel"] ** 0.5 < 1e-4  # float32 rounding: ~1e-7 relative
    assert positive >= 15


def test_an_injected_field_is_found_at_its_size_on_exactly_the_structures_it_is_on():
    atoms = molecules_and_crystals(12, seed=3)
    assert 0 < sum(map(has_oxygen, atoms)) < len(atoms)
    a_field = 0.05
    a = audit(field_models(tiny_mace().float(), a_field), atoms, samples=16, seed=2)
    size = a_field ** 2 / 3
    z = []
    for r, at in zip(a.rows, atoms):
        if has_oxygen(at):
            assert r["forces_verdict"] == "learned"
            assert r["forces_floor"] < 1e-6 * size < r["forces_equiv_f64"]
            z.append((r["forces_equiv"] - size) / r["forces_stderr"])
            assert abs(z[-1]) < 3, (r["index"], r["forces_equiv"], size, r["forces_stderr"])
            # every atom is pulled the same: the largest deviation is a * max_k ||R_k^T e_z - mean||
            assert 0.5 * a_field < r["forces_max_dev"] < 2 * a_field
        else:
            assert r["forces_verdict"] == "rounding" and r["forces_rel_f64"] < 1e-20
        for h in ("energy",) + (("stress",) if r["periodic"] else ()):
            assert r[f"{h}_verdict"] == "rounding"  # the field is on the forces only
    # the standard errors against the closed form: the estimate is (a^2 / 3) tr S, S the sample
    # covariance of K unit vectors u_k uniform on the sphere, whose trace has variance
    # 2 / (3 K (K - 1)) (||u|| = 1: only the second-order term of the U-statistic is left).
    # The jackknife is conservative (Efron-Stein), most so for such a degenerate U-statistic
    sd = size * math.sqrt(2 / (3 * 16 * 15))
    errors = [r["forces_stderr"] for r, at in zip(a.rows, atoms) if has_oxygen(at)]
    assert 0.9 * sd < np.mean(errors) < 2 * sd
    assert abs(np.mean(z)) < 3 / np.sqrt(len(z))


def test_over_the_cube_group_the_field_is_exact():
    """Over the 24 rotations of the cube, R^T e_z is each of the six directions +-x, +-y,
    +-z four times: the twirled field is 0 and L_equiv is exactly a^2 / 3, with no
    sampling error."""
    atoms = molecules_and_crystals(6, seed=4)
    a = audit(field_models(tiny_mace(), 0.2), atoms, group="octahedral")
    assert a.samples == 24 and a.exhaustive
    for r, at in zip(a.rows, atoms):
        want = 0.2 ** 2 / 3 if has_oxygen(at) else 0.0
        assert r["forces_equiv"] == pytest.approx(want, rel=1e-12, abs=1e-25)
        assert r["forces_stderr"] == 0.0


def _hand_loop(model, atoms, R, head: str = "forces"):
    """``(equiv, stderr, max_dev)`` of one structure by hand: ASE rotates the structure
    (fastequiv.ase.rotated), the adapter builds a batch of that one copy, numpy turns the
    forces back; the jackknife recomputes L_equiv without each copy in turn."""
    from fastequiv.ase import rotated

    K = R.shape[0]
    a = []
    for k in range(K):
        batch = model.model.batch_from_atoms([rotated(atoms, R[k])])  # the wrapped adapter builds it
        with torch.enable_grad():
            f = model(model.prepare(batch))[head].detach().double().numpy().reshape(len(atoms), 3)
        a.append(f @ R[k])  # R^T F row by row
    a = np.stack(a)

    def equiv(x):
        return ((x - x.mean(0)) ** 2).sum() / ((len(x) - 1) * x[0].size)

    leave = np.array([equiv(np.delete(a, j, axis=0)) for j in range(K)])
    stderr = np.sqrt((K - 1) / K * ((leave - leave.mean()) ** 2).sum())
    return equiv(a), stderr, np.linalg.norm(a - a.mean(0), axis=-1).max()


def test_the_numbers_equal_a_hand_loop_over_single_structures():
    atoms = molecules_and_crystals(4, seed=5)
    models = field_models(tiny_mace(), 0.1)
    K, seed = 5, 4
    a = audit(models, atoms, samples=K, seed=seed)
    R = fe.random_rotations(K * len(atoms), seed=seed, dtype=torch.float64).reshape(K, len(atoms), 3, 3).numpy()
    for i, at in enumerate(atoms):
        model = models["periodic" if at.pbc.all() else "isolated"]
        equiv, stderr, max_dev = _hand_loop(model, at, R[:, i])
        r = a.rows[i]
        assert r["forces_equiv"] == pytest.approx(equiv, rel=1e-9)
        assert r["forces_stderr"] == pytest.approx(stderr, rel=1e-8)
        assert r["forces_max_dev"] == pytest.approx(max_dev, rel=1e-9)


@pytest.mark.parametrize("periodic", [False, True])
def test_label_free_and_labelled_runs_agree_on_l_equiv(periodic):
    atoms = [x for x in molecules_and_crystals(8, seed=6) if bool(x.pbc.all()) == periodic]
    mace = tiny_mace()
    model = FieldOnOxygen(fe.adapt(mace, stress=periodic), 0.1)
    K, seed = 4, 9
    a = audit(model, atoms, samples=K, seed=seed)
    batch = mace_batch(atoms, mace)
    labelled = fe.equivariance_error(model, batch, model.targets(batch), samples=K, seed=seed)
    free = fe.equivariance_error(model, batch, samples=K, seed=seed)
    for h in HEADS if periodic else HEADS[:2]:
        got = torch.tensor(values(a, h, "equiv"), dtype=torch.float64)
        torch.testing.assert_close(got, labelled.heads[h].per_sample.equiv, rtol=1e-9, atol=1e-30)
        torch.testing.assert_close(got, free.heads[h].per_sample.equiv, rtol=1e-9, atol=1e-30)
        torch.testing.assert_close(torch.tensor(values(a, h, "rel"), dtype=torch.float64),
                                   free.heads[h].per_sample.rel, rtol=1e-9, atol=1e-30)
        torch.testing.assert_close(a.heads[h].rel, free.heads[h].rel, rtol=1e-9, atol=1e-30)
        torch.testing.assert_close(a.heads[h].stderr.rel, free.heads[h].stderr.rel, rtol=1e-9, atol=1e-30)
    assert float(labelled.heads["forces"].equiv) > 1e-4  # the field's, not rounding


def test_chunks_and_grouping_do_not_change_the_numbers():
    atoms = molecules_and_crystals(6, seed=7)
    models = field_models(tiny_mace(), 0.1)
    whole = audit(models, atoms, samples=3, seed=5)
    pieces = audit(models, atoms, samples=3, seed=5, max_atoms=3 * 8)  # one or two structures a call
    assert pieces.calls > whole.calls
    for r, s in zip(whole.rows, pieces.rows):
        assert r["forces_equiv"] == pytest.approx(s["forces_equiv"], rel=1e-10)
        assert r["forces_max_dev"] == pytest.approx(s["forces_max_dev"], rel=1e-10)


class NarrowInside(Broken):
    """A model that computes in float32 whatever its parameters' dtype: no float64 copy."""

    def forward(self, inputs):
        return {k: v.float() for k, v in self.model(inputs).items()}


class CastBack(Broken):
    """A model that computes in float32 and hands back float64 tensors."""

    def forward(self, inputs):
        return {k: v.float().double() for k, v in self.model(inputs).items()}


@pytest.mark.parametrize("wrapper, why", [(NarrowInside, "narrower dtype"), (CastBack, "is a float32 number")])
def test_a_model_that_cannot_run_in_float64_is_reported_so(wrapper, why):
    atoms = molecules_and_crystals(4)
    a = audit(wrapper(fe.adapt(tiny_mace().float())), [x for x in atoms if not x.pbc.any()], samples=3)
    assert a.float64 is not None and why in a.float64
    assert all(r["forces_floor"] is None and r["forces_verdict"] is None for r in a.rows)
    assert all(r["forces_equiv"] > 0 for r in a.rows)
    from fastequiv.audit.table import summary

    assert "no float64 comparison" in summary(a)


def test_bad_arguments_are_refused():
    atoms = molecules_and_crystals(2)
    with pytest.raises(ValueError, match="samples must be an int >= 2"):
        audit(tiny_mace(), atoms, samples=1)
    with pytest.raises(ValueError, match="atoms_list is empty"):
        audit(tiny_mace(), [])
    with pytest.raises(ValueError, match="max_atoms must be a positive int"):
        audit(tiny_mace(), atoms, max_atoms=0)
    with pytest.raises(ValueError, match="stress head, which isolated structures do not have"):
        audit(fe.adapt(tiny_mace(), stress=True), atoms)


def assert_files_hold(out: Path, rows: list) -> dict:
    """audit.csv and audit.json in ``out`` hold exactly ``rows`` (the API's), floats to the
    last bit; returns the JSON."""
    with open(out / "audit.csv") as f:
        table = list(csv.DictReader(f))
    doc = json.loads((out / "audit.json").read_text())
    assert len(table) == len(doc["structures"]) == len(rows)
    for row, js, want in zip(table, doc["structures"], rows):
        for key, value in want.items():
            if isinstance(value, float):
                assert float(row[key]) == value and js[key] == value, key
            elif value is None:
                assert row[key] == "" and js[key] is None, key
            else:
                assert str(value) == row[key] and js[key] == value, key
    return doc


def test_the_command_line_writes_the_table_the_plots_and_the_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastequiv.__main__ import main

    model_file, data_file, out = tmp_path / "tiny.model", tmp_path / "structures.xyz", tmp_path / "audit"
    torch.save(tiny_mace().float(), model_file)
    atoms = molecules_and_crystals(6, seed=8)
    ase.io.write(data_file, atoms, format="extxyz")
    assert main(["audit", str(model_file), str(data_file), "--samples", "4", "--seed", "3", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 structures (3 isolated, 3 periodic)" in printed and "forces" in printed and "learned" in printed
    for name in ("audit.csv", "audit.json", "report.md", "distribution.png", "size.png"):
        assert (out / name).stat().st_size > 0, name
    # the table's numbers are the API's on the same file and structures
    api = audit(torch.load(model_file, weights_only=False), ase.io.read(data_file, ":"), samples=4, seed=3)
    doc = assert_files_hold(out, api.rows)
    assert len(api.rows) == 6
    assert doc["meta"]["float64"] == "measured" and doc["meta"]["samples"] == 4
    report = (out / "report.md").read_text()
    assert "![distribution](distribution.png)" in report and "Worst 10 structures: forces" in report


def test_the_command_line_takes_module_function_and_says_what_is_wrong(tmp_path, capsys):
    from fastequiv.__main__ import main

    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "mymodel.py").write_text(f"import sys\nsys.path.insert(0, {tests!r})\n"
                                         "from test_adapt_mace import tiny_mace\n\n"
                                         "def build():\n    return tiny_mace()\n")
    data_file = tmp_path / "s.xyz"
    ase.io.write(data_file, molecules_and_crystals(3), format="extxyz")
    out = tmp_path / "o"
    assert main(["audit", f"{tmp_path / 'mymodel.py'}:build", str(data_file), "--samples", "3", "--out", str(out),
                 "--no-plots", "--no-float64", "--no-progress"]) == 0
    assert "no float64 comparison: not asked for" in capsys.readouterr().out
    assert not (out / "size.png").exists() and "No plots: --no-plots" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="no such file"):
        main(["audit", str(tmp_path / "missing.model"), str(data_file)])
    with pytest.raises(ValueError, match="DATA must be a file"):
        main(["audit", f"{tmp_path / 'mymodel.py'}:build", str(tmp_path / "missing.xyz")])


@pytest.fixture
def nequip_dtype():
    """nequip's global state sets torch's default dtype to float64, TorchScript's fusion
    strategy and e3nn's code generation (TorchScript, whose MACE models cannot be pickled)
    for good: the tests after this one get theirs back (as tests/test_adapt_nequip.py's)."""
    require("nequip")
    import e3nn

    before = torch.get_default_dtype()
    fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])  # returns the one in force
    torch.jit.set_fusion_strategy(fusion)
    e3nn_defaults = e3nn.get_optimization_defaults()
    yield
    torch.set_default_dtype(before)
    torch.jit.set_fusion_strategy(fusion)
    e3nn.set_optimization_defaults(**e3nn_defaults)


def test_a_second_codebase_nequip_in_float64_and_in_float32(nequip_dtype):
    """A float64 NequIP is exact on every structure; a float32 one is nequip's float32 model
    (its model_dtype), whose float64 copy does not run: the audit says so and reports the
    float32 numbers alone."""
    from test_adapt_nequip import tiny_nequip

    atoms = molecules_and_crystals(6, seed=11)
    exact = audit(tiny_nequip(), atoms, samples=4, seed=0)
    assert exact.float64 is None and set(exact.heads) == set(HEADS)
    assert all(r[f"{h}_rel"] < 1e-20 for r in exact.rows for h in (HEADS if r["periodic"] else HEADS[:2]))
    from nequip.model import NequIPGNNModel

    narrow = NequIPGNNModel(seed=0, model_dtype="float32", type_names=["H", "C", "O"], r_max=4.0, num_layers=2,
                            l_max=1, num_features=4, radial_mlp_width=8, num_bessels=4, avg_num_neighbors=4.0,
                            per_type_energy_scales=1.0, per_type_energy_shifts=0.0)
    a = audit(narrow, atoms, samples=4, seed=0)
    assert a.dtype == "float32" and a.float64 is not None and "float64 copy of the model failed" in a.float64
    assert all(r["forces_floor"] is None and 0 < r["forces_rel"] < 1e-10 for r in a.rows)
