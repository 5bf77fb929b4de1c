"""twirl_reduce: back-rotate K stacked outputs and form the decomposition sums, on every backend.

* the public op against explicit per-copy loops and its definition through ``Rep.act``
  (:func:`twirl_reduce_reference`): reps, dtypes, both layouts, masks, odd, empty and
  strided shapes, gradients, autocast, ``torch.compile``, arrays of other frameworks;
* the row kernels ``reduce_rows`` / ``reduce_rows_backward`` of each compiled backend
  against the torch reference (``reduce_rows_reference``), and the reference's backward
  against autograd;
* the ``torch.ops.fastequiv.reduce_rows`` registration (opcheck).

Backends that cannot run here are skipped with the reason (tests/conftest.py). Shapes stay
small for Triton's CPU interpreter; sizes leave partial blocks, several programs, and (for
the dense reduction) several chunks per sample.
"""

import pytest
import torch
from conftest import BACKENDS, KERNELS, acc_of, assert_close_dtype, backend_params, device_of, kernel
from opdata import ROW_CASES, Case, data, dim, graph_batch, layout, loop_act, mats, rand, reduce_inputs, rotations

import fastequiv as fe
from fastequiv.ops import rotate_copies, twirl_reduce
from fastequiv.ops.layout import mask_for
from fastequiv.ops.twirl_reduce import atomic_sums, reduce_rows, reduce_rows_backward_reference, \
    reduce_rows_reference, reduction_backend, twirl_reduce_reference
from fastequiv.reps import as_rep

LOOP_REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e"]
REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e", "1x1e + 1x3o"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_sums_close(got, want, dtype=None):
    """Every field of two TwirlSums, with the same dtypes."""
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype, name
        assert_close_dtype(a, b, dtype, msg=name)


# --- the public op against its definition ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", LOOP_REPS)
@pytest.mark.parametrize("K,B,N", [(2, 3, 5), (3, 2, 1), (8, 1, 13)])
def test_matches_a_loop(rep, K, B, N, backend):
    dev = device_of(backend)
    d = dim(rep)
    out = torch.randn(K, B, N, d, dtype=torch.float64)
    y = torch.randn(B, N, d, dtype=torch.float64)
    R = rotations(K, B)
    s = twirl_reduce(out.to(dev), R.to(dev), y.to(dev), as_rep(rep), backend=backend)
    a = torch.stack([torch.stack([loop_act(rep, out[k, b], R[k, b], inverse=True) for b in range(B)])
                     for k in range(K)])
    abar = a.mean(0)
    assert_close_dtype(s.twirled, abar)
    assert_close_dtype(s.total, ((a - y) ** 2).mean(0).reshape(B, -1).mean(1))
    assert_close_dtype(s.bias, ((abar - y) ** 2).reshape(B, -1).mean(1))
    assert_close_dtype(s.spread, ((a - abar) ** 2).mean(0).reshape(B, -1).mean(1))
    assert_close_dtype(s.count, torch.full((B,), N * d, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_back_rotation_inverts_rotation(backend):
    dev = device_of(backend)
    for rep in LOOP_REPS[1:]:
        x = torch.randn(4, 6, dim(rep), dtype=torch.float64, device=dev)
        R = rotations(3, 4).to(dev)
        copies = rotate_copies(x, R, as_rep(rep), backend=backend).reshape(3, 4, 6, -1)
        s = twirl_reduce(copies, R, x, as_rep(rep), backend=backend)
        assert s.total.abs().max() < 1e-24, rep  # every copy maps back onto x exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_rows_match_definition(rep, dtype, masked, backend):
    """The row path (rows, matrices, centroids and the kernel) against ``Rep.act``; a fully
    masked sample has count 0 and sums 0."""
    dev = device_of(backend)
    K, B, n = 3, 5, 4
    R = rotations(K, B, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(dev)
    out = data(rep, (K, B, n), dtype, seed=2).to(dev)
    y = data(rep, (B, n), dtype, seed=3).to(dev)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    if masked:
        mask[0] = False
        mask = mask.to(dev)
    got = fe.ops.twirl_reduce(out, R, y, as_rep(rep), mask, backend=backend)
    expected = twirl_reduce_reference(out, R, y, as_rep(rep), mask_for(mask, y.shape, "target"))
    # both accumulate in float32 (float64) from the same inputs: that dtype's tolerance
    assert_sums_close(got, expected, acc_of(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_and_empty_inner_dims(backend):
    dev = device_of(backend)
    rep = as_rep("position")
    for shape in [(0, 4, 3), (2, 0, 3)]:
        x = torch.randn(shape, device=dev)
        R = rotations(3, shape[0], dtype=torch.float32).to(dev)
        got = rotate_copies(x, R, rep, backend=backend)
        s = twirl_reduce(got.reshape((3,) + shape), R, x, rep, backend=backend)
        assert s.total.shape == (shape[0],) and (s.count == 0).all()
        assert torch.isfinite(s.total).all()
    empty = torch.zeros(0, 4, 3, device=dev)
    s = twirl_reduce(torch.zeros(2, 0, 4, 3, device=dev), R[:2, :0], empty, as_rep("vector"), backend=backend)
    assert s.total.shape == (0,) and s.twirled.shape == (0, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_of(backend)
    R = rotations(2, 5).to(dev).transpose(-1, -2)
    out = torch.randn(2, 5, 3, 6, dtype=torch.float64, device=dev).transpose(-1, -2)
    y = torch.randn(5, 3, 6, dtype=torch.float64, device=dev).transpose(-1, -2)
    assert not (out.is_contiguous() or y.is_contiguous() or R.is_contiguous())
    a = twirl_reduce(out, R, y, as_rep("vector"), backend=backend)
    b = twirl_reduce(out.contiguous(), R.contiguous(), y.contiguous(), as_rep("vector"), backend=backend)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend):
    dev = device_of(backend)
    B, N = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    R = rotations(2, B)
    out = torch.randn(2, B, N, 3, dtype=torch.float64)
    y = torch.randn(B, N, 3, dtype=torch.float64)
    s = twirl_reduce(out.to(dev), R.to(dev), y.to(dev), as_rep("vector"), mask.to(dev), backend=backend)
    assert_close_dtype(s.count, torch.tensor([9.0, 15.0, 0.0], dtype=torch.float64))
    a0 = out[:, 0, :3] @ R[:, 0]
    assert_close_dtype(s.total[0], ((a0 - y[0, :3]) ** 2).mean())
    assert s.total[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_the_ops(backend):
    dev = device_of(backend)
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=dev, requires_grad=True)
    R = rotations(3, 2).to(dev)
    y = torch.randn(2, 4, 3, dtype=torch.float64, device=dev)
    rep = as_rep("1x1o")

    def f(x):
        copies = rotate_copies(x, R, as_rep("position"), backend=backend).reshape(3, 2, 4, 3)
        s = twirl_reduce(torch.tanh(copies), R, y, rep, backend=backend)
        return s.total.sum() + 3 * s.spread.sum() + s.twirled.sum()

    assert torch.autograd.gradcheck(f, (x,))


def test_gradient_of_the_torch_backend_matches_definition():
    K, B, n = 2, 3, 4
    R = rotations(K, B)
    rep = as_rep("position")
    out = data("vector", (K, B, n), torch.float64).requires_grad_()
    y = data("vector", (B, n), torch.float64, seed=5).requires_grad_()
    s1 = fe.ops.twirl_reduce(out, R, y, rep, backend="torch")
    s2 = twirl_reduce_reference(out, R, y, rep, None)
    w = torch.randn(4, B, dtype=torch.float64)
    f1 = sum((t * wi).sum() for t, wi in zip(s1[1:4], w)) + s1.twirled.sum()
    f2 = sum((t * wi).sum() for t, wi in zip(s2[1:4], w)) + s2.twirled.sum()
    for a, b in zip(torch.autograd.grad(f1, (out, y)), torch.autograd.grad(f2, (out, y))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignores_autocast(backend):
    dev = device_of(backend)
    K, B, n = 2, 3, 4
    R = rotations(K, B, dtype=torch.float32).to(dev)
    out, y = data("vector", (K, B, n), torch.float32).to(dev), data("vector", (B, n), torch.float32, seed=1).to(dev)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend=backend)
    with torch.autocast(dev, dtype=torch.bfloat16):
        got = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend=backend)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x2e"])
def test_graph_layout_equals_each_graph_alone(rep, backend):
    dev = device_of(backend)
    sizes = [3, 1, 0, 5]  # graph 2 has no node
    K, B = 3, len(sizes)
    R = rotations(K, B).to(dev)
    r = as_rep(rep)
    x, _ = graph_batch(sizes, rep)
    batch = torch.repeat_interleave(torch.arange(B), torch.tensor(sizes)).to(dev)
    out = data(rep, (K, x.shape[0]), torch.float64, seed=7).to(dev)
    y = data(rep, (x.shape[0],), torch.float64, seed=8).to(dev)
    sums = fe.ops.twirl_reduce(out, R, y, r, batch=batch, backend=backend)
    start = 0
    for b, n in enumerate(sizes):
        sl = slice(start, start + n)
        one = fe.ops.twirl_reduce(out[:, None, sl], R[:, b:b + 1], y[None, sl], r, backend="torch")
        assert_close_dtype(sums.twirled[sl], one.twirled[0])
        for field in ("total", "bias", "spread", "count"):
            assert_close_dtype(getattr(sums, field)[b], getattr(one, field)[0], msg=field)
        start += n


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x1o + 1x2e"])
@pytest.mark.parametrize("K", [2, 3])
def test_backend_matches_the_torch_backend(backend, rep, K):
    """Sums, mean and the gradient of a loss of them (the fused backward kernel)."""
    dev = device_of(backend)
    B, n = 3, 5
    r = as_rep(rep)
    R = rotations(K, B, dtype=torch.float32).to(dev)
    out = data(rep, (K, B, n), torch.float32, seed=4).to(dev).requires_grad_()
    y = data(rep, (B, n), torch.float32, seed=5).to(dev)
    mask = (torch.rand(B, n, generator=torch.Generator().manual_seed(6)) > 0.3).to(dev)
    got = fe.ops.twirl_reduce(out, R, y, r, mask, backend=backend)
    expected = fe.ops.twirl_reduce(out, R, y, r, mask, backend="torch")
    assert_sums_close(got, expected)
    w = torch.arange(1.0, 4.0, device=dev)
    loss = lambda s: (s.total * w).sum() + 0.5 * (s.spread * w).sum() - (s.bias * w).sum() + s.twirled.sum()  # noqa: E731
    (g_got,) = torch.autograd.grad(loss(got), out)
    (g_exp,) = torch.autograd.grad(loss(expected), out)
    assert_close_dtype(g_got, g_exp)


@pytest.mark.parametrize("backend", KERNELS)
def test_backend_graph_layout(backend):
    dev = device_of(backend)
    sizes = [2, 0, 3]
    K, B = 2, len(sizes)
    R = rotations(K, B, dtype=torch.float32).to(dev)
    x, batch = graph_batch(sizes, "position", torch.float32)
    x, batch = x.to(dev), batch.to(dev)
    out = data("vector", (K, x.shape[0]), torch.float32, seed=2).to(dev)
    got = fe.ops.twirl_reduce(out, R, x, as_rep("position"), batch=batch, backend=backend)
    expected = fe.ops.twirl_reduce(out, R, x, as_rep("position"), batch=batch, backend="torch")
    assert_sums_close(got, expected)


def test_argument_errors():
    with pytest.raises(ValueError, match="target has shape"):
        twirl_reduce(torch.randn(3, 2, 4, 3), rotations(3, 2, dtype=torch.float32), torch.randn(2, 5, 3),
                     as_rep("vector"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_takes_and_returns_numpy_arrays(backend):
    K, B, n = 2, 3, 4
    R = rotations(K, B)
    out, y = data("vector", (K, B, n), torch.float64, 1), data("vector", (B, n), torch.float64, 2)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(3)) > 0.3
    sums = fe.ops.twirl_reduce(out.numpy(), R.numpy(), y.numpy(), as_rep("vector"), mask.numpy(), backend=backend)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), mask)
    assert isinstance(sums, fe.ops.TwirlSums) and type(sums.total).__module__ == "numpy"
    for a, b in zip(sums, expected):
        torch.testing.assert_close(torch.from_numpy(a), b)


@pytest.mark.parametrize("backend", backend_params("cupy"))
def test_takes_and_returns_cupy_arrays(backend):
    import cupy

    K, B, n = 2, 3, 4
    R = rotations(K, B, dtype=torch.float32).cuda()
    out, y = data("vector", (K, B, n), torch.float32, 1).cuda(), data("vector", (B, n), torch.float32, 2).cuda()
    sums = fe.ops.twirl_reduce(cupy.from_dlpack(out), cupy.from_dlpack(R), cupy.from_dlpack(y), as_rep("vector"),
                               backend=backend)
    assert isinstance(sums.total, cupy.ndarray)
    expected = fe.ops.twirl_reduce(out, R, y, as_rep("vector"), backend="torch")
    for a, b in zip(sums, expected):
        assert_close_dtype(torch.from_dlpack(a), b)


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
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


# --- the row kernels against the torch reference -----------------------------------------------

def check_reduce_ops(c: Case, backend: str):
    """Both row kernels of ``backend`` on the inputs of ``c`` against the reference."""
    mean, sums = kernel("reduce_rows", backend)(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    assert mean.dtype == sums.dtype == c.acc and sums.shape == (3, c.B)
    assert_close_dtype(mean, want_mean, msg="reduce_rows mean")
    assert_close_dtype(sums, want_sums, msg="reduce_rows sums")

    for gm in (c.grad_mean, None):
        got = kernel("reduce_rows_backward", backend)(gm, c.grad_sums, c.out, c.M, c.target, c.sample, c.P,
                                                      c.valid, c.center, want_mean)
        want = reduce_rows_backward_reference(gm, c.grad_sums, c.out, c.M, c.target, c.sample, c.P, c.valid,
                                              c.center, want_mean)
        assert got.dtype == c.out.dtype
        assert_close_dtype(got, want, msg="reduce_rows_backward")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_row_kernels_match_reference(dtype, layout, d, center, backend):
    """Dense with a short last sample, graph with an empty sample, a fully masked sample."""
    check_reduce_ops(Case(d=d, dtype=dtype, layout=layout, center=center, mask=True, device=device_of(backend)),
                     backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("short", [1, 4])
def test_row_kernels_accept_a_short_last_sample(short, backend):
    """The row contract (fastequiv/ops/layout.py): in the dense layout "the kernels accept a
    short last sample", N = B * P - short rows, as the reference does."""
    dev = device_of(backend)
    K, B, P, d = 2, 3, 5, 3
    N = B * P - short
    out, target = rand(K, N, d, seed=90, device=dev), rand(N, d, seed=91, device=dev)
    M = mats(K, B, d, torch.float32, device=dev)
    mean, sums = kernel("reduce_rows", backend)(out, M, target, None, P, None, None, B)
    ref_mean, ref_sums = reduce_rows_reference(out, M, target, None, P, None, None, B)
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)
    gs = rand(3, B, seed=92, device=dev)
    assert_close_dtype(kernel("reduce_rows_backward", backend)(None, gs, out, M, target, None, P, None, None, ref_mean),
                       reduce_rows_backward_reference(None, gs, out, M, target, None, P, None, None, ref_mean))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(ROW_CASES.values()), ids=list(ROW_CASES))
def test_row_kernels_on_the_shared_cases(case, backend):
    """opdata.ROW_CASES: many copies, many rows, sorted graph batches."""
    check_reduce_ops(Case(**case, device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", backend_params("cuda", "cupy"))
@pytest.mark.parametrize("K", [1, 2, 24])
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_row_kernels_past_one_block(K, layout, backend):
    """Past one block of rows of the CUDA kernels: the warp/block combination of the
    per-sample sums (several Triton programs: test_reduce_rows_over_many_programs)."""
    check_reduce_ops(Case(K=K, B=6, P=2501, d=3, dtype=torch.float32, layout=layout, mask=True,
                          device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("out_dtype, target_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                     (torch.bfloat16, torch.float64)], ids=str)
def test_row_kernels_target_in_another_dtype(out_dtype, target_dtype, backend):
    check_reduce_ops(Case(dtype=out_dtype, target_dtype=target_dtype, mask=True, device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_reduce_rows_matches_reference(K, d, graph, backend):
    dev = device_of(backend)
    B = 4
    args = reduce_inputs(K, B, 6, d, torch.float32, graph, masked=True, with_center=d == 3, device=dev)
    mean, sums = kernel("reduce_rows", backend)(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert mean.dtype == sums.dtype == torch.float32 and sums.shape == (3, B)
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)
    assert (sums[:, B - 1] == 0).all()  # the fully masked sample adds nothing


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_reduce_rows_dtypes_masks_centers(dtype, graph, masked, with_center, backend):
    dev = device_of(backend)
    B = 3
    args = reduce_inputs(3, B, 5, 3, dtype, graph, masked, with_center, dev, seed=10)
    mean, sums = kernel("reduce_rows", backend)(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert mean.dtype == acc_of(dtype)
    # both accumulate in acc from the same rounded inputs: acc's tolerance
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("P", [1, 3, 17, 300])
def test_reduce_rows_dense_blocking(P, backend):
    """Dense partial sums: several samples a program (small P) or several chunks a sample
    (P = 300 > 256 rows a program at d = 9 under the Triton interpreter)."""
    B, d = 3, 9
    args = reduce_inputs(2, B, P, d, torch.float64, False, masked=True, with_center=False, device=device_of(backend),
                         seed=20)
    mean, sums = kernel("reduce_rows", backend)(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("d", [3, 9])
def test_reduce_rows_graph_block_inside_one_sample(d, backend):
    """Every valid row in one sample (the one-atomic-per-program path of the Triton kernel),
    with a partial last block at d = 9, and a block whose only other-sample rows are masked."""
    dev = device_of(backend)
    B, N = 3, 300
    sample = torch.full((N,), 1, dtype=torch.int64, device=dev)
    sample[:4] = 2
    valid = sample == 1
    out, target = rand(2, N, d, seed=80, device=dev), rand(N, d, seed=81, device=dev)
    args = (out, mats(2, B, d, torch.float32, device=dev), target, sample, 0, valid, None)
    mean, sums = kernel("reduce_rows", backend)(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_reduce_rows_dense_is_deterministic(backend):
    """The dense reduction of the CPU and Triton kernels sums in a fixed order (the CUDA
    kernels add per-sample sums with atomics and may differ by rounding between runs)."""
    args = reduce_inputs(3, 5, 40, 3, torch.float32, False, masked=True, with_center=True, device=device_of(backend),
                         seed=30)
    first = kernel("reduce_rows", backend)(*args, 5)
    second = kernel("reduce_rows", backend)(*args, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_reduce_rows_no_rows(layout, backend):
    dev = device_of(backend)
    K, B, d = 2, 3, 3
    M = mats(K, B, d, torch.float32, device=dev)
    out, y = torch.zeros(K, 0, d, device=dev), torch.zeros(0, d, device=dev)
    sample = torch.zeros(0, dtype=torch.int64, device=dev) if layout == "graph" else None
    for P in ((0,) if layout == "graph" else (0, 4)):
        mean, sums = kernel("reduce_rows", backend)(out, M, y, sample, P, None, None, B)
        assert mean.shape == (0, d) and torch.equal(sums, torch.zeros(3, B, device=dev))
        for gm in (None, torch.zeros(0, d, device=dev)):
            g = kernel("reduce_rows_backward", backend)(gm, torch.ones(3, B, device=dev), out, M, y, sample, P, None,
                                                        None, mean)
            assert g.shape == (K, 0, d)


@pytest.mark.parametrize("backend", KERNELS)
def test_reduce_rows_masked_and_empty_samples_have_zero_sums(backend):
    c = Case(B=4, d=3, layout="graph", mask=True, device=device_of(backend))  # sample 1 empty, 2 fully masked
    _, sums = kernel("reduce_rows", backend)(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    assert torch.equal(sums[:, 1:3], torch.zeros(3, 2, device=sums.device))
    assert (sums[:, 0] > 0).all() and (sums[:, 3] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_rows_spread_has_no_cancellation(backend):
    """Copies that differ by 1e-2 around values of 1e4: the spread is formed from the
    deviations, so float32 keeps it to about 1% (only abar's rounding enters, squared),
    where E|a|^2 - |abar|^2 in float32 would lose it entirely."""
    dev = device_of(backend)
    K, N = 4, 33
    M = torch.eye(3, device=dev).expand(K, 1, 3, 3).contiguous()
    base = torch.full((N, 3), 1e4, dtype=torch.float64, device=dev)
    deviation = torch.randn(K, N, 3, dtype=torch.float64, device=dev) * 1e-2
    out = (base + deviation).float()
    _, sums = kernel("reduce_rows", backend)(out, M, base.float(), None, N, None, None, 1)
    _, want = reduce_rows_reference(out.double(), M.double(), base, None, N, None, None, 1)
    torch.testing.assert_close(sums[2].double(), want[2], rtol=1e-2, atol=0)
    a = out.reshape(K, N * 3)
    naive = ((a * a).mean(0) - a.mean(0) ** 2).sum()
    assert abs(naive.double() - want[2]) > want[2]  # what the deviations avoid


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_rows_spread_has_no_cancellation_near_1e3(backend):
    """Copies spread by 0.1 around 1e3, target 0: total and bias are ~1e6 per element, so
    total - bias in float32 would be off by ~0.1; the spread (~1e-2) must still be right."""
    dev = device_of(backend)
    K, B, P, d = 4, 2, 8, 3
    base = 1e3 + rand(1, B * P, d, dtype=torch.float64, seed=40, device=dev)
    out = (base + 0.1 * rand(K, B * P, d, dtype=torch.float64, seed=41, device=dev)).float()
    M = torch.eye(d, dtype=torch.float32, device=dev).expand(K, B, d, d).contiguous()
    target = torch.zeros(B * P, d, device=dev)
    _, sums = kernel("reduce_rows", backend)(out, M, target, None, P, None, None, B)
    _, exact = reduce_rows_reference(out.double(), M.double(), target.double(), None, P, None, None, B)
    torch.testing.assert_close(sums[2].double(), exact[2], rtol=1e-2, atol=0)
    assert ((sums[0] - sums[1]).double() - exact[2]).abs().max() > 10 * (sums[2].double() - exact[2]).abs().max()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reduce_rows_dense_rows_of_three_across_tiles(dtype, backend):
    """The tiled CPU path for dense rows of three components: samples spanning several tiles
    of 128 rows, a short last sample, masks and centres."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(5)
    K, B, P = 3, 3, 300
    N = B * P - 7
    M = fe.random_rotations(K * B, seed=1, dtype=dtype).reshape(K, B, 3, 3).to(dev)
    out = (torch.randn(K, N, 3, generator=g, dtype=dtype) + 50.0).to(dev)
    y = (torch.randn(N, 3, generator=g, dtype=dtype) + 50.0).to(dev)
    valid = (torch.rand(N, generator=g) > 0.2).to(dev)
    center = torch.randn(K, B, 3, generator=g, dtype=dtype).to(dev)
    for v, c in ((None, None), (valid, center)):
        mean, sums = kernel("reduce_rows", backend)(out, M, y, None, P, v, c, B)
        want_mean, want_sums = reduce_rows_reference(out, M, y, None, P, v, c, B)
        assert_close_dtype(mean, want_mean)
        assert_close_dtype(sums, want_sums)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("graph", [False, True])
def test_reduce_rows_over_many_programs(graph, backend):
    """More rows than one interpreter block (d = 9: 256 rows a program), partial last block;
    in the graph layout the per-sample sums of several programs meet in the same atomics."""
    dev = device_of(backend)
    K, B, d = 2, 4, 9
    sample, P, N = layout(B, 201, graph, dev, empty_sample=0)
    assert N > 2 * 256 and N % 256
    x, M = rand(N, d, seed=6, device=dev), mats(K, B, d, torch.float32, device=dev)
    g = rand(K, N, d, seed=7, device=dev)
    valid = torch.arange(N, device=dev) % 5 != 0
    args = (g, M, x, sample, P, valid, None)
    mean, sums = kernel("reduce_rows", backend)(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert_close_dtype(mean, ref_mean)
    assert_close_dtype(sums, ref_sums)
    gs = rand(3, B, seed=8, device=dev)
    assert_close_dtype(kernel("reduce_rows_backward", backend)(x, gs, *args, ref_mean),
                       reduce_rows_backward_reference(x, gs, *args, ref_mean))


def reduce_backward_case(K, d, dtype, graph, masked, with_center, with_grad_mean, seed, backend):
    dev = device_of(backend)
    B = 3
    acc = acc_of(dtype)
    out, M, target, sample, P, valid, center = reduce_inputs(K, B, 4, d, dtype, graph, masked, with_center, dev,
                                                             seed=seed)
    N = out.shape[1]
    grad_sums = rand(3, B, dtype=acc, seed=seed + 6, device=dev)
    grad_mean = rand(N, d, dtype=acc, seed=seed + 7, device=dev) if with_grad_mean else None
    leaf = out.to(acc).requires_grad_()
    mean, sums = reduce_rows_reference(leaf, M, target, sample, P, valid, center, B)
    loss = (grad_sums * sums).sum() + ((grad_mean * mean).sum() if with_grad_mean else 0)
    (auto,) = torch.autograd.grad(loss, leaf)
    got = kernel("reduce_rows_backward", backend)(grad_mean, grad_sums, out, M, target, sample, P, valid, center,
                                                  mean.detach())
    ref = reduce_rows_backward_reference(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean.detach())
    assert got.dtype == dtype and got.shape == out.shape
    assert_close_dtype(got, ref)
    assert_close_dtype(got.to(acc), auto.to(dtype).to(acc), dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_reduce_rows_backward_is_the_gradient(K, d, graph, backend):
    reduce_backward_case(K, d, torch.float64, graph, masked=True, with_center=d == 3, with_grad_mean=True, seed=50,
                         backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("with_grad_mean", [False, True])
def test_reduce_rows_backward_dtypes(dtype, masked, with_center, with_grad_mean, backend):
    reduce_backward_case(3, 3, dtype, True, masked, with_center, with_grad_mean, seed=60, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 5])
def test_reduce_rows_backward_matches_autograd_of_reference(layout, d, backend):
    """d/dout of <grad_mean, mean> + <grad_sums, sums> for fixed centres."""
    c = Case(K=3, d=d, dtype=torch.float64, layout=layout, center=True, mask=True, device=device_of(backend))
    out = c.out.clone().requires_grad_()
    mean, sums = reduce_rows_reference(out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    ((mean * c.grad_mean).sum() + (sums * c.grad_sums).sum()).backward()
    got = kernel("reduce_rows_backward", backend)(c.grad_mean, c.grad_sums, c.out, c.M, c.target, c.sample, c.P,
                                                  c.valid, c.center, mean.detach())
    assert_close_dtype(got, out.grad)


@pytest.mark.parametrize("backend", KERNELS)
def test_reduce_rows_strided_inputs_are_copied_not_misread(backend):
    """A strided view gives the same result as its copy."""
    dev = device_of(backend)
    K, B, P, d = 3, 2, 5, 3
    N = B * P
    M = mats(K, B, d, torch.float32, device=dev).transpose(2, 3)
    out = rand(K, d, N, seed=12, device=dev).transpose(1, 2)
    target = rand(d, N, seed=13, device=dev).t()
    valid = torch.ones(2 * N, dtype=torch.bool, device=dev)[::2]
    mean, sums = kernel("reduce_rows", backend)(out, M, target, None, P, valid, None, B)
    ref_mean, ref_sums = reduce_rows_reference(out.contiguous(), M.contiguous(), target.contiguous(), None, P, None,
                                               None, B)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(sums, ref_sums)

    c = Case(K=2, d=3, dtype=torch.float64, mask=True, device=dev)
    out = c.out.transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous()
    mean, sums = kernel("reduce_rows", backend)(out, c.M, c.target, None, c.P, c.valid, c.center, c.B)
    want = reduce_rows_reference(c.out, c.M, c.target, None, c.P, c.valid, c.center, c.B)
    assert_close_dtype(mean, want[0], msg="mean")
    assert_close_dtype(sums, want[1], msg="sums")


# the message of each backend's argument checks
BAD_ARGUMENTS = {
    "cpu": {"dense": "need more than B = 2 samples"},
    "triton": {"dense": "dense layout"},
}


@pytest.mark.parametrize("backend", backend_params(*BAD_ARGUMENTS))
def test_reduce_rows_bad_arguments_raise_value_errors(backend):
    dev = device_of(backend)
    M = mats(2, 2, 3, torch.float32, device=dev)
    with pytest.raises(ValueError, match=BAD_ARGUMENTS[backend]["dense"]):
        kernel("reduce_rows", backend)(rand(2, 5, 3, device=dev), M, rand(5, 3, device=dev), None, 2, None, None, 2)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_reduce_rows_valid_must_be_bool_on_triton(backend):
    """(The host wrapper of the other backends converts ``valid`` to bool.)"""
    dev = device_of(backend)
    M = mats(2, 2, 3, torch.float32, device=dev)
    with pytest.raises(ValueError, match="valid must be a bool"):
        kernel("reduce_rows", backend)(rand(2, 4, 3, device=dev), M, rand(4, 3, device=dev), None, 2,
                                       torch.ones(4, device=dev), None, 2)


# --- the reference and its registration ----------------------------------------------------------

@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("center", [False, True])
def test_reference_backward_matches_autograd(graph, center):
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


def test_reference_spread_has_no_cancellation():
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


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    K, B, P, d = 2, 3, 4, 3
    N = B * P
    M = torch.linalg.qr(torch.randn(K, B, d, d, generator=g))[0].to(dev)
    out = torch.randn(K, N, d, generator=g).to(dev).requires_grad_()
    y = torch.randn(N, d, generator=g).to(dev).requires_grad_()
    cc = torch.randn(K, B, d, generator=g).to(dev).requires_grad_()
    valid = (torch.rand(N, generator=g) > 0.3).to(dev)
    sample = torch.randint(0, B, (N,), generator=g).to(dev)
    torch.library.opcheck(reduce_rows, (out, M, y, None, P, valid, cc, B, backend))
    torch.library.opcheck(reduce_rows, (out, M, y, sample, 0, None, None, B, backend))


# --- torch.use_deterministic_algorithms -----------------------------------------------------------

@pytest.mark.parametrize("backend, graph, atomic", [
    ("torch", False, False), ("torch", True, False), ("cpu", False, False), ("cpu", True, False),
    ("triton", False, False), ("triton", True, True), ("cuda", False, True), ("cuda", True, True),
    ("cupy", False, True), ("cupy", True, True)])
def test_which_reductions_add_with_atomics(backend, graph, atomic):
    assert atomic_sums(backend, graph) is atomic


def test_deterministic_mode_avoids_or_refuses_the_atomic_reductions():
    assert reduction_backend("cuda", "auto", graph=False, deterministic=False) == "cuda"
    assert reduction_backend("cuda", "auto", graph=False, deterministic=True) == "torch"
    assert reduction_backend("triton", "auto", graph=True, deterministic=True) == "torch"
    assert reduction_backend("triton", "auto", graph=False, deterministic=True) == "triton"  # fixed chunks
    assert reduction_backend("cpu", "cpu", graph=True, deterministic=True) == "cpu"
    for name, graph in (("cuda", False), ("cupy", True), ("triton", True)):
        with pytest.raises(RuntimeError, match=r"use_deterministic_algorithms.*backend='torch'"):
            reduction_backend(name, name, graph=graph, deterministic=True)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_deterministic_mode_on_a_graph_batch(backend, deterministic):
    """Triton's graph-layout reduction adds with atomics: with deterministic algorithms on,
    asking for it raises, and "auto" takes a deterministic reduction (the same sums every
    time, the reference's to rounding); Triton's dense layout still runs."""
    dev = device_of(backend)
    x, batch = graph_batch([3, 1, 4], "vector")
    K, B = 2, 3
    R = rotations(K, B).to(dev)
    out = torch.stack([x, 2 * x]).to(dev)
    with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        twirl_reduce(out, R, x.to(dev), as_rep("vector"), batch=batch.to(dev), backend=backend)
    got = [twirl_reduce(out, R, x.to(dev), as_rep("vector"), batch=batch.to(dev), backend="auto") for _ in range(2)]
    want = twirl_reduce(out, R, x.to(dev), as_rep("vector"), batch=batch.to(dev), backend="torch")
    assert torch.equal(got[0].total, got[1].total) and torch.equal(got[0].spread, got[1].spread)
    assert_close_dtype(got[0].total, want.total)
    assert_close_dtype(got[0].spread, want.spread)
    dense = out.reshape(K, 1, 8, 3).expand(K, B, 8, 3)
    twirl_reduce(dense, R, dense[0], as_rep("vector"), backend=backend)  # dense: fixed order, runs
