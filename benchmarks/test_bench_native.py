"""The C++ CPU kernels of the row contract ("cpu" backend) against the pure-torch reference.

Run: ``.venv/bin/pytest benchmarks/test_bench_native.py --benchmark-only`` (add
``--benchmark-json=out.json`` to keep the figures). Each group compares backends on the same
inputs in one run; ``extra_info`` records the sizes.

Targets (DESIGN.md): reduce_rows / twirl_reduce at 1e6 output elements with K = 4 at least
4x the torch reference on CPU; wigner_blocks for l <= 4 on 1e4 rotations at least 10x e3nn's
``Irreps.D_from_matrix``.
"""

import pytest
import torch

import fastequiv as fe
import fastequiv._native  # noqa: F401  (registers the "cpu" backend of the row ops)
from fastequiv import _backend
from fastequiv.ops import _rows, twirl_reduce
from fastequiv.reps import as_rep

K, N, D, B = 4, 333_334, 3, 64  # N * D ~ 1e6 output elements, K copies of each
P = -(-N // B)
IRREPS_L4 = "0e + 1o + 2e + 3o + 4e"


def row_impl(name, backend):
    if backend == "cpu" and "cpu" not in fe.build_info()["backends"]:
        pytest.skip("fastequiv._C is not available in this install")
    return _rows.__dict__[name] if backend == "torch" else _backend.resolve(name, backend, "cpu")[1]


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(K, N, D, generator=g)
    M = fe.random_rotations(K * B, seed=2).reshape(K, B, 3, 3)
    return {
        "out": out,
        "M": M,
        "x": torch.randn(N, D, generator=g),
        "target": torch.randn(N, D, generator=g),
        "grad_sums": torch.randn(3, B, generator=g),
        "mean": _rows.reduce_rows(out, M, torch.zeros(N, D), None, P, None, None, B)[0],
    }


def info(benchmark, elements):
    benchmark.extra_info.update(K=K, N=N, d=D, B=B, elements=elements, threads=torch.get_num_threads())


@pytest.mark.benchmark(group="reduce_rows K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_reduce_rows(benchmark, rows, backend):
    fn = row_impl("reduce_rows", backend)
    info(benchmark, N * D)
    benchmark(fn, rows["out"], rows["M"], rows["target"], None, P, None, None, B)


@pytest.mark.benchmark(group="reduce_rows K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_twirl_reduce_public(benchmark, rows, backend):
    """The public op, same data as (K, B, P, 3) (last sample padded)."""
    if backend == "cpu":
        row_impl("reduce_rows", backend)
    pad = B * P - N
    out = torch.cat([rows["out"], torch.zeros(K, pad, D)], 1).reshape(K, B, P, D)
    y = torch.cat([rows["target"], torch.zeros(pad, D)]).reshape(B, P, D)
    info(benchmark, N * D)
    benchmark(twirl_reduce, out, rows["M"], y, as_rep("vector"), backend=backend)


@pytest.mark.benchmark(group="reduce_rows_backward K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_reduce_rows_backward(benchmark, rows, backend):
    fn = row_impl("reduce_rows_backward", backend)
    info(benchmark, N * D)
    benchmark(fn, None, rows["grad_sums"], rows["out"], rows["M"], rows["target"], None, P, None, None, rows["mean"])


@pytest.mark.benchmark(group="rotate_rows K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_rotate_rows(benchmark, rows, backend):
    fn = row_impl("rotate_rows", backend)
    info(benchmark, N * D)
    benchmark(fn, rows["x"], rows["M"], None, P, None)


@pytest.mark.benchmark(group="rotate_rows_backward K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_rotate_rows_backward(benchmark, rows, backend):
    fn = row_impl("rotate_rows_backward", backend)
    info(benchmark, N * D)
    benchmark(fn, rows["out"], rows["M"], None, P)


@pytest.fixture(scope="module")
def rotations():
    return fe.random_rotations(10_000, seed=0, dtype=torch.float32)


@pytest.mark.benchmark(group="wigner l<=4, 1e4 rotations")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_wigner_blocks(benchmark, rotations, backend):
    fn = row_impl("wigner_blocks", backend)
    benchmark.extra_info["rotations"] = rotations.shape[0]
    benchmark(fn, rotations, 4)


@pytest.mark.benchmark(group="wigner l<=4, 1e4 rotations")
def test_wigner_e3nn(benchmark, rotations):
    o3 = pytest.importorskip("e3nn.o3")
    irreps = o3.Irreps(IRREPS_L4)
    benchmark.extra_info["rotations"] = rotations.shape[0]
    benchmark(irreps.D_from_matrix, rotations)


@pytest.mark.benchmark(group="random_rotations_seeded 1e5")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_random_rotations_seeded(benchmark, backend):
    fn = row_impl("random_rotations_seeded", backend)
    benchmark.extra_info["rotations"] = 100_000
    benchmark(fn, torch.tensor(7), 100_000, 0, False, torch.float32)
