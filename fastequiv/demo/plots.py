"""The demo's plot: pct, the three losses and, with ``--diagnostics``, the curvature panel."""

from __future__ import annotations

__all__ = ["plot"]


def _smooth(values: list, window: int) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(rows: list, path: str, samples: int, name: str = "ema", eval_samples: int = 8) -> str:
    """Write the figure of a run's ``rows`` (log.csv's) to ``path``: pct over the steps, the
    three losses with the learning rate, and the curvature panel when ``rows`` has
    ``split="dynamics"`` rows. ``samples``: K of the training loss; ``eval_samples``: K of
    the evaluations; ``name``: the evaluated weights (``"ema"`` or ``"raw"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    evaluated = "EMA weights" if name == "ema" else "raw weights"
    dyn = [r for r in rows if r["split"] == "dynamics"]
    fig, axes = plt.subplots(1, 3 if dyn else 2, figsize=(18 if dyn else 12, 5.4))
    ax_pct, ax_loss = axes[0], axes[1]
    if dyn:
        ax_dyn = axes[2]
        xs = [r["step"] for r in dyn]
        ax_dyn.plot(xs, [r["top_eig_mean"] for r in dyn], marker="o", ms=3, color="C2", label="top eigenvalue, L_mean")
        ax_dyn.plot(xs, [r["top_eig_equiv"] for r in dyn], marker="o", ms=3, color="C3",
                    label="top eigenvalue, L_equiv")
        ax_dyn.set_yscale("symlog", linthresh=1e-3)
        ax_dyn.set_ylabel("largest Hessian eigenvalue (Lanczos)")
        ax_cos = ax_dyn.twinx()
        ax_cos.plot(xs, [r["cos"] for r in dyn], ls="--", color="0.4", label="cos(grad L_mean, grad L_equiv)")
        ax_cos.set_ylim(-1, 1)
        ax_cos.set_ylabel("gradient cosine (dashed)", color="0.4")
        ax_dyn.set_title("training dynamics (64 held-out structures)")
        ax_dyn.legend(fontsize=7, loc="upper left")
    batch = [r for r in rows if r["split"] == "batch"]
    if batch:
        window = max(1, min(50, len(batch) // 20))
        ax_pct.plot([r["step"] for r in batch], [100 * v for v in _smooth([r["pct"] for r in batch], window)],
                    color="0.75", lw=1, label=f"training batches (raw weights, K={samples}, running mean)")
    styles = {"heldout": ("-", "o", "held-out"), "train": ("--", "s", "training set")}
    for split, (ls, marker, label) in styles.items():
        pts = [r for r in rows if r["split"] == split and r["model"] == name]
        if not pts:
            continue
        xs = [r["step"] for r in pts]
        ax_pct.plot(xs, [100 * r["pct"] for r in pts], ls=ls, marker=marker, ms=4, color="C3" if split == "heldout"
                    else "C1", label=f"{label} ({evaluated}, K={eval_samples})")
        for key, color in (("total", "C0"), ("mean", "C2"), ("equiv", "C3")):
            ax_loss.plot(xs, [max(r[key], 1e-12) for r in pts], ls=ls, marker=marker, ms=3, color=color,
                         label=f"{label} L_{key}")
        raw = [r for r in rows if r["split"] == split and r["model"] == "raw" and name != "raw"]
        if raw:
            ax_pct.plot([raw[-1]["step"]], [100 * raw[-1]["pct"]], marker="x", ms=9, mew=2, ls="none",
                        color="C3" if split == "heldout" else "C1", label=f"{label}, raw weights at the end")
    ax_pct.axhline(5, color="0.5", lw=0.8, ls=":")
    ax_pct.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax_pct.set_ylim(bottom=0)
    ax_pct.set_ylabel("share of the loss due to equivariance error")
    ax_pct.set_title("pct = L_equiv / L_total")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("MSE (units of the force variance)")
    ax_loss.set_title("L_total = L_mean + L_equiv  (solid: held-out, dashed: training set)")
    lrs = [(r["step"], r["lr"]) for r in batch]
    if lrs:
        ax_lr = ax_loss.twinx()
        ax_lr.plot(*zip(*lrs), color="0.6", lw=0.8, ls=":")
        ax_lr.set_ylabel("learning rate (dotted)", color="0.5")
        ax_lr.tick_params(axis="y", colors="0.5")
        ax_lr.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

