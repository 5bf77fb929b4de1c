"""twirl_reduce with weighted copies (``weights=``, a rotation design's): the public op and the
row kernels against an explicit per-copy loop, their gradients (gradcheck in float64, the
backward formula against autograd), on every backend (CUDA and CuPy on a GPU, the CPU kernels
of the same per-row math here), and the routing rule for a backend that could not take them.

``weights=None`` is today's uniform average: tests/test_twirl_reduce.py covers it.
"""

import pytest
import torch
from conftest import BACKENDS, acc_of, assert_close_dtype, backend_params, device_of
from opdata import data, loop_act, reduce_inputs, rotations

import fastequiv as fe
from fastequiv.ops import twirl_reduce
from fastequiv.ops.layout import mask_for
from fastequiv.ops.twirl_reduce import WEIGHTED_BACKENDS, reduce_rows, reduce_rows_backward_reference, \
    reduce_rows_reference, twirl_reduce_reference, weighted_backend
from fastequiv.reps import as_rep

LOOP_REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e"]
WEIGHTED = backend_params(*WEIGHTED_BACKENDS)


def design_weights(K, seed=0, dtype=torch.float64):
    """Positive weights summing to one, far from uniform."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return (w / w.sum()).to(dtype)


def loop_sums(rep, out, R, y, w, mask, batch):
    """``(twirled, total, bias, spread, count)`` by explicit loops over copies and rows:
    ``out`` ``(K, rows, n, d)``, sample of row ``i`` = ``batch[i]`` (or ``i``)."""
    K, rows = out.shape[:2]
    B = R.shape[1]
    sample = list(range(rows)) if batch is None else batch.tolist()
    a = torch.stack([torch.stack([loop_act(rep, out[k, i], R[k, sample[i]], inverse=True) for i in range(rows)])
                     for k in range(K)])
    abar = sum(w[k] * a[k] for k in range(K))
    m = torch.ones(y.shape, dtype=torch.bool) if mask is None else mask[..., None].expand(y.shape)
    total, bias, spread, count = (torch.zeros(B, dtype=torch.float64) for _ in range(4))
    for i in range(rows):
        b = sample[i]
        mi = m[i]
        total[b] += sum(w[k] * ((a[k, i] - y[i]) ** 2)[mi].sum() for k in range(K))
        bias[b] += ((abar[i] - y[i]) ** 2)[mi].sum()
        spread[b] += sum(w[k] * ((a[k, i] - abar[i]) ** 2)[mi].sum() for k in range(K))
        count[b] += mi.sum()
    n = count.clamp_min(1)
    return abar, total / n, bias / n, spread / n, count


@pytest.mark.parametrize("backend", WEIGHTED)
@pytest.mark.parametrize("rep", LOOP_REPS)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_weighted_sums_match_a_loop(rep, layout, masked, dtype, backend):
    if rep == "position" and (layout == "graph" or masked):
        pytest.skip("positions turn about the centroid of their valid points (the loop takes all of one row's): "
                    "test_weighted_row_path_matches_the_definition covers masked positions")
    dev = device_of(backend)
    K, B, n = 3, 4, 2
    R = rotations(K, B)
    w = design_weights(K)
    if layout == "dense":
        rows, batch = B, None
    else:
        batch = torch.tensor([0, 0, 2, 3, 3, 3])  # sample 1 has no node
        rows = batch.numel()
    out = data(rep, (K, rows, n), torch.float64, seed=1).to(dtype)
    y = data(rep, (rows, n), torch.float64, seed=2).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(rows, n, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[-1] = False  # the last sample's last row holds nothing
    s = twirl_reduce(out.to(dev), R.to(dev), y.to(dev), as_rep(rep), None if mask is None else mask.to(dev),
                     batch=None if batch is None else batch.to(dev), backend=backend, weights=w.to(dev))
    want = loop_sums(rep, out.double(), R, y.double(), w, mask, batch)
    for name, got, ref in zip(("twirled", "total", "bias", "spread", "count"), s, want):
        assert got.dtype == acc_of(dtype), name
        assert_close_dtype(got.double(), ref, dtype if dtype != torch.float64 else None, msg=name)


@pytest.mark.parametrize("rep", ["vector", "position", "1x0e + 2x1o + 1x2e"])
@pytest.mark.parametrize("masked", [False, True])
def test_weighted_row_path_matches_the_definition(rep, masked):
    K, B, n = 4, 3, 5
    R = rotations(K, B)
    w = design_weights(K, seed=4)
    out = data(rep, (K, B, n), torch.float64)
    y = data(rep, (B, n), torch.float64, seed=5)
    mask = (torch.rand(B, n, generator=torch.Generator().manual_seed(6)) > 0.3) if masked else None
    got = twirl_reduce(out, R, y, as_rep(rep), mask, backend="torch", weights=w)
    want = twirl_reduce_reference(out, R, y, as_rep(rep), mask_for(mask, y.shape, "target"), w)
    for name, a, b in zip(want._fields, got, want):
        assert_close_dtype(a, b, msg=name)


def test_uniform_weights_give_the_unweighted_sums():
    K, B, n = 5, 3, 4
    R = rotations(K, B)
    out = data("1x0e + 2x1o + 1x2e", (K, B, n), torch.float64)
    y = data("1x0e + 2x1o + 1x2e", (B, n), torch.float64, seed=1)
    rep = as_rep("1x0e + 2x1o + 1x2e")
    one = twirl_reduce(out, R, y, rep, backend="torch")
    uniform = twirl_reduce(out, R, y, rep, backend="torch", weights=torch.full((K,), 1 / K, dtype=torch.float64))
    for name, a, b in zip(one._fields, uniform, one):
        assert_close_dtype(a, b, msg=name)


def test_one_weight_picks_one_copy():
    """All the weight on copy 1: the twirl is that copy's back-rotation, spread 0, total = bias."""
    K, B, n = 3, 2, 4
    R = rotations(K, B)
    out = data("vector", (K, B, n), torch.float64)
    y = data("vector", (B, n), torch.float64, seed=1)
    s = twirl_reduce(out, R, y, as_rep("vector"), backend="torch", weights=torch.tensor([0.0, 1.0, 0.0],
                                                                                       dtype=torch.float64))
    copy = torch.einsum("bji,bnj->bni", R[1], out[1])  # R^T out
    assert_close_dtype(s.twirled, copy)
    assert float(s.spread.abs().max()) == 0.0
    assert_close_dtype(s.total, s.bias)


@pytest.mark.parametrize("backend", WEIGHTED)
@pytest.mark.parametrize("rep", ["position", "1x0e + 1x1o + 1x2e"])
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_weighted_gradcheck(rep, layout, backend):
    if layout == "graph" and rep == "position":
        pytest.skip("per-node positions: see test_weighted_sums_match_a_loop")
    dev = device_of(backend)
    K, B = 3, 2
    R = rotations(K, B).to(dev)
    w = (design_weights(K) * 1.3).to(dev)  # not summing to one: the gradient's (1 - S) term is exercised
    batch = None if layout == "dense" else torch.tensor([0, 1, 1], device=dev)
    rows = B if batch is None else 3
    out = data(rep, (K, rows, 2), torch.float64).to(dev).requires_grad_()
    y = data(rep, (rows, 2), torch.float64, seed=1).to(dev).requires_grad_()
    mask = torch.tensor([[True, False], [True, True], [False, True]][:rows], device=dev)

    def f(out, y):
        s = twirl_reduce(out, R, y, as_rep(rep), mask, batch=batch, backend=backend, weights=w)
        return s.twirled.sum(), s.total, 2 * s.bias, 3 * s.spread

    # Triton's CPU interpreter: one random projection (the kernels' backward is checked
    # against the reference entry by entry in test_weighted_row_kernels_match_reference)
    assert torch.autograd.gradcheck(f, (out, y), fast_mode=backend == "triton")


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_weighted_reduce_rows_op_gradcheck(graph, masked, with_center):
    """The custom op's autograd formula (fused backward for ``out``, torch for M, target and
    centres) against finite differences, weights not summing to one."""
    K, B, P, d = 3, 3, 2, 3
    out, M, target, sample, P, valid, center = reduce_inputs(K, B, P, d, torch.float64, graph, masked, with_center,
                                                             "cpu")
    w = design_weights(K, seed=2) * 0.8
    M = torch.linalg.qr(M)[0]  # the centres' gradient assumes orthogonal matrices (rotations)
    args = [t.clone().requires_grad_() for t in (out, M, target)]
    c = center.clone().requires_grad_() if with_center else None

    def f(out, M, target, *cc):
        mean, sums = reduce_rows(out, M, target, sample, P, valid, cc[0] if cc else None, B, "torch", w)
        return mean, sums

    assert torch.autograd.gradcheck(f, tuple(args) + ((c,) if with_center else ()))


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_weighted_backward_reference_matches_autograd(graph, masked, with_center):
    K, B, P, d = 4, 3, 3, 3
    out, M, target, sample, P, valid, center = reduce_inputs(K, B, P, d, torch.float64, graph, masked, with_center,
                                                             "cpu")
    w = design_weights(K, seed=3) * 1.2
    o = out.clone().requires_grad_()
    mean, sums = reduce_rows_reference(o, M, target, sample, P, valid, center, B, w)
    g = torch.Generator().manual_seed(9)
    gm, gs = torch.randn(mean.shape, generator=g, dtype=torch.float64), torch.randn(3, B, generator=g,
                                                                                    dtype=torch.float64)
    want, = torch.autograd.grad((mean * gm).sum() + (sums * gs).sum(), o)
    got = reduce_rows_backward_reference(gm, gs, out, M, target, sample, P, valid, center, mean.detach(), w)
    assert_close_dtype(got, want)


def test_opcheck_with_weights():
    g = torch.Generator().manual_seed(0)
    K, B, P, d = 2, 3, 4, 3
    M = torch.linalg.qr(torch.randn(K, B, d, d, generator=g))[0]
    out = torch.randn(K, B * P, d, generator=g).requires_grad_()
    y = torch.randn(B * P, d, generator=g).requires_grad_()
    cc = torch.randn(K, B, d, generator=g).requires_grad_()
    w = torch.tensor([0.25, 0.75])
    torch.library.opcheck(reduce_rows, (out, M, y, None, P, None, cc, B, "torch", w))


def test_every_backend_takes_weights():
    """torch, the C++ CPU kernels, Triton, CUDA and CuPy (the last two sharing
    kernels/twirl_math.cuh with the CPU kernels) all take the copies' weights."""
    assert set(WEIGHTED_BACKENDS) == {"torch", "cpu", "triton", "cuda", "cupy"}
    assert {p.values[0] for p in BACKENDS} <= set(WEIGHTED_BACKENDS)


@pytest.mark.parametrize("backend", backend_params("cuda", "cupy"))
def test_gpu_backends_take_weights_by_name_and_auto_on_gpu_tensors(backend):
    """backend="cuda"/"cupy" run weighted sums themselves (no refusal), as does "auto" on
    CUDA tensors; both agree with the torch reference on the CPU."""
    dev = device_of(backend)
    K, B = 3, 2
    R = rotations(K, B)
    out = data("vector", (K, B, 4), torch.float64)
    y = data("vector", (B, 4), torch.float64, seed=1)
    w = design_weights(K)
    want = twirl_reduce(out, R, y, as_rep("vector"), backend="torch", weights=w)
    for b in (backend, "auto"):
        got = twirl_reduce(out.to(dev), R.to(dev), y.to(dev), as_rep("vector"), backend=b, weights=w.to(dev))
        for name, a, ref in zip(want._fields, got, want):
            assert a.device.type == "cuda", name
            assert_close_dtype(a.cpu(), ref, msg=f"{b}: {name}")
    mean, sums = reduce_rows(out.reshape(K, -1, 3).to(dev), R.to(dev), y.reshape(-1, 3).to(dev), None, 4, None,
                             None, B, backend, w.to(dev))
    ref_mean, ref_sums = reduce_rows_reference(out.reshape(K, -1, 3), R, y.reshape(-1, 3), None, 4, None, None, B, w)
    assert_close_dtype(mean.cpu(), ref_mean, msg="mean")
    assert_close_dtype(sums.cpu(), ref_sums, msg="sums")


def test_which_backend_runs_weighted_sums():
    """The routing rule: every backend takes weights by name and keeps them; a backend
    whose kernels could not ("other", not registered) would be refused by name, and "auto"
    would then take the torch reference."""
    w = torch.ones(2) / 2
    for name in WEIGHTED_BACKENDS:
        assert weighted_backend(name, name, w) == name
        assert weighted_backend(name, "auto", w) == name
        assert weighted_backend(name, name, None) == name
    assert weighted_backend("other", "auto", w) == "torch"
    assert weighted_backend("other", "other", None) == "other"
    with pytest.raises(fe.BackendUnavailableError, match="backend='other' cannot run twirl_reduce with weights"):
        weighted_backend("other", "other", w)


def test_auto_takes_weights():
    K, B = 3, 2
    R = rotations(K, B)
    out = data("vector", (K, B, 4), torch.float64)
    y = data("vector", (B, 4), torch.float64, seed=1)
    w = design_weights(K)
    got = twirl_reduce(out, R, y, as_rep("vector"), weights=w)
    want = twirl_reduce_reference(out, R, y, as_rep("vector"), None, w)
    for name, a, b in zip(want._fields, got, want):
        assert_close_dtype(a, b, msg=name)


def test_weights_argument_errors():
    K, B = 3, 2
    R = rotations(K, B)
    out = data("vector", (K, B, 4), torch.float64)
    y = data("vector", (B, 4), torch.float64, seed=1)
    with pytest.raises(ValueError, match=r"weights must be a float tensor of shape \(K,\) = \(3,\).*shape \(2,\)"):
        twirl_reduce(out, R, y, as_rep("vector"), weights=torch.ones(2) / 2)
    with pytest.raises(ValueError, match="weights must be a float tensor.*int64"):
        twirl_reduce(out, R, y, as_rep("vector"), weights=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights must be a float tensor.*list"):
        twirl_reduce(out, R, y, as_rep("vector"), weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="weights require grad"):
        twirl_reduce(out, R, y, as_rep("vector"), weights=design_weights(K).requires_grad_())
    grids = torch.randn(K, B, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="weights with rep 'voxels'"):
        twirl_reduce(grids, R, grids[0], as_rep("voxels"), weights=design_weights(K))


@pytest.mark.parametrize("backend", [p for p in WEIGHTED if p.values[0] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("d", [1, 3, 9])
def test_weighted_row_kernels_match_reference(dtype, graph, masked, with_center, d, backend):
    """The compiled row kernels with weights (rows of 3 leave the tiled path for the
    row-at-a-time one) against the reference, forward and backward, with and without
    ``grad_mean``; weights not summing to one."""
    from fastequiv.backends import registry
    dev = device_of(backend)
    K, B, P = 4, 3, 5
    args = reduce_inputs(K, B, P, d, dtype, graph, masked, with_center, dev)
    M = args[1]
    w = (design_weights(K, seed=7) * 1.1).to(device=dev, dtype=M.dtype)
    mean, sums = registry.implementation("reduce_rows", backend)(*args, B, w)
    ref_mean, ref_sums = reduce_rows_reference(*args, B, w)
    assert_close_dtype(mean, ref_mean, msg="mean")
    assert_close_dtype(sums, ref_sums, msg="sums")
    g = torch.Generator().manual_seed(11)
    gs = torch.randn(3, B, generator=g, dtype=torch.float64).to(device=dev, dtype=M.dtype)
    for gm in (None, torch.randn(mean.shape, generator=g, dtype=torch.float64).to(device=dev, dtype=M.dtype)):
        got = registry.implementation("reduce_rows_backward", backend)(gm, gs, *args, ref_mean, w)
        want = reduce_rows_backward_reference(gm, gs, *args, ref_mean, w)
        assert_close_dtype(got, want, acc_of(dtype), msg="grad_out")


@pytest.mark.parametrize("backend", [p for p in WEIGHTED if p.values[0] != "torch"])
def test_weighted_row_kernels_refuse_wrong_weights(backend):
    from fastequiv.backends import registry
    dev = device_of(backend)
    K, B, P, d = 2, 2, 3, 3
    args = reduce_inputs(K, B, P, d, torch.float64, False, False, False, dev)
    with pytest.raises(ValueError, match="weights"):
        registry.implementation("reduce_rows", backend)(*args, B, torch.ones(K + 1, dtype=torch.float64, device=dev))
    with pytest.raises(ValueError, match="weights"):
        registry.implementation("reduce_rows", backend)(*args, B, torch.ones(K, dtype=torch.float32, device=dev))


# --- the designs' sums through twirl_reduce(weights=) -------------------------------------------

@pytest.mark.parametrize("backend", WEIGHTED)
def test_design_error_and_average_on_each_weighted_backend(backend):
    """design_error and design_average reduce through twirl_reduce(weights=): the same numbers
    on every backend that takes weights as on the torch reference, graph batches and
    positions included, and the twirled average's gradient too."""
    from fastequiv.design_twirl import design_average, design_error
    from fastequiv.designs import design
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    pos = torch.randn(12, 3, generator=g, dtype=torch.float64)
    batch = torch.arange(3).repeat_interleave(4)
    y = {"forces": torch.randn(12, 3, generator=g, dtype=torch.float64),
         "energy": torch.randn(3, generator=g, dtype=torch.float64)}

    def flat(pos, batch):
        e = torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, (pos @ W).pow(2).sum(-1))
        return {"forces": torch.tanh(pos @ W), "energy": e}

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch"}, output={"forces": "vector", "energy": "scalar"})
    inputs = {"pos": pos, "batch": batch}
    got = design_error(flat, inputs, y, spec=spec, rotations="design:2", replicates=3, seed=8, backend=backend)
    want = design_error(flat, inputs, y, spec=spec, rotations="design:2", replicates=3, seed=8, backend="torch")
    for head in ("forces", "energy"):
        for a, b in zip(got.heads[head].per_sample, want.heads[head].per_sample):
            assert_close_dtype(a, b)
    assert_close_dtype(got.rotation_stderr.equiv, want.rotation_stderr.equiv)

    d = design("design:2")
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    dense = fe.Spec(inputs="position", output="vector")
    model = lambda v: torch.tanh(v @ W) * v.norm(dim=-1, keepdim=True)  # noqa: E731
    grads = []
    for b in (backend, "torch"):
        xr = x.clone().requires_grad_()
        avg = design_average(model, xr, dense, d, turn=True, seed=2, backend=b)
        grads.append((avg, torch.autograd.grad((avg * x).sum(), xr)[0]))
    assert_close_dtype(grads[0][0].detach(), grads[1][0].detach())
    assert_close_dtype(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
def test_weighted_sums_compile(backend):
    """torch.compile(fullgraph=True) traces a weighted call (the custom op with its weights
    argument, fake and autograd) and gives the eager values and gradients."""
    K, B = 3, 2
    R = rotations(K, B)
    y = data("position", (B, 4), torch.float64, seed=1)
    w = design_weights(K)

    def f(out):
        s = twirl_reduce(out, R, y, as_rep("position"), backend=backend, weights=w)
        return s.total.sum() + 2 * s.spread.sum() + s.twirled.sum()

    out = data("position", (K, B, 4), torch.float64).requires_grad_()
    eager = f(out)
    compiled = torch.compile(f, fullgraph=True)(out)
    assert_close_dtype(compiled.detach(), eager.detach())
    assert_close_dtype(torch.autograd.grad(compiled, out)[0], torch.autograd.grad(eager, out)[0])
