"""Voxel grids: the cube groups, the exact and trilinear actions against their definitions
(coordinates, torch.rot90, grid_sample), the voxel ops (rotate, rotate_copies, twirl_reduce)
on every backend that has them against the torch reference (the Triton kernels run in
Triton's CPU interpreter in CI), and the API on grid models.

The voxel ops have a torch reference and Triton kernels (kernels/voxels.py); the cpu
backend has the copies only (its exact path is a C++ kernel, csrc/voxels_cpu.cpp; its
trilinear path is the reference's grid_sample); the other backends have none, and say so
(test_other_backends_have_no_voxel_kernels).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import GPU, assert_close_dtype, backend_params, device_of
from torch import nn

import fastequiv as fe
from fastequiv import voxels as V
from fastequiv.backends import registry
from fastequiv.tolerances import GPU_FLOAT32

BACKENDS = backend_params("torch", "triton")
KERNELS = backend_params("triton")
# the copies (voxels_resample) have a cpu kernel too
COPY_BACKENDS = backend_params("torch", "cpu", "triton")
COPY_KERNELS = backend_params("cpu", "triton")
CUBE = ["octahedral", "octahedral_O3"]


def _field(n, dtype=torch.float64):
    """Coordinates ``p = (i, j, k) - c`` of every voxel, ``(n, n, n, 3)``."""
    idx = torch.arange(n, dtype=dtype) - (n - 1) / 2
    return torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1)


def _f(p):
    """A scalar function of the coordinates with no symmetry at all."""
    x, y, z = p.unbind(-1)
    return 1 + x + 2 * y * y - 0.5 * z * y + 0.3 * x * y * z + 0.1 * x ** 3


def _v(p):
    """A vector function of the coordinates with no symmetry: ``(..., 3)``."""
    x, y, z = p.unbind(-1)
    return torch.stack([1 + y, x * z - 2, 0.5 * x + y * y], dim=-1)


def _grids(rng, shape, dtype=torch.float64):
    return torch.randn(shape, generator=rng, dtype=dtype)


# -- the groups ------------------------------------------------------------------------------

@pytest.mark.parametrize("group,order", [("octahedral", 24), ("octahedral_O3", 48)])
def test_cube_groups_are_distinct_signed_permutations_closed_under_composition(group, order):
    G = fe.group_elements(group, dtype=torch.float64)
    assert G.shape == (order, 3, 3) and fe.groups.group_order(group) == order
    torch.testing.assert_close(G[0], torch.eye(3, dtype=torch.float64))
    assert torch.equal(G, G.round()) and torch.equal(G.abs().sum(-1), torch.ones(order, 3, dtype=torch.float64))
    keys = {tuple(g.flatten().tolist()) for g in G}
    assert len(keys) == order
    for a, b in itertools.product(G, G):
        assert tuple((a @ b).flatten().tolist()) in keys
    det = torch.linalg.det(G).round()
    assert (det == 1).sum() == 24 and (det == -1).sum() == order - 24


def test_octahedral_O3_is_the_rotations_then_the_rotations_times_the_inversion():
    G = fe.group_elements("octahedral", dtype=torch.float64)
    H = fe.group_elements("octahedral_O3", dtype=torch.float64)
    assert torch.equal(H[:24], G) and torch.equal(H[24:], -G)
    R = fe.random_rotations(300, seed=3, group="octahedral_O3", dtype=torch.float64)
    keys = {tuple(h.flatten().tolist()) for h in H}
    assert all(tuple(r.flatten().tolist()) in keys for r in R)


# -- the exact action ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("group", CUBE)
def test_cube_action_is_the_matrix_action_on_coordinates(group, n, backend):
    """A field sampled on the grid and moved by index gathers equals the rotated field
    ``(R f)(p) = D(R) f(R^-1 p)`` sampled on the grid, for odd and even sides."""
    dev = device_of(backend)
    p = _field(n)
    G = fe.group_elements(group, dtype=torch.float64)
    x = torch.cat([_f(p)[None], _v(p).permute(3, 0, 1, 2)])  # 1 scalar + 1 vector channel
    xs = x[None].expand(len(G), 4, n, n, n)
    got = V.rotate(xs.to(dev), G.to(dev), fe.Voxels(scalars=1, vectors=1), backend=backend)
    for g, R in enumerate(G):
        src = p @ R  # R^-1 p = R^T p, as row vectors
        want = torch.cat([_f(src)[None], (_v(src) @ R.T).permute(3, 0, 1, 2)])
        torch.testing.assert_close(got[g].cpu(), want, rtol=0, atol=0)
    back = V.rotate(got, G.to(dev), "voxels(scalars=1, vectors=1)", inverse=True, backend=backend)
    torch.testing.assert_close(back.cpu(), xs, rtol=0, atol=0)


def _rot90_orbit(x):
    """The 24 rotations of a grid ``(..., n, n, n)`` by torch.rot90 alone."""
    dims = (-3, -2, -1)
    out = []
    faces = [x, torch.rot90(x, 1, (dims[0], dims[2])), torch.rot90(x, 2, (dims[0], dims[2])),
             torch.rot90(x, 3, (dims[0], dims[2])), torch.rot90(x, 1, (dims[0], dims[1])),
             torch.rot90(x, 3, (dims[0], dims[1]))]
    for f in faces:  # each face to the front, then the four turns about that axis
        for q in range(4):
            out.append(torch.rot90(f, q, (dims[1], dims[2])))
    return out


@pytest.mark.parametrize("n", [3, 4])
def test_cube_copies_are_the_rot90_orbit(n):
    rng = torch.Generator().manual_seed(0)
    x = _grids(rng, (2, 3, n, n, n))
    G = fe.group_elements("octahedral", dtype=torch.float64)
    copies = V.rotate_copies(x, G[:, None].expand(24, 2, 3, 3)).reshape(24, 2, 3, n, n, n)
    orbit = _rot90_orbit(x)
    assert len({c.numpy().tobytes() for c in orbit}) == 24
    mine = {c.numpy().tobytes() for c in copies}
    assert mine == {c.numpy().tobytes() for c in orbit}


# -- the trilinear action --------------------------------------------------------------------

def _trilinear_by_definition(x, R):
    """``out[q] = sum over the 8 voxels around p = R^T (q - c) + c`` of the trilinear weights
    times their values, zero outside the grid: scalar channels, written out voxel by voxel."""
    N, C, n = x.shape[0], x.shape[1], x.shape[-1]
    p = _field(n, R.dtype).reshape(-1, 3) @ R + (n - 1) / 2  # (N, V, 3): row vectors, q @ R = R^T q
    lo = p.floor()
    f, lo = p - lo, lo.long()
    out = torch.zeros(N, C, n ** 3, dtype=R.dtype)
    for d in itertools.product((0, 1), repeat=3):
        c = lo + torch.tensor(d)
        inside = ((c >= 0) & (c < n)).all(-1)
        w = torch.where(torch.tensor(d).bool(), f, 1 - f).prod(-1) * inside
        flat = ((c.clamp(0, n - 1) * torch.tensor([n * n, n, 1])).sum(-1))
        out += w[:, None] * x.reshape(N, C, -1).gather(2, flat[:, None].expand(N, C, n ** 3))
    return out.reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [5, 6])
def test_trilinear_is_its_definition_and_grid_sample(n, backend):
    """Scalar channels: the explicit trilinear sum, and ``F.grid_sample(F.affine_grid([P R^T P | 0]))``
    with ``P`` reversing the axis order (grid_sample's grid is ``(W, H, D)``), for either
    align_corners on a cubic grid."""
    rng = torch.Generator().manual_seed(1)
    x = _grids(rng, (3, 2, n, n, n))
    R = fe.random_rotations(3, seed=2, dtype=torch.float64)
    got = V.rotate(x.to(device_of(backend)), R.to(device_of(backend)), backend=backend).cpu()
    torch.testing.assert_close(got, _trilinear_by_definition(x, R), rtol=1e-10, atol=1e-10)
    P = torch.eye(3, dtype=torch.float64).flip(0)
    theta = torch.cat([P @ R.transpose(1, 2) @ P, torch.zeros(3, 3, 1, dtype=torch.float64)], dim=2)
    for align_corners in (True, False):
        grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
        want = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_trilinear_is_exact_on_linear_fields_inside_and_at_cube_elements():
    n = 7
    p = _field(n)
    x = (p @ torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64) + 0.5)[None, None]
    R = fe.random_rotations(1, seed=5, dtype=torch.float64)
    got = V.rotate(x, R, backend="torch")[0, 0]
    want = (p @ R[0]) @ torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64) + 0.5
    inside = (p @ R[0]).abs().amax(-1) <= (n - 1) / 2  # source points that stay on the grid
    torch.testing.assert_close(got[inside], want[inside])


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_trilinear_path_moves_cube_elements_exactly(backend):
    """Forced onto the trilinear path, cube elements move voxels too: exactly in the kernel,
    which computes the source points in voxel units, to rounding through grid_sample's
    normalised coordinates in the reference."""
    dev = device_of(backend)
    G = fe.group_elements("octahedral_O3", dtype=torch.float64).to(dev)
    xs = _grids(torch.Generator().manual_seed(2), (48, 4, 4, 4, 4)).to(dev)
    vec = torch.tensor([1], dtype=torch.int32, device=dev)
    impl = registry.resolve("voxels_resample", backend, dev)[1]
    torch.testing.assert_close(impl(xs, G, vec, False), impl(xs, G, vec, True), rtol=0,
                               atol={"torch": 1e-14, "cpu": 1e-14, "triton": 0}[backend])


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda", "cupy"))
def test_other_backends_have_no_voxel_kernels(backend):
    x, R = torch.zeros(2, 1, 3, 3, 3), torch.eye(3).expand(2, 3, 3)
    missing = ("voxels_reduce",) if backend == "cpu" else ("voxels_resample", "voxels_reduce")
    for op in missing:
        with pytest.raises(fe.BackendUnavailableError, match=f"has no implementation of '{op}'"):
            registry.resolve(op, backend, "cpu")
    with pytest.raises(fe.BackendUnavailableError, match="voxels_reduce"):
        V.twirl_reduce(x[None], R[None], x, backend=backend)
    if backend != "cpu":
        with pytest.raises(fe.BackendUnavailableError, match="voxels_resample"):
            V.rotate(x, R, backend=backend)


def test_auto_picks_the_cpu_copies_kernel_and_the_reference_reduction_on_the_cpu():
    assert registry.resolve_name("voxels_resample", "auto", torch.device("cpu")) == "cpu"
    assert registry.resolve_name("voxels_reduce", "auto", torch.device("cpu")) == "torch"


# -- the kernels against the reference -------------------------------------------------------

REPS = [fe.Voxels(), fe.Voxels(scalars=1, vectors=2), fe.Voxels(scalars=0, vectors=1)]


@pytest.mark.parametrize("backend", COPY_KERNELS)
@pytest.mark.parametrize("group", ["SO3", "octahedral_O3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rep", REPS, ids=str)
@pytest.mark.parametrize("K,B,n", [(3, 2, 5), (2, 1, 4), (1, 3, 3)])
def test_kernel_rotate_copies_matches_reference(K, B, n, rep, dtype, group, backend):
    dev = device_of(backend)
    rng = torch.Generator().manual_seed(K * 100 + n)
    C = 7 if rep.scalars is None and rep.vectors == 0 else (rep.scalars or 0) + 3 * rep.vectors
    x = _grids(rng, (B, C, n, n, n)).to(dtype=dtype, device=dev)
    R = fe.random_rotations(K * B, seed=n, group=group, dtype=torch.float64).reshape(K, B, 3, 3).to(dev)
    want = V.rotate_copies(x, R, rep, backend="torch")
    got = V.rotate_copies(x, R, rep, backend=backend)
    assert got.dtype == dtype and got.shape == (K * B, C, n, n, n)
    assert_close_dtype(got, want)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_rotate_copies_non_contiguous_extra_dims_and_empty(backend):
    dev = device_of(backend)
    rng = torch.Generator().manual_seed(4)
    base = _grids(rng, (5, 2, 3, 5, 5, 5), dtype=torch.float32).to(dev)
    x = base.transpose(0, 1)[:, ::2]  # (2, 3, 3, 5, 5, 5): non-contiguous, one extra dim
    rep = fe.Voxels(vectors=1)
    R = fe.random_rotations(4, seed=1, dtype=torch.float32).reshape(2, 2, 3, 3).to(dev)
    got = V.rotate_copies(x, R, rep, backend=backend)
    want = torch.stack([V.rotate(x[b:b + 1], R[k, b:b + 1], rep, backend="torch")[0]
                        for k in range(2) for b in range(2)])
    torch.testing.assert_close(got, want)
    empty = V.rotate_copies(x[:0], R[:, :0], rep, backend=backend)
    assert empty.shape == (0, 3, 3, 5, 5, 5)


def _masks(B, C, n):
    g = torch.Generator().manual_seed(7)
    return [None, torch.tensor([True, False, True])[:B], torch.rand(B, C, generator=g) > 0.3,
            torch.rand(B, C, n, n, n, generator=g) > 0.5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("group", ["SO3", "octahedral"])
@pytest.mark.parametrize("K,n", [(3, 5), (2, 4)])
def test_twirl_reduce_matches_reference(K, n, group, dtype, mask_kind, backend):
    """The fused voxel reduction against the definition (fastequiv.ops.twirl_reduce through
    Rep.act, torch backend)."""
    dev = device_of(backend)
    B, rep = 3, fe.Voxels(scalars=2, vectors=1)
    C = 5
    rng = torch.Generator().manual_seed(n + K)
    out, y = _grids(rng, (K, B, C, n, n, n)).to(dtype), _grids(rng, (B, C, n, n, n)).to(dtype)
    R = fe.random_rotations(K * B, seed=K, group=group, dtype=dtype).reshape(K, B, 3, 3)
    mask = _masks(B, C, n)[mask_kind]
    ref = fe.ops.twirl_reduce(out, R, y, rep, mask, backend="torch")  # the definition, through Rep.act
    got = V.twirl_reduce(out.to(dev), R.to(dev), y.to(dev), rep, None if mask is None else mask.to(dev),
                         backend=backend)
    for name, a, b in zip(ref._fields, got, ref):
        assert a.shape == b.shape, name
        assert_close_dtype(a.to(b.dtype), b, dtype, msg=name)
    torch.testing.assert_close(got.total, got.bias + got.spread)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
def test_twirl_reduce_half_inputs_and_empty(half, backend):
    dev = device_of(backend)
    rng = torch.Generator().manual_seed(0)
    out, y = _grids(rng, (2, 2, 3, 5, 5, 5)).to(half).to(dev), _grids(rng, (2, 3, 5, 5, 5)).to(half).to(dev)
    R = fe.random_rotations(4, seed=0).reshape(2, 2, 3, 3).to(dev)
    a, b = (V.twirl_reduce(out, R, y, fe.Voxels(vectors=1), backend=be) for be in ("torch", backend))
    for x1, x2 in zip(a, b):
        assert x1.dtype == torch.float32
        assert_close_dtype(x2, x1)  # both accumulate the half inputs in float32
    e = V.twirl_reduce(out[:, :0], R[:, :0], y[:0], backend=backend)
    assert e.twirled.shape == (0, 3, 5, 5, 5) and e.total.shape == (0,)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradients_are_the_reference_gradients(backend):
    dev = device_of(backend)
    rng = torch.Generator().manual_seed(3)
    rep = fe.Voxels(scalars=1, vectors=1)
    x = _grids(rng, (2, 4, 5, 5, 5)).to(dev)
    R = fe.random_rotations(6, seed=9, dtype=torch.float64).reshape(3, 2, 3, 3).to(dev)
    w = _grids(rng, (6, 4, 5, 5, 5)).to(dev)
    out = _grids(rng, (3, 2, 4, 5, 5, 5)).to(dev)
    y = _grids(rng, (2, 4, 5, 5, 5)).to(dev)
    grads = []
    for backend in ("torch", backend):
        xr, o, t = x.clone().requires_grad_(), out.clone().requires_grad_(), y.clone().requires_grad_()
        s = V.twirl_reduce(o, R, t, rep, backend=backend)
        loss = (V.rotate_copies(xr, R, rep, backend=backend) * w).sum() + s.total.sum() + 2 * s.spread.sum() \
            + (s.twirled * y).sum()
        loss.backward()
        grads.append((xr.grad, o.grad, t.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # the reference's own gradients (the Triton path's backward recomputes through it)
    small = x[:1, :, :3, :3, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: V.rotate(v, R[0, :1], rep, backend="torch"), (small,))


def test_cpu_cube_copies_every_element_odd_sides_and_gradients():
    """The C++ cube copies against the reference gather: all 48 elements of the cube group
    with inversions, per row and shared by a batch (the K copies of a twirl), odd and even
    sides, vector channels; the gradient (the reference's, through the op's autograd) too."""
    rng = torch.Generator().manual_seed(5)
    G = fe.group_elements("octahedral_O3", dtype=torch.float64)
    rep = fe.Voxels(scalars=1, vectors=1)
    for n, dtype in ((1, torch.float32), (4, torch.float64), (7, torch.float32)):
        x = _grids(rng, (2, 4, n, n, n)).to(dtype)
        shared = G[:, None].expand(48, 2, 3, 3)  # copy k of both samples: element k
        mixed = G[torch.randperm(48, generator=rng)[:12]].reshape(6, 2, 3, 3)  # a new element every row
        for R in (shared, mixed):
            want = V.rotate_copies(x, R, rep, backend="torch")
            got = V.rotate_copies(x, R, rep, backend="cpu")
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    x = _grids(rng, (2, 4, 5, 5, 5)).requires_grad_()
    w = _grids(rng, (12, 4, 5, 5, 5))
    grads = []
    for backend in ("torch", "cpu"):
        (g,) = torch.autograd.grad((V.rotate_copies(x, mixed, rep, backend=backend) * w).sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_cpu_cube_copies_kernel_refuses_bad_arguments():
    from fastequiv.backends import extension

    C = extension.load()
    x, out = torch.zeros(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    good = torch.eye(3, dtype=torch.int32).reshape(1, 9).expand(2, 9).contiguous()
    C.cube_copies_cpu(x, good, out)
    bad = good.clone()
    bad[1, 0] = 2
    with pytest.raises(ValueError, match="signed permutation"):
        C.cube_copies_cpu(x, bad, out)
    twice = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1]] * 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="signed permutation"):
        C.cube_copies_cpu(x, twice, out)
    with pytest.raises(ValueError, match="multiple of B"):
        C.cube_copies_cpu(x, good[:1], out[:1])
    with pytest.raises(ValueError, match="int32"):
        C.cube_copies_cpu(x, good.float(), out)
    with pytest.raises(ValueError, match="out"):
        C.cube_copies_cpu(x, good, out.double())
    with pytest.raises(ValueError, match="x: expected"):
        C.cube_copies_cpu(torch.zeros(2, 1, 3, 3, 4), good, out)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.skipif(not GPU, reason="needs a CUDA device (CPU counterparts above run Triton's interpreter)")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", ["SO3", "octahedral_O3"])
def test_kernels_on_gpu_on_larger_grids(group, dtype, backend):
    rng = torch.Generator().manual_seed(0)
    rep, K, B, n = fe.Voxels(scalars=2, vectors=1), 3, 2, 17
    x = _grids(rng, (B, 5, n, n, n)).to(device="cuda", dtype=dtype)
    out = _grids(rng, (K, B, 5, n, n, n)).to(device="cuda", dtype=dtype)
    R = fe.random_rotations(K * B, seed=1, group=group, device="cuda").reshape(K, B, 3, 3)
    copies = V.rotate_copies(x, R, rep, backend=backend), V.rotate_copies(x, R, rep, backend="torch")
    sums = V.twirl_reduce(out, R, x, rep, backend=backend), V.twirl_reduce(out, R, x, rep, backend="torch")
    if dtype == torch.float64:
        assert_close_dtype(*copies)
        for a, b in zip(*sums):
            assert_close_dtype(a, b)
        return
    # float32 math on the GPU: the table's GPU bound, not re-measured without a GPU (the
    # interpreter cases above hold TOL)
    if dtype == torch.float32:
        torch.testing.assert_close(*copies, **GPU_FLOAT32)
    else:
        assert_close_dtype(*copies)
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, **GPU_FLOAT32)


# -- the API on grid models ------------------------------------------------------------------

class Mixer(nn.Module):
    """A pointwise mix of scalar channels: equivariant on any grid, for any rotation."""

    def __init__(self, cin=3, cout=2):
        super().__init__()
        self.lin = nn.Conv3d(cin, cout, 1).double()

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _blur():
    """A separable [1, 2, 1] blur with zero padding: commutes with every symmetry of the cube."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / 4
    kernel = (k[:, None, None] * k[None, :, None] * k[None, None, :])[None, None]
    return lambda x: F.conv3d(x.reshape(-1, 1, *x.shape[-3:]), kernel, padding=1).reshape(x.shape)


def _gradient(x):
    """Central differences of a one-channel grid (zero outside): a vector field (x, y, z)."""
    p = F.pad(x, (1, 1, 1, 1, 1, 1))
    return torch.cat([(p[:, :, 2:, 1:-1, 1:-1] - p[:, :, :-2, 1:-1, 1:-1]) / 2,
                      (p[:, :, 1:-1, 2:, 1:-1] - p[:, :, 1:-1, :-2, 1:-1]) / 2,
                      (p[:, :, 1:-1, 1:-1, 2:] - p[:, :, 1:-1, 1:-1, :-2]) / 2], dim=1)


@pytest.mark.parametrize("n", [5, 6])
def test_equivariant_grid_models_have_zero_equiv_under_the_cube_group(n):
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(1)
    x = _grids(rng, (3, 3, n, n, n))
    mixer = Mixer()
    spec = fe.Spec(inputs="voxels", output="voxels")
    assert spec.group == "octahedral"  # the default for grids
    d = fe.equivariance_error(mixer, x, _grids(rng, (3, 2, n, n, n)), spec=spec)
    assert d.exhaustive and d.samples == 24
    assert d.equiv.abs() < 1e-28 and d.total > 0.1

    d = fe.equivariance_error(_blur(), x, _grids(rng, (3, 3, n, n, n)), spec=spec)
    assert d.equiv.abs() < 1e-28 and d.total > 0.1

    vspec = fe.Spec(inputs="voxels(scalars=1)", output=fe.Voxels(vectors=1), group="octahedral_O3")
    d = fe.equivariance_error(_gradient, x[:, :1], _grids(rng, (3, 3, n, n, n)), spec=vspec)
    assert d.samples == 48 and d.equiv.abs() < 1e-28 and d.total > 0.1
    # the same model read with scalar outputs is not equivariant: the components must rotate
    d = fe.equivariance_error(_gradient, x[:, :1], _grids(rng, (3, 3, n, n, n)),
                              spec=fe.Spec(inputs="voxels", output="voxels"))
    assert d.equiv > 1e-3


def test_a_random_cnn_is_not_equivariant_and_its_twirl_is():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).double()
    rng = torch.Generator().manual_seed(2)
    x, y = _grids(rng, (2, 2, 5, 5, 5)), _grids(rng, (2, 2, 5, 5, 5))
    spec = fe.Spec(inputs="voxels", output="voxels")
    d = fe.equivariance_error(cnn, x, y, spec=spec)
    assert d.equiv > 1e-4 * d.total and torch.allclose(d.total, d.mean + d.equiv)

    twirled = fe.Twirled(cnn, spec=spec)
    G = fe.group_elements("octahedral", dtype=torch.float64)
    R = G[5:6].expand(2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(twirled(V.rotate(x, R)), V.rotate(twirled(x), R))
        d = fe.equivariance_error(twirled, x, y, spec=spec)
    assert d.equiv < 1e-26

    loss, d = fe.twirl_loss(cnn, x, y, spec=spec, equiv_weight=1.0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn.parameters())


def test_interpolation_floor_is_zero_for_the_cube_and_positive_for_SO3():
    rng = torch.Generator().manual_seed(5)
    x = F.avg_pool3d(_grids(rng, (2, 2, 9, 9, 9)), 3, stride=1, padding=1)  # smooth-ish fields
    cube = V.interpolation_floor(x, group="octahedral")
    assert cube.total == 0 and cube.equiv < 1e-30  # 0 up to the rounding of a mean of 24 equal values
    floor = V.interpolation_floor(x, group="SO3", samples=4, seed=11)
    assert floor.equiv > 0 and floor.total > 0
    # the identity model's L_equiv under the same rotations is the floor, by definition
    d = fe.equivariance_error(lambda v: v, x, x, spec=fe.Spec("voxels", "voxels", group="SO3"), samples=4, seed=11)
    torch.testing.assert_close(d.equiv, floor.equiv)
    # a blur is equivariant too, and its L_equiv under SO(3) is of the floor's order, not 0
    d = fe.equivariance_error(_blur(), x, _blur()(x), spec=fe.Spec("voxels", "voxels", group="SO3"),
                              samples=4, seed=11)
    assert 0 < d.equiv < 10 * floor.equiv


# -- reps and errors -------------------------------------------------------------------------

def test_voxel_rep_parsing_and_equality():
    assert fe.reps.as_rep("voxels") == fe.Voxels()
    assert fe.reps.as_rep("voxels(scalars=4, vectors=2)") == fe.Voxels(scalars=4, vectors=2)
    assert fe.reps.as_rep("voxels(vectors=1)") == fe.Voxels(vectors=1) != fe.Voxels()
    assert fe.reps.as_rep(repr(fe.Voxels(scalars=4, vectors=2)).lower()) == fe.Voxels(scalars=4, vectors=2)
    assert len({fe.Voxels(), fe.Voxels(1, 1), fe.Voxels(1, 1)}) == 2
    assert fe.Spec("voxels", "vector").group == "octahedral"
    assert fe.Spec("voxels", "voxels", group="SO3").group == "SO3"
    assert fe.Spec("vector", "vector").group == "SO3"
    for bad in ["voxels(scalar=1)", "voxels(vectors=x)", "voxels(vectors=1, vectors=2)", "voxelsx"]:
        with pytest.raises(ValueError, match="voxel"):
            fe.reps.as_rep(bad)
    with pytest.raises(ValueError, match="at least one channel"):
        fe.Voxels(scalars=0)


def test_voxel_errors_name_the_argument():
    R = torch.eye(3)[None]
    with pytest.raises(ValueError, match=r"x has grid \(4, 5, 5\).*cubic"):
        V.rotate(torch.zeros(1, 1, 4, 5, 5), R)
    with pytest.raises(ValueError, match="x has 4 channels.*needs 3 channels"):
        V.rotate(torch.zeros(1, 4, 3, 3, 3), R, fe.Voxels(scalars=0, vectors=1))
    with pytest.raises(ValueError, match="x must have shape"):
        V.rotate(torch.zeros(1, 3, 3, 3), R)
    with pytest.raises(ValueError, match="floating"):
        V.rotate(torch.zeros(1, 1, 3, 3, 3, dtype=torch.int64), R)
    with pytest.raises(ValueError, match=r"R must be a floating tensor of shape \(1, 3, 3\)"):
        V.rotate(torch.zeros(1, 1, 3, 3, 3), torch.eye(3))
    with pytest.raises(ValueError, match="out must have shape"):
        V.twirl_reduce(torch.zeros(2, 1, 1, 3, 3, 3), torch.eye(3).expand(2, 1, 3, 3), torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="rep must be a voxel rep"):
        V.rotate(torch.zeros(1, 1, 3, 3, 3), R, "vector")
    with pytest.raises(fe.BackendUnavailableError, match="voxels_resample"):
        V.rotate(torch.zeros(1, 1, 3, 3, 3), R, backend="cuda")
    spec = fe.Spec("voxels", "voxels")
    with pytest.raises(ValueError, match="inputs has grid"):
        fe.equivariance_error(lambda v: v, torch.zeros(2, 1, 3, 3, 4), torch.zeros(2, 1, 3, 3, 4), spec=spec)
