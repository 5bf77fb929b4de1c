"""fastequiv.ase on a codebase's calculator: the batched route (one model call for K copies
of every structure) against the serial route (one calculator call per copy).

    python benchmarks/ase_batched_vs_serial.py            # 50 structures, K=8, MACE and NequIP
    python benchmarks/ase_batched_vs_serial.py --structures 200 --samples 8

Tiny random models in float64 (no weights to download), molecules of 8-20 H/C/O atoms;
both routes use the same rotations, so their decompositions must agree to float
rounding. Prints one row per codebase: seconds per route, their ratio, and the largest
relative difference of L_total and L_equiv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def molecules(count: int, seed: int = 0):
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(8, 21))
        atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=rng.normal(size=(n, 3)) * 1.6)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)))
        out.append(atoms)
    return out


def mace_calculator():
    from mace.calculators import MACECalculator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from mace_equivariance import tiny_mace  # float64, random weights

    return MACECalculator(models=tiny_mace(), device="cpu", default_dtype="float64")


def nequip_calculator():
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    types = ["H", "C", "O"]
    model = NequIPGNNModel(seed=0, model_dtype="float64", type_names=types, r_max=4.0, num_layers=2, l_max=1,
                           num_features=4, radial_mlp_width=8, num_bessels=4, avg_num_neighbors=4.0,
                           per_type_energy_scales=1.0, per_type_energy_shifts=0.0).eval()
    transforms = basic_transforms(model.metadata, 4.0, types, {t: t for t in types})
    return NequIPCalculator(model, device="cpu", transforms=transforms)


def compare(name: str, calc, atoms, K: int) -> dict:
    import fastequiv.ase as fa

    fa.equivariance_error(calc, atoms[:2], samples=2, seed=0)  # warm: imports, first calls
    start = time.perf_counter()
    batched = fa.equivariance_error(calc, atoms, samples=K, seed=1)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    serial = fa.equivariance_error(calc, atoms, samples=K, seed=1, batched=False)
    t_serial = time.perf_counter() - start
    diff = max(abs(float(getattr(batched.heads[h].per_sample, t).sub(getattr(serial.heads[h].per_sample, t)).abs().max())
                   / max(float(getattr(serial.heads[h], "total")), 1e-300)) for h in serial.heads for t in ("total", "equiv"))
    row = {"codebase": name, "structures": len(atoms), "K": K, "batched_s": t_batched, "serial_s": t_serial,
           "speedup": t_serial / t_batched, "max_rel_diff": diff, "pct": float(batched.pct)}
    print(f"{name:>7}: {len(atoms)} structures, K={K}: batched {t_batched:.2f} s, serial {t_serial:.2f} s, "
          f"{row['speedup']:.1f}x; largest relative difference {diff:.1e}; pct {row['pct']:.1e}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    atoms = molecules(args.structures)
    for name, make in (("MACE", mace_calculator), ("NequIP", nequip_calculator)):
        compare(name, make(), atoms, args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
