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


def _compiled_backend() -> str:
    """The cpu backend: a wrong implementation is checked against the torch reference, so it
    must not be the reference itself (patching "torch" would patch what it is compared with)."""
    if "cpu" not in _cpu_backends():
        pytest.skip("needs the cpu backend (fastequiv._C), which a source checkout has not: a wrong torch backend "
                    "would be its own reference")
    return "cpu"


def _broken(real):
    """``real``'s rotate_rows 0.1% off: far past any tolerance."""

    def rotate_rows(x, M, sample, P, center):
        return real(x, M, sample, P, center) * 1.001

    return rotate_rows


@pytest.mark.parametrize("how", ["wrong", "crash"])
def test_a_broken_backend_fails_the_check(capsys, monkeypatch, how):
    """A registered implementation that returns wrong values (or raises) is reported as
    FAIL with the case it failed on, the others still run, and the exit status is 1."""
    backend = _compiled_backend() if how == "wrong" else _cpu_backends()[-1]
    impls = registry._REGISTRY["rotate_rows"]
    real, available = impls[backend]

    def crash(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(impls, backend, (_broken(real) if how == "wrong" else crash, available))
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


def _runnable_on_cpu(op):
    """The backends of ``op`` that run on CPU tensors here: torch, cpu with the extension,
    triton under its interpreter (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    return [b for b in ("torch", "cpu", "triton") if b in registry.runnable(op, "cpu")]


def test_design_weights_are_a_designs_far_from_uniform():
    from fastequiv import check

    ctx = check.Context(torch.device("cpu"), torch.Generator().manual_seed(0), interpreter=False)
    for _ in range(200):
        w = check.design_weights(ctx, 3, torch.float64)
        assert w.shape == (3,) and w.dtype == torch.float64
        assert bool((w > 0).all()) and abs(float(w.sum()) - 1) < 1e-15
        assert float(w.max()) >= 1.1 / 2.3 - 1e-15  # against the uniform 1/3


@pytest.mark.parametrize("name", ["reduce_rows", "reduce_rows_bwd"])
def test_weighted_reduce_cases_run_and_pass(capsys, name):
    """Every shape of the reduce checks also runs with weighted copies (without and with the
    mask and centres), on torch, the C++ CPU kernels and Triton's interpreter: as many
    weighted cases as uniform ones, each within its tolerance; and the command passes them."""
    from fastequiv import check

    op = check._OP_OF[name]
    backends = _runnable_on_cpu(op)
    assert backends[0] == "torch" and ("cpu" in backends) == ("cpu" in _cpu_backends())
    for backend in backends:
        ctx = check.Context(torch.device("cpu"), torch.Generator().manual_seed(2), interpreter=False)
        cases = list(check.CHECK_FUNCS[name](ctx, backend))
        weighted = [c for c in cases if c.label.endswith(" weighted")]
        masked = [c for c in weighted if c.label.endswith(" masked weighted")]
        assert len(weighted) == len(cases) // 2 and len(masked) == len(weighted) // 2 > 10, backend
        bad = [(c.label, c.error, c.tolerance) for c in cases if not c.error <= c.tolerance]
        assert not bad, (backend, bad)
    compiled = [b for b in backends if b != "triton"]  # the interpreter ran its cases above, slowly
    argv = ["--json", "--device", "cpu", "--seed", "4", "--only", name]
    for b in compiled:
        argv += ["--backend", b]
    code, out = _run(capsys, *argv)
    report = json.loads(out)
    assert code == 0, out
    assert [r["backend"] for r in report["results"]] == compiled
    assert all(r["result"] == "PASS" and r["cases"] == len(cases) for r in report["results"])


def _wrong_weights(real, n_args, how):
    """``real`` with its trailing weights ignored (the uniform 1/K) or given to the wrong
    copies (rolled by one)."""

    def impl(*args):
        if len(args) == n_args:
            return real(*args)
        w = args[n_args]
        return real(*args[:n_args]) if how == "ignored" else real(*args[:n_args], w.roll(1))

    return impl


@pytest.mark.parametrize("how", ["ignored", "rolled"])
def test_a_kernel_that_mishandles_weights_fails_the_weighted_cases(capsys, monkeypatch, how):
    """A reduce kernel (forward or backward) that ignores the copies' weights, or applies
    them to the wrong copies, passes every uniform case and fails every weighted one; the
    command reports FAIL naming a weighted case, and exits 1."""
    from fastequiv import check

    backend = _compiled_backend()
    for op, n_args in (("reduce_rows", 8), ("reduce_rows_backward", 10)):
        impls = registry._REGISTRY[op]
        real, available = impls[backend]
        monkeypatch.setitem(impls, backend, (_wrong_weights(real, n_args, how), available))
    for name in ("reduce_rows", "reduce_rows_bwd"):
        ctx = check.Context(torch.device("cpu"), torch.Generator().manual_seed(5), interpreter=False)
        cases = list(check.CHECK_FUNCS[name](ctx, backend))
        for c in cases:
            ok = c.error <= c.tolerance
            assert ok != c.label.endswith(" weighted"), (name, c.label, c.error, c.tolerance)
    code, out = _run(capsys, "--device", "cpu", "--backend", backend, "--only", "reduce_rows,reduce_rows_bwd",
                     "--seed", "1")
    assert code == 1
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()}
    for name in ("reduce_rows", "reduce_rows_bwd"):
        bad = lines[(name, backend, "cpu")]
        assert " FAIL " in bad and bad.rstrip().endswith(" weighted"), bad
    assert "2 FAIL" in out.splitlines()[-1]


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
