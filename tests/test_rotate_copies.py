"""rotate_copies: K rotated copies of an input, on every backend.

* the public op against the action of each rep written out per copy, its definition
  through ``Rep.act`` (:func:`rotate_copies_reference`), in both layouts, with masks,
  odd, empty and strided shapes, arrays of other frameworks and its argument errors;
* the row kernels ``rotate_rows`` / ``rotate_rows_backward`` of each compiled backend
  against the torch reference (``rotate_rows_reference``), and the reference's backward
  against autograd;
* the ``torch.ops.fastequiv.rotate_rows`` registration (opcheck).

Backends that cannot run here are skipped with the reason (tests/conftest.py). Shapes stay
small for Triton's CPU interpreter; sizes leave partial blocks and several programs.
"""

import pytest
import torch
from conftest import BACKENDS, GPU, KERNELS, acc_of, assert_close_dtype, backend_params, device_of, kernel
from opdata import ROW_CASES, Case, data, dim, graph_batch, layout, loop_act, mats, rand, rotations

import fastequiv as fe
import fastequiv.backends.triton
from fastequiv.ops import rotate_copies
from fastequiv.ops.layout import mask_for
from fastequiv.ops.rotate_copies import rotate_copies_reference, rotate_rows, rotate_rows_backward_reference, \
    rotate_rows_reference
from fastequiv.reps import as_rep

LOOP_REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e"]
REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e", "1x1e + 1x3o"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- the public op against its definition ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", LOOP_REPS)
@pytest.mark.parametrize("K,B,inner", [(2, 3, (5,)), (3, 1, ()), (8, 2, (7, 2)), (24, 2, (1,))])
def test_matches_a_loop(rep, K, B, inner, backend):
    dev = device_of(backend)
    x = torch.randn((B,) + inner + (dim(rep),), dtype=torch.float64)
    if rep == "position" and not inner:
        x = x[:, None]
    R = rotations(K, B)
    got = rotate_copies(x.to(dev), R.to(dev), as_rep(rep), backend=backend).cpu()
    assert got.shape == (K * B,) + tuple(x.shape[1:])
    for k in range(K):
        for b in range(B):
            assert_close_dtype(got[k * B + b], loop_act(rep, x[b], R[k, b]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("masked", [False, True])
def test_rows_match_definition(rep, masked, backend):
    """The row path (rows, matrices, centroids and the kernel) against ``Rep.act``."""
    dev = device_of(backend)
    K, B, n = 3, 5, 4
    x = data(rep, (B, n), torch.float64).to(dev)
    R = rotations(K, B).to(dev)
    mask = (torch.rand(B, n, generator=torch.Generator().manual_seed(1)) > 0.4).to(dev) if masked else None
    got = fe.ops.rotate_copies(x, R, as_rep(rep), mask, backend=backend)
    assert_close_dtype(got, rotate_copies_reference(x, R, as_rep(rep), mask_for(mask, x.shape, "x")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype, backend):
    dev = device_of(backend)
    x = torch.randn(3, 4, 3).to(dtype)
    R = rotations(2, 3, dtype=torch.float32)
    got = rotate_copies(x.to(dev), R.to(dev), as_rep("vector"), backend=backend).cpu()
    assert got.dtype == dtype
    ref = rotate_copies(x.double(), R.double(), as_rep("vector"), backend="torch")
    if dtype in (torch.float32, torch.float64):
        # float32 math on float32 inputs against float64 math: tighter than TOL[float32]
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=4e-6)
    else:
        assert_close_dtype(got, ref, dtype)  # one rounding of float32 math to the 16-bit dtype
    s = fe.ops.twirl_reduce(got.reshape(2, 3, 4, 3).to(dev), R.to(dev), x.to(dev), as_rep("vector"), backend=backend)
    assert s.total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_and_empty_inner_dims(backend):
    dev = device_of(backend)
    rep = as_rep("position")
    for shape in [(0, 4, 3), (2, 0, 3)]:
        x = torch.randn(shape, device=dev)
        R = rotations(3, shape[0], dtype=torch.float32).to(dev)
        got = rotate_copies(x, R, rep, backend=backend)
        assert got.shape == (3 * shape[0],) + shape[1:]
    empty = torch.zeros(0, 4, 3, device=dev)
    assert rotate_copies(empty, R[:, :0], as_rep("vector"), backend=backend).shape == (0, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_of(backend)
    x = torch.randn(5, 3, 6, dtype=torch.float64, device=dev).transpose(1, 2)  # (5, 6, 3), non-contiguous
    assert not x.is_contiguous()
    R = rotations(2, 5).to(dev).transpose(-1, -2)  # rotations too
    torch.testing.assert_close(rotate_copies(x, R, as_rep("position"), backend=backend),
                               rotate_copies(x.contiguous(), R.contiguous(), as_rep("position"), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend):
    dev = device_of(backend)
    B, N = 3, 5
    x = torch.randn(B, N, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    R = rotations(2, B)
    got = rotate_copies(x.to(dev), R.to(dev), as_rep("position"), mask.to(dev), backend=backend).cpu()
    assert got.shape == (2 * B, N, 3)
    # every point of a sample, masked or not, turns about the centroid of the sample's valid
    # points: sample 0's first three, all of sample 1, and none of sample 2 (fully masked:
    # the origin, so its padding stays finite and its copies are plain rotations)
    centres = [x[0, :3].mean(0), x[1].mean(0), torch.zeros(3, dtype=x.dtype)]
    for k in range(2):
        for b, c in enumerate(centres):
            assert_close_dtype(got[k * B + b], (x[b] - c) @ R[k, b].T + c,
                               msg=f"copy {k}, sample {b}, masked points {(~mask[b]).nonzero().flatten().tolist()}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x2e"])
def test_graph_layout_equals_each_graph_alone(rep, backend):
    dev = device_of(backend)
    sizes = [3, 1, 0, 5]  # graph 2 has no node
    K, B = 3, len(sizes)
    R = rotations(K, B).to(dev)
    r = as_rep(rep)
    x, batch = graph_batch(sizes, rep)
    x, batch = x.to(dev), batch.to(dev)
    d = x.shape[-1]
    copies = fe.ops.rotate_copies(x, R, r, batch=batch, backend=backend).reshape(K, x.shape[0], d)
    start = 0
    for b, n in enumerate(sizes):
        sl = slice(start, start + n)
        alone = fe.ops.rotate_copies(x[None, sl], R[:, b:b + 1], r, backend="torch")
        assert_close_dtype(copies[:, sl], alone.reshape(K, n, d))
        start += n


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("rep", ["vector", "position", "pseudoscalar", "1x0e + 1x1o + 1x2e"])
@pytest.mark.parametrize("K", [2, 3])
def test_backend_matches_the_torch_backend(backend, rep, K):
    dev = device_of(backend)
    B, n = 3, 5
    r = as_rep(rep)
    R = rotations(K, B, dtype=torch.float32).to(dev)
    x = data(rep, (B, n), torch.float32).to(dev)
    mask = (torch.rand(B, n, generator=torch.Generator().manual_seed(6)) > 0.3).to(dev)
    assert_close_dtype(fe.ops.rotate_copies(x, R, r, mask, backend=backend),
                       fe.ops.rotate_copies(x, R, r, mask, backend="torch"))


def test_batch_index_is_checked():
    x = torch.randn(4, 3)
    R = rotations(2, 2)
    with pytest.raises(ValueError, match="batch must be an int64 tensor of shape \\(4,\\)"):
        fe.ops.rotate_copies(x, R, as_rep("vector"), batch=torch.zeros(4, dtype=torch.int32))


def test_argument_errors(monkeypatch):
    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", False)  # the Triton backend then cannot run CPU tensors
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="R must have shape"):
        rotate_copies(x, torch.randn(3, 3, 3, 3), as_rep("vector"))
    with pytest.raises(fe.BackendUnavailableError, match="triton"):
        rotate_copies(x, rotations(3, 2, dtype=torch.float32), as_rep("vector"), backend="triton")


def test_unknown_backend_and_unavailable_backend_errors():
    R = rotations(2, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        fe.ops.rotate_copies(torch.randn(3, 3), R, as_rep("vector"), backend="fast")
    if not GPU:
        with pytest.raises(fe.BackendUnavailableError, match="cuda"):
            fe.ops.rotate_copies(torch.randn(3, 3), R, as_rep("vector"), backend="cuda")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_takes_and_returns_numpy_arrays(backend):
    K, B, n = 2, 3, 4
    R = rotations(K, B)
    x = data("position", (B, n), torch.float64)
    mask = torch.rand(B, n, generator=torch.Generator().manual_seed(3)) > 0.3
    copies = fe.ops.rotate_copies(x.numpy(), R.numpy(), as_rep("position"), mask.numpy(), backend=backend)
    assert type(copies).__module__ == "numpy"
    torch.testing.assert_close(torch.from_numpy(copies), fe.ops.rotate_copies(x, R, as_rep("position"), mask))


# --- the row kernels against the torch reference -----------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_rotate_rows_matches_reference(K, d, graph, with_center, backend):
    dev = device_of(backend)
    B = 3
    sample, P, N = layout(B, 5, graph, dev, empty_sample=1)
    x, M = rand(N, d, seed=2, device=dev), mats(K, B, d, torch.float32, device=dev)
    center = rand(B, d, seed=3, device=dev) if with_center else None
    got = kernel("rotate_rows", backend)(x, M, sample, P, center)
    assert_close_dtype(got, rotate_rows_reference(x, M, sample, P, center))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("graph", [False, True])
def test_rotate_rows_dtypes(dtype, graph, backend):
    dev = device_of(backend)
    K, B, d = 3, 4, 3
    sample, P, N = layout(B, 7, graph, dev)
    x, M = rand(N, d, dtype=dtype, seed=4, device=dev), mats(K, B, d, acc_of(dtype), device=dev)
    center = rand(B, d, dtype=acc_of(dtype), seed=5, device=dev)
    got = kernel("rotate_rows", backend)(x, M, sample, P, center)
    assert got.dtype == dtype and got.shape == (K, N, d)
    assert_close_dtype(got, rotate_rows_reference(x, M, sample, P, center))


def check_rotate_ops(c: Case, backend: str):
    """Both row kernels of ``backend`` on the inputs of ``c`` against the reference."""
    got = kernel("rotate_rows", backend)(c.x, c.M, c.sample, c.P, c.center_x)
    want = rotate_rows_reference(c.x, c.M, c.sample, c.P, c.center_x)
    assert got.dtype == c.x.dtype and got.shape == want.shape
    assert_close_dtype(got, want, msg="rotate_rows")

    got = kernel("rotate_rows_backward", backend)(c.grad_rot, c.M, c.sample, c.P)
    want = rotate_rows_backward_reference(c.grad_rot, c.M, c.sample, c.P)
    assert got.dtype == c.acc
    assert_close_dtype(got, want, msg="rotate_rows_backward")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_row_kernels_match_reference(dtype, layout, d, center, backend):
    """Dense with a short last sample, graph with an empty sample."""
    check_rotate_ops(Case(d=d, dtype=dtype, layout=layout, center=center, mask=True, device=device_of(backend)),
                     backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(ROW_CASES.values()), ids=list(ROW_CASES))
def test_row_kernels_on_the_shared_cases(case, backend):
    """opdata.ROW_CASES: many copies, many rows, sorted graph batches."""
    check_rotate_ops(Case(**case, device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", backend_params("cuda", "cupy"))
@pytest.mark.parametrize("K", [1, 2, 24])
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_row_kernels_past_one_block(K, layout, backend):
    """Past one block of rows of the CUDA kernels: the warp/block combination of the
    per-sample sums (several Triton programs: test_rotate_rows_over_many_programs)."""
    check_rotate_ops(Case(K=K, B=6, P=2501, d=3, dtype=torch.float32, layout=layout, mask=True,
                          device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("graph", [False, True])
def test_rotate_rows_over_many_programs(graph, backend):
    """More rows than one interpreter block (d = 9: 256 rows a program), partial last block."""
    dev = device_of(backend)
    K, B, d = 2, 4, 9
    sample, P, N = layout(B, 201, graph, dev, empty_sample=0)
    assert N > 2 * 256 and N % 256
    x, M = rand(N, d, seed=6, device=dev), mats(K, B, d, torch.float32, device=dev)
    assert_close_dtype(kernel("rotate_rows", backend)(x, M, sample, P, None),
                       rotate_rows_reference(x, M, sample, P, None))
    g = rand(K, N, d, seed=7, device=dev)
    assert_close_dtype(kernel("rotate_rows_backward", backend)(g, M, sample, P),
                       rotate_rows_backward_reference(g, M, sample, P))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_rotate_rows_no_rows(layout, backend):
    dev = device_of(backend)
    K, B, d = 3, 2, 3
    M = torch.randn(K, B, d, d, device=dev)
    x, out = torch.zeros(0, d, device=dev), torch.zeros(K, 0, d, device=dev)
    sample = torch.zeros(0, dtype=torch.int64, device=dev) if layout == "graph" else None
    for P in ((0,) if layout == "graph" else (0, 4)):
        assert kernel("rotate_rows", backend)(x, M, sample, P, None).shape == (K, 0, d)
        assert kernel("rotate_rows_backward", backend)(out, M, sample, P).shape == (0, d)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [1, 3, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_rotate_rows_backward_is_the_gradient(dtype, K, d, graph, backend):
    dev = device_of(backend)
    B, acc = 3, acc_of(dtype)
    sample, P, N = layout(B, 4, graph, dev, empty_sample=0)
    x = rand(N, d, dtype=acc, seed=7, device=dev).requires_grad_()
    M = mats(K, B, d, acc, device=dev)
    grad = rand(K, N, d, dtype=dtype, seed=8, device=dev)
    (auto,) = torch.autograd.grad(rotate_rows_reference(x, M, sample, P, None), x, grad.to(acc))
    got = kernel("rotate_rows_backward", backend)(grad, M, sample, P)
    assert got.dtype == acc
    assert_close_dtype(got, auto)
    assert_close_dtype(got, rotate_rows_backward_reference(grad, M, sample, P))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 5])
def test_rotate_rows_backward_matches_autograd_of_reference(layout, d, backend):
    """d/dx of <grad, rotate_rows(x)> for a fixed centre."""
    c = Case(K=3, d=d, dtype=torch.float64, layout=layout, center=True, mask=True, device=device_of(backend))
    x = c.x.clone().requires_grad_()
    (rotate_rows_reference(x, c.M, c.sample, c.P, c.center_x) * c.grad_rot).sum().backward()
    assert_close_dtype(kernel("rotate_rows_backward", backend)(c.grad_rot, c.M, c.sample, c.P), x.grad)


@pytest.mark.parametrize("backend", KERNELS)
def test_rotate_rows_strided_inputs_are_copied_not_misread(backend):
    """A strided view gives the same result as its copy."""
    dev = device_of(backend)
    K, B, P, d = 3, 2, 5, 3
    N = B * P
    x = rand(d, N, seed=9, device=dev).t()  # (N, d), transposed strides
    M = mats(K, B, d, torch.float32, device=dev).transpose(2, 3)
    center = rand(d, B, seed=10, device=dev).t()
    assert not (x.is_contiguous() or M.is_contiguous() or center.is_contiguous())
    got = kernel("rotate_rows", backend)(x, M, None, P, center)
    torch.testing.assert_close(got, rotate_rows_reference(x.contiguous(), M.contiguous(), None, P, center.contiguous()))
    grad = rand(K, d, N, seed=11, device=dev).transpose(1, 2)
    torch.testing.assert_close(kernel("rotate_rows_backward", backend)(grad, M, None, P),
                               rotate_rows_backward_reference(grad.contiguous(), M.contiguous(), None, P))

    c = Case(K=2, d=3, dtype=torch.float64, mask=True, device=dev)
    x = c.x.t().contiguous().t()  # same values, column-major
    assert not x.is_contiguous()
    assert_close_dtype(kernel("rotate_rows", backend)(x, c.M, None, c.P, c.center_x),
                       rotate_rows_reference(c.x, c.M, None, c.P, c.center_x))


# the message of each backend's argument checks (the C++ checks of fastequiv._C are also
# tested on NumPy arrays in tests/test_extension.py)
BAD_ARGUMENTS = {
    "cpu": {"dtype": "M: expected float32 or float64", "shape": r"M: expected shape \(K, B, d, d\)",
            "sample": "sample: expected an int64"},
    "triton": {"dtype": "M must be float32 or float64", "shape": r"M must have shape \(K, B, 3, 3\)",
               "sample": "sample must be an int64"},
}


@pytest.mark.parametrize("backend", backend_params(*BAD_ARGUMENTS))
def test_rotate_rows_bad_arguments_raise_value_errors(backend):
    dev = device_of(backend)
    match = BAD_ARGUMENTS[backend]
    x, M = rand(4, 3, device=dev), mats(2, 2, 3, torch.float32, device=dev)
    with pytest.raises(ValueError, match=match["dtype"]):
        kernel("rotate_rows", backend)(x, M.half(), None, 2, None)
    with pytest.raises(ValueError, match=match["shape"]):
        kernel("rotate_rows", backend)(x, M[..., :2], None, 2, None)
    with pytest.raises(ValueError, match=match["sample"]):
        kernel("rotate_rows", backend)(x, M, torch.zeros(4, dtype=torch.int32, device=dev), 0, None)


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda", "cupy"))
def test_host_wrapper_refuses_float64_elements_with_float32_accumulation(backend):
    """The host side of fastequiv._C's and the CuPy kernels (fastequiv.backends.host)."""
    dev = device_of(backend)
    with pytest.raises(ValueError, match="M: expected float64"):
        kernel("rotate_rows", backend)(torch.zeros(2, 3, dtype=torch.float64, device=dev),
                                       torch.zeros(1, 1, 3, 3, device=dev), None, 2, None)


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
    c = torch.randn(K, B, d, dtype=torch.float64) if center else None
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    copies = rotate_rows_reference(x, M, sample, P_arg, c[0] if center else None)
    g = torch.randn_like(copies)
    (expected,) = torch.autograd.grad((copies * g).sum(), x)
    torch.testing.assert_close(rotate_rows_backward_reference(g, M, sample, P_arg), expected)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    K, B, P, d = 2, 3, 4, 3
    N = B * P
    M = torch.linalg.qr(torch.randn(K, B, d, d, generator=g))[0].to(dev)
    x = torch.randn(N, d, generator=g).to(dev).requires_grad_()
    c = torch.randn(B, d, generator=g).to(dev).requires_grad_()
    torch.library.opcheck(rotate_rows, (x, M, None, P, c, backend))

