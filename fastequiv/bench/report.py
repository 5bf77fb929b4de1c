"""The benchmark report: the machine, the op table with ratios, the step overheads, JSON, plots.

The ratio of an op case is ``time(reference) / time(case)``: how many times faster than
fastequiv's pure-torch reference measured in the same run on the same inputs (peers get
one too, so "e3nn 0.05x" reads as twenty times slower than the reference). Runs on
different machines compare by their ratios, not their absolute times.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import defaultdict
from typing import Optional

import torch

__all__ = ["machine", "target_verdict", "op_rows", "format_ops", "format_overhead", "format_fixed_cost", "write_json",
           "plot_ops", "plot_overhead", "TARGETS", "FIXED_TARGETS"]

# the step targets of docs/design.md (Performance targets), as (variant, largest ratio to
# the plain step)
TARGETS = {"b": 1.02, "c": 1.05}
# the fixed cost per call on one CPU thread (DESIGN.md section 5), 4 graphs x 20 atoms, K = 8:
# milliseconds beyond the model, and torch ops a call
FIXED_TARGETS = {"equivariance_error": 0.25, "twirl_loss": 0.5}
FIXED_OPS = 15


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    """What the figures were measured on: the device, its name, and the software."""
    import fastequiv as fe

    device = torch.device(device)
    info = {
        "device": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fastequiv": fe.__version__,
        "backends": fe.build_info()["backends"],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    try:
        import e3nn

        info["e3nn"] = e3nn.__version__
    except ImportError:
        pass
    return info


def describe(info: dict) -> str:
    if info["device"] == "cuda":
        return f"{info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info.get('cuda')}, torch {info['torch']}"
    return f"CPU: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads, torch {info['torch']}"


def op_rows(results: list[dict]) -> list[dict]:
    """Add ``GB/s``, ``GFLOP/s`` and ``speedup`` (reference time / this time) to each result."""
    ref = {}
    for r in results:
        if r["role"] == "reference":
            ref[r["group"]] = r["median_s"]
    rows = []
    for r in results:
        t = r["median_s"]
        row = dict(r)
        row["GB/s"] = r["bytes"] / t / 1e9 if r.get("bytes") and t > 0 else None
        row["GFLOP/s"] = r["flops"] / t / 1e9 if r.get("flops") and t > 0 else None
        row["speedup"] = ref[r["group"]] / t if r["group"] in ref and t > 0 else None
        rows.append(row)
    return rows


def _fmt_time(s: float) -> str:
    if s is None or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(x: Optional[float], spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return f"{'-':>{width}}" if x is None else format(x, spec)


def format_ops(rows: list[dict]) -> str:
    """A plain-text table, one block per group, the reference first."""
    lines = []
    width = max([len(r["impl"]) for r in rows] + [10])
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    for group, members in by_group.items():
        lines.append(group)
        members.sort(key=lambda r: (r["role"] != "reference", r["role"] == "peer", r["median_s"]))
        for r in members:
            lines.append(f"  {r['impl']:<{width}} {_fmt_time(r['median_s']):>10} {_fmt(r['GB/s'], '8.1f')} GB/s "
                         f"{_fmt(r['GFLOP/s'], '8.1f')} GFLOP/s  {_fmt(r['speedup'], '7.2f')}x ref")
    return "\n".join(lines)


def target_verdict(key: str, variant: dict) -> str:
    """"met" when the upper quartile of the per-round ratios is within the target, "not met"
    when the lower quartile is above it, else "within noise": the rounds cannot tell."""
    target = TARGETS[key]
    if variant.get("ratio_q3", variant["ratio_to_a"]) <= target:
        return "met"
    if variant.get("ratio_q1", variant["ratio_to_a"]) > target:
        return "not met"
    return "within noise"


def format_overhead(result: dict) -> str:
    size = result["size"]
    p = result["parameters"]
    head = (f"training step, {size['stacked_batch']} clusters of up to {size['atoms']} atoms per step; "
            f"transformer {p['transformer'] / 1e6:.2f}M parameters"
            + (f", e3nn model {p['e3nn'] / 1e6:.2f}M" if "e3nn" in p else "")
            + f"; {result['rounds']} interleaved rounds")
    lines = [head]
    for k, v in result["variants"].items():
        verdict = "" if k not in TARGETS else f"  (target <= {TARGETS[k]:.2f}: {target_verdict(k, v)})"
        spread = f" [{v['ratio_q1']:.3f}-{v['ratio_q3']:.3f}]" if "ratio_q1" in v else ""
        lines.append(f"  ({k}) {v['label']:<58} {_fmt_time(v['median_s']):>10}  {v['ratio_to_a']:6.3f}x (a)"
                     f"{spread}{verdict}")
    m = result.get("machinery")
    if m:
        lines.append(f"  around the model (a stored output instead of the transformer): plain {m['plain_ms']:.2f} ms, "
                     f"twirl_loss {m['twirl_loss_ms']:.2f} ms (+{m['twirl_loss_added_pct_of_a']:.2f}% of (a)), "
                     f"monitor {m['monitor_ms']:.2f} ms (+{m['monitor_added_pct_of_a']:.2f}% of (a))")
    lines.append("  ratios: median over rounds of (variant / (a) in the same round) [quartiles]")
    return "\n".join(lines)


def format_fixed_cost(result: dict) -> str:
    """The fixed cost table of :func:`fastequiv.bench.fixed.fixed_cost`."""
    lines = [f"fixed cost per call: graph batches, a trivial model, K = {result['K']}, {result['threads']} torch "
             f"thread(s), {result['rounds']} interleaved rounds; beyond the floor: median over rounds [quartiles]"]
    for i, size in enumerate(result["sizes"]):
        v = size["variants"]
        lines.append(f"  {size['graphs']} graphs x {size['atoms']} atoms ({size['rows']} stacked rows): model "
                     f"{v['model']['median_ms']:.3f} ms, model step {v['model step']['median_ms']:.3f} ms")
        width = max([32] + [len(name) for name, x in v.items() if "beyond_ms" in x])
        for name, x in v.items():
            if "beyond_ms" not in x:
                continue
            ops = f"{x['ops_forward']} ops" + (f" + {x['ops_backward']} backward nodes" if "ops_backward" in x else "")
            base = name.split(" (")[0]
            verdict = ""
            if i == 0 and base == name and result["threads"] == 1 and result["device"] == "cpu" \
                    and (size["graphs"], size["atoms"]) == (4, 20) and base in FIXED_TARGETS:
                met = x["beyond_q3"] <= FIXED_TARGETS[base] and x["ops_forward"] + x.get("ops_backward", 0) <= FIXED_OPS
                verdict = f"  (target <= {FIXED_TARGETS[base]} ms, <= {FIXED_OPS} ops: {'met' if met else 'not met'})"
            lines.append(f"    {name:<{width}} {x['median_ms']:8.3f} ms  {x['beyond_ms']:7.3f} ms beyond the "
                         f"{x['floor']} [{x['beyond_q1']:.3f}-{x['beyond_q3']:.3f}]  {ops}{verdict}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ops(rows: list[dict], path: str, title: str) -> Optional[str]:
    """Time against size per implementation, one panel per op (and its parameters)."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["op"], r["unit"]) + tuple((k, r[k]) for k in ("K", "rep", "layout", "dtype", "irreps") if k in r)
        panels[key][r["impl"]].append((r["size"], r["median_s"]))
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(sorted({r["impl"] for r in rows}))}
    n = len(panels)
    cols = min(3, n)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.6 * rows_), squeeze=False)
    for ax, (key, impls) in zip(axes.flat, sorted(panels.items())):
        for impl, pts in sorted(impls.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl, color=color[impl])
        # grid sides span less than a decade: a linear axis keeps their labels
        ax.set_xscale("linear" if key[1] == "side" else "log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        times = [t for pts in impls.values() for _, t in pts]
        if max(times) < 10 * min(times):  # under a decade: label the minor ticks, as plain numbers
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(" ".join([key[0]] + [f"{k}={v}" for k, v in key[2:]]), fontsize=9)
        ax.set_xlabel(key[1])
        ax.set_ylabel("time per call (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overhead(result: dict, path: str, title: str) -> str:
    """Bars of each variant's step time relative to the plain augmented step, with the targets."""
    plt = _pyplot()
    variants = result["variants"]
    keys = list(variants)
    ratios = [variants[k]["ratio_to_a"] for k in keys]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    # error bars: the quartiles of the per-round ratios
    err = [[r - variants[k].get("ratio_q1", r) for k, r in zip(keys, ratios)],
           [variants[k].get("ratio_q3", r) - r for k, r in zip(keys, ratios)]]
    bars = ax.bar([f"({k})" for k in keys], ratios, yerr=err, capsize=4,
                  color=["#777777", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"][:len(keys)])
    for bar, r, up in zip(bars, ratios, err[1]):
        ax.annotate(f"{r:.3f}x", (bar.get_x() + bar.get_width() / 2, r + up), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    for k, target in TARGETS.items():
        if k in keys:
            i = keys.index(k)
            ax.hlines(target, i - 0.4, i + 0.4, colors="k", linestyles="dashed")
    ax.set_yscale("log")
    ax.set_ylabel("step time / plain augmented step\n(median and quartiles over rounds)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.98, "\n".join(f"({k}) {variants[k]['label']}" for k in keys), transform=ax.transAxes,
            va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
