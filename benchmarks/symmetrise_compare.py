"""Symmetrise or regularise: the demo's transformer trained five ways on the same data.

The model, task and data are those of ``fastequiv demo`` (``fastequiv.demo``: the plain
point-cloud transformer, Morse forces of 5-8 atom clusters, a fixed training set, AdamW
with a warmup and a cosine decay, an EMA of the weights), shortened so that the whole
comparison runs in about ten minutes on a 2-core CPU. Every method sees the same training
batches, the same rotations of the training loss (``fe.twirl_loss``, K=2) and the same
initial weights for a given seed:

* ``augment``: random-rotation augmentation only (``equiv_weight=0``);
* ``equiv_weight``: ``L_total + w L_equiv`` from the same forward pass;
* ``margin``: ``L_total + w relu(L_equiv - eps)`` (``equiv_margin``);
* ``lie_loss``: ``L_total + w lie_loss / 2`` (:func:`fastequiv.lie_loss` on the batch,
  half of which bounds ``L_equiv`` from above);
* ``augment + FA``: the ``augment`` models wrapped in :class:`fastequiv.FrameAveraged`
  at test time (4 PCA frames, exactly equivariant; no retraining).

Each trained model (its EMA weights) is decomposed on a fixed held-out set with
:func:`fastequiv.equivariance_error` (K=8, fixed rotations). Writes
``symmetrise_compare.csv`` (one row per method and seed) and ``symmetrise_compare.png``
into ``--out`` and prints a Markdown table of the means over seeds.

    python benchmarks/symmetrise_compare.py                 # 5 seeds, ~7 min on 2 cores
    python benchmarks/symmetrise_compare.py --smoke         # a few steps: checks it runs
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time

import torch

import fastequiv as fe
from fastequiv.demo import EMA, SPEC, PointTransformer, batches, datasets, take

EVAL_SAMPLES, EVAL_SEED = 8, 7
METHODS = ("augment", "equiv_weight", "margin", "lie_loss", "augment + FA")


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--held-out", type=int, default=512)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight", type=float, default=1.0, help="w of equiv_weight, margin and lie_loss")
    p.add_argument("--margin", type=float, default=4e-3, help="eps of the margin run (units of L_equiv)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--smoke", action="store_true", help="8 steps, 1 seed, 32 held-out clusters")
    p.add_argument("--from-csv", help="only redraw the table and the plot from a CSV this script wrote")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.held_out, args.train_size = 1, 8, 32, 64
    return args


def schedule(opt, steps: int):
    """The demo's learning rate: linear warmup over 10% of the steps (at most 100), cosine to 0."""
    warm = max(1, min(100, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


def train(method: str, seed: int, sets, args) -> tuple[torch.nn.Module, float]:
    """The EMA weights after ``args.steps`` steps of ``method``, and the seconds per step."""
    torch.manual_seed(seed)
    model = PointTransformer(width=args.width, layers=args.layers, species=sets.species, cutoff=sets.cutoff)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = schedule(opt, args.steps)
    ema = EMA(model, 0.999)
    order = batches(sets.train[1].shape[0], args.batch_size, torch.Generator().manual_seed(seed + 1))
    rotations = torch.Generator().manual_seed(seed + 2)
    penalty = {"augment": {}, "equiv_weight": {"equiv_weight": args.weight},
               "margin": {"equiv_weight": args.weight, "equiv_margin": args.margin}, "lie_loss": {}}[method]
    start = time.perf_counter()
    for step in range(args.steps):
        inputs, target = take(sets.train, next(order))
        loss, _ = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=2, generator=rotations, **penalty)
        if method == "lie_loss":
            loss = loss + args.weight * fe.lie_loss(model, inputs, spec=SPEC) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
    return ema.model, (time.perf_counter() - start) / max(args.steps, 1)


def evaluate(model, sets) -> dict:
    inputs, target = sets.heldout
    with torch.no_grad():
        d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=EVAL_SAMPLES, seed=EVAL_SEED)
    return {"total": float(d.total), "mean": float(d.mean), "equiv": float(d.equiv), "pct": float(d.pct)}


def forward_seconds(model, sets, repeats: int = 3) -> float:
    """The best of ``repeats`` no-grad forwards over the held-out set."""
    inputs, _ = sets.heldout
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs)
            best = min(best, time.perf_counter() - t0)
    return best


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    for seed in range(args.seeds):
        sets = datasets(args.train_size, args.held_out, 1, seed, "cpu")
        for method in METHODS[:-1]:
            model, per_step = train(method, seed, sets, args)
            model.eval()
            rows.append({"method": method, "seed": seed, "ms_per_step": 1e3 * per_step, **evaluate(model, sets)})
            print(f"seed {seed} {method:>13}: {rows[-1]}", flush=True)
            if method == "augment":
                fa = fe.FrameAveraged(model, spec=SPEC, seed=0)
                cost = forward_seconds(fa, sets) / forward_seconds(model, sets)
                rows.append({"method": "augment + FA", "seed": seed, "ms_per_step": 1e3 * per_step,
                             "inference_cost": cost, **evaluate(fa, sets)})
                print(f"seed {seed} {'augment + FA':>13}: {rows[-1]}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Means ± standard deviations over seeds, and each method's ratio to ``augment`` on
    the same seed (mean, and the range over seeds): seeds differ more than methods do."""
    lines = ["| method | held-out L_total | L_mean | L_equiv | pct | L_total / augment's | L_equiv / augment's "
             "| ms / training step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["seed"]: r for r in rows if r["method"] == "augment"}
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue

        def cell(key, fmt):
            vals = [r[key] for r in sel]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{fmt(statistics.mean(vals))} ± {fmt(sd)}"

        def ratio(key):
            vals = [r[key] / base[r["seed"]][key] for r in sel]
            return f"{statistics.mean(vals):.3g} ({min(vals):.3g}-{max(vals):.3g})"

        lines.append(f"| {method} | {cell('total', lambda v: f'{v:.4f}')} | {cell('mean', lambda v: f'{v:.4f}')} "
                     f"| {cell('equiv', lambda v: f'{v:.2e}')} | {cell('pct', lambda v: f'{100 * v:.2f}%')} "
                     f"| {ratio('total')} | {ratio('equiv')} | {cell('ms_per_step', lambda v: f'{v:.1f}')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r["seed"]: r["total"] for r in rows if r["method"] == "augment"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, method in enumerate(METHODS):
        sel = [r for r in rows if r["method"] == method]
        for ax, key, label in zip(axes, ("total", "equiv", "ms_per_step"),
                                  ("held-out L_total / augment's (same seed)", "held-out L_equiv",
                                   "ms per training step")):
            ys = [r[key] / base[r["seed"]] if key == "total" else max(r[key], 1e-16) if key == "equiv" else r[key]
                  for r in sel]
            ax.scatter([i] * len(ys), ys, s=22, alpha=0.8)
            ax.plot([i - 0.25, i + 0.25], [statistics.mean(ys)] * 2, color="k", lw=1.5)
            ax.set_title(label)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels(METHODS, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Symmetrise or regularise: the demo transformer, same data, steps and seeds (dots: seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = arguments(argv)
    if args.from_csv:
        with open(args.from_csv) as fh:
            rows = [{k: (v if k == "method" else int(v) if k == "seed" else float(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(fh)]
        plot(rows, os.path.splitext(args.from_csv)[0] + ".png")
        print(table(rows))
        return rows
    t0 = time.perf_counter()
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    name = "symmetrise_compare_smoke" if args.smoke else "symmetrise_compare"
    with open(os.path.join(args.out, name + ".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "seed", "total", "mean", "equiv", "pct", "ms_per_step",
                                           "inference_cost"], restval="")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, name + ".png"))
    print(table(rows))
    costs = [r["inference_cost"] for r in rows if "inference_cost" in r]
    print(f"FrameAveraged forward / plain forward on the held-out set: {statistics.mean(costs):.2f}x")
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
