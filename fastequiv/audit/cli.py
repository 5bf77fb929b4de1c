"""fastequiv audit MODEL DATA: how equivariant a trained potential is, structure by structure.

Every structure of DATA (any file ASE reads; periodic and isolated mixed) is turned by K
random rotations (or, with --rotations, by a rotation design turned by --replicates random
rotations); MODEL's energy, forces and (periodic structures) stress on the rotated
copies are turned back and compared. A float64 copy of the model on the same copies
tells the rounding floor (what the model's precision alone gives) from what it learned.

MODEL: a model file torch.load reads (a MACE .model file), or module:function
(file.py:function) returning a model, an ASE calculator or an adapted model of a codebase
fastequiv.adapt knows (MACE, NequIP, SevenNet, SchNetPack, TorchMD-Net, PyG, Orb).

Writes OUT/audit.csv and OUT/audit.json (one row per structure), OUT/report.md with
OUT/distribution.png and OUT/size.png, and prints a summary. Example:

    fastequiv audit mace.model test.xyz --samples 8 --out audit-out
    fastequiv audit mace.model test.xyz --rotations design:3 --replicates 3 --out audit-out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .measure import MAX_ATOMS

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model file (torch.load) or module:function")
    parser.add_argument("data", metavar="DATA", help="structures: any file ase.io.read reads")
    parser.add_argument("--samples", "-K", type=int, default=None,
                        help="K rotated copies per structure (default 8; every element of a finite --group)")
    parser.add_argument("--rotations", default=None,
                        help="a rotation design in place of K random rotations: design:L (the fewest rotations exact "
                             "to degree L), lebedev:L, octahedral or icosahedral (--group SO3 or O3; not with "
                             "--samples)")
    parser.add_argument("--replicates", "-R", type=int, default=None,
                        help="with --rotations: random turns of the design per structure (default 2: unbiased for any "
                             "model; 3 or more: a stderr per structure)")
    parser.add_argument("--seed", type=int, default=0, help="the rotations' Philox stream (default 0)")
    parser.add_argument("--group", default="SO3", help="SO3 (default), O3, or a finite group (every element once)")
    parser.add_argument("--out", default="fastequiv-audit", help="output folder (default fastequiv-audit)")
    parser.add_argument("--max-atoms", type=int, default=MAX_ATOMS,
                        help=f"atoms per model call, over the K copies (with --rotations: R x the design's) (default "
                             f"{MAX_ATOMS}); lower it to save memory")
    parser.add_argument("--index", default=":", help="which structures of DATA, as ase.io.read's index (default ':')")
    parser.add_argument("--format", default=None, help="DATA's format, if ASE cannot tell it from the name")
    parser.add_argument("--device", default="cpu", help="where a model file is loaded (default cpu)")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 copy (no floor, no learned part)")
    parser.add_argument("--worst", type=int, default=10, help="structures listed per head in the report (default 10)")
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bar")
    parser.add_argument("--backend", default="auto", help="of the rotations and reductions (default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's own; 1 on a machine other jobs keep busy)")


class _Progress:
    """A tqdm bar over the structures where tqdm is installed, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="structure", desc="audit", file=sys.stderr)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plots(result, out: Path) -> tuple[list, str | None]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], 'matplotlib is not installed (pip install "fastequiv[demo]" or pip install matplotlib)'
    from .plots import plot_all

    return plot_all(result, out), None


def main(args) -> int:
    from . import table
    from .load import load_model, load_structures
    from .measure import audit

    if args.rotations is not None and args.samples is not None:
        raise ValueError(f"--samples {args.samples} with --rotations {args.rotations}: a design fixes the rotations of "
                         "each structure (--replicates x its size); pass one or the other")
    if args.replicates is not None and args.rotations is None:
        raise ValueError(f"--replicates {args.replicates} turns a rotation design: pass --rotations with it (random "
                         "rotations take --samples)")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    atoms = load_structures(args.data, args.index, args.format)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(len(atoms), not args.no_progress)
    try:
        result = audit(model, atoms, samples=args.samples, seed=args.seed, group=args.group,
                       max_atoms=args.max_atoms, float64=not args.no_float64, backend=args.backend,
                       progress=progress, rotations=args.rotations, replicates=args.replicates)
    finally:
        progress.close()
    names = {"model": args.model, "data": args.data}
    written = [table.write_csv(result, out / "audit.csv"), table.write_json(result, out / "audit.json", **names)]
    plots, why = ([], "--no-plots") if args.no_plots else _plots(result, out)
    written += plots
    written.append(table.write_report(result, out / "report.md", plots, worst_n=args.worst, plot_error=why, **names))
    print(table.summary(result, **names))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
