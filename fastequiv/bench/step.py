"""What logging or training against equivariance error costs in a real training step.

One non-equivariant point-cloud transformer (:class:`fastequiv.demo.PointTransformer`,
several million parameters in the quick and full sizes) learns Morse forces of atom
clusters (:class:`fastequiv.demo.ForceTask`) with AdamW. Every variant below takes one
optimizer step on the same data, and all run interleaved in one process, so that their
ratios to (a) come from the same conditions:

(a) ``plain``: the augmented step users run today: a fresh random rotation per sample,
    applied to positions and forces, on ``2B`` samples (the stacked batch of (b));
(b) ``twirl_loss``: :func:`fastequiv.twirl_loss` with K=2 on ``B`` samples: the same
    ``2B`` rows through the model in one call, the loss and its decomposition from them;
(c) ``plain + monitor``: (a), then :class:`fastequiv.EquivarianceMonitor` (``every=1``,
    K=2, no grad) on the first 1/8 of the batch;
(d) ``plain + e3nn loop``: (a), then e3nn's ``equivariance_error`` with 8 rotations (two
    forwards each, no grad) on the same 1/8 of the batch: the loop fastequiv replaces;
(e) ``e3nn model``: one step of an e3nn-equivariant message-passing network of similar
    parameter count (e3nn's own ``gate_points`` convolutions) on the ``2B`` samples: what
    building the symmetry in costs instead.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import fastequiv as fe
from fastequiv.demo import SPEC, SPECIES, ForceTask, PointTransformer

from .timing import synchronizer

__all__ = ["StepSize", "STEP_SIZES", "E3nnForceNet", "StepBench", "VARIANTS", "overhead"]


@dataclass(frozen=True)
class StepSize:
    """Batch and model size of one benchmark step (``samples``: B, the twirl_loss batch)."""

    samples: int
    atoms: int
    width: int
    layers: int
    heads: int
    e3nn_mul: int
    e3nn_layers: int
    rounds: int
    e3nn_rounds: int  # the e3nn model's step is ~50x slower on CPU: it is timed in the first rounds only


# quick and full: a 4.7M-parameter transformer (width 384, 4 layers) next to a 5.1M-parameter
# e3nn network (mul 512, 3 layers); smoke: toy sizes that only prove every variant runs.
_SMOKE = dict(samples=8, atoms=8, width=32, layers=1, heads=2, e3nn_mul=8, e3nn_layers=1, rounds=1, e3nn_rounds=1)
_MODEL = dict(width=384, layers=4, heads=8, e3nn_mul=512, e3nn_layers=3)
STEP_SIZES = {
    "cpu": {
        "smoke": StepSize(**_SMOKE),
        "quick": StepSize(samples=16, atoms=32, rounds=21, e3nn_rounds=3, **_MODEL),
        "full": StepSize(samples=32, atoms=32, rounds=31, e3nn_rounds=5, **_MODEL),
    },
    "cuda": {
        "smoke": StepSize(**_SMOKE),
        "quick": StepSize(samples=64, atoms=64, rounds=30, e3nn_rounds=10, **_MODEL),
        "full": StepSize(samples=256, atoms=64, rounds=100, e3nn_rounds=20, **_MODEL),
    },
}


class E3nnForceNet(nn.Module):
    """An e3nn-equivariant force field with the interface of :class:`PointTransformer`.

    e3nn's gated point convolutions (``e3nn.nn.models.v2106``): node features
    ``mul x 0e + mul/2 x 1o + mul/4 x 2e``, edges between every pair of atoms of a cluster
    with spherical harmonics up to l = 2 and a smooth radial basis, one ``1x1o`` force per
    atom. Equivariant by construction, so it needs no augmentation.
    """

    def __init__(self, mul: int = 512, layers: int = 3, species: int = SPECIES, max_radius: float = 6.0,
                 basis: int = 10, radial_neurons: int = 64):
        super().__init__()
        from e3nn import o3
        from e3nn.nn.models.v2106.gate_points_message_passing import MessagePassing

        self.species, self.max_radius, self.basis = species, max_radius, basis
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)
        hidden = f"{mul}x0e + {max(1, mul // 2)}x1o + {max(1, mul // 4)}x2e"
        self.mp = MessagePassing([f"{species}x0e"] + [hidden] * layers + ["1x1o"], "1x0e", self.irreps_sh,
                                 fc_neurons=[basis, radial_neurons], num_neighbors=8.0)

    def forward(self, pos: torch.Tensor, species: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from e3nn import o3
        from e3nn.math import soft_one_hot_linspace

        B, N, _ = pos.shape
        eye = torch.eye(N, dtype=torch.bool, device=pos.device)
        b, i, j = (mask[:, :, None] & mask[:, None, :] & ~eye).nonzero(as_tuple=True)
        src, dst = b * N + j, b * N + i
        flat = pos.reshape(B * N, 3)
        vec = flat[src] - flat[dst]
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        radial = soft_one_hot_linspace(vec.norm(dim=1), 0.0, self.max_radius, self.basis, basis="smooth_finite",
                                       cutoff=True).mul(self.basis ** 0.5)
        nodes = nn.functional.one_hot(species.reshape(-1), self.species).to(pos.dtype)
        attr = pos.new_ones(B * N, 1)
        forces = self.mp(nodes, attr, src, dst, sh, radial).reshape(B, N, 3)
        return forces * mask[..., None]


def _masked_mse(pred, target, mask):
    w = mask[..., None].to(pred.dtype)
    return ((pred - target) ** 2 * w).sum() / (3 * w.sum()).clamp_min(1)


def _cut(inputs: dict, n: int) -> dict:
    return {k: v[:n] for k, v in inputs.items()}


class StepBench:
    """The models, data and optimizers of one overhead run; each variant is a method."""

    def __init__(self, size: StepSize, device="cpu", seed: int = 0):
        self.size, self.device = size, torch.device(device)
        torch.manual_seed(seed)
        task = ForceTask(atoms=(max(2, 3 * size.atoms // 4), size.atoms), device=self.device)
        B = size.samples
        self.inputs, self.forces = task.batch(2 * B, torch.Generator().manual_seed(seed))
        self.half, self.half_forces = _cut(self.inputs, B), self.forces[:B]
        self.measured = max(1, math.ceil(2 * B / 8))  # the monitored 1/8 of the batch
        self.model = PointTransformer(width=size.width, heads=size.heads, layers=size.layers).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.monitor = fe.EquivarianceMonitor(self.model, spec=SPEC, every=1, fraction=1 / 8, samples=2)
        self._e3nn = None
        self.seed = torch.Generator().manual_seed(seed + 1)

    @property
    def e3nn_model(self) -> E3nnForceNet:
        if self._e3nn is None:
            self._e3nn = E3nnForceNet(mul=self.size.e3nn_mul, layers=self.size.e3nn_layers).to(self.device)
            self._e3nn_opt = torch.optim.AdamW(self._e3nn.parameters(), lr=1e-4)
        return self._e3nn

    def parameters(self, e3nn: bool = True) -> dict:
        """Parameter counts of the transformer and (building it if needed) the e3nn model."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"transformer": count(self.model), **({"e3nn": count(self.e3nn_model)} if e3nn else {})}

    def _update(self, loss, opt=None):
        opt = opt or self.opt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _plain_loss(self, model):
        x = self.inputs
        R = fe.random_rotations(x["pos"].shape[0], generator=self.seed, device=self.device)
        pos, forces = x["pos"] @ R.transpose(1, 2), self.forces @ R.transpose(1, 2)
        return _masked_mse(model(pos, x["species"], x["mask"]), forces, x["mask"])

    def _twirl_loss(self, model):
        loss, _ = fe.twirl_loss(model, self.half, self.half_forces, spec=SPEC, samples=2, generator=self.seed,
                                check_finite=False)
        return loss

    def plain(self):
        """(a) random-rotation augmentation on the 2B samples."""
        self._update(self._plain_loss(self.model))

    def twirl_loss(self):
        """(b) fe.twirl_loss, K=2 copies of B samples: 2B rows, one model call."""
        self._update(self._twirl_loss(self.model))

    def monitored(self):
        """(c) (a), then the no-grad monitor (K=2) on 1/8 of the batch."""
        self.plain()
        self.monitor(0, self.inputs, self.forces)

    def e3nn_loop(self):
        """(d) (a), then e3nn's equivariance_error: 8 rotations x 2 forwards on 1/8 of the batch."""
        from e3nn.util.test import equivariance_error

        self.plain()
        n = self.measured
        args = [self.inputs["pos"][:n], self.inputs["species"][:n], self.inputs["mask"][:n]]
        with torch.no_grad():
            equivariance_error(self.model, args, irreps_in=["cartesian_points", None, None], irreps_out=["1x1o"],
                               ntrials=8, do_parity=False, do_translation=False)

    def e3nn_step(self):
        """(e) one step of the equivariant e3nn model on the 2B samples (no augmentation)."""
        model, x = self.e3nn_model, self.inputs
        self._update(_masked_mse(model(x["pos"], x["species"], x["mask"]), self.forces, x["mask"]), self._e3nn_opt)


class _Stored(nn.Module):
    """A stand-in model that returns a stored output (a leaf, so backward has work to do):
    with it a step costs only what surrounds the model."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(torch.randn_like(like))

    def forward(self, pos, species, mask):
        return self.out[: pos.shape[0]]


def machinery(bench: StepBench, mode: str) -> dict:
    """Milliseconds of everything but the model in (a), (b) and (c): the loss, rotations,
    copies, reductions and their backward, with the model replaced by :class:`_Stored`.
    Timed with :func:`fastequiv.bench.timing.measure` (hundreds of rounds), so the cost
    fastequiv adds is resolved even where a whole step's run-to-run noise hides it."""
    from .timing import measure

    stub = _Stored(bench.forces).to(bench.device)
    monitor = fe.EquivarianceMonitor(stub, spec=SPEC, every=1, fraction=1 / 8, samples=2)
    fns = {
        "plain_ms": lambda: bench._plain_loss(stub).backward(),
        "twirl_loss_ms": lambda: bench._twirl_loss(stub).backward(),
        "monitor_ms": lambda: monitor(0, bench.inputs, bench.forces),
    }
    return {k: 1e3 * measure(fn, bench.device, mode).median for k, fn in fns.items()}


# (key, label, method): the order of the report
VARIANTS = [
    ("a", "plain augmented step", "plain"),
    ("b", "fe.twirl_loss K=2", "twirl_loss"),
    ("c", "plain + EquivarianceMonitor (1/8 batch, K=2)", "monitored"),
    ("d", "plain + e3nn equivariance_error (1/8 batch, 8 rotations)", "e3nn_loop"),
    ("e", "e3nn-equivariant model, plain step", "e3nn_step"),
]


def overhead(mode: str = "quick", device=None, *, rounds: int | None = None, variants=None, seed: int = 0,
             log=None) -> dict:
    """Time every variant ``rounds`` times, interleaved in a shuffled order per round, and
    return per-variant times, the median (and quartiles) over rounds of each time divided
    by (a)'s time in the same round, and :func:`machinery`: what surrounds the model."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = STEP_SIZES[device.type][mode]
    rounds = rounds or size.rounds
    keys = [k for k, _, _ in VARIANTS if variants is None or k in variants]
    if "a" not in keys:
        keys.insert(0, "a")
    bench = StepBench(size, device, seed)
    fns = {k: getattr(bench, method) for k, _, method in VARIANTS if k in keys}
    sync = synchronizer(device)
    for k in keys:  # warm-up: allocator, TorchScript of the e3nn model, kernel caches
        fns[k]()
    sync()
    times = {k: [] for k in keys}
    order = random.Random(seed)
    for r in range(rounds):
        for k in order.sample(keys, len(keys)):
            if k == "e" and r >= size.e3nn_rounds:
                continue
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
        if log:
            log(f"  round {r + 1}/{rounds}: " + " ".join(f"{k}={1e3 * times[k][r]:.0f}ms" for k in keys if r < len(times[k])))
    labels = {k: label for k, label, _ in VARIANTS}
    result = {
        "mode": mode,
        "device": str(device),
        "rounds": rounds,
        "e3nn_rounds": min(rounds, size.e3nn_rounds) if "e" in keys else 0,
        "size": {**size.__dict__, "stacked_batch": 2 * size.samples, "measured_samples": bench.measured},
        "parameters": bench.parameters(e3nn="e" in keys),
        "variants": {},
    }
    for k in keys:
        ratios = sorted(t / a for t, a in zip(times[k], times["a"]))
        quartile = lambda q: ratios[min(len(ratios) - 1, round(q * (len(ratios) - 1)))]  # noqa: E731
        ratio = statistics.median(ratios)
        result["variants"][k] = {"label": labels[k], "median_s": statistics.median(times[k]), "times_s": times[k],
                                 "ratio_to_a": ratio, "ratio_q1": quartile(0.25), "ratio_q3": quartile(0.75),
                                 "overhead_pct": 100 * (ratio - 1)}
    m = machinery(bench, mode)
    a = result["variants"]["a"]["median_s"] * 1e3
    m["twirl_loss_added_pct_of_a"] = 100 * (m["twirl_loss_ms"] - m["plain_ms"]) / a
    m["monitor_added_pct_of_a"] = 100 * m["monitor_ms"] / a
    result["machinery"] = m
    return result
