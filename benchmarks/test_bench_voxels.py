"""Voxel grids: K rotated copies and the fused back-rotation + twirl sums, against the loops
they replace (``F.affine_grid`` + ``F.grid_sample`` per rotation; ``torch.rot90`` per cube
rotation).

Run: ``pytest benchmarks/test_bench_voxels.py --benchmark-only``. CPU cases are small;
the Triton cases run only on a GPU (the CPU interpreter is a test harness, not a backend to
time). Each case records its sizes in ``extra_info``.
"""

import pytest
import torch
import torch.nn.functional as F

import fastequiv as fe
from fastequiv import voxels as V

B, C, K = 2, 4, 8
SIDES = {"cpu": 24, "cuda": 64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(device):
    n = SIDES[device]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, n, n, n, generator=g).to(device)
    R = fe.random_rotations(K * B, seed=1, device=device).reshape(K, B, 3, 3)
    return x, R


def _info(benchmark, device, x, copies):
    benchmark.extra_info.update(device=device, grid=x.shape[-1], channels=x.shape[1], batch=x.shape[0], copies=copies)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def grid_sample_loop(x, R):
    """The loop fastequiv replaces: one affine_grid + grid_sample per rotation. grid_sample's
    grid is ordered (W, H, D), hence the axis reversal P."""
    P = torch.eye(3, dtype=R.dtype, device=R.device).flip(0)
    out = []
    for Rk in R:
        theta = torch.cat([P @ Rk.transpose(1, 2) @ P, Rk.new_zeros(Rk.shape[0], 3, 1)], dim=2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        out.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    return torch.cat(out)


def rot90_orbit(x):
    """The 24 rotations of a grid by torch.rot90 calls: each face to the front, four turns."""
    faces = [x, torch.rot90(x, 1, (2, 4)), torch.rot90(x, 2, (2, 4)), torch.rot90(x, 3, (2, 4)),
             torch.rot90(x, 1, (2, 3)), torch.rot90(x, 3, (2, 3))]
    return torch.cat([torch.rot90(f, q, (3, 4)) for f in faces for q in range(4)])


@pytest.mark.benchmark(group="voxels: K=8 SO(3) copies")
@pytest.mark.parametrize("device", DEVICES)
def test_rotate_copies_grid_sample_loop(benchmark, device):
    x, R = _data(device)
    _info(benchmark, device, x, K)
    benchmark(lambda: (grid_sample_loop(x, R), _sync(device)))


@pytest.mark.benchmark(group="voxels: K=8 SO(3) copies")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rotate_copies_fastequiv(benchmark, device, backend):
    if backend == "triton" and device != "cuda":
        pytest.skip("Triton is timed on a GPU only")
    x, R = _data(device)
    _info(benchmark, device, x, K)
    benchmark(lambda: (V.rotate_copies(x, R, backend=backend), _sync(device)))


@pytest.mark.benchmark(group="voxels: 24 cube copies")
@pytest.mark.parametrize("device", DEVICES)
def test_cube_copies_rot90_loop(benchmark, device):
    x, _ = _data(device)
    _info(benchmark, device, x, 24)
    benchmark(lambda: (rot90_orbit(x), _sync(device)))


@pytest.mark.benchmark(group="voxels: 24 cube copies")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cube_copies_fastequiv(benchmark, device, backend):
    if backend == "triton" and device != "cuda":
        pytest.skip("Triton is timed on a GPU only")
    x, _ = _data(device)
    G = fe.group_elements("octahedral", device=device)[:, None].expand(24, B, 3, 3)
    _info(benchmark, device, x, 24)
    benchmark(lambda: (V.rotate_copies(x, G, backend=backend), _sync(device)))


def _sums_loop(out, R, y):
    """Back-rotate with grid_sample, then the decomposition sums in plain torch."""
    a = grid_sample_loop(out.flatten(0, 1), R.transpose(-1, -2).reshape(1, -1, 3, 3)).reshape(out.shape)
    abar = a.mean(0)
    per = [((a - y) ** 2).mean(0), (abar - y) ** 2, ((a - abar) ** 2).mean(0)]
    return abar, [p.flatten(1).mean(1) for p in per]


@pytest.mark.benchmark(group="voxels: back-rotate K=8 outputs + twirl sums")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["grid_sample loop", "torch", "triton"])
def test_twirl_reduce(benchmark, device, impl):
    if impl == "triton" and device != "cuda":
        pytest.skip("Triton is timed on a GPU only")
    x, R = _data(device)
    out = torch.randn((K,) + tuple(x.shape), device=device)
    _info(benchmark, device, x, K)
    if impl == "grid_sample loop":
        benchmark(lambda: (_sums_loop(out, R, x), _sync(device)))
    else:
        benchmark(lambda: (V.twirl_reduce(out, R, x, backend=impl), _sync(device)))
