"""``fastequiv demo`` on the command line: its options, the missing-dependency check, and
what it prints (the table of evaluations, the findings of the run in sentences)."""

from __future__ import annotations

import argparse
import importlib
import math
import os
from typing import Optional

import fastequiv as fe

from .data import Datasets, count
from .training import EVAL_SAMPLES, run

__all__ = ["add_arguments", "main", "findings", "summary", "missing_dependencies"]

#: the install command of what the demo needs beyond fastequiv itself
INSTALL = 'pip install "fastequiv[demo]"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5000, help="training steps (default 5000)")
    parser.add_argument("--batch-size", type=int, default=32, help="structures per training step (default 32)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="structures in the fixed training set (default 500; with --data all but the held-out "
                             "ones); 0: fresh clusters every step (infinite data)")
    parser.add_argument("--held-out", type=int, default=2048,
                        help="structures in the held-out set (default 2048; with --data at most a fifth of the file)")
    parser.add_argument("--train-eval", type=int, default=512,
                        help="training structures decomposed at each evaluation (default 512)")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="train on your structures with forces instead (any file ase.io.read takes, e.g. extxyz; "
                             "needs ase)")
    parser.add_argument("--samples", type=int, default=2, help="K, rotated copies per structure in the training loss")
    parser.add_argument("--equiv-weight", type=float, default=0.0, help="weight of L_equiv added to the loss")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warmup then cosine to 0)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="decay of the exponential moving average of the weights that is evaluated (default 0.999)")
    parser.add_argument("--ema", dest="ema", action="store_true", default=True,
                        help="evaluate the EMA of the weights (the default)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="evaluate the raw weights")
    parser.add_argument("--eval-every", type=int, default=1000,
                        help="steps between evaluations (default 1000, and at steps 50, 250 and 500)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the training set, its order, the rotations and the init; the held-out set is fixed")
    parser.add_argument("--out", default="fastequiv-out", help="folder for log.csv and decomposition.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--diagnostics", type=int, default=0, metavar="STEPS",
                        help="every STEPS steps, log the cosine of the gradients of L_mean and L_equiv and the top "
                             "Hessian eigenvalue of each (fe.diagnostics; 0: off, the default)")


def missing_dependencies(progress: bool = True) -> list[str]:
    """The packages of the demo extra that this run needs and cannot import: matplotlib
    (the plot) and, with a progress bar, tqdm."""
    missing = []
    for name in ("matplotlib",) + (("tqdm",) if progress else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def findings(res: dict, ema: bool = True) -> dict:
    """The numbers :func:`summary` reports, from :func:`~fastequiv.demo.run`'s result.

    ``{"heldout", "train" (None without a training set), "raw" (the raw weights' held-out
    values, None without an EMA): the final values of each; "heldout_count", "worst_count"
    (the structures in the held-out set and in its worst 1%); "mean_ratio", "equiv_ratio"
    (held-out over training L_mean and L_equiv, None without a training set); "equiv_mid",
    "equiv_end": (step, held-out L_equiv, learning rate) of the evaluation nearest half
    way and of the last one (None with fewer than two evaluations after step 0);
    "below_5pct_from": the first evaluation from which held-out pct stays below 5%, or
    None}``.
    """
    held, train = res["final"]["heldout"], res["final"].get("train")
    held_n = count(res["datasets"].heldout)
    out = {"heldout": held, "train": train, "raw": res["final_raw"]["heldout"] if ema else None,
           "heldout_count": held_n, "worst_count": max(1, round(0.01 * held_n)),
           "mean_ratio": _ratio(held["mean"], train["mean"]) if train is not None else None,
           "equiv_ratio": _ratio(held["equiv"], train["equiv"]) if train is not None else None,
           "equiv_mid": None, "equiv_end": None, "below_5pct_from": None}
    rows = [r for r in res["heldout"] if r[0] > 0]
    if len(rows) >= 2:
        lr = res.get("lr", {})
        end = rows[-1]
        mid = min(rows[:-1], key=lambda r: abs(r[0] - end[0] / 2))
        out["equiv_mid"] = (mid[0], mid[3], lr.get(mid[0], math.nan))
        out["equiv_end"] = (end[0], end[3], lr.get(end[0], math.nan))
    below: Optional[int] = None
    for step, *_, pct in res["heldout"]:
        below = (step if below is None else below) if pct < 0.05 else None
    out["below_5pct_from"] = below
    return out


def summary(res: dict, ema: bool = True) -> list[str]:
    """What the run shows, in sentences whose numbers and verbs come from the run (:func:`findings`)."""
    f = findings(res, ema)
    held, train = f["heldout"], f["train"]
    worst = f"{f['worst_count']} of {f['heldout_count']}"
    lines = [f"At the end ({'the EMA weights' if ema else 'the raw weights'}):"]
    if train is not None:
        r_mean, r_equiv = f["mean_ratio"], f["equiv_ratio"]
        gap = ("the generalisation gap of a model fit to a finite training set" if r_mean > 1.2
               else "no generalisation gap to speak of")
        lines.append(f"- L_mean, the error of the rotation-averaged model: held-out {held['mean']:.4g}, training set "
                     f"{train['mean']:.4g} ({r_mean:.1f}x): {gap}. It is heavy-tailed: the worst 1% of held-out "
                     f"structures ({worst}) hold {100 * held['mean_worst1pct']:.0f}% of held-out L_mean "
                     f"(training set: {100 * train['mean_worst1pct']:.0f}%).")
        same = 0.67 < r_equiv < 1.5
        lines.append(f"- L_equiv, the part that changes with the orientation: held-out {held['equiv']:.3g}, training "
                     f"set {train['equiv']:.3g} ({r_equiv:.2f}x)"
                     + (": about the same on structures the model has and has not seen." if same else "."))
        why = (" Held-out pct is lower because held-out L_mean is larger, not because L_equiv is smaller."
               if held["pct"] < train["pct"] and r_mean > r_equiv else "")
        lines.append(f"- pct = L_equiv / L_total: held-out {100 * held['pct']:.1f}%, training set "
                     f"{100 * train['pct']:.1f}%.{why}")
    else:
        lines.append(f"- No fixed training set (fresh structures every step), so no generalisation gap: held-out "
                     f"L_mean {held['mean']:.4g} (the worst 1% of held-out structures, {worst}, hold "
                     f"{100 * held['mean_worst1pct']:.0f}% of it), L_equiv {held['equiv']:.3g}, pct "
                     f"{100 * held['pct']:.1f}%.")
    if f["equiv_end"] is not None:
        (mid_step, mid, mid_lr), (_, end, end_lr) = f["equiv_mid"], f["equiv_end"]
        falls = ": it fell as training went on and the learning rate decayed." if end < mid / 1.2 else "."
        lines.append(f"- Held-out L_equiv was {mid:.3g} at step {mid_step} (lr {mid_lr:.2g}) "
                     f"and {end:.3g} at the end (lr {end_lr:.2g}){falls}")
    if f["raw"] is not None:
        raw = f["raw"]
        lines.append(f"- The raw weights end at held-out L_equiv {raw['equiv']:.3g}, L_mean {raw['mean']:.4g}, pct "
                     f"{100 * raw['pct']:.1f}% (EMA: {held['equiv']:.3g}, {held['mean']:.4g}, "
                     f"{100 * held['pct']:.1f}%).")
    return lines


def _announce(args: argparse.Namespace, sets: Datasets) -> None:
    """The data, the training protocol and what is evaluated, before training starts."""
    evaluated = f"an EMA of the weights (decay {args.ema_decay:g})" if args.ema else "the raw weights"
    print(f"data: {sets.description}")
    print(f"training: {args.steps} steps of {args.batch_size}, AdamW lr {args.lr:g} with warmup and cosine decay "
          f"to 0, loss fe.twirl_loss with K={args.samples} rotated copies (fresh rotations for every structure "
          f"and step)" + (f" + {args.equiv_weight:g} L_equiv" if args.equiv_weight else ""))
    print(f"evaluated: {evaluated}, decomposed with fe.equivariance_error (K={EVAL_SAMPLES}, fixed rotations) "
          f"every {args.eval_every} steps on the held-out set"
          + (f" and {count(sets.train_eval)} training structures" if sets.train_eval is not None else ""),
          flush=True)


def _print_evaluations(res: dict) -> None:
    """One line per evaluation: step, learning rate, held-out and training-set decomposition."""
    train = {r[0]: r for r in res["train"]}
    print(f"{'':>17}{'held-out':^37}" + (f"   {'training set (' + str(count(res['datasets'].train_eval)) + ')':^37}"
                                            if train else ""))
    head = f"{'L_total':>9} {'L_mean':>9} {'L_equiv':>9} {'pct':>7}"
    lrs = res["lr"]
    print(f"{'step':>6} {'lr':>8}  {head}" + (f"   {head}" if train else ""))
    for step, total, mean, equiv, pct in res["heldout"]:
        line = f"{step:>6} {lrs.get(step, 0.0):>8.2e}  {total:>9.4f} {mean:>9.4f} {equiv:>9.5f} {100 * pct:>6.2f}%"
        if step in train:
            _, t, m, e, p = train[step]
            line += f"   {t:>9.4f} {m:>9.4f} {e:>9.5f} {100 * p:>6.2f}%"
        print(line)


def _print_dynamics(res: dict) -> None:
    print(f"{'step':>6} {'cos(grad L_mean, grad L_equiv)':>32} {'top eig L_mean':>15} {'top eig L_equiv':>16}")
    for r in res["dynamics"]:
        print(f"{r['step']:>6} {r['cos']:>32.3f} {r['top_eig_mean']:>15.4g} {r['top_eig_equiv']:>16.4g}")


def main(args: argparse.Namespace) -> int:
    missing = missing_dependencies(progress=not args.no_progress)
    if missing:
        raise SystemExit(f"fastequiv demo needs {' and '.join(missing)}, which cannot be imported here: {INSTALL}")
    what = "Morse forces of 5-8 atom clusters" if args.data is None else f"the forces in {args.data}"
    print(f"fastequiv {fe.__version__} demo: a plain transformer learns {what} with random-rotation augmentation")
    res = run(steps=args.steps, samples=args.samples, equiv_weight=args.equiv_weight, device=args.device,
              seed=args.seed, out=args.out, batch_size=args.batch_size, eval_every=args.eval_every,
              held_out=args.held_out, lr=args.lr, progress=not args.no_progress, train_size=args.train_size,
              ema=args.ema, ema_decay=args.ema_decay, train_eval=args.train_eval, data=args.data,
              announce=lambda sets: _announce(args, sets), diagnostics=args.diagnostics)
    _print_evaluations(res)
    for line in summary(res, ema=args.ema):
        print(line)
    if args.diagnostics:
        _print_dynamics(res)
    below = findings(res, args.ema)["below_5pct_from"]
    if below is not None:
        print(f"The equivariance error stays below 5% of the held-out loss from step {below} on.")
    else:
        print(f"The equivariance error is still {100 * res['heldout'][-1][4]:.1f}% of the held-out loss at the end.")
    print(f"done in {res['seconds']:.0f} s ({res['train_seconds']:.0f} s training, the rest evaluations); "
          f"wrote {os.path.abspath(res['csv'])}")
    if res["png"]:
        print(f"plot: {os.path.abspath(res['png'])}")
    return 0
