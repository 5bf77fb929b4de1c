"""benchmarks/designs_compare.py in its smallest mode: every case runs, the closed forms it
measures against agree with a design far above the models' degrees, and the CSV and plot
are written. The ratios it reports are not asserted here (tests/test_designs.py tests the
estimators; benchmarks/RESULTS.md quotes a full run)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import fastequiv as fe

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "designs_compare.py"


def _module():
    spec = importlib.util.spec_from_file_location("designs_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_closed_forms():
    """A design of degree 12 (1118 rotations: Lebedev needs scipy) against the closed forms:
    the smooth model's content above degree 12 is below 1e-10, the broken model's is not
    (so its twirl is off by more), and the unbiased L_equiv estimates agree with both."""
    pytest.importorskip("scipy")
    m = _module()
    pos = m.clusters(3)
    for name, model, bound in (("smooth", m.smooth, 1e-9), ("broken", m.broken, 1e-2)):
        fbar, equiv = m.closed_forms(name, pos)
        twirled = fe.Twirled(model, spec=m.SPEC_XYZ, rotations="design:12")(pos)
        assert float((twirled - fbar).abs().max()) < bound
        d = fe.design_error(model, pos, None, spec=m.SPEC_XYZ, rotations="design:12", replicates=3, seed=0)
        assert abs(float(d.equiv) - equiv) < 4 * float(d.rotation_stderr.equiv) + 1e-12 * equiv


def test_the_comparison_runs_in_smoke_mode(tmp_path):
    rows = _module().main(["--smoke", "--out", str(tmp_path)])
    assert {r["metric"] for r in rows} == {"prediction_rms", "equiv_rms_error", "equiv_spread"}
    assert {r["method"] for r in rows if r["metric"] == "prediction_rms"} == {"iid", "fixed design",
                                                                             "randomised design"}
    for r in rows:
        assert r["value"] >= 0 and torch.isfinite(torch.tensor(r["value"]))
    with open(tmp_path / "designs_compare_smoke.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (tmp_path / "designs_compare_smoke.png").stat().st_size > 0
