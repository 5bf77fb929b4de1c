"""The audit as files and text: the per-structure table (CSV, JSON), the one-screen
summary and the Markdown report that lists the worst structures next to the plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .measure import FIELDS, ROUNDING_REL, Audit

__all__ = ["COLUMNS", "columns", "summary", "worst", "write_csv", "write_json", "write_report"]

#: what each per-head column means (the README and the report print this); :func:`columns`
#: gives the entries for one audit's kind of rotations
COLUMNS = {
    "equiv": "L_equiv of the model as given: the unbiased mean over the structure's output elements of the squared "
             "deviation of the back-rotated predictions from their rotation average",
    "rel": "equiv / ||fbar||^2, L_equiv relative to the rotation-averaged prediction's size",
    "stderr": "the jackknife standard error of equiv: over the K rotations (i.i.d. draws; 0 for every element of a "
              "finite group), or over the R Haar turns of a rotation design (NaN for R < 3)",
    "max_dev": "max over rotations and atoms of ||a_k,i - abar_i|| (a force vector's Euclidean norm; the stress's "
               "Frobenius norm; the energy's absolute value)",
    "floor": "the rounding part: L_equiv of the model's outputs minus the float64 copy's on the same rotated copies",
    "equiv_f64": "L_equiv of a float64 copy of the model on the same copies: the learned part",
    "rel_f64": "equiv_f64 relative to the float64 copy's rotation-averaged prediction",
    "verdict": f"learned if equiv_f64 exceeds the floor and rel_f64 exceeds {ROUNDING_REL:g}, else rounding",
}


#: the entries of :data:`COLUMNS` that differ with a rotation design
DESIGN_COLUMNS = {
    "equiv": "L_equiv of the model as given: the randomised-design estimate (each replicate's weighted spread of the "
             "back-rotated predictions around its weighted average, plus the spread between the replicates' averages), "
             "unbiased for R >= 2 and exact where neither the model's twisted prediction nor its squared deviation "
             "has content above the design's degree (a twisted prediction of at most half that degree)",
    "stderr": "the jackknife standard error of equiv over the R Haar turns of the design (leave one turn out; NaN for "
              "R < 3)",
    "max_dev": "max over the R x K copies and atoms of ||a_k,i - abar_i||, abar the replicate-averaged twirled "
               "prediction (a force vector's Euclidean norm; the stress's Frobenius norm; the energy's absolute value)",
}

_IID_COLUMNS = {"stderr": "the jackknife standard error of equiv over the K rotations"}


def columns(a: Audit) -> dict:
    """:data:`COLUMNS` as they apply to ``a``: i.i.d. draws, every element of a finite group,
    or a rotation design."""
    if a.rotations is not None:
        return {**COLUMNS, **DESIGN_COLUMNS}
    if a.exhaustive:
        return {**COLUMNS, "stderr": "0: every element of the finite group is used once, there is no sampling error"}
    return {**COLUMNS, **_IID_COLUMNS}


def _clean(v):
    """A JSON value: NaN and inf become None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_csv(a: Audit, path: Path) -> Path:
    """One row per structure; empty cells where a head does not apply."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(a.rows[0]))
        w.writeheader()
        for row in a.rows:
            w.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def meta(a: Audit, **extra) -> dict:
    out = {"samples": a.samples, "exhaustive": a.exhaustive, "seed": a.seed, "group": a.group, "dtype": a.dtype,
           "float64": "measured" if a.float64 is None else a.float64, "calls": a.calls, "seconds": a.seconds,
           "structures": len(a.rows), "periodic": sum(r["periodic"] for r in a.rows), "notes": a.notes,
           "rotations": a.rotations, "degree": a.degree, "design_size": a.design_size, "replicates": a.replicates}
    out.update(extra)
    return out


def write_json(a: Audit, path: Path, **extra) -> Path:
    """``{"meta", "heads", "heads_f64", "columns", "structures"}``: the batch-level
    :class:`fastequiv.LabelFree` numbers per head and the table."""
    doc = {"meta": meta(a, **extra),
           "heads": {h: {k: _clean(v) for k, v in d.to_dict().items()} for h, d in a.heads.items()},
           "heads_f64": {h: {k: _clean(v) for k, v in d.to_dict().items()} for h, d in a.heads_f64.items()},
           "columns": columns(a),
           "structures": [{k: _clean(v) for k, v in row.items()} for row in a.rows]}
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def worst(a: Audit, head: str, n: int, key: str = "rel") -> list:
    """The ``n`` structures with the largest ``head_key``."""
    rows = [r for r in a.rows if isinstance(r.get(f"{head}_{key}"), float) and math.isfinite(r[f"{head}_{key}"])]
    return sorted(rows, key=lambda r: r[f"{head}_{key}"], reverse=True)[:n]


def _g(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}e}"


def _head_line(a: Audit, h: str) -> dict:
    rows = [r for r in a.rows if r.get(f"{h}_equiv") is not None]
    d = a.heads[h]
    mean = lambda k: sum(r[f"{h}_{k}"] for r in rows) / len(rows)
    top = max(rows, key=lambda r: r[f"{h}_max_dev"])
    line = {"head": h, "n": len(rows), "equiv": f"{_g(float(d.equiv))} ± {_g(float(d.stderr.equiv), 1)}",
            "rel": f"{_g(float(d.rel))} ± {_g(float(d.stderr.rel), 1)}",
            "max_dev": f"{_g(top[f'{h}_max_dev'])} (#{top['index']} {top['formula']})"}
    if a.float64 is None:
        learned = sum(r[f"{h}_verdict"] == "learned" for r in rows)
        line.update(floor=_g(mean("floor")), equiv_f64=_g(mean("equiv_f64")), learned=f"{learned}/{len(rows)}")
    else:
        line.update(floor="n/a", equiv_f64="n/a", learned="n/a")
    return line


HEADER = {"head": "head", "n": "structures", "equiv": "L_equiv mean ± se", "rel": "rel ± se",
          "floor": "floor mean", "equiv_f64": "float64 L_equiv", "learned": "learned", "max_dev": "max deviation"}


def summary(a: Audit, model: str = "", data: str = "", worst_n: int = 5) -> str:
    """The one-screen summary printed at the end of ``fastequiv audit``."""
    periodic = sum(r["periodic"] for r in a.rows)
    rot = a.describe()
    f64 = "float64 copy on the same copies" if a.float64 is None else f"no float64 comparison: {a.float64}"
    lines = [f"fastequiv audit{': ' + model if model else ''}{' on ' + data if data else ''}",
             f"{len(a.rows)} structures ({len(a.rows) - periodic} isolated, {periodic} periodic), {rot}",
             f"model {a.dtype}; {f64}; {a.calls} model calls in {a.seconds:.1f} s", ""]
    table = [HEADER] + [_head_line(a, h) for h in a.heads]
    widths = {k: max(len(str(t[k])) for t in table) for k in HEADER}
    for t in table:
        lines.append("  ".join(str(t[k]).ljust(widths[k]) for k in HEADER).rstrip())
    for h in a.heads:
        bad = worst(a, h, worst_n)
        if bad:
            lines.append("")
            lines.append(f"worst {h} (by rel): " + ", ".join(f"#{r['index']} {r['formula']} {_g(r[f'{h}_rel'])}"
                                                              for r in bad))
    lines.extend(f"note: {n}" for n in a.notes)
    return "\n".join(lines)


def write_report(a: Audit, path: Path, plots: list, model: str = "", data: str = "", worst_n: int = 10,
                 plot_error: str | None = None) -> Path:
    """A Markdown report: the summary, what the columns mean, the worst structures of each
    head, and the plots."""
    out = ["# fastequiv audit", "", "```", summary(a, model, data, worst_n=0), "```", "", "## Columns (per head)", ""]
    out += [f"- `<head>_{k}`: {v}" for k, v in columns(a).items()]
    for h in a.heads:
        out += ["", f"## Worst {worst_n} structures: {h} (by rel)", "",
                "| index | formula | atoms | pbc | " + " | ".join(FIELDS) + " |",
                "|" + "---|" * (4 + len(FIELDS))]
        for r in worst(a, h, worst_n):
            cells = [r[f"{h}_{f}"] if f == "verdict" else _g(r[f"{h}_{f}"]) for f in FIELDS]
            out.append(f"| {r['index']} | {r['formula']} | {r['atoms']} | {r['pbc']} | "
                       + " | ".join(str(c) if c is not None else "-" for c in cells) + " |")
    out += ["", "## Plots", ""]
    out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    if plot_error:
        out.append(f"No plots: {plot_error}")
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path
