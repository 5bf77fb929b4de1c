"""pytest-benchmark suites over the cases of :mod:`fastequiv.bench` (the same cases as ``fastequiv bench``).

    pytest benchmarks/ --benchmark-only                     # quick: two sizes per op (minutes on a CPU)
    pytest benchmarks/ --benchmark-only --bench-mode full   # size sweeps and the row-level kernels
    pytest benchmarks/ --benchmark-only --bench-mode smoke  # toy sizes, one round: proves every case runs
    pytest benchmarks/ --benchmark-only -k twirl_reduce --benchmark-json=out.json

Cases run on the GPU when torch sees one (``--bench-device cpu`` forces the CPU). Each
case is a pytest-benchmark group (op, its parameters, size, device); ``extra_info`` holds
the bytes and FLOPs of one call and the GB/s and GFLOP/s achieved at the median time.
"""

import time

import pytest
import torch

from fastequiv.bench.timing import MODES, synchronizer


def pytest_addoption(parser):
    group = parser.getgroup("fastequiv benchmarks")
    group.addoption("--bench-mode", default="quick", choices=sorted(MODES),
                    help="sizes and rounds: smoke (toy, one round), quick (default), full")
    group.addoption("--bench-device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the GPU when torch sees one, else the CPU")


@pytest.fixture(scope="session")
def bench_mode(request):
    return request.config.getoption("--bench-mode")


def bench_device(config) -> str:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


@pytest.fixture(scope="session")
def device(request):
    d = bench_device(request.config)
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but torch sees no CUDA device")
    return d


@pytest.fixture
def run(benchmark, bench_mode):
    """``run(fn, device=..., bytes=..., flops=..., **info)``: time ``fn`` with a device sync after each call, with as
    many rounds as the mode's time budget allows (see :mod:`fastequiv.bench.timing`)."""

    def go(fn, *, device, bytes=0, flops=0, **info):
        cfg = MODES[bench_mode]
        sync = synchronizer(device)

        def call():
            fn()
            sync()

        for _ in range(max(1, cfg["warmup"])):  # compilation and caches stay out of the timing
            call()
        t0 = time.perf_counter()
        call()
        once = time.perf_counter() - t0
        rounds = max(cfg["min_rounds"], min(cfg["max_rounds"], int(cfg["budget_s"] / max(once, 1e-9))))
        benchmark.extra_info.update(info, device=device, bytes=bytes, flops=flops)
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        median = benchmark.stats.stats.median
        if bytes:
            benchmark.extra_info["GB/s"] = round(bytes / median / 1e9, 2)
        if flops:
            benchmark.extra_info["GFLOP/s"] = round(flops / median / 1e9, 2)

    return go
