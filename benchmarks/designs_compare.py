"""Rotation designs against i.i.d. Haar draws, at equal numbers of model evaluations.

A thin wrapper around :mod:`fastequiv.bench.designs` (the models, their closed forms, the
measurements, the CSV and the plot; ``fastequiv bench --ops designs`` runs the same code,
with a quick mode between these two):

    python benchmarks/designs_compare.py            # the full run: ~2 min on one thread
    python benchmarks/designs_compare.py --smoke    # seconds: checks it runs

Writes ``designs_compare.csv`` and ``designs_compare.png`` (``designs_compare_smoke.*`` with
``--smoke``) into ``--out`` and prints every measurement, the short table and the ratios.
"""

from __future__ import annotations

import argparse
import os

from fastequiv.bench import designs


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clusters", type=int, default=None, help="6-atom clusters (default 16)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of every random estimate (default 40)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the demo transformer (default 400)")
    p.add_argument("--held-out", type=int, default=None, help="held-out clusters of the transformer (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for the CSV and the plot (default: benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="3 seeds, 4 design degrees, 4 training steps")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = arguments(argv)
    mode = "smoke" if args.smoke else "full"
    result = designs.run(mode, args.out, stem="designs_compare_smoke" if args.smoke else "designs_compare",
                         threads=args.threads, clusters=args.clusters, seeds=args.seeds, steps=args.steps,
                         held_out=args.held_out)
    print("\n".join(result["summary"]))
    print("\n" + result["report"])
    print(f"total wall time: {result['elapsed_s']:.0f} s; wrote {result['csv']}, {result['png']}")
    return result["rows"]


if __name__ == "__main__":
    main()
