"""fastequiv.wigner: the pure-torch Wigner-D reference against e3nn and the group laws."""

import pytest
import torch

import fastequiv as fe
from e3nn import o3

from fastequiv.backends.registry import BackendUnavailableError
from fastequiv.ops.wigner_d import wigner_D
from fastequiv.wigner import recursion_terms, wigner_D_blocks

LMAX = 8
TOL = {torch.float64: dict(atol=1e-10, rtol=0), torch.float32: dict(atol=1e-5, rtol=0)}


@pytest.fixture
def e3nn_float64():
    # e3nn builds its so(3) generators in the default dtype, so its float64 output is only
    # float32-accurate unless the default dtype is float64 while it runs.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rotations(n, dtype=torch.float64, improper=False, seed=0):
    torch.manual_seed(seed)
    R = o3.rand_matrix(n, dtype=torch.float64)
    if improper:
        R = -R
    return R.to(dtype)


def reference(irreps, R):
    """e3nn's D_from_matrix computed in float64, cast to R's dtype."""
    return o3.Irreps(irreps).D_from_matrix(R.double()).to(R.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("improper", [False, True], ids=["proper", "improper"])
@pytest.mark.parametrize("p", ["e", "o"])
@pytest.mark.parametrize("l", range(LMAX + 1))
def test_matches_e3nn_single_irrep(e3nn_float64, l, p, improper, dtype):
    R = rotations(16, dtype, improper, seed=l)
    D = wigner_D(f"1x{l}{p}", R)
    assert D.dtype == dtype and D.shape == (16, 2 * l + 1, 2 * l + 1)
    torch.testing.assert_close(D, reference(f"{l}{p}", R), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("as_irreps", [False, True], ids=["str", "Irreps"])
def test_matches_e3nn_mixed_irreps(e3nn_float64, dtype, as_irreps):
    irreps = "2x0e + 1x1o + 3x2e + 1x3o + 0x4e + 2x1e + 1x0o"
    R = torch.cat([rotations(8, dtype), rotations(8, dtype, improper=True, seed=1)])
    arg = o3.Irreps(irreps) if as_irreps else irreps
    D = wigner_D(arg, R, backend="torch")
    assert D.shape == (16, o3.Irreps(irreps).dim, o3.Irreps(irreps).dim)
    torch.testing.assert_close(D, reference(irreps, R), **TOL[dtype])


def test_matches_e3nn_up_to_l10(e3nn_float64):
    R = torch.cat([rotations(8), rotations(8, improper=True, seed=1)])
    irreps = " + ".join(f"{l}{'eo'[l % 2]}" for l in range(11))
    torch.testing.assert_close(wigner_D(irreps, R), reference(irreps, R), atol=1e-10, rtol=0)


def test_l1_block_is_R():
    R = rotations(10)
    assert torch.equal(wigner_D("1o", R), R)
    assert torch.equal(wigner_D("1e", -R), R)  # "1e" is blind to the inversion


@pytest.mark.parametrize("l", range(LMAX + 1))
def test_homomorphism(l):
    R1, R2 = rotations(8, seed=1), rotations(8, seed=2)
    ir = f"{l}{'eo'[l % 2]}"
    torch.testing.assert_close(wigner_D(ir, R1 @ R2), wigner_D(ir, R1) @ wigner_D(ir, R2), atol=1e-10, rtol=0)
    # O(3): improper times proper and improper times improper
    torch.testing.assert_close(wigner_D(ir, -R1 @ R2), wigner_D(ir, -R1) @ wigner_D(ir, R2), atol=1e-10, rtol=0)
    torch.testing.assert_close(wigner_D(ir, R1 @ R2), wigner_D(ir, -R1) @ wigner_D(ir, -R2), atol=1e-10, rtol=0)


@pytest.mark.parametrize("l", range(LMAX + 1))
def test_identity_and_orthogonality(l):
    n = 2 * l + 1
    for p in "eo":
        torch.testing.assert_close(wigner_D(f"{l}{p}", torch.eye(3, dtype=torch.float64)), torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(wigner_D(f"{l}{p}", -torch.eye(3, dtype=torch.float64)), (1.0 if p == "e" else -1.0) * torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    D = wigner_D(f"{l}e", rotations(8))
    torch.testing.assert_close(D.transpose(-1, -2) @ D, torch.eye(n, dtype=torch.float64).expand(8, n, n), atol=1e-10, rtol=0)


def test_blocks_match_wigner_D():
    R = rotations(6)
    blocks = wigner_D_blocks(5, R)
    assert [b.shape for b in blocks] == [(6, 2 * l + 1, 2 * l + 1) for l in range(6)]
    for l, b in enumerate(blocks):
        torch.testing.assert_close(b, wigner_D(f"{l}e", R), atol=0, rtol=0)
    assert wigner_D_blocks(1, R)[1].data_ptr() != R.data_ptr()


@pytest.mark.parametrize("batch", [(), (5,), (2, 3), (0,)], ids=str)
def test_batch_shapes(e3nn_float64, batch):
    irreps = "2x0e + 1x1o + 1x2e"
    n = 1
    for k in batch:
        n *= k
    R = rotations(max(n, 1))[:n].reshape(*batch, 3, 3)
    D = wigner_D(irreps, R)
    assert D.shape == (*batch, 10, 10)
    if n:
        torch.testing.assert_close(D, reference(irreps, R), atol=1e-10, rtol=0)


def test_non_contiguous_R(e3nn_float64):
    R = rotations(7).transpose(-1, -2)
    assert not R.is_contiguous()
    torch.testing.assert_close(wigner_D("1o + 2e + 3o", R), reference("1o + 2e + 3o", R), atol=1e-10, rtol=0)


def test_gradcheck():
    R = rotations(3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda R: wigner_D("0e + 1o + 2e + 3o", R), (R,))
    Ri = (-rotations(2, seed=3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda R: wigner_D("1e + 2o + 3e", R), (Ri,))


def test_recursion_table_layout():
    for l in range(2, LMAX + 1):
        r, c, coef, i, j, a, b = recursion_terms(l)
        assert len({len(x) for x in (r, c, coef, i, j, a, b)}) == 1
        assert r.max() == 2 * l and c.max() == 2 * l and i.max() <= 2 and a.max() <= 2 * l - 2
        assert (coef != 0).all()
        assert set(zip(r.tolist(), c.tolist())) == {(x, y) for x in range(2 * l + 1) for y in range(2 * l + 1)}


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 3, 4), (3, 2)], ids=str)
def test_bad_R_shape(shape):
    with pytest.raises(ValueError, match=r"R must have shape \(\.\.\., 3, 3\), got shape"):
        wigner_D("1o", torch.zeros(shape))


def test_bad_R_dtype():
    with pytest.raises(ValueError, match="R must have a floating-point dtype"):
        wigner_D("1o", torch.eye(3, dtype=torch.int64))


@pytest.mark.parametrize("irreps", ["2x0q", "banana", "1x-1e"])
def test_bad_irreps(irreps):
    with pytest.raises(ValueError, match="irreps"):
        wigner_D(irreps, torch.eye(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU backends are available on a GPU machine")
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_unavailable_backend(backend):
    with pytest.raises(BackendUnavailableError, match=backend):
        wigner_D("1o", torch.eye(3), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_backends_match_reference(backend, dtype):
    irreps = "2x0e + 1x1o + 1x1e + 1x2e + 1x3o + 1x8e"
    R = fe.random_rotations(7, seed=1, group="O3", dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(wigner_D(irreps, R, backend=backend), wigner_D(irreps, R, backend="torch"), **tol)


def test_compiled_backend_refuses_to_drop_gradients():
    R = torch.eye(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not differentiate"):
        wigner_D("1o + 2e", R, backend="cpu")
    assert wigner_D("1o + 2e", R).requires_grad  # auto falls back to the differentiable reference


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        wigner_D("1o", torch.eye(3), backend="numpy")
