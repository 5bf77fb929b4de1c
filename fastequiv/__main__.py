"""Command line: ``fastequiv demo``, ``fastequiv bench``, ``fastequiv check``, ``fastequiv audit``, ``fastequiv example`` and ``fastequiv info`` (also ``python -m fastequiv ...``)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _spring_forces(pos):
    """Forces of unit-rest-length springs between every pair of points: equivariant by physics."""
    import torch

    rel = pos[:, :, None] - pos[:, None, :]
    dist = rel.norm(dim=-1, keepdim=True)
    eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)[None, :, :, None]
    unit = torch.where(eye, torch.zeros_like(rel), rel / dist.clamp_min(1e-9))
    return -((dist - 1.0) * unit).sum(dim=2)


def example(args) -> int:
    """Train a small non-equivariant MLP on spring forces with ``fe.twirl_loss`` and print
    how the share of the loss due to equivariance error evolves."""
    import torch
    from torch import nn

    import fastequiv as fe

    torch.manual_seed(args.seed)
    atoms = 4
    model = nn.Sequential(nn.Flatten(1), nn.Linear(3 * atoms, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                          nn.Linear(128, 3 * atoms), nn.Unflatten(1, (atoms, 3)))
    spec = fe.Spec(inputs="position", output="vector")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    held_out = torch.randn(256, atoms, 3)
    held_target = _spring_forces(held_out)

    print(f"fastequiv {fe.__version__}: a {atoms}-atom MLP learns spring forces with random-rotation augmentation")
    print(f"training loss: fe.twirl_loss with K={args.samples} stacked copies; held-out: K=8")
    print(f"{'step':>6} {'train L_total':>14} {'held-out L_total':>17} {'L_mean':>10} {'L_equiv':>10} {'pct':>7}")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        pos = torch.randn(64, atoms, 3)
        loss, d = fe.twirl_loss(model, pos, _spring_forces(pos), spec=spec, samples=args.samples,
                                equiv_weight=args.equiv_weight)
        if step % max(1, args.steps // 10) == 0:
            h = fe.equivariance_error(model, held_out, held_target, spec=spec, samples=8, seed=0)
            print(f"{step:>6} {float(d.total):>14.4f} {float(h.total):>17.4f} {float(h.mean):>10.4f} "
                  f"{float(h.equiv):>10.4f} {100 * float(h.pct):>6.1f}%")
        if step < args.steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"done in {time.perf_counter() - start:.1f} s; pct = share of the held-out loss due to equivariance error")
    return 0


def demo(args) -> int:
    from . import demo as _demo

    return _demo.main(args)


def bench(args) -> int:
    from .bench import cli

    return cli.main(args)


def check(args) -> int:
    from . import check as _check

    return _check.main(args)


def audit(args) -> int:
    from .audit import cli

    return cli.main(args)


def info(args) -> int:
    import fastequiv as fe

    print(json.dumps(fe.build_info(), indent=2))
    return 0


def _documented(sub, name: str, module, func, help: str) -> None:
    """A subcommand whose ``--help`` shows its module's docstring and whose options the
    module adds (``module.add_arguments``)."""
    parser = sub.add_parser(name, help=help, description=module.__doc__.replace("``", "").replace("::\n", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(func=func)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastequiv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_arguments

    dm = sub.add_parser("demo", help="train a point-cloud transformer on cluster forces; log, CSV and plot of "
                                     "the share of its loss due to equivariance error")
    add_arguments(dm)
    dm.set_defaults(func=demo)
    from .bench import cli as bench_cli

    _documented(sub, "bench", bench_cli, bench,
                "time the fused ops against the torch reference, e3nn and plain loops, and what logging "
                "equivariance error adds to a training step; table, JSON, plots")
    ex = sub.add_parser("example", help="train a small model and print its loss decomposition")
    ex.add_argument("--steps", type=int, default=400)
    ex.add_argument("--samples", type=int, default=2, help="K, rotated copies per sample in the training loss")
    ex.add_argument("--equiv-weight", type=float, default=0.0)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=example)
    from . import check as check_cli

    _documented(sub, "check", check_cli, check,
                "every backend that can run here against the torch reference; PASS/FAIL per op and backend, "
                "non-zero exit on a failure")
    from .audit import cli as audit_cli

    _documented(sub, "audit", audit_cli, audit,
                "how equivariant a trained potential is, structure by structure, rounding told apart from learned "
                "symmetry breaking; CSV, JSON, report with plots")
    sub.add_parser("info", help="print what this install was built with").set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
