"""``fastequiv check``: runs, lists what it checked, fails loudly on a wrong backend."""

from __future__ import annotations

import json

import pytest
import torch

from fastequiv.__main__ import main
from fastequiv.backends import registry


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["check", *argv])
    return code, capsys.readouterr().out


def _cpu_backends():
    return ["torch"] + (["cpu"] if "cpu" in registry.runnable("rotate_rows", "cpu") else [])


def test_check_json_passes_and_lists_the_backends(capsys):
    backends = _cpu_backends()
    argv = ["--json", "--device", "cpu", "--seed", "3", "--only", "random_rotations,rotate_rows,reduce_rows_bwd"]
    for b in backends:
        argv += ["--backend", b]
    code, out = _run(capsys, *argv)
    report = json.loads(out)
    assert code == 0, out
    assert report["summary"]["ok"] and report["summary"]["failed"] == 0
    assert report["summary"]["backends"] == backends
    assert report["summary"]["seed"] == 3
    seen = {(r["check"], r["backend"]) for r in report["results"]}
    assert seen == {(c, b) for c in ("random_rotations", "rotate_rows", "reduce_rows_bwd") for b in backends}
    assert all(r["result"] == "PASS" and r["cases"] > 10 and r["device"] == "cpu" for r in report["results"])
    assert report["versions"]["torch"] == torch.__version__


def test_check_table_has_one_line_per_check_and_a_summary(capsys):
    code, out = _run(capsys, "--device", "cpu", "--backend", "torch", "--only", "wigner_blocks,voxels")
    lines = out.splitlines()
    assert code == 0, out
    assert any(line.split()[:3] == ["wigner_blocks", "torch", "cpu"] and line.split()[-2] == "PASS" for line in lines)
    assert any(line.split()[:3] == ["voxels", "torch", "cpu"] for line in lines)
    assert lines[-1].startswith("summary: 2 checks") and "2 PASS, 0 FAIL" in lines[-1]


def _broken_rotate_rows(x, M, sample, P, center):
    out = registry.implementation("rotate_rows", "torch")(x, M, sample, P, center)
    return out * 1.001  # 0.1% off: far past any tolerance


@pytest.mark.parametrize("how", ["wrong", "crash"])
def test_a_broken_backend_fails_the_check(capsys, monkeypatch, how):
    """A registered implementation that returns wrong values (or raises) is reported as
    FAIL with the case it failed on, the others still run, and the exit status is 1."""
    backend = _cpu_backends()[-1]
    impls = registry._REGISTRY["rotate_rows"]
    available = impls[backend][1]

    def crash(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(impls, backend, (_broken_rotate_rows if how == "wrong" else crash, available))
    code, out = _run(capsys, "--device", "cpu", "--backend", backend, "--only", "rotate_rows,rotate_rows_bwd",
                     "--seed", "1")
    assert code == 1
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()}
    bad = lines[("rotate_rows", backend, "cpu")]
    assert " FAIL " in bad and ("d=1 " in bad if how == "wrong" else "kernel exploded" in bad)
    assert " PASS " in lines[("rotate_rows_bwd", backend, "cpu")]
    assert "1 FAIL" in out.splitlines()[-1] and f"rotate_rows/{backend}/cpu" in out.splitlines()[-1]

    code, out = _run(capsys, "--json", "--device", "cpu", "--backend", backend, "--only", "rotate_rows")
    report = json.loads(out)
    assert code == 1 and not report["summary"]["ok"]
    assert report["results"][0]["result"] == "FAIL"


def test_check_refuses_unknown_checks_and_a_missing_gpu(capsys):
    with pytest.raises(SystemExit, match="unknown"):
        main(["check", "--only", "nothing_like_it"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["check", "--device", "cuda"])


def test_check_help_describes_every_check(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for name in ("random_rotations", "graph_atomics", "opcheck", "compile", "cuda_graph", "--json"):
        assert name in out


def test_the_cuda_graph_check_runs_its_steps(monkeypatch):
    """The CUDA-graph check's code path without a GPU: torch.cuda's streams and graphs
    replaced by stand-ins that run the captured step once and replay nothing. The int-seed
    capture then equals the eager step (PASS), and the seed=None replays repeat (the
    stand-in replays nothing), which the check must call a failure."""
    import contextlib

    from fastequiv import check

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    ctx = check.Context(torch.device("cpu"), torch.Generator().manual_seed(0), interpreter=False)
    cases = list(check.check_cuda_graph(ctx, "torch"))
    assert len(cases) == 2
    assert cases[0].label.startswith("seed=11") and cases[0].error <= cases[0].tolerance
    assert "REPEATED" in cases[1].label and cases[1].error == float("inf")
