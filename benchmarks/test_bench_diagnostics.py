"""What the training-dynamics diagnostics cost next to one ``fe.twirl_loss`` forward + backward.

All cases run the demo's point-cloud transformer (:class:`fastequiv.demo.PointTransformer`)
on the same batch of Morse clusters with the same K stacked copies, so they push the
same rows through the model:

* ``twirl_loss``: ``fe.twirl_loss(...)`` and ``loss.backward()``: one forward, one backward
  (the unit the others are quoted in);
* ``gradient_alignment``: one forward and two backward passes (one per term);
* ``hessian_spectrum``: one forward, one backward that keeps its graph, then exactly
  ``lanczos_steps`` Hessian-vector products (``tol`` is set so small that Lanczos never
  stops early): the cost of one product is ``(time - forward - backward) / lanczos_steps``;
* ``log_dynamics``: what the demo would log (cosine, and the top eigenvalue of each
  term's Hessian), with its own Lanczos budget.

``python benchmarks/test_bench_diagnostics.py [--mode quick]`` times them interleaved,
round by round, and prints the ratios to ``twirl_loss`` that RESULTS.md quotes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import pytest
import torch

import fastequiv as fe
from fastequiv import diagnostics
from fastequiv.demo import SPEC, ForceTask, PointTransformer


@dataclass(frozen=True)
class DiagSize:
    """Batch and model of one diagnostics case (``samples``: B clusters, ``copies``: K)."""

    samples: int
    atoms: int
    width: int
    layers: int
    heads: int
    copies: int
    lanczos_steps: int


# quick and full: the demo's model (width 64, 3 layers, 0.1M parameters) on the batch its
# held-out decomposition uses per call (K=8); smoke: toy sizes that only prove every case runs.
DIAG_SIZES = {
    "smoke": DiagSize(samples=4, atoms=6, width=16, layers=1, heads=2, copies=2, lanczos_steps=3),
    "quick": DiagSize(samples=16, atoms=8, width=64, layers=3, heads=4, copies=8, lanczos_steps=8),
    "full": DiagSize(samples=64, atoms=8, width=64, layers=3, heads=4, copies=8, lanczos_steps=16),
}


class DiagBench:
    """One model and batch; a method per case."""

    def __init__(self, size: DiagSize, device: str, seed: int = 0):
        torch.manual_seed(seed)
        self.size = size
        task = ForceTask(atoms=(size.atoms - 2, size.atoms), device=device)
        self.inputs, self.target = task.batch(size.samples, torch.Generator().manual_seed(seed))
        self.model = PointTransformer(width=size.width, heads=size.heads, layers=size.layers).to(device).eval()
        self.kw = dict(spec=SPEC, samples=size.copies, seed=seed)

    def twirl_loss(self):
        loss, _ = fe.twirl_loss(self.model, self.inputs, self.target, **self.kw)
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def gradient_alignment(self):
        return diagnostics.gradient_alignment(self.model, self.inputs, self.target, **self.kw)

    def hessian_spectrum(self):
        n = self.size.lanczos_steps
        return diagnostics.hessian_spectrum(self.model, self.inputs, self.target, term="equiv", k=min(8, n),
                                            max_iter=n, tol=1e-300, **self.kw)

    def log_dynamics(self):
        return diagnostics.log_dynamics(self.model, self.inputs, self.target, k=1, tol=1e-300,
                                        max_iter=self.size.lanczos_steps, **self.kw)


CASES = ["twirl_loss", "gradient_alignment", "hessian_spectrum", "log_dynamics"]


@pytest.fixture(scope="module")
def diag_bench(bench_mode, device):
    return DiagBench(DIAG_SIZES[bench_mode], device)


@pytest.mark.parametrize("method", CASES)
def test_diagnostics(benchmark, run, diag_bench, bench_mode, device, method):
    size = DIAG_SIZES[bench_mode]
    benchmark.group = (f"diagnostics, {size.copies} copies x {size.samples} clusters x {size.atoms} atoms, "
                       f"width {size.width}, {device}")
    info = dict(case=method, stacked_rows=size.copies * size.samples, lanczos_steps=size.lanczos_steps)
    run(getattr(diag_bench, method), device=device, **info)


def ratios(mode: str = "quick", device: str = "cpu", rounds: int = 7) -> dict:
    """Median time of each case and its ratio to ``twirl_loss``, timed interleaved."""
    bench = DiagBench(DIAG_SIZES[mode], device)
    fns = {name: getattr(bench, name) for name in CASES}
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in CASES}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["twirl_loss"]
    out = {name: {"seconds": med[name], "ratio": med[name] / base} for name in CASES}
    steps = DIAG_SIZES[mode].lanczos_steps
    # one Hessian-vector product, net of the forward and backward hessian_spectrum runs first
    out["one_hvp"] = {"seconds": (med["hessian_spectrum"] - base) / steps,
                      "ratio": (med["hessian_spectrum"] - base) / steps / base}
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="quick", choices=sorted(DIAG_SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = DIAG_SIZES[args.mode]
    print(f"{size}, device {args.device}, torch threads {torch.get_num_threads()}")
    for name, r in ratios(args.mode, args.device, args.rounds).items():
        print(f"{name:>20}  {r['seconds'] * 1e3:9.1f} ms  {r['ratio']:6.2f} x twirl_loss fwd+bwd")
