"""The rotation designs' comparison (:mod:`fastequiv.bench.designs`) and its script,
benchmarks/designs_compare.py, in its smallest mode: the closed forms it measures against
agree with a design far above the models' degrees, every case runs, and the CSV and plot
are written. The ratios it reports are not asserted here (tests/test_designs.py tests the
estimators; benchmarks/RESULTS.md quotes a full run); tests/test_bench.py runs the same
module through ``fastequiv bench --ops designs``."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import fastequiv as fe
from fastequiv.bench import designs as m

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "designs_compare.py"


def _script():
    spec = importlib.util.spec_from_file_location("designs_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_closed_forms():
    """A design of degree 12 (1118 rotations: Lebedev needs scipy) against the closed forms:
    the smooth model's content above degree 12 is below 1e-10, the broken model's is not
    (so its twirl is off by more), and the unbiased L_equiv estimates agree with both."""
    pytest.importorskip("scipy")
    pos = m.clusters(3)
    for name, model, bound in (("smooth", m.smooth, 1e-9), ("broken", m.broken, 1e-2)):
        fbar, equiv = m.closed_forms(name, pos)
        twirled = fe.Twirled(model, spec=m.SPEC_XYZ, rotations="design:12")(pos)
        assert float((twirled - fbar).abs().max()) < bound
        d = fe.design_error(model, pos, None, spec=m.SPEC_XYZ, rotations="design:12", replicates=3, seed=0)
        assert abs(float(d.equiv) - equiv) < 4 * float(d.rotation_stderr.equiv) + 1e-12 * equiv


def test_settings_name_what_they_reject(tmp_path):
    assert m.settings("full") == m.SETTINGS["full"]
    assert m.settings("quick", seeds=5, steps=None).seeds == 5
    with pytest.raises(ValueError, match="mode must be one of"):
        m.settings("fast")
    with pytest.raises(ValueError, match="seeds must be at least 2"):
        m.settings("smoke", seeds=1)
    with pytest.raises(ValueError, match="fields of Settings"):
        m.settings("smoke", sample=3)
    with pytest.raises(ValueError, match="threads must be None or at least 1"):
        m.run("smoke", str(tmp_path), threads=0)
    with pytest.raises(ValueError, match="name must be"):
        m.closed_forms("kinked", m.clusters(1))


def test_the_script_runs_in_smoke_mode(tmp_path):
    rows = _script().main(["--smoke", "--out", str(tmp_path)])
    assert {r["metric"] for r in rows} == {"prediction_rms", "equiv_rms_error", "equiv_spread"}
    assert {r["method"] for r in rows if r["metric"] == "prediction_rms"} == {"iid", "fixed design",
                                                                             "randomised design"}
    for r in rows:
        assert r["value"] >= 0 and torch.isfinite(torch.tensor(r["value"]))
    with open(tmp_path / "designs_compare_smoke.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (tmp_path / "designs_compare_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
