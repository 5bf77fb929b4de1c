"""One training step of a 4.7M-parameter point-cloud transformer, plain and with each way of
measuring equivariance error, and an e3nn-equivariant model of similar size (see
:mod:`fastequiv.bench.step` for the variants (a)-(e)).

pytest-benchmark times the variants one after another; ``fastequiv bench`` times them
interleaved round by round and reports the ratios to (a), which is how RESULTS.md quotes
them.
"""

import pytest

from fastequiv.bench.step import STEP_SIZES, VARIANTS, StepBench


@pytest.fixture(scope="module")
def step_bench(bench_mode, device):
    return StepBench(STEP_SIZES[device][bench_mode], device)


@pytest.mark.parametrize("key,label,method", VARIANTS, ids=[f"{k}-{m}" for k, _, m in VARIANTS])
def test_step(benchmark, run, step_bench, bench_mode, device, key, label, method):
    size = STEP_SIZES[device][bench_mode]
    benchmark.group = f"training step, {2 * size.samples} clusters x {size.atoms} atoms, {device}"
    info = dict(variant=key, label=label, stacked_batch=2 * size.samples, atoms=size.atoms)
    run(getattr(step_bench, method), device=device, **info)
