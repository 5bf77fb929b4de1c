"""The hot path of the measuring functions (fastequiv.stacking.CallPlan on the cpu backend):
the same numbers as the steps it replaces, few torch ops, and what it still checks.

The steps (``fastequiv.stacking.stack``, ``twirl_reduce``, the torch estimators) are the
reference: a planned call is compared with the same call forced through them
(``twirl.call_plan`` answering None). Per-sample values, the samples that count and every
gradient are equal bit for bit; batch means and standard errors, which the kernel
accumulates in float64 where torch adds float32 in its own order, agree to a few ulps.
"""

from __future__ import annotations

import pytest
import torch

import fastequiv as fe
from fastequiv import stacking, twirl

pytestmark = pytest.mark.skipif(not fe.build_info()["extension"], reason="the hot path runs the cpu backend's kernels")


def _steps(monkeypatch):
    """Force the steps: no call is planned."""
    monkeypatch.setattr(twirl, "call_plan", lambda *a, **k: None)


def _graph(B=4, P=9, heads=2, mask=False, dtype=torch.float32, num_graphs=True, edges=False, group="SO3", seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B * P
    inputs = {"pos": torch.randn(N, 3, generator=g, dtype=dtype), "z": torch.randint(1, 5, (N,), generator=g),
              "batch": torch.arange(B).repeat_interleave(P)}
    roles = {"pos": "position", "z": "scalar", "batch": "batch"}
    if num_graphs:
        inputs["num_graphs"], roles["num_graphs"] = B, "num_graphs"
    if edges:
        E = 3 * N
        inputs["edge_index"] = torch.randint(0, P, (2, E), generator=g) + torch.arange(E) % B * P
        inputs["vec"] = torch.randn(E, 3, generator=g, dtype=dtype)
        roles.update(edge_index="index", vec="vector@edge")
    if mask:
        inputs["mask"], roles["mask"] = torch.rand(N, generator=g) > 0.3, "scalar"
    W = torch.randn(3, 3, generator=g, dtype=dtype)
    out = {"energy": "scalar", "forces": "vector"} if heads == 2 else "vector"
    spec = fe.Spec(inputs=roles, output=out, group=group, mask="mask" if mask else None)

    def model(pos, z, batch, num_graphs=None, edge_index=None, vec=None, mask=None):
        f = pos @ W + 0.01 * z[:, None]
        if vec is not None:
            f = f + torch.zeros_like(f).index_add_(0, edge_index[0], vec)
        if heads != 2:
            return f
        e = torch.zeros(pos.shape[0] // P, dtype=pos.dtype).index_add_(0, batch, (f ** 2).sum(1))
        return {"energy": e, "forces": f}

    forces = torch.randn(N, 3, generator=g, dtype=dtype)
    target = {"energy": torch.randn(B, generator=g, dtype=dtype), "forces": forces} if heads == 2 else forces
    return model, inputs, target, spec, W


def _dense(rep="position", mask=False, dtype=torch.float32, B=5, P=6):
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(B, P, 3, generator=g, dtype=dtype)}
    roles = {"x": rep}
    if mask:
        m = torch.rand(B, P, generator=g) > 0.3
        m[0] = False  # a sample with nothing valid
        inputs["mask"], roles["mask"] = m, "scalar"
    W = torch.randn(3, 3, generator=g, dtype=dtype)
    spec = fe.Spec(inputs=roles, output={"f": "vector" if rep != "pseudovector" else rep, "e": "scalar"},
                   mask="mask" if mask else None)

    def model(x, mask=None):
        f = x @ W
        return {"f": f, "e": (f ** 2).sum((1, 2))[:, None]}

    target = {"f": torch.randn(B, P, 3, generator=g, dtype=dtype), "e": torch.randn(B, 1, generator=g, dtype=dtype)}
    return model, inputs, target, spec, W


CASES = {
    "graph": lambda: _graph(),
    "graph one head": lambda: _graph(heads=1),
    "graph mask": lambda: _graph(mask=True),
    "graph float64": lambda: _graph(dtype=torch.float64),
    "graph without num_graphs": lambda: _graph(num_graphs=False),
    "graph edges": lambda: _graph(edges=True),
    "graph O3": lambda: _graph(group="O3"),
    "graph octahedral": lambda: _graph(group="octahedral"),
    "dense": lambda: _dense(),
    "dense mask": lambda: _dense(mask=True),
    "dense pseudovector": lambda: _dense(rep="pseudovector"),
    "dense float64 mask": lambda: _dense(mask=True, dtype=torch.float64),
}


def _fields(d, prefix=""):
    """Every number of a decomposition (a design's ``rotation_stderr`` too) and of its heads."""
    names = getattr(d, "FIELDS", None) or ("total", "mean", "equiv", "pct")
    out = {prefix + n: getattr(d, n) for n in names}
    out.update({f"{prefix}per_sample.{i}": t for i, t in enumerate(d.per_sample)})
    out.update({f"{prefix}stderr.{i}": t for i, t in enumerate(d.stderr)})
    if getattr(d, "rotation_stderr", None) is not None:
        out.update({f"{prefix}rotation_stderr.{i}": t for i, t in enumerate(d.rotation_stderr)})
    if getattr(d, "valid", None) is not None:
        out[prefix + "valid"] = d.valid
    for h, hd in d.heads.items():
        out.update(_fields(hd, f"{prefix}{h}/"))
    return out


def _same(planned, steps, scale):
    """Per-sample values and validity equal; batch statistics to a few ulps of ``scale``."""
    a, b = _fields(planned), _fields(steps)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].detach(), b[k].detach()
        if "per_sample" in k or k.endswith("valid"):
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), k
        else:
            eps = torch.finfo(y.dtype).eps
            torch.testing.assert_close(x, y, rtol=4 * eps, atol=4 * eps * scale, equal_nan=True, msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_a_planned_call_gives_the_steps_numbers(case, monkeypatch):
    """equivariance_error (with and without labels, an int seed and a drawn one) and
    twirl_loss (with an equiv_weight; its gradient) through the hot path equal the same
    calls through the steps: per-sample values, validity and gradients bit for bit, the
    batch statistics to 4 ulps of the per-sample values' size."""
    model, inputs, target, spec, W = CASES[case]()
    K = None if spec.group == "octahedral" else 3

    def measure(labels, seed):
        torch.manual_seed(11)
        return fe.equivariance_error(model, inputs, target if labels else None, spec=spec, samples=K, seed=seed)

    def train(weight):
        W.grad = None
        W.requires_grad_(True)
        loss, d = fe.twirl_loss(model, inputs, target, spec=spec, samples=K, seed=5, equiv_weight=weight)
        loss.backward()
        W.requires_grad_(False)
        return loss.detach(), d, W.grad.clone()

    planned = [measure(labels, seed) for labels in (True, False) for seed in (3, None)]
    trained = [train(weight) for weight in (0.0, 0.4)]
    assert sum(len(plans) for plans in stacking._PLANS.values()) > 0
    with monkeypatch.context() as m:
        _steps(m)
        steps = [measure(labels, seed) for labels in (True, False) for seed in (3, None)]
        trained_steps = [train(weight) for weight in (0.0, 0.4)]
    for a, b in zip(planned, steps):
        _same(a, b, scale=b.per_sample[1].abs().mean())  # L_mean, or the twirled prediction's size
    for (la, da, ga), (lb, db, gb) in zip(trained, trained_steps):
        _same(da, db, scale=db.per_sample.total.abs().mean())
        assert torch.equal(ga, gb)
        torch.testing.assert_close(la, lb, rtol=4 * torch.finfo(lb.dtype).eps, atol=0)


def _profiled_ops(fn, model_scope="MODEL"):
    """The torch ops ``fn`` issues at the top level (the dispatcher calls Python makes),
    outside the record_function scope ``model_scope`` of the model."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    scopes = [e.time_range for e in events if e.name == model_scope]
    inside = lambda e: any(s.start <= e.time_range.start and e.time_range.end <= s.end for s in scopes)  # noqa: E731
    return [e.name for e in events if e.cpu_parent is None and e.name != model_scope and not inside(e)]


def test_a_small_graph_batch_costs_at_most_15_torch_ops():
    """equivariance_error of 4 graphs x 20 atoms, K = 8, issues at most 15 torch ops
    besides the model's (the steps issued about 200): the rotations, copies, reductions
    and estimators run in a few kernels of fastequiv._C. So does a twirl_loss forward."""
    B, P, K = 4, 20, 8
    g = torch.Generator().manual_seed(0)
    inputs = {"pos": torch.randn(B * P, 3, generator=g), "z": torch.randint(1, 5, (B * P,), generator=g),
              "batch": torch.arange(B).repeat_interleave(P), "num_graphs": B}
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "num_graphs": "num_graphs"},
                   output={"energy": "scalar", "forces": "vector"})
    target = {"energy": torch.randn(B, generator=g), "forces": torch.randn(B * P, 3, generator=g)}
    W = torch.randn(3, 3, generator=g)

    def model(pos, z, batch, num_graphs):
        with torch.profiler.record_function("MODEL"):
            f = pos @ W
            return {"energy": torch.zeros(num_graphs).index_add_(0, batch, f[:, 0]), "forces": f}

    def measure():
        fe.equivariance_error(model, inputs, target, spec=spec, samples=K, seed=1)

    measure()  # the call that plans
    ops = _profiled_ops(measure)
    assert 0 < len(ops) <= 15, ops
    W.requires_grad_(True)

    def train():
        fe.twirl_loss(model, inputs, target, spec=spec, samples=K, seed=1)

    train()
    ops = _profiled_ops(train)
    assert 0 < len(ops) <= 15, ops


def test_a_plan_is_made_once_and_later_batches_are_checked_where_it_is_free():
    """The first call of a kind reads and checks the batch (an out-of-range batch index is
    the GraphLayout's error); later calls of the same shapes are not read on the host: the
    kernels refuse a batch index outside [0, B), and then the steps' check names it."""
    model, inputs, target, spec, _ = _graph(B=3, P=4)
    bad = dict(inputs, batch=inputs["batch"].clone())
    bad["batch"][-1] = 3  # graph 3 of a batch of 3
    with pytest.raises(ValueError, match=r"holds graph indices from 0 to 3"):
        fe.equivariance_error(model, bad, target, spec=spec, samples=2, seed=0)
    fe.equivariance_error(model, inputs, target, spec=spec, samples=2, seed=0)
    plans = stacking._PLANS[spec]
    assert len(plans) == 1 and next(iter(plans.values())) is not None
    with pytest.raises(ValueError, match=r"holds graph indices from 0 to 3"):  # a kernel refused it
        fe.equivariance_error(model, bad, target, spec=spec, samples=2, seed=0)
    fe.equivariance_error(model, inputs, target, spec=spec, samples=2, seed=1)
    assert len(plans) == 1


def test_calls_the_plan_does_not_cover_take_the_steps():
    """No plan (the steps run) for another backend, chunking, inputs that need a gradient,
    a graph batch without its batch index in a dict, ... and a plan per kind of call."""
    model, inputs, target, spec, _ = _graph(B=2, P=3)
    assert stacking.call_plan(spec, inputs, 2, False, backend="torch") is None
    assert stacking.call_plan(spec, inputs, 2, False, backend="cpu") is not None
    assert stacking.call_plan(spec, inputs, 2, False, chunk_size=4) is None
    grad = dict(inputs, pos=inputs["pos"].clone().requires_grad_())
    assert stacking.call_plan(spec, grad, 2, False) is None
    assert stacking.call_plan(spec, [inputs["pos"]], 2, False) is None  # a list: not planned
    assert stacking.call_plan(spec, inputs, 2, False) is stacking.call_plan(spec, inputs, 2, False)
    assert stacking.call_plan(spec, inputs, 3, False) is not stacking.call_plan(spec, inputs, 2, False)


def test_a_target_that_needs_a_gradient_gets_it():
    """twirl_loss with a target that requires grad: its heads are not planned, and the
    steps give the target its gradient, as before."""
    model, inputs, target, spec, _ = _graph(B=2, P=3)
    target = {k: v.clone().requires_grad_() for k, v in target.items()}
    loss, _ = fe.twirl_loss(model, inputs, target, spec=spec, samples=2, seed=0)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in target.values())


# --- the monitor call in a CUDA graph ------------------------------------------------------------

def _monitor_call(backend: str, device: str = "cpu"):
    """A monitor (K = 4, every step) of a graph batch and the function of one call: its
    inputs are the tensors a captured graph reads (positions, species, batch index, labels)."""
    B, P = 3, 5
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "num_graphs": "num_graphs"},
                   output={"energy": "scalar", "forces": "vector"})
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(0)).to(device)

    def model(pos, z, batch, num_graphs):
        f = pos @ W + 0.1 * z[:, None].to(pos.dtype)
        return {"energy": torch.zeros(num_graphs, device=pos.device).index_add_(0, batch, f[:, 0] ** 2), "forces": f}

    monitor = fe.EquivarianceMonitor(model, spec=spec, every=1, samples=4, backend=backend)

    def call(pos, z, batch, forces, energy):
        logs = monitor(0, {"pos": pos, "z": z, "batch": batch, "num_graphs": B}, {"energy": energy, "forces": forces})
        return list(logs.values())

    def data(seed):
        g = torch.Generator().manual_seed(seed)
        return [t.to(device) for t in (torch.randn(B * P, 3, generator=g), torch.randint(1, 5, (B * P,), generator=g),
                                       torch.arange(B).repeat_interleave(P), torch.randn(B * P, 3, generator=g),
                                       torch.randn(B, generator=g))]

    return spec, call, data


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_monitor_call_captures_and_replays_on_cpu(backend, monkeypatch):
    """What a CUDA-graph capture of a monitor call needs, shown on the CPU: traced with fake
    tensors (``make_fx``: every op recorded, any read of a tensor's values on the host
    refused) under a simulated capture (``capturing()`` answers True, and the batch index
    is not read, as on a GPU while capturing), the call becomes a graph of torch ops and
    fastequiv's custom ops (the ones the cuda backend runs, for ``"cpu"``), with no Python
    deciding anything on the data; replayed on new batches, that graph gives what the eager
    call through the same steps gives, bit for bit."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastequiv import graph, grid, groups

    spec, call, data = _monitor_call(backend)
    with monkeypatch.context() as m:
        m.setattr(groups, "capturing", lambda: True)
        m.setattr(grid, "capturing", lambda: True)
        m.setattr(graph, "index_range", lambda index: None)  # a GPU's batch index during capture
        captured = make_fx(call, tracing_mode="fake", _allow_non_fake_inputs=True)(*data(0))
    ops = {str(n.target) for n in captured.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten._local_scalar_dense.default", "aten.item.default"}, ops  # no value read on the host
    if backend == "cpu":
        assert {"fastequiv.rotate_rows.default", "fastequiv.reduce_rows.default",
                "fastequiv.random_rotations_seeded.default"} <= ops
    _steps(monkeypatch)
    for seed in (1, 2):
        replayed, eager = captured(*data(seed)), call(*data(seed))
        assert len(replayed) == len(eager) > 0
        for a, b in zip(replayed, eager):
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU-side capture test runs without)")
def test_the_monitor_call_replays_in_a_cuda_graph():
    """On a GPU: the whole monitor call (rotations, copies, the model, reductions,
    estimators) captured in one CUDA graph after fe.warmup and an eager call; each replay
    on new batches copied into its inputs equals an eager call on them (the cuda kernels'
    atomics may change the rounding of the sums)."""
    spec, call, data = _monitor_call("auto", "cuda")
    static = data(0)
    fe.warmup(spec, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logged = call(*static)
    for seed in (1, 2):
        new = data(seed)
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = call(*new)
        assert len(logged) == len(eager) > 0
        for a, b in zip(logged, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the benchmark ------------------------------------------------------------------------------

def test_the_fixed_cost_benchmark_runs_and_counts_ops():
    """``fastequiv bench --ops fixed`` in smoke mode: every variant timed against its floor
    (the design calls' too), the planned calls within 15 torch ops, the steps' many more,
    and a table."""
    from fastequiv.bench import fixed, report

    result = fixed.fixed_cost("smoke", "cpu")
    (size,) = result["sizes"]
    v = size["variants"]
    calls = ("equivariance_error", "twirl_loss", "monitor", "equivariance_error design", "twirl_loss design")
    assert set(v) == {"model", "model step"} | {f"{n}{r}" for n in calls for r in ("", " (reference)")}
    for name in calls:
        ops = v[name]["ops_forward"] + v[name].get("ops_backward", 0)
        assert 0 < ops <= 15, (name, v[name]["ops"])
        assert v[f"{name} (reference)"]["ops_forward"] > 5 * ops
    for name in ("twirl_loss", "twirl_loss design"):
        assert v[name]["ops_backward"] == 1 and v[f"{name} (reference)"]["ops_backward"] > 5
    assert "4 graphs" not in report.format_fixed_cost(result) and "equivariance_error (reference)" in \
        report.format_fixed_cost(result)
