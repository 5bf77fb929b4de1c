"""The scripts in examples/ run end to end at tiny sizes and report sensible numbers."""

import math
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(script, *args):
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert res.returncode == 0, res.stderr[-4000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(line) == 1, res.stdout
    values = dict(item.split("=") for item in line[0].split()[1:])
    values = {k: float(v) for k, v in values.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    return values


def test_force_field_on_graph_batches():
    r = run("force_field_graph.py", "--steps", "8", "--graphs", "4", "--log-every", "4")
    assert r["last_total"] < r["first_total"]
    assert r["last_total"] == pytest.approx(r["last_mean"] + r["last_equiv"], rel=1e-4)
    assert 0 <= r["last_pct"] <= 1 and 0 <= r["forces_pct"] <= 1 and 0 <= r["energy_pct"] <= 1


def test_flow_matching_velocity_field():
    r = run("flow_matching.py", "--steps", "6", "--batch", "16", "--log-every", "3")
    assert r["heldout_total"] == pytest.approx(r["heldout_mean"] + r["heldout_equiv"], rel=1e-4)
    assert r["heldout_equiv"] > 0
    # the Lie-derivative bound holds in expectation; 512 samples leave it far from violated
    assert r["lie_bound"] > 0.5 * r["heldout_equiv"]


def test_test_time_twirl():
    r = run("test_time_twirl.py", "--steps", "20", "--test", "32", "--samples", "4")
    # twirling over the cube removes exactly L_equiv: the twirled MSE is the plain L_mean
    assert r["twirled_mse"] == pytest.approx(r["plain_mean"], rel=1e-4, abs=1e-7)
    assert r["plain_total"] == pytest.approx(r["plain_mean"] + r["plain_equiv"], rel=1e-4)
    assert r["plain_equiv"] > 0 and r["twirled_equiv"] < 1e-8 * max(r["plain_total"], 1.0)


def test_lightning_twirl_loss_logs_the_held_out_decomposition():
    r = run("lightning_twirl_loss.py", "--steps", "6", "--batch", "8", "--train-size", "32", "--held-out", "16",
            "--val-every", "3", "--log-every", "3", "--width", "16", "--layers", "1", "--equiv-weight", "1")
    assert r["validations"] == 2 and r["train_logs"] == 2  # validations after steps 3 and 6; steps 2 and 5 sliced
    assert r["last_total"] == pytest.approx(r["last_mean"] + r["last_equiv"], rel=1e-6)
    assert 0 < r["last_pct"] < 1 and 0 < r["last_train_pct"] < 1 and r["last_total_stderr"] > 0
