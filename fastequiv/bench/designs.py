"""Rotation designs against i.i.d. Haar draws, at equal numbers of model evaluations
(``fastequiv bench --ops designs``; ``benchmarks/designs_compare.py`` runs the same code).

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

and the demo's transformer (:mod:`fastequiv.demo`), trained briefly with ``fe.twirl_loss``,
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
   in-plane angles (``"lebedev:L"``, scipy's rules; left out without scipy);
3. on the demo transformer, the spread over seeds of L_equiv at N = 120 (and 180 in the
   full run) (no closed form: the standard error itself), and the jackknife
   ``rotation_stderr`` next to it.

Modes (:data:`SETTINGS`): ``smoke`` (toy sizes, seconds: proves it runs), ``quick`` (fewer
seeds, design degrees and transformer runs than ``full``: 20-30 s on 2 cores) and ``full``
(the run ``benchmarks/RESULTS.md`` quotes: about 2 minutes). Everything runs on the CPU, on
one torch thread by default, in float64 (the transformer in float32): the figures are
errors of estimators, not times. :func:`run` writes ``<stem>.csv`` and ``<stem>.png`` and returns
the rows and the report (:func:`report`: the short table and the ratios at N ~ 60 and ~120).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Optional

import torch

import fastequiv as fe
from fastequiv import designs
from fastequiv.demo import EMA, SPEC, PointTransformer, batches, datasets, take
from fastequiv.design_twirl import DesignDecomposition, Replicates, back_rotated, design_average, stack_design

__all__ = ["Settings", "SETTINGS", "settings", "compare", "run", "write_csv", "plot", "summary", "table",
           "headline", "report", "closed_forms", "clusters", "smooth", "broken", "springs", "SPEC_XYZ"]

EPS, WAVE = 0.3, 0.5  # the breaking term's size, and k of the smooth model
DESIGN_DEGREES = (1, 2, 3, 5, 6, 7, 8, 9)  # sizes 4, 12, 24, 60, 168, 192, 288, 320
LEBEDEV_DEGREES = (3, 5, 7, 9)  # metatomic's construction: Lebedev x (L + 1) angles: 24, 84, 208, 380
# (evaluations per sample, design, replicates) on the demo transformer, next to i.i.d. draws
DEMO_RUNS = ((120, "design:1", 30), (120, "design:2", 10), (120, "octahedral", 5), (120, "icosahedral", 2),
             (180, "icosahedral", 3))
CSV_FIELDS = ["model", "metric", "method", "N", "degree", "value", "bias", "equiv", "jackknife", "batch_stderr"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures.

    Attributes:
        clusters: 6-atom clusters of the analytic models' batch.
        seeds: seeds of every random estimate (the RMS errors and spreads are over them).
        steps: training steps of the demo transformer.
        held_out: held-out clusters the transformer's L_equiv is measured on.
        degrees: the ``"design:L"`` degrees of the analytic comparison.
        lebedev: the ``"lebedev:L"`` degrees (needs scipy; empty: none).
        demo_runs: ``(N, design, replicates)`` on the transformer, each next to N i.i.d. draws.
    """

    clusters: int
    seeds: int
    steps: int
    held_out: int
    degrees: tuple
    lebedev: tuple
    demo_runs: tuple

    def describe(self) -> str:
        runs = ", ".join(f"{d} x R={r}" for _, d, r in self.demo_runs)
        return (f"{self.clusters} clusters, {self.seeds} seeds, design degrees {', '.join(map(str, self.degrees))}"
                f"; lebedev degrees {', '.join(map(str, self.lebedev)) or 'none'}; transformer: {self.steps} "
                f"steps, {self.held_out} held-out clusters, N = "
                f"{', '.join(str(n) for n in sorted({n for n, _, _ in self.demo_runs}))} ({runs})")


#: the modes of ``fastequiv bench`` (``full`` is the run ``benchmarks/RESULTS.md`` quotes)
SETTINGS = {
    "smoke": Settings(clusters=4, seeds=3, steps=4, held_out=8, degrees=(1, 2, 3, 5), lebedev=(),
                      demo_runs=DEMO_RUNS[3:4]),
    "quick": Settings(clusters=16, seeds=20, steps=400, held_out=64, degrees=(1, 2, 3, 5, 6, 9),
                      lebedev=LEBEDEV_DEGREES, demo_runs=DEMO_RUNS[2:4]),
    "full": Settings(clusters=16, seeds=40, steps=400, held_out=64, degrees=DESIGN_DEGREES, lebedev=LEBEDEV_DEGREES,
                     demo_runs=DEMO_RUNS),
}


def settings(mode: str, **overrides) -> Settings:
    """:data:`SETTINGS` of ``mode`` with the fields in ``overrides`` (``None``: kept) replaced."""
    if mode not in SETTINGS:
        raise ValueError(f"mode must be one of {sorted(SETTINGS)}, got {mode!r}")
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides must be fields of Settings {sorted(fields)}, got {unknown}")
    s = dataclasses.replace(SETTINGS[mode], **{k: v for k, v in overrides.items() if v is not None})
    for name in ("clusters", "seeds", "held_out"):
        if getattr(s, name) < (2 if name == "seeds" else 1):
            raise ValueError(f"{name} must be at least {2 if name == 'seeds' else 1} (a spread over seeds needs two), "
                             f"got {getattr(s, name)}")
    if s.steps < 1:
        raise ValueError(f"steps must be at least 1, got {s.steps}")
    return s


def _have_scipy() -> bool:
    try:
        from scipy.integrate import lebedev_rule  # noqa: F401
    except ImportError:
        return False
    return True


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
    """Springs plus ``eps * exp(k u . e1) e2``."""
    u = pos - pos.mean(1, keepdim=True)
    return springs(pos) + EPS * torch.exp(WAVE * (u @ E1))[..., None] * E2


def broken(pos):
    """Springs plus ``eps * Q^T |Q u|``."""
    return springs(pos) + EPS * ((pos - pos.mean(1, keepdim=True)) @ Q.T).abs() @ Q


def closed_forms(name: str, pos: torch.Tensor):
    """``(fbar, L_equiv)``: the twirled prediction ``(B, n, 3)`` and the batch mean of L_equiv
    of the model ``name`` (``"smooth"`` or ``"broken"``)."""
    if name not in ("smooth", "broken"):
        raise ValueError(f"name must be 'smooth' or 'broken', got {name!r}")
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
    """``(B, n, 3)`` float64 standard normal positions."""
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
        iid = statistics.mean(rms(fe.Twirled(model, spec=SPEC_XYZ, samples=N, seed=s)(pos) - fbar)
                              for s in range(seeds))
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
    """The demo's transformer after ``steps`` steps of ``fe.twirl_loss`` (K=2), EMA weights, and
    its datasets. Seeds its own draws; the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sets = datasets(500, 2048, 1, seed, "cpu")
        model = PointTransformer(width=48, layers=2, species=sets.species, cutoff=sets.cutoff)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        warmup = max(1, min(100, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
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
        if d.size * R != N:
            raise ValueError(f"runs_wanted: {name} ({d.size} rotations) x R={R} is not N={N} evaluations")
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


# --- the run ------------------------------------------------------------------------------------

def compare(s: Settings, log: Callable[[str], None] = print) -> list[dict]:
    """Every measurement of ``s``: the rows of the CSV. Lebedev's designs are left out (with
    a line to ``log``) when scipy is missing."""
    t0 = time.perf_counter()
    lebedev = s.lebedev
    if lebedev and not _have_scipy():
        log("designs: no scipy (scipy.integrate.lebedev_rule): the lebedev:L designs are left out")
        lebedev = ()
    pos = clusters(s.clusters)
    rows = []
    for name, model in (("smooth", smooth), ("broken", broken)):
        rows += prediction_errors(name, model, pos, s.seeds, s.degrees, lebedev)
        rows += equiv_errors(name, model, pos, s.seeds, s.degrees, lebedev)
        log(f"designs: {name} model done at {time.perf_counter() - t0:.0f} s")
    model, sets = trained_transformer(s.steps)
    log(f"designs: transformer trained ({s.steps} steps) at {time.perf_counter() - t0:.0f} s")
    rows += demo_spread(model, sets, s.held_out, s.seeds, s.demo_runs)
    log(f"designs: transformer measured at {time.perf_counter() - t0:.0f} s")
    return rows


def write_csv(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def run(mode: str, out: str, stem: str = "designs", log: Optional[Callable[[str], None]] = print,
        threads: Optional[int] = 1, **overrides) -> dict:
    """Measure ``settings(mode, **overrides)``, write ``<out>/<stem>.csv`` and ``<stem>.png``.

    ``threads``: torch's intra-op threads during the run (restored after; ``None``: as they
    are). One by default: the tensors are small, and on a machine other jobs keep busy a
    second thread made the quick run 3x slower (87 s against 28 s on 2 cores).

    Returns ``{"settings", "rows", "report", "summary", "csv", "png", "elapsed_s"}``
    (``report``: :func:`report`; ``summary``: :func:`summary`'s lines)."""
    s = settings(mode, **overrides)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be None or at least 1, got {threads}")
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = compare(s, log)
    finally:
        torch.set_num_threads(before)
    os.makedirs(out, exist_ok=True)
    csv_path = write_csv(rows, os.path.join(out, stem + ".csv"))
    png_path = os.path.join(out, stem + ".png")
    plot(rows, png_path)
    return {"settings": dataclasses.asdict(s), "rows": rows, "report": report(rows, mode, s),
            "summary": summary(rows), "csv": csv_path, "png": png_path, "elapsed_s": time.perf_counter() - t0}


# --- report -------------------------------------------------------------------------------------

def plot(rows: list[dict], path: str) -> str:
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
    return path


def summary(rows: list[dict]) -> list[str]:
    """Every measurement as a line (what ``benchmarks/designs_compare.py`` prints)."""
    out = []
    for model in ("smooth", "broken"):
        pr = {(r["method"], r["N"]): r["value"] for r in rows if (r["model"], r["metric"]) == (model, "prediction_rms")}
        for N in sorted({n for _, n in pr}):
            if ("iid", N) in pr:
                iid, fixed = pr[("iid", N)], pr[("fixed design", N)]
                out.append(f"{model}: twirled prediction at N={N}: iid {iid:.2e}, fixed design {fixed:.2e} "
                           f"({iid / max(fixed, 1e-300):.3g}x), randomised {pr[('randomised design', N)]:.2e}")
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


def _by(rows, metric):
    """``{(model, method, N): row}`` of one metric."""
    return {(r["model"], r["method"], r["N"]): r for r in rows if r["metric"] == metric}


def _ratio(a: float, b: float) -> str:
    """``a / b`` as ``"2.19x"`` or ``"1460x"``."""
    if not b > 0:
        return "inf"
    r = a / b
    return f"{r:.0f}x" if r >= 100 else f"{r:.3g}x"


def _design_name(degree: int) -> str:
    return f"design:{degree} ({designs.design(f'design:{degree}').name})"


def table(rows: list[dict]) -> str:
    """The short table: per design, N evaluations, the twirled prediction's RMS error (i.i.d.,
    fixed design, randomised design) and L_equiv's relative RMS error (i.i.d. against the
    randomised design, R = 2, at twice the design's N)."""
    pr, eq = _by(rows, "prediction_rms"), _by(rows, "equiv_rms_error")
    degrees = sorted({r["degree"] for r in rows if r["metric"] == "prediction_rms" and r["method"] == "iid"})
    w = max([len("design")] + [len(_design_name(L)) for L in degrees])
    lines = ["twirled prediction, RMS error against the closed form (N = the design's size):",
             f"{'N':>5}  {'design':<{w}} {'smooth: iid':>11} {'fixed':>8} {'random':>8}   "
             f"{'broken: iid':>11} {'fixed':>8} {'random':>8}"]
    for L in degrees:
        N = next(r["N"] for r in rows if r["metric"] == "prediction_rms" and r["degree"] == L and r["method"] == "iid")
        cells = "   ".join(" ".join(f"{pr[(m, meth, N)]['value']:{w}.1e}" for meth, w in
                                    (("iid", 11), ("fixed design", 8), ("randomised design", 8)))
                           for m in ("smooth", "broken"))
        lines.append(f"{N:>5}  {_design_name(L):<{w}} {cells}")
    lines += ["L_equiv, RMS error / L_equiv over seeds (N = 2 x the design's size; randomised: R = 2 replicates):",
              f"{'N':>5}  {'design':<{w}} {'smooth: iid':>11} {'random':>8}  {'ratio':>7}   "
              f"{'broken: iid':>11} {'random':>8}  {'ratio':>7}"]
    for L in degrees:
        N = next(r["N"] for r in rows if r["metric"] == "equiv_rms_error" and r["degree"] == L and r["method"] == "iid")
        cells = []
        for m in ("smooth", "broken"):
            iid, rnd = eq[(m, "iid", N)]["value"], eq[(m, "randomised design, R=2", N)]["value"]
            cells.append(f"{iid:11.1e} {rnd:8.1e}  {_ratio(iid, rnd):>7}")
        lines.append(f"{N:>5}  {_design_name(L):<{w}} {'   '.join(cells)}")
    return "\n".join(lines)


def _nearest(Ns, target):
    return min(Ns, key=lambda n: (abs(n - target), n)) if Ns else None


def headline(rows: list[dict]) -> list[str]:
    """The ratios at N ~ 60 and ~120 (the measured N nearest to each), the transformer's spread
    at the same N, and metatomic's grid sizes (``"lebedev:L"``: a Lebedev rule times ``L + 1``
    in-plane angles) next to ``"design:L"``."""
    pr, eq, sp = _by(rows, "prediction_rms"), _by(rows, "equiv_rms_error"), _by(rows, "equiv_spread")
    pr_N = sorted({n for (_, meth, n) in pr if meth == "iid"})
    eq_N = sorted({n for (_, meth, n) in eq if meth == "iid"})
    out, said = [], set()
    for target in (60, 120):
        n = _nearest(pr_N, target)
        if n is not None and ("pr", n) not in said:
            said.add(("pr", n))
            parts = [f"{m} {_ratio(pr[(m, 'iid', n)]['value'], pr[(m, 'fixed design', n)]['value'])} fixed, "
                     f"{_ratio(pr[(m, 'iid', n)]['value'], pr[(m, 'randomised design', n)]['value'])} randomised"
                     for m in ("smooth", "broken")]
            out.append(f"N ~ {target}: twirled prediction at N={n}, {_design_name(pr[('smooth', 'iid', n)]['degree'])}"
                       f": i.i.d. RMS error / design's: {'; '.join(parts)}")
        n = _nearest(eq_N, target)
        if n is not None and ("eq", n) not in said:
            said.add(("eq", n))
            parts = [f"{m} {_ratio(eq[(m, 'iid', n)]['value'], eq[(m, 'randomised design, R=2', n)]['value'])}"
                     for m in ("smooth", "broken")]
            out.append(f"N ~ {target}: L_equiv at N={n}, randomised {_design_name(eq[('smooth', 'iid', n)]['degree'])}"
                       f" x R=2: i.i.d. RMS error / design's: {', '.join(parts)}")
        n = _nearest(sorted({n for (_, _, n) in sp}), target)
        if n is not None and abs(n - target) <= target // 2 and ("sp", n) not in said:
            said.add(("sp", n))
            iid = sp[("demo transformer", "iid", n)]["value"]
            parts = [f"{meth} {_ratio(iid, r['value'])}" for (_, meth, N), r in sp.items() if N == n and meth != "iid"]
            out.append(f"N ~ {target}: demo transformer at N={n}: i.i.d. spread of L_equiv over seeds / design's: "
                       f"{', '.join(parts)}")
    cat = {r["degree"]: r for r in designs.catalogue(max(LEBEDEV_DEGREES))}
    sizes = ", ".join(f"lebedev:{L} {cat[L]['lebedev_product']} ({cat[L]['lebedev_points']} x {L + 1}; "
                      f"design:{L} {cat[L]['design']})" for L in LEBEDEV_DEGREES)
    out.append(f"metatomic's grids (Lebedev x (L+1) in-plane angles; O(3) with inversion: twice): {sizes} rotations")
    leb = sorted({n for (_, meth, n) in pr if meth.startswith("fixed Lebedev")})
    if leb:
        parts = [f"N={n}: smooth {pr[('smooth', 'fixed Lebedev x (L+1)', n)]['value']:.1e}, broken "
                 f"{pr[('broken', 'fixed Lebedev x (L+1)', n)]['value']:.1e}" for n in leb]
        out.append(f"lebedev:L twirled prediction, RMS error: {'; '.join(parts)}")
    return out


def report(rows: list[dict], mode: str, s: Settings) -> str:
    """What ``fastequiv bench --ops designs`` prints: the settings, :func:`table` and :func:`headline`."""
    note = {"smoke": "smoke: toy sizes, the figures mean nothing",
            "quick": f"quick: fewer seeds, design degrees and transformer runs than --full "
                     f"({SETTINGS['full'].seeds} seeds, degrees {', '.join(map(str, SETTINGS['full'].degrees))})",
            "full": "full: the run benchmarks/RESULTS.md quotes"}.get(mode, mode)
    return "\n".join([f"rotation designs against i.i.d. Haar draws ({note}; CPU, float64)",
                      f"settings: {s.describe()}", table(rows), *headline(rows)])
