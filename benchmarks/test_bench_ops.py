"""Every fused op against its pure-torch reference, e3nn and the plain loop over K.

The cases, their sizes and the bytes they must move are defined once in
:mod:`fastequiv.bench.cases`; this file hands them to pytest-benchmark, one group per
(op, parameters, size, device). See ``benchmarks/conftest.py`` for the options.
"""

import torch

from fastequiv.bench.cases import cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = metafunc.config.getoption("--bench-device")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        selected = cases(metafunc.config.getoption("--bench-mode"), device) if device != "cuda" or torch.cuda.is_available() else []
        metafunc.parametrize("case", selected, ids=[c.name.replace(" ", "_") for c in selected])


def test_op(benchmark, run, case):
    benchmark.group = case.group
    fn = case.setup()
    run(fn, **case.info())
