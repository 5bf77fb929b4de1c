"""The audit's plots (matplotlib, imported when a plot is drawn): the distribution of
L_equiv over the structures, and L_equiv against the structure's size, each head with its
rounding floor and its float64 value beside it."""

from __future__ import annotations

import math
from pathlib import Path

from .measure import Audit

__all__ = ["against_size", "distribution", "plot_all"]

SERIES = (("equiv", "model", "C0"), ("floor", "rounding floor", "C1"), ("equiv_f64", "float64 (learned)", "C2"))


def _values(a: Audit, head: str, key: str) -> list:
    """``(atoms, value, periodic)`` of the structures where ``head_key`` is a positive number
    (a log axis shows no zero: the count left out goes in the legend)."""
    out = []
    for r in a.rows:
        v = r.get(f"{head}_{key}")
        if isinstance(v, float) and math.isfinite(v) and v > 0:
            out.append((r["atoms"], v, r["periodic"]))
    return out


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    return plt, fig, axes[0]


def distribution(a: Audit, path: Path) -> Path:
    """Per head, histograms of log10 L_equiv over the structures, of the model, its floor
    and its float64 copy."""
    plt, fig, axes = _figure(len(a.heads))
    for ax, head in zip(axes, a.heads):
        series = [(key, label, c, [math.log10(v) for _, v, _ in _values(a, head, key)]) for key, label, c in SERIES]
        logs = [x for *_, xs in series for x in xs]
        if not logs:
            ax.set_title(f"{head}: no positive L_equiv")
            continue
        lo, hi = min(logs), max(logs)
        bins = [lo + (hi - lo + 1e-9) * i / 30 for i in range(31)]
        total = sum(1 for r in a.rows if r.get(f"{head}_equiv") is not None)
        for key, label, color, xs in series:
            if xs:
                zeros = total - len(xs)
                # outlines: the model's histogram and its floor often coincide
                ax.hist(xs, bins=bins, histtype="step", linewidth=1.6, color=color,
                        label=label + (f" ({zeros} at 0)" if zeros else ""))
        ax.set_xlabel(f"log10 L_equiv ({head})")
        ax.set_ylabel("structures")
        ax.legend(fontsize=7)
    fig.suptitle(f"L_equiv over {len(a.rows)} structures, {a.describe(short=True)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def against_size(a: Audit, path: Path) -> Path:
    """Per head, L_equiv against the number of atoms (circles isolated, squares periodic)."""
    plt, fig, axes = _figure(len(a.heads))
    for ax, head in zip(axes, a.heads):
        for key, label, color in SERIES:
            pts = _values(a, head, key)
            for periodic, marker in ((False, "o"), (True, "s")):
                sel = [(n, v) for n, v, p in pts if p == periodic]
                if sel:
                    # hollow for the model: its floor (filled) shows through where they coincide
                    hollow = ({"facecolors": "none", "edgecolors": color, "s": 28} if key == "equiv"
                              else {"color": color, "s": 8})
                    ax.scatter([n for n, _ in sel], [v for _, v in sel], marker=marker, alpha=0.8,
                               label=f"{label}, {'periodic' if periodic else 'isolated'}", **hollow)
        ax.set_yscale("log")
        ax.set_xlabel("atoms")
        ax.set_ylabel(f"L_equiv ({head})")
        ax.legend(fontsize=6)
    fig.suptitle("L_equiv against structure size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_all(a: Audit, out: Path) -> list:
    """Both plots into ``out``; their paths."""
    out = Path(out)
    return [distribution(a, out / "distribution.png"), against_size(a, out / "size.png")]
