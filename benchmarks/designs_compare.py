"""Rotation designs against i.i.d. Haar draws, at equal numbers of model evaluations.

Two analytic force fields on 6-atom clusters (float64), each an equivariant spring force plus
a term that breaks the symmetry, with closed forms for the twirled prediction and L_equiv
(``u = x - centroid``, ``r = |u|``, per atom):

* ``smooth``: ``eps * exp(k u . e1) e2`` for two fixed unit vectors (``e1 . e2 = c``), an
  entire function of the rotation with content at every degree, falling like
  ``(k r)^l / (2l+1)!!``. With ``n_i = g^T e_i``, ``E[n2 | n1] = c n1`` and ``u . n1 = r t``,
  ``t`` uniform on [-1, 1] (Archimedes): ``fbar = eps * c (cosh z / z - sinh z / z^2) u / r``
  and ``E ||f_g||^2 = eps^2 sinh(2z) / (2z)``, ``z = k r``;
* ``broken``: ``eps * Q^T |Q u|`` (componentwise, in a fixed generic frame ``Q``), a kink in
  every direction, so content at every degree: ``fbar = 0`` and ``E ||f_g||^2 = eps^2 r^2``
  (in the lab frame the cube's rotations would twirl ``|u|`` exactly: ``c^T |c v| = |v|`` for
  the half turns about the axes and the 3-fold turns);

and the demo's transformer (``fastequiv.demo``), trained briefly with ``fe.twirl_loss``,
whose L_equiv is measured on held-out clusters. Measured, against the number of model
evaluations per sample N:

1. the RMS error of the twirled prediction against the closed form: i.i.d. Haar
   (``fe.Twirled(samples=N)``), fixed designs (``fe.Twirled(rotations="design:L")``) and
   randomised ones (each sample's design turned by a Haar rotation);
2. the RMS error of the batch's L_equiv estimate against the closed form, over seeds:
   i.i.d. Haar (``fe.equivariance_error(samples=N)``, unbiased), randomised designs with
   R = 2 replicates (``fe.design_error``, unbiased) and fixed designs (one replicate, the
   plug-in within-design spread: deterministic, biased where the design is short);
   the fixed designs include metatomic's construction, a Lebedev rule times ``L + 1``
   in-plane angles (``"lebedev:L"``, scipy's rules);
3. on the demo transformer, the spread over seeds of L_equiv at N = 120 and 180 (no closed
   form: the standard error itself), and the jackknife ``rotation_stderr`` next to it.

    python benchmarks/designs_compare.py            # ~3 min on 2 cores
    python benchmarks/designs_compare.py --smoke    # seconds: checks it runs

Writes ``designs_compare.csv`` and ``designs_compare.png`` into ``--out``.
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
from fastequiv import designs
from fastequiv.demo import EMA, SPEC, PointTransformer, batches, datasets, take
from fastequiv.design_twirl import DesignDecomposition, Replicates, back_rotated, design_average, stack_design

EPS, WAVE = 0.3, 0.5  # the breaking term's size, and k of the smooth model
DESIGN_DEGREES = (1, 2, 3, 5, 6, 7, 8, 9)  # sizes 4, 12, 24, 60, 168, 192, 288, 320
LEBEDEV_DEGREES = (3, 5, 7, 9)  # metatomic's construction: Lebedev x (L + 1) angles: 24, 84, 208, 380
# (evaluations per sample, design, replicates) on the demo transformer, next to i.i.d. draws
DEMO_RUNS = ((120, "design:1", 30), (120, "design:2", 10), (120, "octahedral", 5), (120, "icosahedral", 2),
             (180, "icosahedral", 3))


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--seeds", type=int, default=40, help="seeds of every random estimate")
    p.add_argument("--steps", type=int, default=400, help="training steps of the demo transformer")
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--smoke", action="store_true", help="2 seeds, few designs, 4 training steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.clusters, args.seeds, args.steps, args.held_out = 4, 3, 4, 8
    return args


# --- the analytic models ------------------------------------------------------------------------

SPEC_XYZ = fe.Spec(inputs="position", output="vector")


def springs(pos: torch.Tensor) -> torch.Tensor:
    """Equivariant pair forces ``-sum_j (r_ij - 1) rhat_ij``."""
    d = pos[:, :, None] - pos[:, None, :]
    r = d.norm(dim=-1, keepdim=True)
    rhat = torch.where(r > 0, d / r.clamp_min(1e-12), torch.zeros_like(d))
    return -((r - 1.0) * rhat).sum(2)


# |.| acts in a fixed generic frame Q: in the lab frame the cube's group would twirl it exactly
Q = fe.random_rotations(1, seed=2024, dtype=torch.float64)[0]
E1 = torch.tensor([0.36, 0.48, 0.8], dtype=torch.float64)
E2 = Q @ E1


def smooth(pos):
    u = pos - pos.mean(1, keepdim=True)
    return springs(pos) + EPS * torch.exp(WAVE * (u @ E1))[..., None] * E2


def broken(pos):
    return springs(pos) + EPS * ((pos - pos.mean(1, keepdim=True)) @ Q.T).abs() @ Q


def closed_forms(name: str, pos: torch.Tensor):
    """``(fbar, L_equiv)``: the twirled prediction ``(B, n, 3)`` and the batch mean of L_equiv."""
    u = pos - pos.mean(1, keepdim=True)
    r = u.norm(dim=-1, keepdim=True)
    if name == "smooth":
        z = WAVE * r
        c = float(E1 @ E2) * (torch.cosh(z) / z - torch.sinh(z) / z ** 2)
        fbar = springs(pos) + EPS * c * u / r
        spread = EPS ** 2 * torch.sinh(2 * z) / (2 * z) - (EPS * c) ** 2
    else:
        fbar = springs(pos)
        spread = EPS ** 2 * r ** 2
    return fbar, float(spread.sum((1, 2)).mean() / (3 * pos.shape[1]))


def clusters(B: int, n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def prediction_errors(name: str, model, pos, seeds: int, degrees, lebedev) -> list[dict]:
    fbar, _ = closed_forms(name, pos)
    rows = []
    for L in lebedev:
        d = designs.design(f"lebedev:{L}")
        rows.append({"model": name, "metric": "prediction_rms", "method": "fixed Lebedev x (L+1)", "N": d.size,
                     "degree": d.degree, "value": rms(fe.Twirled(model, spec=SPEC_XYZ, rotations=d)(pos) - fbar)})
    for L in degrees:
        d = designs.design(f"design:{L}")
        N = d.size
        fixed = rms(fe.Twirled(model, spec=SPEC_XYZ, rotations=d)(pos) - fbar)
        iid = statistics.mean(rms(fe.Twirled(model, spec=SPEC_XYZ, samples=N, seed=s)(pos) - fbar) for s in range(seeds))
        turned = statistics.mean(rms(design_average(model, pos, SPEC_XYZ, d, turn=True, seed=s) - fbar)
                                 for s in range(seeds))
        for method, err in (("iid", iid), ("fixed design", fixed), ("randomised design", turned)):
            rows.append({"model": name, "metric": "prediction_rms", "method": method, "N": N, "degree": d.degree,
                         "value": err})
    return rows


def fixed_equiv(model, pos, d) -> float:
    """The plug-in L_equiv of an unturned design (one replicate): what a deterministic grid gives."""
    with torch.no_grad():
        st = stack_design(model, pos, SPEC_XYZ, d, turn=False)
        head = st.heads[0]
        y = torch.zeros_like(head.value[0])
        a, m = back_rotated(head, st.action, torch.float64)
        return float(Replicates(a, d.weights, y, m, None, st.B, 1).terms().equiv.mean())


def equiv_errors(name: str, model, pos, seeds: int, degrees, lebedev) -> list[dict]:
    _, exact = closed_forms(name, pos)
    rows = []
    for L in lebedev:
        d = designs.design(f"lebedev:{L}")
        bias = (fixed_equiv(model, pos, d) - exact) / exact
        rows.append({"model": name, "metric": "equiv_rms_error", "method": "fixed Lebedev x (L+1)", "N": d.size,
                     "degree": d.degree, "value": abs(bias), "bias": bias})
    for L in degrees:
        d = designs.design(f"design:{L}")
        N = 2 * d.size
        iid = [float(fe.equivariance_error(model, pos, None, spec=SPEC_XYZ, samples=N, seed=s).equiv)
               for s in range(seeds)]
        rnd = [float(fe.design_error(model, pos, None, spec=SPEC_XYZ, rotations=d, replicates=2, seed=s).equiv)
               for s in range(seeds)]
        fixed = fixed_equiv(model, pos, d)
        for method, vals, n in (("iid", iid, N), ("randomised design, R=2", rnd, N), ("fixed design", [fixed], d.size)):
            err = math.sqrt(statistics.mean((v - exact) ** 2 for v in vals))
            rows.append({"model": name, "metric": "equiv_rms_error", "method": method, "N": n, "degree": d.degree,
                         "value": err / exact, "bias": (statistics.mean(vals) - exact) / exact})
    return rows


# --- the demo transformer ---------------------------------------------------------------------

def trained_transformer(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    sets = datasets(500, 2048, 1, seed, "cpu")
    model = PointTransformer(width=48, layers=2, species=sets.species, cutoff=sets.cutoff)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, min(100, steps // 10))) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    ema = EMA(model, 0.999)
    order = batches(sets.train[1].shape[0], 32, torch.Generator().manual_seed(seed + 1))
    rotations = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        inputs, target = take(sets.train, next(order))
        loss, _ = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=2, generator=rotations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
    ema.model.eval()
    return ema.model, sets


def demo_spread(model, sets, held_out: int, seeds: int, runs_wanted) -> list[dict]:
    inputs, target = take(sets.heldout, torch.arange(held_out))
    runs = {}
    for N, name, R in runs_wanted:
        if (N, "iid") not in runs:
            runs[(N, "iid")] = [fe.equivariance_error(model, inputs, target, spec=SPEC, samples=N, seed=s)
                                for s in range(seeds)]
        d = designs.design(name)
        assert d.size * R == N
        runs[(N, f"{name} x R={R}")] = [fe.design_error(model, inputs, target, spec=SPEC, rotations=d, replicates=R,
                                                        seed=s) for s in range(seeds)]
    rows = []
    for (N, method), ds in runs.items():
        vals = [float(d.equiv) for d in ds]
        mean = statistics.mean(vals)
        jack = [float(d.rotation_stderr.equiv) for d in ds] if isinstance(ds[0], DesignDecomposition) else [math.nan]
        rows.append({"model": "demo transformer", "metric": "equiv_spread", "method": method, "N": N,
                     "value": statistics.stdev(vals) / mean, "equiv": mean,
                     "jackknife": statistics.mean(jack) / mean if not math.isnan(jack[0]) else "",
                     "batch_stderr": statistics.mean(float(d.stderr.equiv) for d in ds) / mean})
    return rows


# --- report -------------------------------------------------------------------------------------

def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    panels = [("smooth", "prediction_rms"), ("broken", "prediction_rms"), ("smooth", "equiv_rms_error"),
              ("broken", "equiv_rms_error")]
    for ax, (model, metric) in zip(axes, panels):
        for method in sorted({r["method"] for r in rows if r["model"] == model and r["metric"] == metric}):
            sel = sorted((r for r in rows if (r["model"], r["metric"], r["method"]) == (model, metric, method)),
                         key=lambda r: r["N"])
            ax.loglog([r["N"] for r in sel], [max(r["value"], 1e-17) for r in sel], "o-", label=method)
        ax.set_xlabel("model evaluations per sample")
        ax.set_title(f"{model}: " + ("RMS error of the twirled prediction" if metric == "prediction_rms"
                                     else "RMS error of L_equiv / L_equiv"), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    sel = [r for r in rows if r["metric"] == "equiv_spread"]
    ax = axes[-1]
    ax.bar(range(len(sel)), [r["value"] for r in sel], color=["tab:blue" if r["method"] == "iid" else "tab:orange"
                                                               for r in sel])
    ax.set_xticks(range(len(sel)))
    ax.set_xticklabels([f"N={r['N']}: {r['method']}" for r in sel], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_title("demo transformer: spread of L_equiv over seeds / L_equiv", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> list[str]:
    out = []
    for model in ("smooth", "broken"):
        pr = {(r["method"], r["N"]): r["value"] for r in rows if (r["model"], r["metric"]) == (model, "prediction_rms")}
        for N in sorted({n for _, n in pr}):
            if ("iid", N) in pr:
                out.append(f"{model}: twirled prediction at N={N}: iid {pr[('iid', N)]:.2e}, fixed design "
                           f"{pr[('fixed design', N)]:.2e} ({pr[('iid', N)] / max(pr[('fixed design', N)], 1e-300):.3g}x), "
                           f"randomised {pr[('randomised design', N)]:.2e}")
        eq = {(r["method"], r["N"]): r for r in rows if (r["model"], r["metric"]) == (model, "equiv_rms_error")}
        for N in sorted({n for m, n in eq if m == "iid"}):
            iid, rnd = eq[("iid", N)]["value"], eq[("randomised design, R=2", N)]["value"]
            out.append(f"{model}: L_equiv relative RMS error at N={N}: iid {iid:.2e}, randomised design R=2 {rnd:.2e} "
                       f"({iid / max(rnd, 1e-300):.3g}x)")
        for (m, N), r in sorted(eq.items()):
            if m.startswith("fixed"):
                out.append(f"{model}: {m} N={N} (degree {r['degree']}): L_equiv relative bias {r['bias']:+.2e}")
        pr_leb = sorted((n, v) for (m, n), v in pr.items() if m.startswith("fixed Lebedev"))
        out += [f"{model}: twirled prediction, fixed Lebedev x (L+1) at N={n}: {v:.2e}" for n, v in pr_leb]
    demo = [r for r in rows if r["metric"] == "equiv_spread"]
    for r in demo:
        iid = next(x for x in demo if (x["N"], x["method"]) == (r["N"], "iid"))["value"]
        jack = f", jackknife rotation_stderr / L_equiv {r['jackknife']:.3g}" if r["jackknife"] != "" else ""
        out.append(f"demo transformer, N={r['N']}, {r['method']}: spread over seeds / L_equiv {r['value']:.3g} "
                   f"({iid / r['value']:.3g}x below iid){jack}; batch stderr / L_equiv {r['batch_stderr']:.3g}")
    return out


def main(argv=None) -> list[dict]:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pos = clusters(args.clusters)
    degrees = DESIGN_DEGREES[:3] if args.smoke else DESIGN_DEGREES
    lebedev = () if args.smoke else LEBEDEV_DEGREES  # (scipy's rules)
    rows = []
    for name, model in (("smooth", smooth), ("broken", broken)):
        rows += prediction_errors(name, model, pos, args.seeds, degrees, lebedev)
        rows += equiv_errors(name, model, pos, args.seeds, degrees, lebedev)
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    model, sets = trained_transformer(args.steps)
    rows += demo_spread(model, sets, args.held_out, args.seeds, DEMO_RUNS[3:4] if args.smoke else DEMO_RUNS)
    os.makedirs(args.out, exist_ok=True)
    name = "designs_compare_smoke" if args.smoke else "designs_compare"
    with open(os.path.join(args.out, name + ".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "metric", "method", "N", "degree", "value", "bias", "equiv",
                                           "jackknife", "batch_stderr"], restval="")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, name + ".png"))
    print("\n".join(summary(rows)))
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
