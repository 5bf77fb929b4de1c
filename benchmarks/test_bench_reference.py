"""Microbenchmarks of the reference ops against e3nn, a plain loop and the compiled sampler.

Run: ``pytest benchmarks --benchmark-only`` (``--benchmark-json=out.json`` to keep
the figures). Each case records the size it ran at in ``extra_info``; compare backends
within one run, on one machine.
"""

import pytest
import torch

import fastequiv as fe
from fastequiv.ops import twirl_reduce
from fastequiv.reps import as_rep

IRREPS_L4 = "0e + 1o + 2e + 3o + 4e"


@pytest.fixture(scope="module")
def rotations():
    return fe.random_rotations(10_000, seed=0, dtype=torch.float32)


@pytest.mark.benchmark(group="wigner_D l<=4, 1e4 rotations")
def test_wigner_D_fastequiv(benchmark, rotations):
    benchmark.extra_info["rotations"] = rotations.shape[0]
    benchmark(fe.wigner_D, IRREPS_L4, rotations, backend="torch")


@pytest.mark.benchmark(group="wigner_D l<=4, 1e4 rotations")
def test_wigner_D_e3nn(benchmark, rotations):
    o3 = pytest.importorskip("e3nn.o3")
    irreps = o3.Irreps(IRREPS_L4)
    benchmark.extra_info["rotations"] = rotations.shape[0]
    benchmark(irreps.D_from_matrix, rotations)


@pytest.mark.benchmark(group="random_rotations 1e5")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_random_rotations(benchmark, backend):
    if backend not in fe.build_info()["backends"]:
        pytest.skip(f"backend {backend!r} is not available in this install")
    benchmark.extra_info["bytes"] = 100_000 * 9 * 4
    benchmark(fe.random_rotations, 100_000, seed=1, backend=backend)


@pytest.mark.benchmark(group="twirl_reduce K=4, 1e6 elements")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_twirl_reduce(benchmark, backend):
    K, B, N = 4, 64, 1302  # K * B * N * 3 ~ 1e6 elements
    out = torch.randn(K, B, N, 3)
    R = fe.random_rotations(K * B, seed=2).reshape(K, B, 3, 3)
    y = torch.randn(B, N, 3)
    rep = as_rep("vector")
    benchmark.extra_info["elements"] = out.numel()
    benchmark.extra_info["bytes"] = (out.numel() + y.numel()) * 4
    if backend not in fe.build_info()["backends"]:
        pytest.skip(f"backend {backend!r} is not available in this install")
    benchmark(twirl_reduce, out, R, y, rep, backend=backend)


@pytest.mark.benchmark(group="twirl_reduce K=4, 1e6 elements")
def test_twirl_reduce_plain_loop(benchmark):
    """What users write today: back-rotate each copy and reduce in Python."""
    K, B, N = 4, 64, 1302
    out = torch.randn(K, B, N, 3)
    R = fe.random_rotations(K * B, seed=2).reshape(K, B, 3, 3)
    y = torch.randn(B, N, 3)

    def loop():
        a = [out[k] @ R[k] for k in range(K)]
        abar = sum(a) / K
        total = sum(((ak - y) ** 2).mean() for ak in a) / K
        spread = sum(((ak - abar) ** 2).mean() for ak in a) / K
        return total, spread

    benchmark.extra_info["elements"] = out.numel()
    benchmark(loop)
