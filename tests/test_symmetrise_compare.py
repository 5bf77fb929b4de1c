"""benchmarks/symmetrise_compare.py in its smallest mode: every method trains and is
decomposed, the frame-averaged models are equivariant to float32 rounding while the
trained ones are not, and the CSV and the plot are written. Timings are not asserted."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "symmetrise_compare.py"


def test_the_comparison_runs_in_smoke_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("symmetrise_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["augment", "augment + FA", "equiv_weight", "margin", "lie_loss"]
    by = {r["method"]: r for r in rows}
    assert by["augment + FA"]["equiv"] < 1e-9 < by["augment"]["equiv"]
    for r in rows:  # the identity L_total = L_mean + L_equiv of every decomposition
        assert abs(r["total"] - r["mean"] - r["equiv"]) < 1e-5 * r["total"]
    with open(tmp_path / "symmetrise_compare_smoke.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (tmp_path / "symmetrise_compare_smoke.png").stat().st_size > 0
