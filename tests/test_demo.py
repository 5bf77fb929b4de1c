"""fastequiv demo: the task's physics, the protocol (finite training set, held-out set, EMA),
``--data``, and a short run of the command end to end."""

import argparse
import csv
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import fastequiv as fe
from fastequiv import demo


def test_morse_forces_are_exact_and_equivariant():
    task = demo.ForceTask()
    inputs, forces = task.batch(6, torch.Generator().manual_seed(0))
    pos, species, mask = inputs["pos"].double(), inputs["species"], inputs["mask"]
    assert (forces[~mask] == 0).all() and torch.isfinite(forces).all()
    # -dE/dpos by central differences on one coordinate
    e = lambda p: demo.morse_energy(p, species, mask)  # noqa: E731
    h = 1e-6
    step = torch.zeros_like(pos)
    step[2, 1, 0] = h
    fd = -(e(pos + step) - e(pos - step))[2] / (2 * h) / task.scale
    torch.testing.assert_close(fd, forces[2, 1, 0].double(), rtol=1e-4, atol=1e-5)
    # rotating a cluster rotates its forces: the target is exactly equivariant
    R = fe.random_rotations(1, seed=3, dtype=torch.float64)[0]
    pos2 = (pos @ R.T).requires_grad_(True)
    (g,) = torch.autograd.grad(demo.morse_energy(pos2, species, mask).sum(), pos2)
    torch.testing.assert_close((-g / task.scale).float(), forces @ R.T.float(), rtol=1e-4, atol=1e-5)


def test_the_model_keeps_padding_at_zero_and_rows_independent():
    torch.manual_seed(0)
    task = demo.ForceTask()
    inputs, _ = task.batch(4, torch.Generator().manual_seed(1))
    model = demo.PointTransformer(width=16, heads=2, layers=1).eval()
    out = model(**inputs)
    assert out.shape == inputs["pos"].shape and (out[~inputs["mask"]] == 0).all()
    one = model(**{k: v[1:2] for k, v in inputs.items()})
    torch.testing.assert_close(one, out[1:2], rtol=1e-5, atol=1e-6)


def _same(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and torch.equal(a[1], b[1])


def test_the_training_set_is_fixed_per_seed_and_the_held_out_set_for_every_seed():
    a = demo.datasets(train_size=20, held_out=8, train_eval=5, seed=3)
    b = demo.datasets(train_size=20, held_out=8, train_eval=5, seed=3)
    c = demo.datasets(train_size=20, held_out=8, train_eval=5, seed=4)
    assert a.train[1].shape[0] == 20 and a.heldout[1].shape[0] == 8 and a.train_eval[1].shape[0] == 5
    assert _same(a.train, b.train) and _same(a.heldout, b.heldout)
    assert not _same(a.train, c.train) and _same(a.heldout, c.heldout)
    # the training subset that is decomposed is the first structures of the training set
    assert _same(a.train_eval, demo.take(a.train, torch.arange(5)))
    # a training-eval size above the training set takes all of it
    assert demo.datasets(train_size=6, held_out=4, train_eval=512).train_eval[1].shape[0] == 6
    inf = demo.datasets(train_size=0, held_out=4)
    assert inf.train is None and inf.train_eval is None and inf.task is not None


def test_training_batches_visit_every_structure_once_per_epoch_in_a_new_order():
    batches = demo.batches(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([next(batches) for _ in range(5)])  # 20 indices: two epochs
    first, second = seen[:10], seen[10:]
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)


def _tiny(tmp_path, **kw):
    args = dict(steps=12, batch_size=4, held_out=8, train_size=12, train_eval=4, eval_every=6, progress=False,
                plot=False, out=str(tmp_path / "out"), seed=0)
    return demo.run(**{**args, **kw})


def test_the_evaluated_model_is_an_ema_of_the_weights(tmp_path):
    res = _tiny(tmp_path)
    raw, ema = res["model"], res["ema_model"]
    diffs = [float((p.detach() - q).abs().max()) for p, q in zip(raw.parameters(), ema.parameters())]
    assert max(diffs) > 1e-6  # the average lags the raw weights
    assert res["final"]["heldout"]["equiv"] != res["final_raw"]["heldout"]["equiv"]
    with open(res["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows if r["split"] == "heldout"} == {"ema", "raw"}
    assert [int(r["step"]) for r in rows if r["split"] == "heldout" and r["model"] == "raw"] == [12]

    plain = _tiny(tmp_path, ema=False)
    assert plain["ema_model"] is None and plain["final"] is plain["final_raw"]
    with open(plain["csv"]) as fh:
        assert {r["model"] for r in csv.DictReader(fh)} == {"raw"}


def test_infinite_data_trains_on_fresh_clusters_and_has_no_training_split(tmp_path):
    res = _tiny(tmp_path, train_size=0)
    assert res["datasets"].train is None and res["train"] == [] and "train" not in res["final"]
    with open(res["csv"]) as fh:
        splits = {r["split"] for r in csv.DictReader(fh)}
    assert splits == {"batch", "heldout"}
    assert res["heldout"][-1][1] < res["heldout"][0][1]  # it learns


def _numbers(line: str) -> list:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?", line)]


def test_demo_command_writes_its_log_and_plot(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fastequiv", "demo", "--steps", "24", "--batch-size", "8", "--eval-every", "12",
           "--held-out", "16", "--train-size", "40", "--train-eval", "10", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"},
                         cwd=tmp_path)  # the installed package, not the checkout
    assert res.returncode == 0, res.stderr
    assert str(out / "log.csv") in res.stdout and str(out / "decomposition.png") in res.stdout
    with open(out / "log.csv") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert {"step", "split", "model", "lr", "total", "mean", "equiv", "pct", "mean_worst1pct"} <= set(reader.fieldnames)
    batch = [r for r in rows if r["split"] == "batch"]
    held = [r for r in rows if r["split"] == "heldout" and r["model"] == "ema"]
    train = [r for r in rows if r["split"] == "train" and r["model"] == "ema"]
    assert [int(r["step"]) for r in batch] == list(range(24))
    assert [int(r["step"]) for r in held] == [int(r["step"]) for r in train] == [0, 12, 24]
    lrs = [float(r["lr"]) for r in batch]
    assert max(lrs) == pytest.approx(2e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)  # warmup, then cosine to 0
    for r in rows:
        total, mean, equiv, pct = (float(r[k]) for k in ("total", "mean", "equiv", "pct"))
        assert total > 0 and equiv >= 0 and abs(total - mean - equiv) < 1e-4 * total
        assert abs(pct - equiv / total) < 1e-5
        if r["split"] != "batch":
            assert 0 < float(r["mean_worst1pct"]) <= 1
    assert float(held[-1]["total"]) < float(held[0]["total"])  # it learns, even in 24 steps
    assert (out / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the printed table is the log's evaluations: step, lr, then L_total, L_mean, L_equiv, pct (%)
    # of the held-out and the training sets, to the printed precision
    lines = res.stdout.splitlines()
    table = [_numbers(line) for line in lines if re.match(r"\s*\d+\s+\d\.\d\de[-+]\d\d\s", line)]
    assert len(table) == 3 and all(len(row) == 10 for row in table)
    for row, h, tr in zip(table, held, train):
        assert row[0] == int(h["step"])
        for got, want, digits in zip(row[2:], [h[k] for k in ("total", "mean", "equiv", "pct")]
                                     + [tr[k] for k in ("total", "mean", "equiv", "pct")], (4, 4, 5, 2) * 2):
            scale = 100 if digits == 2 else 1  # pct is printed in percent
            assert got == pytest.approx(scale * float(want), abs=10.0 ** -digits)
    # the summary: a heading and one line per finding (L_mean, L_equiv, pct, the L_equiv
    # trend over the run, the raw weights), whose numbers are the final held-out values
    start = next(i for i, line in enumerate(lines) if line.startswith("At the end"))
    findings = [line for line in lines[start + 1:] if line.startswith("- ")]
    assert len(findings) == 5
    final, raw = held[-1], [r for r in rows if r["split"] == "heldout" and r["model"] == "raw"][-1]
    assert float(f"{float(final['mean']):.4g}") in _numbers(findings[0])
    assert float(f"{float(final['equiv']):.3g}") in _numbers(findings[1])
    assert float(f"{100 * float(final['pct']):.1f}") in _numbers(findings[2])
    assert float(f"{float(raw['equiv']):.3g}") in _numbers(findings[4])


def test_findings_are_the_runs_numbers(tmp_path):
    res = _tiny(tmp_path)
    f = demo.findings(res)
    held, train = res["final"]["heldout"], res["final"]["train"]
    assert f["mean_ratio"] == pytest.approx(held["mean"] / train["mean"])
    assert f["equiv_ratio"] == pytest.approx(held["equiv"] / train["equiv"])
    assert f["heldout_count"] == 8 and f["worst_count"] == 1
    assert f["raw"] is res["final_raw"]["heldout"]
    assert f["equiv_mid"] == (6, res["heldout"][1][3], res["lr"][6])  # evaluations at 0, 6, 12
    assert f["equiv_end"] == (12, res["heldout"][2][3], res["lr"][12])
    pcts = [(s, pct) for s, *_, pct in res["heldout"]]
    stays = [s for i, (s, _) in enumerate(pcts) if all(p < 0.05 for _, p in pcts[i:])]
    assert f["below_5pct_from"] == (stays[0] if stays else None)
    assert demo.findings(res, ema=False)["raw"] is None


@pytest.mark.parametrize("module", ["matplotlib", "tqdm"])
def test_demo_without_its_extra_says_what_to_install(module, tmp_path):
    """Without matplotlib or tqdm (the demo extra) the command exits with the install line,
    before any training."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from fastequiv.__main__ import main\n"
            f"sys.exit(main(['demo', '--steps', '1', '--out', {str(tmp_path / 'out')!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    assert 'pip install "fastequiv[demo]"' in res.stderr and module in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def _write_clusters(path, n=15):
    """Small Cu/Al clusters with EMT forces, written as extxyz."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    import ase.io

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        atoms_n = int(rng.integers(3, 6))
        atoms = Atoms(["Cu" if rng.random() < 0.6 else "Al" for _ in range(atoms_n)],
                      positions=rng.normal(size=(atoms_n, 3)) * 1.5)
        atoms.calc = EMT()
        forces, energy = atoms.get_forces(), atoms.get_potential_energy()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")
    return frames


def test_data_file_structures_are_read_split_and_trained_on(tmp_path, capsys):
    pytest.importorskip("ase")
    path = tmp_path / "clusters.extxyz"
    frames = _write_clusters(path)
    inputs, forces, info = demo.load_structures(str(path))
    assert info["elements"] == [13, 29] and info["periodic"] == 0
    n = len(frames[4])
    assert inputs["mask"][4].sum() == n and not inputs["mask"][4, n:].any()
    torch.testing.assert_close(inputs["pos"][4, :n].double(), torch.tensor(frames[4].positions), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(forces[4, :n].double(), torch.tensor(frames[4].get_forces()), rtol=1e-5, atol=1e-5)
    assert inputs["species"][4, :n].tolist() == [0 if z == 13 else 1 for z in frames[4].numbers]

    sets = demo.datasets(held_out=100, data=str(path))
    assert sets.heldout[1].shape[0] == 3 and sets.train[1].shape[0] == 12  # at most a fifth held out
    m = sets.train[0]["mask"]
    assert float(sets.train[1][m].pow(2).mean()) == pytest.approx(1.0, rel=1e-5)  # forces / their training RMS
    assert demo.datasets(train_size=5, held_out=2, data=str(path)).train[1].shape[0] == 5
    with pytest.raises(ValueError, match="train-size 0"):
        demo.datasets(train_size=0, data=str(path))

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--data", str(path), "--steps", "8", "--batch-size", "4", "--eval-every", "4",
                              "--no-progress", "--out", str(tmp_path / "out")])
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "15 structures of AlCu" in out and "12 for training, 3 held out" in out
    with open(tmp_path / "out" / "log.csv") as fh:
        held = [r for r in csv.DictReader(fh) if r["split"] == "heldout"]
    assert held and all(math.isfinite(float(r["total"])) for r in held)


def test_diagnostics_are_logged_beside_the_decomposition(tmp_path):
    """--diagnostics: the gradient cosine and top Hessian eigenvalues of the evaluated (EMA)
    model, every few steps, in the CSV and the returned curves; the EMA copy keeps no
    gradient flags afterwards."""
    res = _tiny(tmp_path, steps=4, eval_every=4, diagnostics=2, plot=True)
    dyn = res["dynamics"]
    assert [r["step"] for r in dyn] == [0, 2, 4]
    for r in dyn:
        assert -1.0 <= r["cos"] <= 1.0 and r["norm_mean"] > 0 and r["norm_equiv"] > 0
        assert r["top_eig_mean"] > 0 and r["top_eig_equiv"] > 0
    assert not any(p.requires_grad for p in res["ema_model"].parameters())
    with open(res["csv"]) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dynamics"]
    assert len(rows) == 3 and float(rows[0]["top_eig_equiv"]) == pytest.approx(dyn[0]["top_eig_equiv"])
    with pytest.raises(ValueError, match="diagnostics"):
        _tiny(tmp_path, diagnostics=-1)
