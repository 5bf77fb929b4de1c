"""What ``fastequiv.lightning.EquivarianceCallback`` costs per logged training step, against the
same Lightning training step without it.

One Lightning run trains the demo's point-cloud transformer (:class:`fastequiv.demo.PointTransformer`)
on Morse clusters with plain random-rotation augmentation (AdamW, a CSVLogger that gets the
loss every step). The callback measures every other step (``every_n_steps=2``; defaults
otherwise: K=8 rotations of the first 1/8 of the batch, no grad, eval mode), so logged and
unlogged steps alternate in one run under the same conditions. A timing callback records
when each step starts; a step's time runs to the next step's start, so it holds the
callback's measurement, Lightning's logging and the optimiser step. Reported: the median
unlogged step, the median logged step, their difference (the cost per logged step) and the
callback's hook alone.

``python benchmarks/test_bench_lightning.py [--mode quick]`` prints the figures RESULTS.md
quotes. Under pytest-benchmark (``pytest benchmarks/ --benchmark-only``) the two cases are
``fit`` runs of a few steps, without the callback and with it on every step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import fastequiv as fe
from fastequiv.demo import SPEC, ForceTask, PointTransformer
from fastequiv.lightning import EquivarianceCallback


@dataclass(frozen=True)
class LightningSize:
    """``samples`` clusters of up to ``atoms`` atoms a step; the transformer's size; ``steps`` per fit."""

    samples: int
    atoms: int
    width: int
    layers: int
    heads: int
    steps: int


# quick: the demo's model and batch (width 64, 3 layers, 0.1M parameters; 32 clusters of 5-8 atoms);
# full: the 4.7M-parameter transformer of the training-step benchmark on 32 clusters of 24-32 atoms
LIGHTNING_SIZES = {
    "smoke": LightningSize(samples=8, atoms=6, width=16, layers=1, heads=2, steps=2),
    "quick": LightningSize(samples=32, atoms=8, width=64, layers=3, heads=4, steps=20),
    "full": LightningSize(samples=32, atoms=32, width=384, layers=4, heads=8, steps=20),
}


class Augmented(L.LightningModule):
    """Plain random-rotation augmentation: a fresh rotation per sample, one model call."""

    def __init__(self, size: LightningSize):
        super().__init__()
        self.model = PointTransformer(width=size.width, heads=size.heads, layers=size.layers)
        self.rotations = torch.Generator().manual_seed(1)

    def training_step(self, batch, batch_idx):
        inputs, forces = batch
        R = fe.random_rotations(forces.shape[0], generator=self.rotations).to(forces)
        pos, forces = inputs["pos"] @ R.transpose(1, 2), forces @ R.transpose(1, 2)
        mask = inputs["mask"][..., None].to(forces.dtype)
        pred = self.model(pos, inputs["species"], inputs["mask"])
        loss = (((pred - forces) ** 2) * mask).sum() / (3 * mask.sum())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Clock(L.Callback):
    """The times its ``on_train_batch_start`` runs: first in the list, when each step starts;
    right after the callback under test, when that one's hook ends."""

    def __init__(self):
        self.marks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append(time.perf_counter())


class LightningBench:
    """One dataset and a fresh module per fit (same initial weights every time)."""

    def __init__(self, size: LightningSize, seed: int = 0):
        self.size = size
        task = ForceTask(atoms=(max(2, 3 * size.atoms // 4), size.atoms))
        inputs, forces = task.batch(size.samples, torch.Generator().manual_seed(seed))
        self.data = [({k: v[i] for k, v in inputs.items()}, forces[i]) for i in range(size.samples)]
        self.seed = seed
        self.logs = tempfile.mkdtemp(prefix="fastequiv-bench-lightning-")

    def fit(self, callbacks: list, steps: int) -> None:
        torch.manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(self.data, batch_size=self.size.samples)
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, log_every_n_steps=1, accelerator="cpu",
                            logger=CSVLogger(self.logs), callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0)
        trainer.fit(Augmented(self.size), loader)

    def plain(self):
        self.fit([], self.size.steps)

    def with_callback(self):
        self.fit([EquivarianceCallback(model="model", spec=SPEC, every_n_steps=1, validation=False)], self.size.steps)

    def per_step(self, steps: int, samples: int = 8, warmup: int = 4) -> dict:
        """Median unlogged and logged step times (s) from one run where they alternate."""
        clock, hook = Clock(), Clock()
        callback = EquivarianceCallback(model="model", spec=SPEC, every_n_steps=2, samples=samples, validation=False)
        self.fit([clock, callback, hook], steps + warmup + 1)
        marks = clock.marks
        times = [b - a for a, b in zip(marks, marks[1:])]
        # step s is measured when (s + 1) % 2 == 0: the odd steps
        logged = [t for s, t in enumerate(times) if s >= warmup and s % 2 == 1]
        plain = [t for s, t in enumerate(times) if s >= warmup and s % 2 == 0]
        hooks = [h - c for s, (c, h) in enumerate(zip(marks, hook.marks)) if s >= warmup and s % 2 == 1]
        return {"plain": statistics.median(plain), "logged": statistics.median(logged),
                "hook": statistics.median(hooks), "rounds": len(logged)}


@pytest.fixture(scope="module")
def lightning_bench(bench_mode, device):
    if device != "cpu":
        pytest.skip("the Lightning cases run on the CPU")
    return LightningBench(LIGHTNING_SIZES[bench_mode])


@pytest.mark.parametrize("method", ["plain", "with_callback"])
def test_lightning_fit(benchmark, run, lightning_bench, bench_mode, device, method):
    size = LIGHTNING_SIZES[bench_mode]
    benchmark.group = f"Lightning fit, {size.steps} steps of {size.samples} clusters, width {size.width}, {device}"
    run(getattr(lightning_bench, method), device=device, case=method, steps=size.steps)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="quick", choices=sorted(LIGHTNING_SIZES))
    parser.add_argument("--steps", type=int, default=60, help="steps timed (half of them logged)")
    parser.add_argument("--samples", type=int, default=8, help="K of the callback")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = LIGHTNING_SIZES[args.mode]
    r = LightningBench(size).per_step(args.steps, samples=args.samples)
    print(f"{size}, K={args.samples}, fraction 1/8, torch threads {torch.get_num_threads()}, "
          f"{r['rounds']} logged steps")
    print(f"step without the callback  {r['plain'] * 1e3:8.1f} ms (median)")
    print(f"step it logs               {r['logged'] * 1e3:8.1f} ms (median), "
          f"+{(r['logged'] - r['plain']) * 1e3:.1f} ms = {r['logged'] / r['plain']:.2f}x")
    print(f"its hook alone             {r['hook'] * 1e3:8.1f} ms (median)")
