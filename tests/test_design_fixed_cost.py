"""The hot path of a measuring call with a rotation design (design_twirl on the cpu backend):
the same numbers as the general design path, and few torch ops.

The general path (``stack_design``, one ``twirl_reduce(weights=)`` call per replicate and
head, the torch estimators of ``Replicates`` and ``assemble``) is the reference: a planned
call is compared with the same call forced through it (``design_twirl.call_plan`` answering
None). In float64 every value (per-sample terms, batch means, standard errors,
``rotation_stderr``, the label-free ratios) and every gradient agrees to 1e-12 relative to
its scale: the kernels run the same float expressions, but add a sample's elements in
double where torch adds them in an order of its own. In float32, to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import fastequiv as fe
from fastequiv import design_twirl, stacking
from test_fixed_cost import _fields  # every number of a decomposition, rotation_stderr included

pytestmark = pytest.mark.skipif(not fe.build_info()["extension"], reason="the hot path runs the cpu backend's kernels")


def _general(monkeypatch):
    """Force the general path: no design call is planned."""
    monkeypatch.setattr(design_twirl, "call_plan", lambda *a, **k: None)


def _graph(B=4, P=6, heads=2, mask=False, dtype=torch.float64, seed=0):
    """A graph batch through a model that is not equivariant (a fixed matrix W and a
    nonlinearity), so every term of the decomposition is nonzero."""
    g = torch.Generator().manual_seed(seed)
    N = B * P
    inputs = {"pos": torch.randn(N, 3, generator=g, dtype=dtype), "z": torch.randint(1, 5, (N,), generator=g),
              "batch": torch.arange(B).repeat_interleave(P), "num_graphs": B}
    roles = {"pos": "position", "z": "scalar", "batch": "batch", "num_graphs": "num_graphs"}
    if mask:
        m = torch.rand(N, generator=g) > 0.3
        m[:P] = False  # graph 0 has no valid node: it counts in the energy head only
        inputs["mask"], roles["mask"] = m, "scalar"
    W = torch.randn(3, 3, generator=g, dtype=dtype)
    out = {"energy": "scalar", "forces": "vector"} if heads == 2 else "vector"
    spec = fe.Spec(inputs=roles, output=out, mask="mask" if mask else None)

    def model(pos, z, batch, num_graphs, mask=None):
        f = torch.tanh(pos @ W) + 0.1 * z[:, None].to(pos.dtype)
        if heads != 2:
            return f
        e = torch.zeros(num_graphs, dtype=pos.dtype).index_add_(0, batch, (f ** 2).sum(1))
        return {"energy": e, "forces": f}

    forces = torch.randn(N, 3, generator=g, dtype=dtype)
    target = {"energy": torch.randn(B, generator=g, dtype=dtype), "forces": forces} if heads == 2 else forces
    return model, inputs, target, spec, W


def _dense(heads=2, mask=False, dtype=torch.float64, B=5, P=4):
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(B, P, 3, generator=g, dtype=dtype)}
    roles = {"x": "position"}
    if mask:
        m = torch.rand(B, P, generator=g) > 0.3
        m[0] = False  # a sample with nothing valid
        inputs["mask"], roles["mask"] = m, "scalar"
    W = torch.randn(3, 3, generator=g, dtype=dtype)
    out = {"f": "vector", "e": "scalar"} if heads == 2 else "vector"
    spec = fe.Spec(inputs=roles, output=out, mask="mask" if mask else None)

    def model(x, mask=None):
        f = torch.tanh(x @ W)
        return {"f": f, "e": (f ** 2).sum((1, 2))[:, None]} if heads == 2 else f

    f = torch.randn(B, P, 3, generator=g, dtype=dtype)
    target = {"f": f, "e": torch.randn(B, 1, generator=g, dtype=dtype)} if heads == 2 else f
    return model, inputs, target, spec, W


CASES = {
    "graph": lambda: _graph(),
    "graph one head": lambda: _graph(heads=1),
    "graph mask": lambda: _graph(mask=True),
    "graph float32": lambda: _graph(dtype=torch.float32),
    "dense": lambda: _dense(),
    "dense one head": lambda: _dense(heads=1),
    "dense mask": lambda: _dense(mask=True),
    "dense float32 mask": lambda: _dense(mask=True, dtype=torch.float32),
}


def _close(a, b, what=""):
    """Equal validity, the same metadata, every value to 1e-12 (float64) or a few float32
    ulps of its scale (the per-sample values' size for per-sample and batch values)."""
    assert type(a) is type(b), what
    assert (a.samples, a.exact, a.exhaustive, a.replicates, a.design) == \
        (b.samples, b.exact, b.exhaustive, b.replicates, b.design), what
    x, y = _fields(a), _fields(b)
    assert x.keys() == y.keys(), what
    for k in x:
        u, v = x[k].detach(), y[k].detach()
        if k.endswith("valid"):
            assert torch.equal(u, v), (what, k)
            continue
        tol = 1e-12 if v.dtype == torch.float64 else 3e-6
        scale = v.abs().max().nan_to_num(0) if v.dim() else v.abs().nan_to_num(0)
        torch.testing.assert_close(u, v, rtol=tol, atol=tol * float(scale), equal_nan=True, msg=f"{what} {k}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("R", [1, 2, 3])
def test_a_planned_design_call_gives_the_general_paths_numbers(case, R, monkeypatch):
    """equivariance_error with a design (labels and none, an int seed and a drawn one) and
    twirl_loss (with an equiv_weight; its loss and gradient) through the hot path agree with
    the same calls through the general path: validity equal, every value and gradient to
    rounding; rotation_stderr NaN below three replicates in both."""
    model, inputs, target, spec, W = CASES[case]()

    def measure(labels, seed):
        torch.manual_seed(11)
        return fe.equivariance_error(model, inputs, target if labels else None, spec=spec, rotations="design:1",
                                     replicates=R, seed=seed)

    def train(weight):
        W.grad = None
        W.requires_grad_(True)
        loss, d = fe.twirl_loss(model, inputs, target, spec=spec, rotations="design:1", replicates=R, seed=5,
                                equiv_weight=weight)
        loss.backward()
        W.requires_grad_(False)
        return loss.detach(), d, W.grad.clone()

    stacking._PLANS.clear()
    planned = [measure(labels, seed) for labels in (True, False) for seed in (3, None)]
    trained = [train(weight) for weight in (0.0, 0.4)]
    assert any(p is not None for plans in stacking._PLANS.values() for p in plans.values())  # the hot path ran
    with monkeypatch.context() as m:
        _general(m)
        general = [measure(labels, seed) for labels in (True, False) for seed in (3, None)]
        trained_general = [train(weight) for weight in (0.0, 0.4)]
    for i, (a, b) in enumerate(zip(planned, general)):
        _close(a, b, f"measure {i}")
        assert bool(torch.isnan(b.rotation_stderr.equiv)) == (R < 3)
    tol = 1e-12 if W.dtype == torch.float64 else 3e-6
    for (la, da, ga), (lb, db, gb) in zip(trained, trained_general):
        _close(da, db, "twirl_loss")
        torch.testing.assert_close(la, lb, rtol=tol, atol=0)
        assert gb.abs().max() > 0
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * float(gb.abs().max()))


def test_the_design_estimators_hold_against_a_hand_computation():
    """The planned path's per-sample values against the module docs' formulas computed here
    from the model's outputs on the turned copies (one head, no mask, R = 3): total, mean,
    equiv and the jackknife rotation_stderr, independently of both paths' code."""
    model, inputs, target, spec, _ = _dense(heads=1, B=3, P=2)
    R, seed = 3, 4
    d = fe.equivariance_error(model, inputs, target, spec=spec, rotations="design:1", replicates=R, seed=seed)
    design = fe.designs.design("design:1")
    K, B = design.size, 3
    rot = design_twirl.design_rotations(design, B, replicates=R, seed=seed, dtype=torch.float64)  # (R K, B, 3, 3)
    x = inputs["x"]
    c = x.mean(1, keepdim=True)
    turned = torch.einsum("kbij,bpj->kbpi", rot, x - c) + c  # positions turned about their centroid
    a = torch.einsum("kbji,kbpj->kbpi", rot, model(turned.reshape(R * K * B, 2, 3)).reshape(R * K, B, 2, 3))
    a = a.reshape(R, K, B, 2, 3)
    w = design.weights.to(torch.float64)[None, :, None, None, None]
    y = target[None, None]
    T = (w * (a - y) ** 2).sum(1).mean((-1, -2))  # (R, B)
    abar = (w * a).sum(1)  # (R, B, 2, 3)
    Wr = (w * (a - abar[:, None]) ** 2).sum(1).mean((-1, -2))
    u = abar - target
    ubar = u.mean(0)

    def terms(keep):
        k = len(keep)
        ub = u[keep].mean(0)
        s = ((u[keep] - ub) ** 2).mean((-1, -2)).mean(0)
        return T[keep].mean(0), (ub ** 2).mean((-1, -2)) - s / (k - 1), Wr[keep].mean(0) + s * k / (k - 1)

    total, mean, equiv = terms([0, 1, 2])
    assert torch.equal(ubar, u.mean(0))
    for got, want in zip(d.per_sample, (total, mean, equiv)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    jack = [torch.stack(col) for col in zip(*(terms([j for j in range(R) if j != r]) for r in range(R)))]
    for got, j in zip(d.rotation_stderr, jack):
        want = ((R - 1) / R * ((j - j.mean(0)) ** 2).sum(0)).sum().sqrt() / B
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_calls_the_design_plan_does_not_take_go_the_general_way(monkeypatch):
    """backend='torch', chunking and inputs that need a gradient are not planned; a position
    output is planned for its inputs but its head is not, and the general path finishes the
    call from the model's outputs (the same numbers as the forced general path)."""
    model, inputs, target, spec, _ = _dense(heads=1)
    calls = []
    planned = design_twirl.call_plan
    monkeypatch.setattr(design_twirl, "call_plan", lambda *a, **k: calls.append(planned(*a, **k)) or calls[-1])
    for kw in (dict(backend="torch"), dict(chunk_size=7)):
        fe.equivariance_error(model, inputs, target, spec=spec, rotations="design:1", **kw)
        assert calls.pop() is None
    grad = dict(inputs, x=inputs["x"].clone().requires_grad_())
    fe.twirl_loss(model, grad, target, spec=spec, rotations="design:1")[0].backward()
    assert calls.pop() is None and grad["x"].grad is not None

    pos_spec = fe.Spec(inputs={"x": "position"}, output="position")

    def moved(x):
        return x + 0.1 * torch.tanh(x)

    a = fe.equivariance_error(moved, inputs, inputs["x"], spec=pos_spec, rotations="design:1", replicates=3, seed=2)
    assert calls.pop() is not None
    with monkeypatch.context() as m:
        _general(m)
        b = fe.equivariance_error(moved, inputs, inputs["x"], spec=pos_spec, rotations="design:1", replicates=3, seed=2)
    for k, v in _fields(b).items():
        assert torch.equal(_fields(a)[k], v), k  # the same code from the model's outputs on


def test_the_planned_design_call_raises_what_the_general_one_raises(monkeypatch):
    """check_finite: a NaN in the model's output at a valid element is the general path's
    error; a NaN only in the target gives NaN values in both; a head with no valid element
    is the general path's error too."""
    model, inputs, target, spec, W = _dense(mask=True)

    def broken(x, mask=None):
        out = model(x)
        return {"f": out["f"].index_fill(1, torch.tensor([1]), float("nan")), "e": out["e"]}

    nan_target = dict(target, e=target["e"].clone())
    nan_target["e"][2] = float("nan")
    empty = dict(inputs, mask=torch.zeros_like(inputs["mask"]))
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                _general(m)
            with pytest.raises(ValueError, match=r"model output 'f' has non-finite values"):
                fe.equivariance_error(broken, dict(inputs, mask=torch.ones_like(inputs["mask"])), target, spec=spec,
                                      rotations="design:1", seed=0)
            d = fe.equivariance_error(model, inputs, nan_target, spec=spec, rotations="design:1", seed=0)
            assert torch.isnan(d.total) and torch.isfinite(d.heads["f"].total)
            with pytest.raises(ValueError, match=r"every element of output head\(s\) \['f'\] is masked out"):
                fe.equivariance_error(model, empty, target, spec=spec, rotations="design:1", seed=0)


def _profiled_ops(fn, model_scope="MODEL"):
    """The torch ops ``fn`` issues at the top level, outside the model's record_function
    scope (as tests/test_fixed_cost.py counts them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    scopes = [e.time_range for e in events if e.name == model_scope]
    inside = lambda e: any(s.start <= e.time_range.start and e.time_range.end <= s.end for s in scopes)  # noqa: E731
    return [e.name for e in events if e.cpu_parent is None and e.name != model_scope and not inside(e)]


@pytest.mark.parametrize("R", [2, 3])
def test_a_small_design_call_costs_at_most_14_torch_ops(R):
    """equivariance_error of 4 graphs x 20 atoms with design:1 and R replicates issues at most
    14 torch ops besides the model's, whatever R (the general path issued about 370 with
    R = 2; the planned i.i.d. call 11): the turns, their product with the design, the copies,
    the buffers of the kernels and their unbinding. A twirl_loss forward at most 12, and its
    backward is one autograd node besides the model's."""
    B, P = 4, 20
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
        fe.equivariance_error(model, inputs, target, spec=spec, rotations="design:1", replicates=R, seed=1)

    measure()  # the call that plans
    ops = _profiled_ops(measure)
    assert 0 < len(ops) <= 14, ops
    W.requires_grad_(True)
    loss = []

    def train():
        loss.append(fe.twirl_loss(model, inputs, target, spec=spec, rotations="design:1", replicates=R, seed=1)[0])

    train()
    ops = _profiled_ops(train)
    assert 0 < len(ops) <= 12, ops
    node = loss[-1].grad_fn
    assert type(node).__name__ == "_DesignDifferentiableBackward"
    loss[-1].backward()
    assert W.grad.abs().sum() > 0
