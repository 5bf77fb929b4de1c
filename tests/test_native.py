"""The "cpu" backend of the row contract (fastequiv._C's C++ kernels, kernels/*.cuh math)
against the pure-torch reference fastequiv.ops._rows, and the "cuda" backend against the
same reference when there is a GPU (the CPU tests are its counterpart: same .cuh math)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastequiv as fe
import fastequiv.backends.native as native
from fastequiv.backends import extension as _extension, host
from fastequiv.backends import registry as _backend
from fastequiv.ops.layout import sample_index
from fastequiv.ops.random_rotations import random_rotations_seeded_reference
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference
from fastequiv.ops.wigner_d import wigner_blocks_reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# tolerance of an output element of each dtype (relative to the data's scale ~1)
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def C():
    ext = _extension.load()
    if ext is None:
        pytest.fail(f"fastequiv._C did not import: {_extension.load_error()}")
    return ext


def impl(name, backend="cpu", device="cpu"):
    return _backend.resolve(name, backend, device)[1]


def acc_of(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def close(got, want, tol, what=""):
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


class Case:
    """Random inputs of the row contract: K copies, B samples, N rows of d components."""

    def __init__(self, K=3, B=4, P=5, d=3, dtype=torch.float32, layout="dense", center=True, mask=False,
                 device="cpu", seed=0, target_dtype=None):
        g = torch.Generator().manual_seed(seed)
        acc = acc_of(dtype, target_dtype or dtype)
        self.K, self.B, self.d, self.acc = K, B, d, acc
        if layout == "dense":
            self.N, self.P, self.sample = B * P - (P > 1), P, None  # last sample one row short
        else:
            self.N, self.P = B * P + 1, 0
            # sample 1 is empty; the others in random order
            s = torch.randint(0, B, (self.N,), generator=g)
            self.sample = torch.where(s == 1, 0, s).to(device)
        N = self.N
        self.M = torch.randn(K, B, d, d, generator=g, dtype=torch.float64).to(acc).to(device)
        self.x = torch.randn(N, d, generator=g).to(dtype).to(device)
        self.out = torch.randn(K, N, d, generator=g).to(dtype).to(device)
        self.target = torch.randn(N, d, generator=g).to(target_dtype or dtype).to(device)
        self.center_x = torch.randn(B, d, generator=g, dtype=torch.float64).to(acc).to(device) if center else None
        self.center = torch.randn(K, B, d, generator=g, dtype=torch.float64).to(acc).to(device) if center else None
        self.valid = None
        if mask:
            v = torch.rand(N, generator=g) > 0.3
            s = sample_index(N, self.P, self.sample, "cpu").cpu()
            v[s == 2] = False  # a fully masked sample
            self.valid = v.to(device)
        self.grad_sums = torch.randn(3, B, generator=g, dtype=torch.float64).to(acc).to(device)
        self.grad_mean = torch.randn(N, d, generator=g, dtype=torch.float64).to(acc).to(device)
        self.grad_rot = torch.randn(K, N, d, generator=g).to(dtype).to(device)


def check_row_ops(case: Case, backend: str, tol: float):
    c = case
    dev = c.M.device
    got = impl("rotate_rows", backend, dev)(c.x, c.M, c.sample, c.P, c.center_x)
    want = rotate_rows_reference(c.x, c.M, c.sample, c.P, c.center_x)
    assert got.dtype == c.x.dtype and got.shape == want.shape
    close(got, want, tol * 10, "rotate_rows")

    got = impl("rotate_rows_backward", backend, dev)(c.grad_rot, c.M, c.sample, c.P)
    want = rotate_rows_backward_reference(c.grad_rot, c.M, c.sample, c.P)
    assert got.dtype == c.acc
    close(got, want, 1e-4 if c.acc == torch.float32 else 1e-11, "rotate_rows_backward")

    mean, sums = impl("reduce_rows", backend, dev)(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    assert mean.dtype == sums.dtype == c.acc and sums.shape == (3, c.B)
    acc_tol = 1e-4 if c.acc == torch.float32 else 1e-11
    close(mean, want_mean, acc_tol, "reduce_rows mean")
    close(sums, want_sums, acc_tol * max(1, c.N // c.B), "reduce_rows sums")

    for gm in (c.grad_mean, None):
        got = impl("reduce_rows_backward", backend, dev)(gm, c.grad_sums, c.out, c.M, c.target, c.sample, c.P,
                                                         c.valid, c.center, want_mean)
        want = reduce_rows_backward_reference(gm, c.grad_sums, c.out, c.M, c.target, c.sample, c.P, c.valid,
                                          c.center, want_mean)
        assert got.dtype == c.out.dtype
        close(got, want, tol * 10, "reduce_rows_backward")


# --- CPU against the reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_cpu_matches_reference(C, dtype, layout, d, center):
    check_row_ops(Case(d=d, dtype=dtype, layout=layout, center=center, mask=True), "cpu", TOL[dtype])


@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("P", [1, 7])
def test_cpu_copies_and_rows_per_sample(C, K, P):
    check_row_ops(Case(K=K, B=3, P=P, d=3, dtype=torch.float64), "cpu", TOL[torch.float64])


def test_cpu_many_rows_use_the_threads(C):
    # past the kernels' parallel threshold: OpenMP partial sums per thread
    check_row_ops(Case(K=4, B=5, P=4001, d=3, dtype=torch.float32, mask=True), "cpu", TOL[torch.float32])
    check_row_ops(Case(K=2, B=7, P=3001, d=3, dtype=torch.float64, layout="graph"), "cpu", TOL[torch.float64])


@pytest.mark.parametrize("out_dtype, target_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                     (torch.bfloat16, torch.float64)], ids=str)
def test_cpu_target_in_another_dtype(C, out_dtype, target_dtype):
    check_row_ops(Case(dtype=out_dtype, target_dtype=target_dtype, mask=True), "cpu", TOL[out_dtype])


@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_cpu_no_rows(C, layout):
    K, B, d = 3, 2, 3
    M = torch.randn(K, B, d, d)
    x, out, y = torch.zeros(0, d), torch.zeros(K, 0, d), torch.zeros(0, d)
    sample = torch.zeros(0, dtype=torch.int64) if layout == "graph" else None
    P = 0 if layout == "graph" else 4
    assert impl("rotate_rows")(x, M, sample, P, None).shape == (K, 0, d)
    assert impl("rotate_rows_backward")(out, M, sample, P).shape == (0, d)
    mean, sums = impl("reduce_rows")(out, M, y, sample, P, None, None, B)
    assert mean.shape == (0, d) and torch.equal(sums, torch.zeros(3, B))
    assert impl("reduce_rows_backward")(None, sums, out, M, y, sample, P, None, None, mean).shape == (K, 0, d)


def test_cpu_masked_and_empty_samples_have_zero_sums(C):
    c = Case(B=4, d=3, layout="graph", mask=True)  # sample 1 empty, sample 2 fully masked
    _, sums = impl("reduce_rows")(c.out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    assert torch.equal(sums[:, 1:3], torch.zeros(3, 2))
    assert (sums[:, 0] > 0).all() and (sums[:, 3] > 0).all()


def test_cpu_spread_has_no_cancellation(C):
    """Copies that differ by 1e-2 around values of 1e4: the spread is formed from the
    deviations, so float32 keeps it to about 1% (only abar's rounding enters, squared),
    where E|a|^2 - |abar|^2 in float32 would lose it entirely."""
    K, N = 4, 33
    M = torch.eye(3).expand(K, 1, 3, 3).contiguous()
    base = torch.full((N, 3), 1e4, dtype=torch.float64)
    dev = torch.randn(K, N, 3, dtype=torch.float64) * 1e-2
    out = (base + dev).float()
    _, sums = impl("reduce_rows")(out, M, base.float(), None, N, None, None, 1)
    _, want = reduce_rows_reference(out.double(), M.double(), base, None, N, None, None, 1)
    torch.testing.assert_close(sums[2].double(), want[2], rtol=1e-2, atol=0)
    a = out.reshape(K, N * 3)
    naive = ((a * a).mean(0) - a.mean(0) ** 2).sum()
    assert abs(naive.double() - want[2]) > want[2]  # what the deviations avoid


@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 5])
def test_cpu_backward_matches_autograd_of_reference(C, layout, d):
    c = Case(K=3, d=d, dtype=torch.float64, layout=layout, center=True, mask=True)
    # rotate_rows: d/dx of <grad, rotate_rows(x)> for a fixed centre
    x = c.x.clone().requires_grad_()
    (rotate_rows_reference(x, c.M, c.sample, c.P, c.center_x) * c.grad_rot).sum().backward()
    close(impl("rotate_rows_backward")(c.grad_rot, c.M, c.sample, c.P), x.grad, 1e-11, "rotate_rows_backward")
    # reduce_rows: d/dout of <grad_mean, mean> + <grad_sums, sums>
    out = c.out.clone().requires_grad_()
    mean, sums = reduce_rows_reference(out, c.M, c.target, c.sample, c.P, c.valid, c.center, c.B)
    ((mean * c.grad_mean).sum() + (sums * c.grad_sums).sum()).backward()
    got = impl("reduce_rows_backward")(c.grad_mean, c.grad_sums, c.out, c.M, c.target, c.sample, c.P, c.valid,
                                       c.center, mean.detach())
    close(got, out.grad, 1e-10, "reduce_rows_backward")


def test_cpu_non_contiguous_inputs(C):
    c = Case(K=2, d=3, dtype=torch.float64, mask=True)
    x = c.x.t().contiguous().t()  # same values, column-major
    out = c.out.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous() and not out.is_contiguous()
    close(impl("rotate_rows")(x, c.M, None, c.P, c.center_x), rotate_rows_reference(c.x, c.M, None, c.P, c.center_x),
          1e-12, "rotate_rows")
    mean, sums = impl("reduce_rows")(out, c.M, c.target, None, c.P, c.valid, c.center, c.B)
    want = reduce_rows_reference(c.out, c.M, c.target, None, c.P, c.valid, c.center, c.B)
    close(mean, want[0], 1e-12, "mean")
    close(sums, want[1], 1e-11, "sums")


# --- the C++ entry points on NumPy arrays (no torch tensors) -----------------------------------


def test_cpu_kernels_take_numpy_arrays(C):
    c = Case(K=3, B=3, P=4, d=3, dtype=torch.float64, layout="graph", center=True, mask=True)
    np_ = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in vars(c).items()}
    K, N, d, B = c.K, c.N, c.d, c.B
    out = np.empty((K, N, d))
    C.rotate_rows_cpu(np_["x"], np_["M"], np_["sample"], 0, np_["center_x"], out)
    np.testing.assert_allclose(out, rotate_rows_reference(c.x, c.M, c.sample, 0, c.center_x).numpy(), atol=1e-12)

    g = np.empty((N, d))
    C.rotate_rows_backward_cpu(np_["grad_rot"], np_["M"], np_["sample"], 0, g)
    np.testing.assert_allclose(g, rotate_rows_backward_reference(c.grad_rot, c.M, c.sample, 0).numpy(), atol=1e-11)

    mean, sums = np.empty((N, d)), np.full((3, B), np.nan)
    C.reduce_rows_cpu(np_["out"], np_["M"], np_["target"], np_["sample"], 0, np_["valid"], np_["center"], mean, sums)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, 0, c.valid, c.center, B)
    np.testing.assert_allclose(mean, want_mean.numpy(), atol=1e-12)
    np.testing.assert_allclose(sums, want_sums.numpy(), atol=1e-10)

    grad_out = np.empty((K, N, d))
    C.reduce_rows_backward_cpu(None, np_["grad_sums"], np_["out"], np_["M"], np_["target"], np_["sample"], 0,
                               np_["valid"], np_["center"], mean, grad_out)
    want = reduce_rows_backward_reference(None, c.grad_sums, c.out, c.M, c.target, c.sample, 0, c.valid, c.center,
                                      want_mean)
    np.testing.assert_allclose(grad_out, want.numpy(), atol=1e-11)

    R = fe.random_rotations(7, seed=3, dtype=torch.float64)
    index, coef, start = host.wigner_term_table(3)
    D = np.empty((7, 84))
    C.wigner_blocks_cpu(R.numpy(), 3, index, coef, start, D)
    np.testing.assert_allclose(D, wigner_blocks_reference(R, 3).numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=np.zeros((5, 2))), r"x: expected shape \(N, d\)"),
        (dict(M=np.zeros((2, 3, 3, 2))), r"M: expected shape \(K, B, d, d\)"),
        (dict(x=np.zeros((5, 3), np.int32)), "x: expected dtype float32 or float64"),
        (dict(out=np.zeros((2, 5, 3), np.float32)), "out: expected the dtype of x"),
        (dict(center=np.zeros((3, 3), np.float32)), "center: expected the dtype of M"),
        (dict(center=np.zeros((2, 3))), r"center: expected shape \(B, d\)"),
        (dict(out=np.zeros((2, 5, 3))[:, ::-1]), "out: expected a C-contiguous array"),
        (dict(sample=np.zeros(5, np.int32)), "sample: expected dtype int64"),
        (dict(sample=np.array([0, 1, 2, 3, 0])), r"sample: expected every index in \[0, B\)"),
        (dict(sample=None, P=0), "P: expected P >= 1"),
        (dict(sample=None, P=1), "need more than B = 3 samples"),
    ],
)
def test_cpu_bad_arguments_raise_value_error(C, change, match):
    args = dict(x=np.zeros((5, 3)), M=np.zeros((2, 3, 3, 3)), sample=np.zeros(5, np.int64), P=0,
                center=np.zeros((3, 3)), out=np.zeros((2, 5, 3)))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        C.rotate_rows_cpu(**args)


def test_wrapper_refuses_float64_elements_with_float32_accumulation(C):
    with pytest.raises(ValueError, match="M: expected float64"):
        impl("rotate_rows")(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(1, 1, 3, 3), None, 2, None)


# --- Wigner-D and seeded rotations -----------------------------------------------------------


@pytest.mark.parametrize("lmax", [0, 1, 2, 4, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_cpu_wigner_blocks_match_reference(C, lmax, dtype):
    R = fe.random_rotations(37, seed=lmax, dtype=torch.float64)
    got = impl("wigner_blocks")(R.to(dtype), lmax)
    want = wigner_blocks_reference(R, lmax)
    assert got.dtype == dtype and got.shape == want.shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-5 * (lmax + 1), torch.float16: 4e-3 * (lmax + 1)}[dtype]
    close(got, want, tol, "wigner_blocks")


def test_cpu_wigner_blocks_match_e3nn(C):
    o3 = pytest.importorskip("e3nn.o3")
    R = fe.random_rotations(20, seed=4, dtype=torch.float64)
    D = impl("wigner_blocks")(R, 5)
    offset = 0
    for l in range(6):
        n = 2 * l + 1
        # e3nn goes through Euler angles and float32 tables: agreement to ~1e-6
        close(D[:, offset:offset + n * n].reshape(-1, n, n), o3.Irrep(l, 1).D_from_matrix(R), 1e-5, f"l={l}")
        offset += n * n
    assert impl("wigner_blocks")(R[:0], 3).shape == (0, 84)


def test_wigner_term_table_is_the_reference_recursion():
    from fastequiv.wigner import recursion_terms

    index, coef, start = host.wigner_term_table(4)
    assert start.tolist()[:3] == [0, 0, 0] and len(start) == 6
    for l in range(2, 5):
        r, c, k, i, j, a, b = recursion_terms(l)
        seg = slice(start[l], start[l + 1])
        np.testing.assert_array_equal(index[seg, 0], r * (2 * l + 1) + c)
        np.testing.assert_array_equal(index[seg, 1], i * 3 + j)
        np.testing.assert_array_equal(index[seg, 2], a * (2 * l - 1) + b)
        np.testing.assert_array_equal(coef[seg], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("improper", [False, True])
def test_cpu_seeded_rotations_match_torch_stream(C, dtype, improper):
    seed, n, offset = 2**40 + 3, 1001, 2**32 - 10
    got = impl("random_rotations_seeded")(torch.tensor(seed), n, offset, improper, dtype)
    want = fe.random_rotations(n, seed=seed, offset=offset, group="O3" if improper else "SO3",
                               dtype=torch.float64, backend="torch")
    assert got.dtype == dtype and got.shape == (n, 3, 3)
    close(got, want, {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype], "rotations")


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    for name in host.ROW_OPS:
        assert _backend.resolve(name, "auto", "cpu")[0] == "cpu"


def test_cuda_backend_says_what_is_missing_on_cpu_tensors():
    with pytest.raises(fe.BackendUnavailableError, match="cuda"):
        _backend.resolve("reduce_rows", "cuda", "cpu")


# --- CUDA (the CPU tests above are the counterpart) -----------------------------------------


def _require_cuda(C):
    if not hasattr(C, "reduce_rows_cuda"):
        pytest.fail("fastequiv._C was built without CUDA on a machine with a GPU")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "graph"])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_cuda_matches_reference(C, dtype, layout, d, center):
    _require_cuda(C)
    check_row_ops(Case(d=d, dtype=dtype, layout=layout, center=center, mask=True, device="cuda"), "cuda", TOL[dtype])


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 2, 24])
@pytest.mark.parametrize("layout", ["dense", "graph"])
def test_cuda_many_rows(C, K, layout):
    """Past one block of rows: the warp/block combination of the per-sample sums."""
    _require_cuda(C)
    check_row_ops(Case(K=K, B=6, P=2501, d=3, dtype=torch.float32, layout=layout, mask=True, device="cuda"),
                  "cuda", TOL[torch.float32])


@needs_gpu
@pytest.mark.gpu
def test_cuda_wigner_and_seeded_rotations(C):
    _require_cuda(C)
    R = fe.random_rotations(1001, seed=1, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        got = impl("wigner_blocks", "cuda", "cuda")(R.to(dtype).cuda(), 10)
        close(got.cpu(), wigner_blocks_reference(R, 10), tol, "wigner_blocks")
    seed = torch.tensor(2**35 + 1, device="cuda")
    got = impl("random_rotations_seeded", "cuda", "cuda")(seed, 1001, 2**32 - 3, True, torch.float32)
    want = random_rotations_seeded_reference(seed.cpu(), 1001, 2**32 - 3, True, torch.float64)
    close(got.cpu(), want, 2e-6, "seeded rotations")


@needs_gpu
@pytest.mark.gpu
def test_cuda_seeded_rotations_replay_in_a_cuda_graph(C):
    _require_cuda(C)
    fn = impl("random_rotations_seeded", "cuda", "cuda")
    seed = torch.tensor(1, device="cuda")
    fn(seed, 64, 0, False, torch.float32)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(seed, 64, 0, False, torch.float32)
    seed.fill_(99)
    graph.replay()
    want = random_rotations_seeded_reference(torch.tensor(99), 64, 0, False, torch.float64)
    close(out.cpu(), want, 2e-6, "replayed rotations")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_dense_rows_of_three_across_tiles(C, dtype):
    """The tiled CPU path for dense rows of three components: samples spanning several tiles
    of 128 rows, a short last sample, masks and centres."""
    g = torch.Generator().manual_seed(5)
    K, B, P = 3, 3, 300
    N = B * P - 7
    M = fe.random_rotations(K * B, seed=1, dtype=dtype).reshape(K, B, 3, 3)
    out = torch.randn(K, N, 3, generator=g, dtype=dtype) + 50.0
    y = torch.randn(N, 3, generator=g, dtype=dtype) + 50.0
    valid = torch.rand(N, generator=g) > 0.2
    center = torch.randn(K, B, 3, generator=g, dtype=dtype)
    for v, c in ((None, None), (valid, center)):
        mean, sums = impl("reduce_rows")(out, M, y, None, P, v, c, B)
        want_mean, want_sums = reduce_rows_reference(out, M, y, None, P, v, c, B)
        torch.testing.assert_close(mean, want_mean, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(sums, want_sums, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
