"""``fastequiv bench``: run the op benchmarks and the training-step overheads, print a table,
write ``results.json``, ``ops.png`` and ``overhead.png`` to ``--out``.

::

    fastequiv bench                 # quick: two sizes per op + the step overheads (minutes)
    fastequiv bench --full          # size sweeps, the row-level kernels, more rounds, the designs comparison
    fastequiv bench --smoke         # every case once at toy sizes (CI: proves they run)
    fastequiv bench --ops twirl_reduce,step --out results/
    fastequiv bench --ops fixed     # the fixed cost of a call on small graph batches
    fastequiv bench --ops designs   # rotation designs against i.i.d. Haar draws (20-30 s on 2 cores)

``--ops designs`` (``fastequiv.bench.designs``) measures errors, not times: the twirled
prediction and L_equiv of two analytic force fields against their closed forms, and the
spread of the demo transformer's L_equiv over seeds, for i.i.d. Haar draws and rotation
designs at equal numbers of model evaluations, on the CPU whatever ``--device`` says (one
torch thread). It prints a short table and the ratios at N ~ 60 and ~120 and writes
``designs.csv`` and ``designs.png``; quick mode runs fewer seeds, design degrees and
transformer runs than ``--full`` (the run ``benchmarks/RESULTS.md`` quotes, ~2 min).
Without ``--ops`` it runs with ``--smoke`` and ``--full``, not in the default quick run
(~2.5 min on 2 cores), which it would make 15-25% slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

MODES = ("smoke", "quick", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cases import OPS

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="size sweeps, the row-level kernels, more rounds, the designs comparison in full")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="every case once at toy sizes (proves the benchmarks run; the figures mean nothing)")
    parser.set_defaults(mode="quick")
    parser.add_argument("--ops", default=None,
                        help=f"comma-separated subset of {','.join(list(OPS) + list(EXTRA))} (default: every "
                             "public op, the step and the fixed cost; the row-level 'kernels' and the rotation "
                             "'designs' comparison too with --full or --smoke)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when torch sees one, else the CPU")
    parser.add_argument("--out", default="fastequiv-bench",
                        help="folder for results.json, ops.png, overhead.png (and designs.csv, designs.png) "
                             "(default: fastequiv-bench)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")


#: what --ops selects besides the op cases: the training step, the fixed cost of a call and
#: the rotation designs' comparison
EXTRA = ("step", "fixed", "designs")
#: the modes whose run without --ops includes the designs' comparison (quick: 20-30 s more on 2 cores)
DESIGNS_BY_DEFAULT = ("smoke", "full")


def _select(ops_arg, mode):
    """``(op cases or None for all, {"step": bool, "fixed": bool, "designs": bool})``."""
    from .cases import OPS

    if ops_arg is None:
        return None, {k: k != "designs" or mode in DESIGNS_BY_DEFAULT for k in EXTRA}
    wanted = [o.strip() for o in ops_arg.split(",") if o.strip()]
    unknown = sorted(set(wanted) - set(OPS) - set(EXTRA))
    if unknown:
        raise SystemExit(f"fastequiv bench: --ops got unknown {unknown}; choose from {sorted(list(OPS) + list(EXTRA))}")
    return [o for o in wanted if o not in EXTRA], {k: k in wanted for k in EXTRA}


def main(args: argparse.Namespace) -> int:
    from . import fixed, report, step
    from .cases import cases
    from .timing import measure

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastequiv bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    ops, extra = _select(args.ops, args.mode)
    os.makedirs(args.out, exist_ok=True)
    info = report.machine(device)
    title = f"fastequiv bench ({args.mode}) on {report.describe(info)}"
    print(title)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    start = time.perf_counter()

    results = []
    selected = cases(args.mode, device, ops) if ops is None or ops else []
    for i, case in enumerate(selected):
        fn = case.setup()
        stats = measure(fn, device, args.mode)
        del fn
        results.append({**case.info(), "group": case.group, **stats.as_dict()})
        log(f"[{i + 1}/{len(selected)}] {case.name}: {stats.median * 1e3:.3f} ms")
    rows = report.op_rows(results)
    payload = {"mode": args.mode, "machine": info, "ops": rows}
    files = {}
    if rows:
        print("\n" + report.format_ops(rows))
        files["ops_plot"] = report.plot_ops(rows, os.path.join(args.out, "ops.png"), title)

    if extra["fixed"]:
        log("\nthe fixed cost of a call on small graph batches (variants interleaved in each round)")
        fixed_cost = fixed.fixed_cost(args.mode, device, log=log)
        payload["fixed_cost"] = fixed_cost
        print("\n" + report.format_fixed_cost(fixed_cost))

    if extra["step"]:
        log("\ntraining-step overheads (variants interleaved in each round)")
        overhead = step.overhead(args.mode, device, log=log)
        payload["step"] = overhead
        print("\n" + report.format_overhead(overhead))
        files["overhead_plot"] = report.plot_overhead(overhead, os.path.join(args.out, "overhead.png"), title)

    if extra["designs"]:
        from . import designs

        log("\nrotation designs against i.i.d. Haar draws (errors against closed forms, not times)")
        result = designs.run(args.mode, args.out, stem="designs", log=log)
        payload["designs"] = {"settings": result["settings"], "rows": result["rows"],
                              "elapsed_s": result["elapsed_s"]}
        files["designs_csv"], files["designs_plot"] = result["csv"], result["png"]
        print("\n" + result["report"])

    payload["elapsed_s"] = time.perf_counter() - start
    files["json"] = os.path.join(args.out, "results.json")
    payload["files"] = {k: os.path.basename(v) for k, v in files.items() if v}  # relative to --out
    report.write_json(files["json"], payload)
    done = [what for what, on in (("the fixed cost", extra["fixed"]), ("the step overheads", extra["step"]),
                                  ("the designs comparison", extra["designs"])) if on]
    print(f"\n{len(results)} op cases{''.join(' and ' + d for d in done)} in "
          f"{payload['elapsed_s']:.0f} s; wrote {', '.join(f for f in files.values() if f)}")
    return 0
