"""The Triton kernels against the row-level contract (fastequiv/ops/_rows.py).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), with a GPU on CUDA tensors: the same tests, on ``DEVICE``.
Shapes stay small because the interpreter is slow; sizes are chosen to leave partial
blocks, several programs, and (for the dense reduction) several chunks per sample.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastequiv as fe
import fastequiv.backends.triton
from fastequiv.backends import registry as _backend
from fastequiv.ops.layout import sample_index
from fastequiv.ops.random_rotations import random_rotations_seeded_reference
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference
from fastequiv.ops.wigner_d import wigner_blocks_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ["random_rotations_seeded", "rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward",
       "wigner_blocks"]


def triton_op(name):
    backend, impl = _backend.resolve(name, "triton", DEVICE)
    assert backend == "triton"
    return impl


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tol(dtype):
    """Tolerances for comparing with the reference computed in the same dtypes."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-11),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]


def layout(B, P, graph, empty_sample=None, seed=0):
    """``(sample, P, N)``: dense (every sample has P rows) or a graph batch index with
    uneven, shuffled samples (one of them, ``empty_sample``, with no rows)."""
    if not graph:
        return None, P, B * P
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2 * P, (B,), generator=g)
    if empty_sample is not None:
        counts[empty_sample] = 0
    sample = torch.repeat_interleave(torch.arange(B), counts)
    sample = sample[torch.randperm(len(sample), generator=g)]
    return sample.to(DEVICE), 0, len(sample)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def mats(K, B, d, dtype, seed=1):
    """Orthogonal-ish matrices would hide transposition errors: use general ones."""
    return rand(K, B, d, d, dtype=dtype, seed=seed)


# --------------------------------------------------------------------------- backend


def test_registered_for_every_op_and_auto_prefers_triton_on_cuda():
    for op in OPS:
        assert "triton" in _backend.implemented(op), op
        assert _backend._AUTO_ORDER[op]["cuda"][0] == "triton"


def test_available_says_what_is_missing(monkeypatch):
    from fastequiv.backends.triton import available

    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", True)
    assert available(torch.device("cpu")) is None
    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in available(torch.device("cpu"))
    assert "CUDA" in available(torch.device("meta"))
    if not torch.cuda.is_available():
        assert "CUDA" in available(torch.device("cuda"))
    with pytest.raises(fe.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backend.resolve("rotate_rows", "triton", "cpu")


def test_the_backend_imports_triton_only_when_called(tmp_path):
    """With triton made unimportable, fastequiv and its triton backend still import, and
    the backend reports what is missing instead of failing at import time."""
    code = textwrap.dedent(
        """
        import os, sys

        sys.modules["triton"] = None  # what an install without triton looks like to importlib
        try:
            import triton
        except ImportError:
            pass
        else:
            raise AssertionError("triton still imports")
        os.environ["TRITON_INTERPRET"] = "1"
        import fastequiv, fastequiv.backends.triton
        assert not any(m.startswith("fastequiv.kernels.") for m in sys.modules)
        print(fastequiv.backends.triton.available("cpu"))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "triton is not installed" in res.stdout and "pip install triton" in res.stdout


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 5, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40 + 3])
@pytest.mark.parametrize("improper", [False, True])
def test_random_rotations_seeded_is_the_reference_stream(seed, offset, improper):
    n = 37
    group = "O3" if improper else "SO3"
    want = fe.random_rotations(n, seed=seed, offset=offset, group=group, dtype=torch.float64, backend="torch")
    op = triton_op("random_rotations_seeded")
    s = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    got64 = op(s, n, offset, improper, torch.float64)
    torch.testing.assert_close(got64.cpu(), want, rtol=0, atol=1e-12)
    got32 = op(s, n, offset, improper, torch.float32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.cpu().double(), want, rtol=0, atol=1e-6)
    ref = random_rotations_seeded_reference(s, n, offset, improper, torch.float64)
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-12)


def test_random_rotations_seeded_float32_over_many_draws():
    """float32 within 1e-6 of the float64 stream over many draws (the tail, not a few)."""
    s = torch.tensor(12345, device=DEVICE)
    n = 20000
    got = triton_op("random_rotations_seeded")(s, n, 3, True, torch.float32)
    want = random_rotations_seeded_reference(s, n, 3, True, torch.float64)
    assert (got.double() - want).abs().max().item() < 1e-6


def test_random_rotations_seeded_empty_and_other_dtypes():
    op = triton_op("random_rotations_seeded")
    s = torch.tensor(3, device=DEVICE)
    assert op(s, 0, 0, False, torch.float32).shape == (0, 3, 3)
    half = op(s, 5, 0, False, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, random_rotations_seeded_reference(s, 5, 0, False, torch.bfloat16))


def test_random_rotations_seeded_takes_a_device_tensor_seed():
    op = triton_op("random_rotations_seeded")
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        op(3, 4, 0, False, torch.float32)
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        op(torch.tensor([3], device=DEVICE), 4, 0, False, torch.float32)


# --------------------------------------------------------------------------- rotate_rows


@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_rotate_rows_matches_reference(K, d, graph, with_center):
    B = 3
    sample, P, N = layout(B, 5, graph, empty_sample=1)
    x, M = rand(N, d, seed=2), mats(K, B, d, torch.float32)
    center = rand(B, d, seed=3) if with_center else None
    got = triton_op("rotate_rows")(x, M, sample, P, center)
    torch.testing.assert_close(got, rotate_rows_reference(x, M, sample, P, center), **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True])
def test_rotate_rows_dtypes(dtype, graph):
    K, B, d = 3, 4, 3
    sample, P, N = layout(B, 7, graph)
    x, M = rand(N, d, dtype=dtype, seed=4), mats(K, B, d, acc_of(dtype))
    center = rand(B, d, dtype=acc_of(dtype), seed=5)
    got = triton_op("rotate_rows")(x, M, sample, P, center)
    assert got.dtype == dtype and got.shape == (K, N, d)
    torch.testing.assert_close(got, rotate_rows_reference(x, M, sample, P, center), **tol(dtype))


@pytest.mark.parametrize("graph", [False, True])
def test_row_ops_over_many_programs(graph):
    """More rows than one interpreter block (d = 9: 256 rows a program), partial last block;
    in the graph layout the per-sample sums of several programs meet in the same atomics."""
    K, B, d = 2, 4, 9
    sample, P, N = layout(B, 201, graph, empty_sample=0)
    assert N > 2 * 256 and N % 256
    x, M = rand(N, d, seed=6), mats(K, B, d, torch.float32)
    torch.testing.assert_close(triton_op("rotate_rows")(x, M, sample, P, None), rotate_rows_reference(x, M, sample, P, None),
                               **tol(torch.float32))
    g = rand(K, N, d, seed=7)
    torch.testing.assert_close(triton_op("rotate_rows_backward")(g, M, sample, P),
                               rotate_rows_backward_reference(g, M, sample, P), **tol(torch.float32))
    valid = torch.arange(N, device=DEVICE) % 5 != 0
    args = (g, M, x, sample, P, valid, None)
    mean, sums = triton_op("reduce_rows")(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    torch.testing.assert_close(mean, ref_mean, **tol(torch.float32))
    torch.testing.assert_close(sums, ref_sums, **tol(torch.float32))
    gs = rand(3, B, seed=8)
    torch.testing.assert_close(triton_op("reduce_rows_backward")(x, gs, *args, ref_mean),
                               reduce_rows_backward_reference(x, gs, *args, ref_mean), **tol(torch.float32))


def test_rotate_rows_empty():
    M = mats(3, 2, 3, torch.float32)
    x = torch.zeros(0, 3, device=DEVICE)
    assert triton_op("rotate_rows")(x, M, None, 0, None).shape == (3, 0, 3)
    sample = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert triton_op("rotate_rows")(x, M, sample, 0, None).shape == (3, 0, 3)
    g = torch.zeros(3, 0, 3, device=DEVICE)
    assert triton_op("rotate_rows_backward")(g, M, sample, 0).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 3, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_rotate_rows_backward_is_the_gradient(dtype, K, d, graph):
    B, acc = 3, acc_of(dtype)
    sample, P, N = layout(B, 4, graph, empty_sample=0)
    x = rand(N, d, dtype=acc, seed=7).requires_grad_()
    M = mats(K, B, d, acc)
    grad = rand(K, N, d, dtype=dtype, seed=8)
    (auto,) = torch.autograd.grad(rotate_rows_reference(x, M, sample, P, None), x, grad.to(acc))
    got = triton_op("rotate_rows_backward")(grad, M, sample, P)
    assert got.dtype == acc
    torch.testing.assert_close(got, auto, **tol(acc))
    torch.testing.assert_close(got, rotate_rows_backward_reference(grad, M, sample, P), **tol(acc))


def test_non_contiguous_inputs_are_copied_not_misread():
    """The launchers call .contiguous(): a strided view gives the same result as its copy."""
    K, B, P, d = 3, 2, 5, 3
    N = B * P
    x = rand(d, N, seed=9).t()  # (N, d), transposed strides
    M = mats(K, B, d, torch.float32).transpose(2, 3)
    center = rand(d, B, seed=10).t()
    assert not (x.is_contiguous() or M.is_contiguous() or center.is_contiguous())
    got = triton_op("rotate_rows")(x, M, None, P, center)
    torch.testing.assert_close(got, rotate_rows_reference(x.contiguous(), M.contiguous(), None, P, center.contiguous()))
    grad = rand(K, d, N, seed=11).transpose(1, 2)
    torch.testing.assert_close(triton_op("rotate_rows_backward")(grad, M, None, P),
                               rotate_rows_backward_reference(grad.contiguous(), M.contiguous(), None, P))
    out = rand(K, d, N, seed=12).transpose(1, 2)
    target = rand(d, N, seed=13).t()
    valid = torch.ones(2 * N, dtype=torch.bool, device=DEVICE)[::2]
    mean, sums = triton_op("reduce_rows")(out, M, target, None, P, valid, None, B)
    ref_mean, ref_sums = reduce_rows_reference(out.contiguous(), M.contiguous(), target.contiguous(), None, P, None, None, B)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(sums, ref_sums)
    R = fe.random_rotations(6, seed=1, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    torch.testing.assert_close(triton_op("wigner_blocks")(R, 3), wigner_blocks_reference(R.contiguous(), 3))


def test_bad_arguments_raise_value_errors():
    x, M = rand(4, 3), mats(2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="M must be float32 or float64"):
        triton_op("rotate_rows")(x, M.half(), None, 2, None)
    with pytest.raises(ValueError, match=r"M must have shape \(K, B, 3, 3\)"):
        triton_op("rotate_rows")(x, M[..., :2], None, 2, None)
    with pytest.raises(ValueError, match="sample must be an int64"):
        triton_op("rotate_rows")(x, M, torch.zeros(4, dtype=torch.int32, device=DEVICE), 0, None)
    with pytest.raises(ValueError, match="dense layout"):
        triton_op("reduce_rows")(rand(2, 5, 3), M, rand(5, 3), None, 2, None, None, 2)
    with pytest.raises(ValueError, match="valid must be a bool"):
        triton_op("reduce_rows")(rand(2, 4, 3), M, rand(4, 3), None, 2, torch.ones(4, device=DEVICE), None, 2)
    with pytest.raises(ValueError, match="lmax"):
        triton_op("wigner_blocks")(rand(2, 3, 3), 11)


# --------------------------------------------------------------------------- reduce_rows


def reduce_inputs(K, B, P, d, dtype, graph, masked, with_center, seed=0):
    acc = acc_of(dtype)
    sample, P, N = layout(B, P, graph, empty_sample=1 if graph else None, seed=seed)
    out = rand(K, N, d, dtype=dtype, seed=seed + 1)
    target = rand(N, d, dtype=dtype, seed=seed + 2)
    M = mats(K, B, d, acc, seed=seed + 3)
    center = rand(K, B, d, dtype=acc, seed=seed + 4) if with_center else None
    valid = None
    if masked:
        s = sample_index(N, P, sample, DEVICE)
        g = torch.Generator().manual_seed(seed + 5)
        valid = (torch.rand(N, generator=g) > 0.3).to(DEVICE) & (s != B - 1)  # last sample fully masked
    return out, M, target, sample, P, valid, center


@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_reduce_rows_matches_reference(K, d, graph):
    B = 4
    args = reduce_inputs(K, B, 6, d, torch.float32, graph, masked=True, with_center=d == 3)
    mean, sums = triton_op("reduce_rows")(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert mean.dtype == sums.dtype == torch.float32 and sums.shape == (3, B)
    torch.testing.assert_close(mean, ref_mean, **tol(torch.float32))
    torch.testing.assert_close(sums, ref_sums, **tol(torch.float32))
    assert (sums[:, B - 1] == 0).all()  # the fully masked sample adds nothing


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_reduce_rows_dtypes_masks_centers(dtype, graph, masked, with_center):
    B = 3
    args = reduce_inputs(3, B, 5, 3, dtype, graph, masked, with_center, seed=10)
    mean, sums = triton_op("reduce_rows")(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    assert mean.dtype == acc_of(dtype)
    # both accumulate in acc from the same rounded inputs: acc's tolerance
    torch.testing.assert_close(mean, ref_mean, **tol(acc_of(dtype)))
    torch.testing.assert_close(sums, ref_sums, **tol(acc_of(dtype)))


@pytest.mark.parametrize("P", [1, 3, 17, 300])
def test_reduce_rows_dense_blocking(P):
    """Dense partial sums: several samples a program (small P) or several chunks a sample
    (P = 300 > 256 rows a program at d = 9 under the interpreter)."""
    B, d = 3, 9
    args = reduce_inputs(2, B, P, d, torch.float64, False, masked=True, with_center=False, seed=20)
    mean, sums = triton_op("reduce_rows")(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    torch.testing.assert_close(mean, ref_mean, **tol(torch.float64))
    torch.testing.assert_close(sums, ref_sums, **tol(torch.float64))


@pytest.mark.parametrize("d", [3, 9])
def test_reduce_rows_graph_block_inside_one_sample(d):
    """Every valid row in one sample (the one-atomic-per-program path), with a partial
    last block at d = 9, and a block whose only other-sample rows are masked."""
    B, N = 3, 300
    sample = torch.full((N,), 1, dtype=torch.int64, device=DEVICE)
    sample[:4] = 2
    valid = sample == 1
    out, target = rand(2, N, d, seed=80), rand(N, d, seed=81)
    args = (out, mats(2, B, d, torch.float32), target, sample, 0, valid, None)
    mean, sums = triton_op("reduce_rows")(*args, B)
    ref_mean, ref_sums = reduce_rows_reference(*args, B)
    torch.testing.assert_close(mean, ref_mean, **tol(torch.float32))
    torch.testing.assert_close(sums, ref_sums, **tol(torch.float32))


def test_reduce_rows_dense_is_deterministic():
    args = reduce_inputs(3, 5, 40, 3, torch.float32, False, masked=True, with_center=True, seed=30)
    first = triton_op("reduce_rows")(*args, 5)
    second = triton_op("reduce_rows")(*args, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_reduce_rows_spread_has_no_cancellation():
    """Copies spread by 0.1 around 1e3, target 0: total and bias are ~1e6 per element, so
    total - bias in float32 would be off by ~0.1; the spread (~1e-2) must still be right."""
    K, B, P, d = 4, 2, 8, 3
    base = 1e3 + rand(1, B * P, d, dtype=torch.float64, seed=40)
    out = (base + 0.1 * rand(K, B * P, d, dtype=torch.float64, seed=41)).float()
    M = torch.eye(d, dtype=torch.float32, device=DEVICE).expand(K, B, d, d).contiguous()
    target = torch.zeros(B * P, d, device=DEVICE)
    _, sums = triton_op("reduce_rows")(out, M, target, None, P, None, None, B)
    _, exact = reduce_rows_reference(out.double(), M.double(), target.double(), None, P, None, None, B)
    torch.testing.assert_close(sums[2].double(), exact[2], rtol=1e-2, atol=0)
    assert ((sums[0] - sums[1]).double() - exact[2]).abs().max() > 10 * (sums[2].double() - exact[2]).abs().max()


def test_reduce_rows_empty():
    M = mats(2, 3, 3, torch.float32)
    for sample, P in ((None, 0), (torch.zeros(0, dtype=torch.int64, device=DEVICE), 0)):
        mean, sums = triton_op("reduce_rows")(torch.zeros(2, 0, 3, device=DEVICE), M, torch.zeros(0, 3, device=DEVICE),
                                              sample, P, None, None, 3)
        assert mean.shape == (0, 3) and torch.equal(sums, torch.zeros(3, 3, device=DEVICE))
        g = triton_op("reduce_rows_backward")(None, torch.ones(3, 3, device=DEVICE), torch.zeros(2, 0, 3, device=DEVICE),
                                              M, torch.zeros(0, 3, device=DEVICE), sample, P, None, None, mean)
        assert g.shape == (2, 0, 3)


def reduce_backward_case(K, d, dtype, graph, masked, with_center, with_grad_mean, seed):
    B = 3
    acc = acc_of(dtype)
    out, M, target, sample, P, valid, center = reduce_inputs(K, B, 4, d, dtype, graph, masked, with_center, seed=seed)
    N = out.shape[1]
    grad_sums = rand(3, B, dtype=acc, seed=seed + 6)
    grad_mean = rand(N, d, dtype=acc, seed=seed + 7) if with_grad_mean else None
    leaf = out.to(acc).requires_grad_()
    mean, sums = reduce_rows_reference(leaf, M, target, sample, P, valid, center, B)
    loss = (grad_sums * sums).sum() + ((grad_mean * mean).sum() if with_grad_mean else 0)
    (auto,) = torch.autograd.grad(loss, leaf)
    got = triton_op("reduce_rows_backward")(grad_mean, grad_sums, out, M, target, sample, P, valid, center,
                                            mean.detach())
    ref = reduce_rows_backward_reference(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean.detach())
    assert got.dtype == dtype and got.shape == out.shape
    torch.testing.assert_close(got, ref, **tol(dtype))
    torch.testing.assert_close(got.to(acc), auto.to(dtype).to(acc), **tol(dtype))


@pytest.mark.parametrize("K", [1, 2, 3, 8, 24])
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("graph", [False, True])
def test_reduce_rows_backward_is_the_gradient(K, d, graph):
    reduce_backward_case(K, d, torch.float64, graph, masked=True, with_center=d == 3, with_grad_mean=True, seed=50)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("with_grad_mean", [False, True])
def test_reduce_rows_backward_dtypes(dtype, masked, with_center, with_grad_mean):
    reduce_backward_case(3, 3, dtype, True, masked, with_center, with_grad_mean, seed=60)


# --------------------------------------------------------------------------- wigner_blocks


@pytest.mark.parametrize("lmax", list(range(11)))
def test_wigner_blocks_float64(lmax):
    R = fe.random_rotations(21, seed=lmax, dtype=torch.float64).to(DEVICE)
    got = triton_op("wigner_blocks")(R, lmax)
    torch.testing.assert_close(got, wigner_blocks_reference(R, lmax), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lmax", [0, 1, 2, 5, 10])
def test_wigner_blocks_float32(lmax):
    R = fe.random_rotations(70, seed=3, dtype=torch.float32).to(DEVICE)  # more than one interpreter block
    got = triton_op("wigner_blocks")(R, lmax)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, wigner_blocks_reference(R, lmax), rtol=0, atol=2e-5)


def test_wigner_blocks_empty_and_e3nn():
    assert triton_op("wigner_blocks")(torch.zeros(0, 3, 3, device=DEVICE), 4).shape == (0, 165)
    o3 = pytest.importorskip("e3nn.o3")
    R = fe.random_rotations(5, seed=9, dtype=torch.float64).to(DEVICE)
    got = triton_op("wigner_blocks")(R, 3)
    D3 = o3.Irrep(3, 1).D_from_matrix(R.cpu())
    # e3nn goes through Euler angles (and loses digits there): this checks the basis, not rounding
    torch.testing.assert_close(got[:, 35:84].reshape(5, 7, 7).cpu(), D3, rtol=0, atol=1e-5)
