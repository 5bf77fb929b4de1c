"""The reference ops against explicit per-copy loops: reps, dtypes, odd and empty shapes,
non-contiguous inputs, masks and gradients. Later backends are compared with these."""

import pytest
import torch

import fastequiv as fe
import fastequiv.backends.triton
from fastequiv.ops import rotate_copies, twirl_reduce
from fastequiv.reps import as_rep

REPS = ["scalar", "pseudoscalar", "vector", "pseudovector", "position", "1x0e + 2x1o + 1x2e"]


def _rotations(K, B, group="O3", dtype=torch.float64, seed=0):
    return fe.random_rotations(K * B, seed=seed, group=group, dtype=dtype).reshape(K, B, 3, 3)


def _loop_act(rep, x, R, inverse=False):
    """rho(R) x for one sample, written out per rep: x (*inner, d), R (3, 3)."""
    det = torch.linalg.det(R)
    M = R.T if inverse else R
    if rep == "scalar":
        return x
    if rep == "pseudoscalar":
        return det * x
    if rep == "vector":
        return x @ M.T
    if rep == "pseudovector":
        return det * (x @ M.T)
    if rep == "position":
        c = x.reshape(-1, 3).mean(0)
        return (x - c) @ M.T + c
    D = fe.wigner_D(rep, R)
    return x @ (D if inverse else D.T)


def _dim(rep):
    return {"scalar": 2, "pseudoscalar": 1, "vector": 3, "pseudovector": 3, "position": 3}.get(rep, 1 + 6 + 5)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("K,B,inner", [(2, 3, (5,)), (3, 1, ()), (8, 2, (7, 2)), (24, 2, (1,))])
def test_rotate_copies_matches_a_loop(rep, K, B, inner):
    x = torch.randn((B,) + inner + (_dim(rep),), dtype=torch.float64)
    if rep == "position" and not inner:
        x = x[:, None]
    R = _rotations(K, B)
    got = rotate_copies(x, R, as_rep(rep))
    assert got.shape == (K * B,) + tuple(x.shape[1:])
    for k in range(K):
        for b in range(B):
            torch.testing.assert_close(got[k * B + b], _loop_act(rep, x[b], R[k, b]))


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("K,B,N", [(2, 3, 5), (3, 2, 1), (8, 1, 13)])
def test_twirl_reduce_matches_a_loop(rep, K, B, N):
    d = _dim(rep)
    out = torch.randn(K, B, N, d, dtype=torch.float64)
    y = torch.randn(B, N, d, dtype=torch.float64)
    R = _rotations(K, B)
    s = twirl_reduce(out, R, y, as_rep(rep))
    a = torch.stack([torch.stack([_loop_act(rep, out[k, b], R[k, b], inverse=True) for b in range(B)]) for k in range(K)])
    abar = a.mean(0)
    torch.testing.assert_close(s.mean, abar)
    torch.testing.assert_close(s.total, ((a - y) ** 2).mean(0).reshape(B, -1).mean(1))
    torch.testing.assert_close(s.bias, ((abar - y) ** 2).reshape(B, -1).mean(1))
    torch.testing.assert_close(s.spread, ((a - abar) ** 2).mean(0).reshape(B, -1).mean(1))
    torch.testing.assert_close(s.count, torch.full((B,), N * d, dtype=torch.float64))


def test_back_rotation_inverts_rotation():
    for rep in REPS[1:]:
        x = torch.randn(4, 6, _dim(rep), dtype=torch.float64)
        R = _rotations(3, 4)
        copies = rotate_copies(x, R, as_rep(rep)).reshape(3, 4, 6, -1)
        s = twirl_reduce(copies, R, x, as_rep(rep))
        assert s.total.abs().max() < 1e-24, rep  # every copy maps back onto x exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    x = torch.randn(3, 4, 3).to(dtype)
    R = _rotations(2, 3, dtype=torch.float32)
    got = rotate_copies(x, R, as_rep("vector"))
    assert got.dtype == dtype
    ref = rotate_copies(x.double(), R.double(), as_rep("vector"))
    tol = {torch.float32: 1e-6, torch.float64: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, atol=tol * 4, rtol=tol)
    s = twirl_reduce(got.reshape(2, 3, 4, 3), R, x, as_rep("vector"))
    assert s.total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_empty_batches_and_empty_inner_dims():
    rep = as_rep("position")
    for shape in [(0, 4, 3), (2, 0, 3)]:
        x = torch.randn(shape)
        R = _rotations(3, shape[0], dtype=torch.float32)
        got = rotate_copies(x, R, rep)
        assert got.shape == (3 * shape[0],) + shape[1:]
        s = twirl_reduce(got.reshape((3,) + shape), R, x, rep)
        assert s.total.shape == (shape[0],) and (s.count == 0).all()
        assert torch.isfinite(s.total).all()


def test_non_contiguous_inputs():
    x = torch.randn(5, 3, 6, dtype=torch.float64).transpose(1, 2)  # (5, 6, 3), non-contiguous
    assert not x.is_contiguous()
    R = _rotations(2, 5).transpose(-1, -2)  # rotations too
    torch.testing.assert_close(rotate_copies(x, R, as_rep("position")), rotate_copies(x.contiguous(), R.contiguous(), as_rep("position")))
    out = torch.randn(2, 5, 3, 6, dtype=torch.float64).transpose(-1, -2)
    y = torch.randn(5, 3, 6, dtype=torch.float64).transpose(-1, -2)
    a = twirl_reduce(out, R, y, as_rep("vector"))
    b = twirl_reduce(out.contiguous(), R.contiguous(), y.contiguous(), as_rep("vector"))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_masks_in_the_ops():
    B, N = 3, 5
    x = torch.randn(B, N, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    R = _rotations(2, B)
    got = rotate_copies(x, R, as_rep("position"), mask)
    # sample 0 rotates about the centroid of its first three points
    c = x[0, :3].mean(0)
    torch.testing.assert_close(got[0, :3], (x[0, :3] - c) @ R[0, 0].T + c)
    out = torch.randn(2, B, N, 3, dtype=torch.float64)
    y = torch.randn(B, N, 3, dtype=torch.float64)
    s = twirl_reduce(out, R, y, as_rep("vector"), mask)
    torch.testing.assert_close(s.count, torch.tensor([9.0, 15.0, 0.0], dtype=torch.float64))
    a0 = out[:, 0, :3] @ R[:, 0]
    torch.testing.assert_close(s.total[0], ((a0 - y[0, :3]) ** 2).mean())
    assert s.total[2] == 0


def test_gradients_of_the_ops():
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    R = _rotations(3, 2)
    y = torch.randn(2, 4, 3, dtype=torch.float64)
    rep = as_rep("1x1o")

    def f(x):
        copies = rotate_copies(x, R, as_rep("position")).reshape(3, 2, 4, 3)
        s = twirl_reduce(torch.tanh(copies), R, y, rep)
        return s.total.sum() + 3 * s.spread.sum() + s.mean.sum()

    assert torch.autograd.gradcheck(f, (x,))


def test_op_argument_errors(monkeypatch):
    monkeypatch.setattr(fastequiv.backends.triton, "INTERPRET", False)  # the Triton backend then cannot run CPU tensors
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="R must have shape"):
        rotate_copies(x, torch.randn(3, 3, 3, 3), as_rep("vector"))
    with pytest.raises(ValueError, match="target has shape"):
        twirl_reduce(torch.randn(3, 2, 4, 3), _rotations(3, 2, dtype=torch.float32), torch.randn(2, 5, 3), as_rep("vector"))
    with pytest.raises(fe.BackendUnavailableError, match="triton"):
        rotate_copies(x, _rotations(3, 2, dtype=torch.float32), as_rep("vector"), backend="triton")
