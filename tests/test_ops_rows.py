"""The public ops on the row contract: against the Rep.act definitions, in the graph layout,
and on every compiled backend through their torch.library ops (opcheck, torch.compile)."""

import pytest
import torch

import fastequiv as fe
from fastequiv.backends import registry as _backend
from fastequiv.ops.layout import mask_for
from fastequiv.ops.random_rotations import _seeded_op, random_rotations_seeded, seed_tensor
from fastequiv.ops.rotate_copies import rotate_copies_reference as _rotate_copies_act, rotate_rows, rotate_rows_backward_reference, \
    rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows, reduce_rows_backward_reference, reduce_rows_reference, \
    twirl_reduce_reference as _twirl_reduce_act
from fastequiv.ops.wigner_d import wigner_blocks
from fastequiv.reps import as_rep

REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e", "1x1e + 1x3o"]
GPU = torch.cuda.is_available()


def _compiled_backends():
    """Compiled backends that must run here: the C++ CPU kernels and the Triton kernels
    (under TRITON_INTERPRET=1 on a CPU-only machine); CUDA and CuPy only with a GPU."""
    return ["cpu", "triton"] + (["cuda", "cupy"] if GPU else [])


def _device(backend):
    return "cuda" if backend in ("cuda", "cupy") or (backend == "triton" and GPU) else "cpu"


def _rotations(K, B, dtype=torch.float64, group="O3", seed=0):
    return fe.random_rotations(K * B, seed=seed, group=group, dtype=dtype).reshape(K, B, 3, 3)


def _data(rep, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = as_rep(rep).dim or 4
    return torch.randn(shape + (d,), generator=g, dtype=torch.float64).to(dtype)


# --- the reference rows against autograd -------------------------------------------------------

@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("center", [False, True])
def test_row_backward_formulas_match_autograd(graph, center):
    torch.manual_seed(0)
    K, B, P, d = 3, 4, 5, 3
    N = B * P
    M = torch.linalg.qr(torch.randn(K, B, d, d, dtype=torch.float64))[0]
    sample = torch.randint(0, B, (N,)) if graph else None
    P_arg = 0 if graph else P
    out = torch.randn(K, N, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(N, d, dtype=torch.float64)
    valid = torch.rand(N) > 0.3
    c = torch.randn(K, B, d, dtype=torch.float64) if center else None
    mean, sums = reduce_rows_reference(out, M, y, sample, P_arg, valid, c, B)
    gm, gs = torch.randn_like(mean), torch.randn_like(sums)
    (expected,) = torch.autograd.grad((mean * gm).sum() + (sums * gs).sum(), out)
    got = reduce_rows_backward_reference(gm, gs, out.detach(), M, y, sample, P_arg, valid, c, mean.detach())
    torch.testing.assert_close(got, expected)

    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    copies = rotate_rows_reference(x, M, sample, P_arg, c[0] if center else None)
    g = torch.randn_like(copies)
    (expected,) = torch.autograd.grad((copies * g).sum(), x)
    torch.testing.assert_close(rotate_rows_backward_reference(g, M, sample, P_arg), expected)


def test_reduce_rows_spread_has_no_cancellation():
    # outputs far from the origin with a tiny spread: a sum-of-squares formula would lose it
    K, N, d = 4, 6, 3
    M = torch.eye(3).expand(K, 1, 3, 3).contiguous()
    # in float32 at 100, E[a^2] - abar^2 would carry an error ~1e-3, four times the spread
    base = torch.full((N, d), 100.0)
    dev = torch.tensor([1.0, -1.0, 2.0, -2.0])[:, None, None] * 1e-2
    out = base + dev
    _, sums = reduce_rows_reference(out, M, base, None, N, None, None, 1)
    expected = (dev.squeeze().double() ** 2).mean() * N * d
    torch.testing.assert_close(sums[2, 0].double(), expected, rtol=1e-2, atol=0)


# --- the row path against the Rep.act definitions --------------------------------------------

@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("masked", [False, True])
def test_rotate_copies_rows_match_definition(rep, masked):
    K, B, n = 3, 5, 4
    x = _data(rep, (B, n), torch.float64)
    R = _rotations(K, B)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    got = fe.ops.rotate_copies(x, R, as_rep(rep), mask, backend="torch")
    torch.testing.assert_close(got, _rotate_copies_act(x, R, as_rep(rep), mask_for(mask, x.shape, "x")))


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_twirl_reduce_rows_match_definition(rep, dtype, masked):
    K, B, n = 3, 5, 4
    R = _rotations(K, B, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = _data(rep, (K, B, n), dtype, seed=2)
    y = _data(rep, (B, n), dtype, seed=3)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    if masked:
        mask[0] = False  # a fully masked sample has count 0 and sums 0
    got = fe.ops.twirl_reduce(out, R, y, as_rep(rep), mask, backend="torch")
    expected = _twirl_reduce_act(out, R, y, as_rep(rep), mask_for(mask, y.shape, "target"))
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_twirl_reduce_rows_gradient_matches_definition():
    K, B, n = 2, 3, 4
    R = _rotations(K, B)
    rep = as_rep("position")
    out = _data("vector", (K, B, n), torch.float64).requires_grad_()
    y = _data("vector", (B, n), torch.float64, seed=5).requires_grad_()
    s1 = fe.ops.twirl_reduce(out, R, y, rep, backend="torch")
    s2 = _twirl_reduce_act(out, R, y, rep, None)
    w = torch.randn(4, B, dtype=torch.float64)
    f1 = sum((t * wi).sum() for t, wi in zip(s1[1:4], w)) + s1.mean.sum()
    f2 = sum((t * wi).sum() for t, wi in zip(s2[1:4], w)) + s2.mean.sum()
    for a, b in zip(torch.autograd.grad(f1, (out, y)), torch.autograd.grad(f2, (out, y))):
        torch.testing.assert_close(a, b)


def test_ops_ignore_autocast():
    K, B, n = 2, 3, 4
    R = _rotations(K, B, dtype=torch.float32)
    out, y = _data("vector", (K, B, n), torch.float32), _data("vector", (B, n), torch.float32, seed=1)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend="torch")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- graph layout ------------------------------------------------------------------------------

def _graph(sizes, rep, dtype=torch.float64, seed=0):
    x = _data(rep, (sum(sizes),), dtype, seed=seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, batch


@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x2e"])
def test_graph_layout_equals_each_graph_alone(rep):
    sizes = [3, 1, 0, 5]  # graph 2 has no node
    K, B = 3, len(sizes)
    R = _rotations(K, B)
    r = as_rep(rep)
    x, batch = _graph(sizes, rep)
    out = _data(rep, (K, x.shape[0]), torch.float64, seed=7)
    y = _data(rep, (x.shape[0],), torch.float64, seed=8)
    d = x.shape[-1]
    copies = fe.ops.rotate_copies(x, R, r, batch=batch, backend="torch").reshape(K, x.shape[0], d)
    sums = fe.ops.twirl_reduce(out, R, y, r, batch=batch, backend="torch")
    start = 0
    for b, n in enumerate(sizes):
        sl = slice(start, start + n)
        alone = fe.ops.rotate_copies(x[None, sl], R[:, b:b + 1], r, backend="torch")
        torch.testing.assert_close(copies[:, sl], alone.reshape(K, n, d))
        one = fe.ops.twirl_reduce(out[:, None, sl], R[:, b:b + 1], y[None, sl], r, backend="torch")
        torch.testing.assert_close(sums.mean[sl], one.mean[0])
        for field in ("total", "bias", "spread", "count"):
            torch.testing.assert_close(getattr(sums, field)[b], getattr(one, field)[0])
        start += n


def test_batch_index_is_checked():
    x = torch.randn(4, 3)
    R = _rotations(2, 2)
    with pytest.raises(ValueError, match="batch must be an int64 tensor of shape \\(4,\\)"):
        fe.ops.rotate_copies(x, R, as_rep("vector"), batch=torch.zeros(4, dtype=torch.int32))


# --- seeds on the device ---------------------------------------------------------------------

def test_seeded_rotations_follow_the_public_stream():
    for group in ("SO3", "O3", "octahedral"):
        got = random_rotations_seeded(40, torch.tensor(2**40 + 5), group, torch.float64, offset=3, backend="torch")
        expected = fe.random_rotations(40, seed=2**40 + 5, offset=3, group=group, dtype=torch.float64, backend="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_seed_tensor_sources():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert int(seed_tensor(None, g1, torch.device("cpu"))) == int(seed_tensor(None, g2, torch.device("cpu")))
    assert int(seed_tensor(11, None, torch.device("cpu"))) == 11
    with pytest.raises(ValueError, match="not both"):
        seed_tensor(11, g1, torch.device("cpu"))
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_tensor(-1, None, torch.device("cpu"))


# --- every compiled backend against the reference --------------------------------------------

@pytest.mark.parametrize("backend", _compiled_backends())
@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x1o + 1x2e"])
@pytest.mark.parametrize("K", [2, 3])
def test_backend_ops_match_reference(backend, rep, K):
    dev = _device(backend)
    B, n = 3, 5
    r = as_rep(rep)
    R = _rotations(K, B, dtype=torch.float32).to(dev)
    x = _data(rep, (B, n), torch.float32).to(dev)
    out = _data(rep, (K, B, n), torch.float32, seed=4).to(dev).requires_grad_()
    y = _data(rep, (B, n), torch.float32, seed=5).to(dev)
    mask = (torch.rand(B, n, generator=torch.Generator().manual_seed(6)) > 0.3).to(dev)
    torch.testing.assert_close(fe.ops.rotate_copies(x, R, r, mask, backend=backend),
                               fe.ops.rotate_copies(x, R, r, mask, backend="torch"))
    got = fe.ops.twirl_reduce(out, R, y, r, mask, backend=backend)
    expected = fe.ops.twirl_reduce(out, R, y, r, mask, backend="torch")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.arange(1.0, 4.0, device=dev)
    loss = lambda s: (s.total * w).sum() + 0.5 * (s.spread * w).sum() - (s.bias * w).sum() + s.mean.sum()  # noqa: E731
    (g_got,) = torch.autograd.grad(loss(got), out)
    (g_exp,) = torch.autograd.grad(loss(expected), out)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _compiled_backends())
def test_backend_graph_layout_and_empty(backend):
    dev = _device(backend)
    sizes = [2, 0, 3]
    K, B = 2, len(sizes)
    R = _rotations(K, B, dtype=torch.float32).to(dev)
    x, batch = _graph(sizes, "position", torch.float32)
    x, batch = x.to(dev), batch.to(dev)
    out = _data("vector", (K, x.shape[0]), torch.float32, seed=2).to(dev)
    got = fe.ops.twirl_reduce(out, R, x, as_rep("position"), batch=batch, backend=backend)
    expected = fe.ops.twirl_reduce(out, R, x, as_rep("position"), batch=batch, backend="torch")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 4, 3, device=dev)
    R0 = R[:, :0]
    assert fe.ops.rotate_copies(empty, R0, as_rep("vector"), backend=backend).shape == (0, 4, 3)
    s = fe.ops.twirl_reduce(torch.zeros(K, 0, 4, 3, device=dev), R0, empty, as_rep("vector"), backend=backend)
    assert s.total.shape == (0,) and s.mean.shape == (0, 4, 3)


@pytest.mark.parametrize("backend", _compiled_backends())
def test_opcheck(backend):
    dev = _device(backend)
    g = torch.Generator().manual_seed(0)
    K, B, P, d = 2, 3, 4, 3
    N = B * P
    M = torch.linalg.qr(torch.randn(K, B, d, d, generator=g))[0].to(dev)
    x = torch.randn(N, d, generator=g).to(dev).requires_grad_()
    c = torch.randn(B, d, generator=g).to(dev).requires_grad_()
    torch.library.opcheck(rotate_rows, (x, M, None, P, c, backend))
    out = torch.randn(K, N, d, generator=g).to(dev).requires_grad_()
    y = torch.randn(N, d, generator=g).to(dev).requires_grad_()
    cc = torch.randn(K, B, d, generator=g).to(dev).requires_grad_()
    valid = (torch.rand(N, generator=g) > 0.3).to(dev)
    sample = torch.randint(0, B, (N,), generator=g).to(dev)
    torch.library.opcheck(reduce_rows, (out, M, y, None, P, valid, cc, B, backend))
    torch.library.opcheck(reduce_rows, (out, M, y, sample, 0, None, None, B, backend))
    seed = torch.tensor(5, device=dev)
    torch.library.opcheck(_seeded_op, (seed, 7, 3, True, torch.float32, backend))
    torch.library.opcheck(wigner_blocks, (M.reshape(-1, 3, 3), 4, backend))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("rep", ["position", "1x0e + 1x1o + 1x2e"])
def test_compiled_twirl_loss_step_matches_eager(backend, rep):
    """torch.compile(fullgraph=True) of a twirl_loss step (C++ kernels through their
    torch.library ops; the Triton interpreter cannot run on fake tensors)."""
    torch.manual_seed(0)
    d = as_rep(rep).dim
    model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, d))
    spec = fe.Spec(inputs=rep, output=rep)
    x, y = torch.randn(4, 5, d), torch.randn(4, 5, d)
    mask = torch.rand(4, 5) > 0.3

    def step(x, y):
        loss, dec = fe.twirl_loss(model, x, y, spec=spec, samples=3, seed=3, equiv_weight=0.5, mask=mask,
                                  backend=backend)
        return loss, dec.equiv, dec.pct

    eager = step(x, y)
    eager[0].backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(x, y)
    compiled[0].backward()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    for p, g in zip(model.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g)


def test_unknown_backend_and_unavailable_backend_errors():
    R = _rotations(2, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        fe.ops.rotate_copies(torch.randn(3, 3), R, as_rep("vector"), backend="fast")
    if not GPU:
        with pytest.raises(_backend.BackendUnavailableError, match="cuda"):
            fe.ops.rotate_copies(torch.randn(3, 3), R, as_rep("vector"), backend="cuda")


# --- arrays of other frameworks ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_public_ops_take_and_return_numpy_arrays(backend):
    K, B, n = 2, 3, 4
    R = _rotations(K, B)
    x, out, y = _data("position", (B, n), torch.float64), _data("vector", (K, B, n), torch.float64, 1), \
        _data("vector", (B, n), torch.float64, 2)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(3)) > 0.3
    copies = fe.ops.rotate_copies(x.numpy(), R.numpy(), as_rep("position"), mask.numpy(), backend=backend)
    assert type(copies).__module__ == "numpy"
    torch.testing.assert_close(torch.from_numpy(copies), fe.ops.rotate_copies(x, R, as_rep("position"), mask))
    sums = fe.ops.twirl_reduce(out.numpy(), R.numpy(), y.numpy(), as_rep("vector"), mask.numpy(), backend=backend)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), mask)
    assert isinstance(sums, fe.ops.TwirlSums) and type(sums.total).__module__ == "numpy"
    for a, b in zip(sums, expected):
        torch.testing.assert_close(torch.from_numpy(a), b)


@pytest.mark.skipif(not GPU, reason="CuPy arrays live on a GPU")
def test_public_ops_take_and_return_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    K, B, n = 2, 3, 4
    R = _rotations(K, B, dtype=torch.float32).cuda()
    out, y = _data("vector", (K, B, n), torch.float32, 1).cuda(), _data("vector", (B, n), torch.float32, 2).cuda()
    sums = fe.ops.twirl_reduce(cupy.from_dlpack(out), cupy.from_dlpack(R), cupy.from_dlpack(y), as_rep("vector"),
                               backend="cupy")
    assert isinstance(sums.total, cupy.ndarray)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend="torch")
    for a, b in zip(sums, expected):
        torch.testing.assert_close(torch.from_dlpack(a), b, rtol=1e-5, atol=1e-5)
