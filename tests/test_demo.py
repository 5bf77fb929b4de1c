"""fastequiv demo: the task's physics, and a short run of the command end to end."""

import csv
import os
import subprocess
import sys

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


def test_demo_command_writes_its_log_and_plot(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fastequiv", "demo", "--steps", "24", "--batch-size", "8", "--eval-every", "12",
           "--held-out", "16", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert res.returncode == 0, res.stderr
    assert str(out / "log.csv") in res.stdout and str(out / "decomposition.png") in res.stdout
    with open(out / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert [int(r["step"]) for r in train] == list(range(24))
    assert [int(r["step"]) for r in held] == [0, 1, 2, 5, 10, 12, 24]
    for r in rows:
        total, mean, equiv, pct = (float(r[k]) for k in ("total", "mean", "equiv", "pct"))
        assert total > 0 and equiv >= 0 and abs(total - mean - equiv) < 1e-4 * total
        assert abs(pct - equiv / total) < 1e-5
    assert float(held[-1]["total"]) < float(held[0]["total"])  # it learns, even in 24 steps
    assert (out / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
