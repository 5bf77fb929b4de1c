"""The demo's training run: AdamW on ``fe.twirl_loss``, an EMA of the weights, and the
evaluated model decomposed on fixed sets at fixed steps; :func:`run` ties the pieces
together and writes ``log.csv`` (and the plot)."""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from typing import Iterator, Optional

import torch
from torch import nn

import fastequiv as fe

from . import plots
from .data import Datasets, Structures, count, datasets, take
from .model import SPEC, PointTransformer

__all__ = ["run", "batches", "EMA", "DYNAMICS", "EVAL_SAMPLES", "EVAL_ROTATIONS_SEED"]

# what --diagnostics logs (fastequiv.diagnostics.log_dynamics)
DYNAMICS = ("cos", "norm_mean", "norm_equiv", "top_eig_mean", "top_eig_equiv")
# every evaluation: K and the rotations, the same for every --seed
EVAL_SAMPLES = 8
EVAL_ROTATIONS_SEED = 7
# the columns of log.csv (DYNAMICS too with --diagnostics)
FIELDS = ["step", "split", "model", "lr", "total", "mean", "equiv", "pct", "total_stderr", "mean_stderr",
          "equiv_stderr", "mean_worst1pct"]


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of training batches, forever: a fresh permutation of ``range(n)`` every epoch
    (a batch may span the end of one epoch and the start of the next)."""
    queue = torch.empty(0, dtype=torch.long)
    while True:
        while queue.numel() < batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=generator)])
        yield queue[:batch_size]
        queue = queue[batch_size:]


def training_data(sets: Datasets, batch_size: int, generator: torch.Generator, device) -> Iterator[Structures]:
    """``(inputs, forces)`` of every training step, forever: batches of the fixed training
    set in a new order every epoch, or fresh clusters (``sets.train`` is None)."""
    if sets.train is None:
        while True:
            yield sets.task.batch(batch_size, generator)
    for idx in batches(count(sets.train), batch_size, generator):
        yield take(sets.train, idx.to(device))


class EMA:
    """An exponential moving average of a model's weights, with the warmup of the decay
    that torch_ema (used by MACE and fairchem) applies: ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so the first steps are not averaged with the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1 - d)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)


def _tail_share(per_sample: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the sum of ``per_sample`` held by its largest ``fraction`` of entries."""
    v = per_sample.detach().double().flatten()
    k = max(1, round(fraction * v.numel()))
    total = float(v.sum())
    return float(v.topk(k).values.sum()) / total if total > 0 else float("nan")


def _eval_steps(steps: int, every: int) -> list[int]:
    """Steps at which the evaluated model is decomposed: 0, every ``every`` steps, the end,
    and a few early steps where the loss moves fast."""
    early = [s for s in (50, 250, 500) if s < every]
    return sorted({0, steps, *early, *range(every, steps, every)} & set(range(steps + 1)))


def _check_arguments(steps, samples, batch_size, eval_every, ema, ema_decay, diagnostics) -> None:
    if isinstance(diagnostics, bool) or not isinstance(diagnostics, int) or diagnostics < 0:
        raise ValueError(f"diagnostics must be an int >= 0 (steps between logs; 0: off), got {diagnostics!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate L_equiv, got {samples}")
    if batch_size < 1 or eval_every < 1:
        raise ValueError(f"batch_size and eval_every must be >= 1, got {batch_size} and {eval_every}")
    if ema and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")


def optimiser(model: nn.Module, lr: float, steps: int):
    """AdamW at peak ``lr``: a linear warmup over the first 10% of the steps (at most 100),
    then a cosine decay to 0 at ``steps``. Returns ``(optimizer, scheduler)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    return opt, sched


def decompose(net: nn.Module, splits: list, chunk_size: Optional[int]) -> dict:
    """``{split: values}``: ``fe.equivariance_error`` of ``net`` (eval mode, no grad) on each
    ``(split, (inputs, forces))``, K = EVAL_SAMPLES fixed rotations; values are
    ``Decomposition.to_dict()`` plus ``mean_worst1pct``."""
    was_training = net.training
    net.eval()
    res = {}
    for split, (inputs, target) in splits:
        with torch.no_grad():
            d = fe.equivariance_error(net, inputs, target, spec=SPEC, samples=EVAL_SAMPLES, seed=EVAL_ROTATIONS_SEED,
                                      chunk_size=chunk_size)
        res[split] = {**d.to_dict(), "mean_worst1pct": _tail_share(d.per_sample.mean)}
    net.train(was_training)
    return res


def dynamics(net: nn.Module, heldout: Structures) -> dict:
    """:data:`DYNAMICS` of ``net`` on the first 64 held-out structures
    (``fe.diagnostics.log_dynamics``); the parameters' ``requires_grad`` flags are restored
    (the EMA copy keeps none)."""
    inputs, target = take(heldout, torch.arange(min(64, count(heldout)), device=heldout[1].device))
    flags = [p.requires_grad for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(True)
        vals = fe.diagnostics.log_dynamics(net, inputs, target, spec=SPEC, samples=EVAL_SAMPLES,
                                           seed=EVAL_ROTATIONS_SEED, max_iter=12)
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
    return {k: vals[k] for k in DYNAMICS}


def train_step(model: nn.Module, opt, sched, inputs: dict, target: torch.Tensor, samples: int,
               equiv_weight: float, generator: torch.Generator) -> dict:
    """One AdamW step on ``fe.twirl_loss`` (K = ``samples``, gradients clipped at norm 1);
    returns the batch's row of log.csv (its decomposition and the learning rate it used)."""
    loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=samples, equiv_weight=equiv_weight,
                            generator=generator, check_finite=False)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    total, mean, equiv, pct = torch.stack([d.total, d.mean, d.equiv, d.pct]).tolist()  # one host copy per step
    return {"split": "batch", "model": "raw", "lr": lr, "total": total, "mean": mean, "equiv": equiv, "pct": pct}


def write_log(rows: list, out: str, diagnostics: bool) -> str:
    """Write ``rows`` to ``out/log.csv``; returns its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS + (list(DYNAMICS) if diagnostics else []), restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def _progress(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", dynamic_ncols=True)


def run(steps: int = 5000, samples: int = 2, equiv_weight: float = 0.0, device: str = "cpu", seed: int = 0,
        out: str = "fastequiv-out", batch_size: int = 32, eval_every: int = 1000, held_out: int = 2048,
        lr: float = 2e-3, progress: bool = True, plot: bool = True, train_size: Optional[int] = None,
        ema: bool = True, ema_decay: float = 0.999, train_eval: int = 512, data: Optional[str] = None,
        announce=None, diagnostics: int = 0) -> dict:
    """Train the demo model and write its log; returns the paths, the curves and the models.

    Returns:
        ``{"csv", "png" (or None), "heldout": [(step, total, mean, equiv, pct)], "train": the same
        on the training subset ([] without a training set), "final": {split: values} of the
        evaluated model at the end, "final_raw": the same for the raw weights, "model": the
        trained model, "ema_model": its EMA (None with ``ema=False``), "datasets", "seconds",
        "train_seconds", "lr": {step: learning rate at each evaluation}}``; values are
        :meth:`fastequiv.Decomposition.to_dict` plus ``mean_worst1pct`` (the share of
        ``L_mean`` held by the worst 1% of structures). ``announce``, if given, is called
        with the :class:`Datasets` before training starts. ``diagnostics > 0`` also logs,
        every that many steps, :func:`fastequiv.diagnostics.log_dynamics` of the evaluated
        model on the first 64 held-out structures (the cosine of the gradients of L_mean and
        L_equiv and the top Hessian eigenvalue of each) as rows with ``split="dynamics"``.
    """
    _check_arguments(steps, samples, batch_size, eval_every, ema, ema_decay, diagnostics)
    dev = torch.device(device)
    sets = datasets(train_size, held_out, train_eval, seed, dev, data)
    if announce is not None:
        announce(sets)
    torch.manual_seed(seed)
    model = PointTransformer(species=sets.species, cutoff=sets.cutoff).to(dev)
    opt, sched = optimiser(model, lr, steps)
    data_gen = torch.Generator().manual_seed(seed + 1)  # the order of the training structures
    rot_gen = torch.Generator().manual_seed(seed + 2)  # the seeds of the training loss's rotations
    averaged = EMA(model, ema_decay) if ema else None
    evaluated, name = (averaged.model, "ema") if averaged else (model, "raw")
    train = training_data(sets, batch_size, data_gen, dev)
    evals = set(_eval_steps(steps, eval_every))
    splits = [(s, v) for s, v in (("train", sets.train_eval), ("heldout", sets.heldout)) if v is not None]
    chunk_size = None if data is None else 8192
    rows: list = []
    curves: dict = {"train": [], "heldout": []}
    lrs: dict = {}

    def log(step: int, split: str, label: str, vals: dict) -> None:
        rows.append({"step": step, "split": split, "model": label, "lr": opt.param_groups[0]["lr"], **vals})

    bar = _progress(steps, progress)
    start = time.perf_counter()
    eval_seconds = 0.0
    final: dict = {}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        if step in evals:
            final = decompose(evaluated, splits, chunk_size)
            lrs[step] = opt.param_groups[0]["lr"]
            for split, vals in final.items():
                log(step, split, name, vals)
                curves[split].append((step, vals["total"], vals["mean"], vals["equiv"], vals["pct"]))
            if bar is not None:
                h = final["heldout"]
                bar.set_postfix_str(f"held-out L_total {h['total']:.4f} pct {100 * h['pct']:.1f}%")
        if diagnostics and (step % diagnostics == 0 or step == steps):
            log(step, "dynamics", name, dynamics(evaluated, sets.heldout))
        eval_seconds += time.perf_counter() - t0
        if step == steps:
            break
        inputs, target = next(train)
        row = train_step(model, opt, sched, inputs, target, samples, equiv_weight, rot_gen)
        rows.append({"step": step, **row})
        if averaged is not None:
            averaged.update(model)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_description(f"step {step} batch L_total {row['total']:.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    final_raw = final
    if averaged is not None:
        final_raw = decompose(model, splits, chunk_size)
        for split, vals in final_raw.items():
            log(steps, split, "raw", vals)

    csv_path = write_log(rows, out, bool(diagnostics))
    png_path = plots.plot(rows, os.path.join(out, "decomposition.png"), samples, name, EVAL_SAMPLES) if plot else None
    return {"csv": csv_path, "png": png_path, "heldout": curves["heldout"], "train": curves["train"],
            "final": final, "final_raw": final_raw, "model": model,
            "ema_model": averaged.model if averaged else None, "datasets": sets, "seconds": seconds,
            "train_seconds": seconds - eval_seconds, "lr": lrs,
            "dynamics": [r for r in rows if r["split"] == "dynamics"]}
