"""The benchmark suite itself: its cases compute what they claim, its step variants run, and
``fastequiv bench`` writes its report. Timings are never asserted here (benchmarks/ and
``fastequiv bench`` measure them)."""

import csv
import json
import math
from collections import defaultdict

import pytest
import torch
from conftest import assert_close_dtype

import fastequiv as fe
from fastequiv.__main__ import main
from fastequiv.bench import cases as C
from fastequiv.bench import cli, report, step
from fastequiv.bench.timing import MODES, Stats, measure
from fastequiv.demo import SPEC, ForceTask, PointTransformer


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    raise TypeError(f"unexpected output {type(x).__name__}")


def _groups(mode, device="cpu", ops=None):
    groups = defaultdict(list)
    for case in C.cases(mode, device, ops):
        groups[case.group].append(case)
    return groups


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_group_has_one_reference_and_a_peer_or_kernel(mode, device):
    groups = _groups(mode, device)
    assert groups
    for group, members in groups.items():
        roles = [c.role for c in members]
        assert roles.count("reference") == 1, group
        assert len({c.impl for c in members}) == len(members), f"{group}: an implementation twice"
        # something to compare the reference with: a compiled backend or the tool it replaces
        # (listing CUDA cases without a GPU leaves the row kernels with their reference alone)
        if device == "cpu" or torch.cuda.is_available() or members[0].level == "op":
            assert len(members) >= 2, group
        # every case states the traffic its roofline needs, or (the model-bound
        # measurement) the FLOPs of the forwards it must run
        assert all(c.bytes > 0 or c.flops > 0 for c in members), group


def test_modes_select_sizes_and_levels():
    quick, full = C.cases("quick", "cpu"), C.cases("full", "cpu")
    assert {c.level for c in quick} == {"op"}
    assert {c.level for c in full} == {"op", "kernel"}
    assert len({c.size for c in full if c.op == "twirl_reduce"}) > len({c.size for c in quick if c.op == "twirl_reduce"})
    assert {c.op for c in C.cases("quick", "cpu", ["wigner_D"])} == {"wigner_D"}
    with pytest.raises(ValueError, match="mode must be one of"):
        C.cases("fast", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        C.cases("quick", "cpu", ["twirl"])


@pytest.mark.parametrize("op", sorted(C.OPS))
def test_cases_compute_what_their_reference_computes(op):
    """Inside a group every checkable case (compiled backends, e3nn, the plain loops) returns
    the reference's result on the same inputs: the benchmark compares like with like."""
    for group, members in _groups("smoke", "cpu", [op]).items():
        ref = next(c for c in members if c.role == "reference")
        expected = [t.double() for t in _tensors(ref.setup()())]
        for case in members:
            if case is ref or not case.check:
                continue
            got = _tensors(case.setup()())
            assert len(got) == len(expected), case.name
            for g, e in zip(got, expected):
                if g.dtype == torch.bfloat16:
                    # a bfloat16 result (the kernel cases): the kernel and the reference sum in
                    # float32 in different orders, so one element may land on the neighbouring
                    # bfloat16 number (one ulp, e.g. 0.00049 at 0.1): the shared table's entry
                    assert_close_dtype(g, e, torch.bfloat16, msg=case.name)
                else:
                    torch.testing.assert_close(g.double(), e, rtol=2e-4, atol=2e-5, msg=lambda m: f"{case.name}: {m}")


def test_peers_that_draw_their_own_rotations_still_return_rotations():
    for case in C.cases("smoke", "cpu", ["random_rotations"]):
        R = case.setup()().double()
        eye = torch.eye(3, dtype=R.dtype).expand_as(R)
        torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)
        assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[0], dtype=R.dtype), atol=1e-5)


def test_measure_counts_rounds_per_mode():
    calls = []
    stats = measure(lambda: calls.append(1), "cpu", "smoke")
    assert len(stats.times) == 1 and len(calls) == 1  # smoke: no warm-up, one round
    stats = measure(lambda: calls.append(1), "cpu", "quick")
    assert MODES["quick"]["min_rounds"] <= len(stats.times) <= MODES["quick"]["max_rounds"]
    s = Stats([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s.median == 3.0 and s.min == 1.0 and s.iqr == pytest.approx(3.0)
    assert math.isnan(Stats().median)


def test_op_rows_ratios_are_against_the_reference_of_the_same_group():
    results = [
        dict(group="g", op="o", impl="ref", role="reference", median_s=4e-3, bytes=8e6, flops=0, size=1, unit="x"),
        dict(group="g", op="o", impl="fast", role="fastequiv", median_s=1e-3, bytes=8e6, flops=2e6, size=1, unit="x"),
        dict(group="h", op="o", impl="peer", role="peer", median_s=1e-3, bytes=0, flops=0, size=2, unit="x"),
    ]
    rows = {r["impl"]: r for r in report.op_rows(results)}
    assert rows["fast"]["speedup"] == pytest.approx(4.0)
    assert rows["ref"]["speedup"] == pytest.approx(1.0)
    assert rows["fast"]["GB/s"] == pytest.approx(8.0) and rows["fast"]["GFLOP/s"] == pytest.approx(2.0)
    assert rows["peer"]["speedup"] is None and rows["peer"]["GB/s"] is None  # no reference in its group
    text = report.format_ops(list(rows.values()))
    assert text.index("ref") < text.index("fast")  # the reference heads its group


def test_target_verdicts_need_the_quartiles_on_one_side():
    v = lambda q1, med, q3: dict(ratio_q1=q1, ratio_to_a=med, ratio_q3=q3)  # noqa: E731
    assert report.target_verdict("b", v(0.99, 1.00, 1.01)) == "met"
    assert report.target_verdict("b", v(1.03, 1.05, 1.08)) == "not met"
    assert report.target_verdict("b", v(0.95, 1.01, 1.06)) == "within noise"
    assert report.target_verdict("c", v(1.00, 1.04, 1.05)) == "met"


def test_step_variants_run_and_ratios_are_per_round():
    result = step.overhead("smoke", "cpu", rounds=2)
    assert list(result["variants"]) == ["a", "b", "c", "d", "e"]
    for k, v in result["variants"].items():
        expected = len(result["variants"]["a"]["times_s"]) if k != "e" else result["e3nn_rounds"]
        assert len(v["times_s"]) == expected and all(t > 0 for t in v["times_s"])
        ratios = [t / a for t, a in zip(v["times_s"], result["variants"]["a"]["times_s"])]
        assert min(ratios) <= v["ratio_to_a"] <= max(ratios)
    assert result["variants"]["a"]["ratio_to_a"] == 1.0
    assert result["size"]["measured_samples"] == 2  # 1/8 of the 16 stacked samples
    m = result["machinery"]
    assert all(m[k] > 0 for k in ("plain_ms", "twirl_loss_ms", "monitor_ms"))
    a_ms = 1e3 * result["variants"]["a"]["median_s"]
    assert m["monitor_added_pct_of_a"] == pytest.approx(100 * m["monitor_ms"] / a_ms)


def test_quick_and_full_models_have_millions_of_parameters_of_similar_size():
    for size in (step.STEP_SIZES["cpu"]["quick"], step.STEP_SIZES["cuda"]["full"]):
        transformer = PointTransformer(width=size.width, heads=size.heads, layers=size.layers)
        e3nn = step.E3nnForceNet(mul=size.e3nn_mul, layers=size.e3nn_layers)
        n_t = sum(p.numel() for p in transformer.parameters())
        n_e = sum(p.numel() for p in e3nn.parameters())
        assert n_t > 2e6 and n_e > 2e6 and 0.5 < n_e / n_t < 2


def _cluster_batch(dtype):
    task = ForceTask(atoms=(5, 7), dtype=dtype)
    return task.batch(4, torch.Generator().manual_seed(0))


def test_e3nn_model_is_equivariant_and_the_transformer_is_not():
    inputs, forces = _cluster_batch(torch.float64)
    torch.manual_seed(0)
    e3 = step.E3nnForceNet(mul=8, layers=2).double()
    d = fe.equivariance_error(e3, inputs, forces, spec=SPEC, samples=4, seed=0)
    assert float(d.equiv) < 1e-20 * max(1.0, float(d.total)) + 1e-24
    torch.manual_seed(0)
    tr = PointTransformer(width=16, heads=2, layers=1).double()
    d = fe.equivariance_error(tr, inputs, forces, spec=SPEC, samples=4, seed=0)
    assert float(d.pct) > 1e-3


def test_e3nn_model_puts_zero_force_on_padded_atoms():
    inputs, forces = _cluster_batch(torch.float32)
    out = step.E3nnForceNet(mul=8, layers=1)(**inputs)
    assert out.shape == forces.shape
    assert bool((out[~inputs["mask"]] == 0).all())
    assert bool((out[inputs["mask"]] != 0).any())


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["bench", "--smoke", "--ops", "twirl_reduce,step", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "twirl_reduce" in text and "(a) plain augmented step" in text and "CPU:" in text
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["mode"] == "smoke" and payload["machine"]["device"] == "cpu"
    assert {r["op"] for r in payload["ops"]} == {"twirl_reduce", "twirl_reduce fwd+bwd"}
    assert all(r["median_s"] > 0 for r in payload["ops"])
    assert set(payload["step"]["variants"]) == {"a", "b", "c", "d", "e"}
    for name in ("ops.png", "overhead.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_ops_and_a_missing_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "--smoke", "--ops", "twirl", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        assert main(["bench", "--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_designs_run_without_ops_in_smoke_and_full_only():
    assert [cli._select(None, mode)[1]["designs"] for mode in ("smoke", "quick", "full")] == [True, False, True]
    assert cli._select("designs", "quick") == ([], {"step": False, "fixed": False, "designs": True})


def test_cli_runs_the_designs_comparison(tmp_path, capsys):
    """``--ops designs --smoke``: the CSV, the plot, the JSON and the printed table, and at toy
    sizes the closed forms already agree with the estimators: the icosahedral design's twirl
    is within its truncation error of the closed-form twirl, and the unbiased L_equiv
    estimates (i.i.d. and the randomised design) scatter around the closed form."""
    threads = torch.get_num_threads()
    assert main(["bench", "--smoke", "--ops", "designs", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # it runs on one thread, then gives the others back
    text = capsys.readouterr().out
    assert "twirled prediction, RMS error against the closed form" in text
    assert "N ~ 60: twirled prediction at N=60" in text and "N ~ 120: L_equiv at N=120" in text
    assert "lebedev:5 84 (14 x 6; design:5 60)" in text  # metatomic's grid sizes, quoted without scipy
    with open(tmp_path / "designs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["metric"] for r in rows} == {"prediction_rms", "equiv_rms_error", "equiv_spread"}
    assert all(math.isfinite(float(r["value"])) and float(r["value"]) >= 0 for r in rows)
    value = {(r["model"], r["metric"], r["method"], int(r["N"])): float(r["value"]) for r in rows}
    for model in ("smooth", "broken"):
        # a wrong closed form would leave 1e-2 or more in these (the twirled breaking term)
        assert value[(model, "prediction_rms", "fixed design", 60)] < 1e-3
        assert value[(model, "equiv_rms_error", "randomised design, R=2", 120)] < 1e-2
        assert value[(model, "equiv_rms_error", "iid", 120)] < 0.1
    assert {k[2] for k in value if k[1] == "equiv_spread"} == {"iid", "icosahedral x R=2"}
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["mode"] == "smoke" and payload["ops"] == [] and "step" not in payload
    assert len(payload["designs"]["rows"]) == len(rows) and payload["designs"]["settings"]["seeds"] == 3
    assert payload["files"]["designs_csv"] == "designs.csv"
    assert (tmp_path / "designs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
