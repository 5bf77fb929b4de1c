"""``fastequiv audit`` against a serial calculator loop over the same rotations.

    python benchmarks/audit_vs_serial.py                        # 200 structures, K=8, MACE and SchNetPack
    python benchmarks/audit_vs_serial.py --structures 20        # a quick check

Tiny random float32 models (no weights to download) of two codebases, MACE and
SchNetPack (PaiNN), each with an external field added to its forces (``F + a e_z``, so
that L_equiv of the forces is ``a^2 / 3`` and the numbers compared are not rounding
noise). Half the structures are H/C/O molecules, half triclinic H/C/O cells (energy,
forces, stress).

* the audit: :func:`fastequiv.audit.audit`, the model and its float64 copy on the same K
  copies of every structure, many structures per model call (the batch built by the
  codebase's own pipeline, included in its time);
* the serial loop: :func:`fastequiv.ase.equivariance_error` with ``batched=False``, one
  calculator call per rotated copy (K per structure), on the float32 calculator (what
  one would run) and on the float64 one (the audit's float64 column), with the same
  rotations (copy ``k`` of structure ``i``: rotation ``k * N + i`` of the seed's stream).

Prints per codebase the seconds of each, their ratios, and the largest differences of the
per-structure L_equiv: float64 against float64 (relative, forces; absolute over
``||fbar||^2`` for energy and stress, which are rounding noise there), float32 against
float32 (relative, forces, where the field dominates the float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIELD = 0.05  # eV/A along z on every atom
CUTOFF = 4.0


def structures(count: int, seed: int = 0) -> list:
    """Molecules of 4-12 H/C/O atoms and triclinic cells of 4-10, alternately."""
    import ase

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        periodic = i % 2 == 1
        n = int(rng.integers(4, 11 if periodic else 13))
        pos = rng.normal(size=(n, 3)) * 1.3
        kwargs = dict(numbers=rng.choice([1, 6, 8], n), positions=pos)
        if periodic:
            cell = np.array([[4.5, 0.0, 0.0], [0.8, 4.6, 0.0], [0.5, 0.7, 4.8]]) + rng.normal(size=(3, 3)) * 0.1
            kwargs.update(positions=rng.uniform(size=(n, 3)) @ cell, cell=cell, pbc=True)
        out.append(ase.Atoms(**kwargs))
    return out


# --- the field, on both sides ----------------------------------------------------------------

def field_adapted(adapted):
    """The adapted model with ``FIELD e_z`` added to its forces."""
    from fastequiv.adapted import Adapted

    class Field(Adapted):
        def __init__(self, inner):
            super().__init__(inner, inner.spec)
            self.family = inner.family

        def prepare(self, batch):
            return self.model.prepare(batch)

        def forward(self, inputs):
            out = dict(self.model(inputs))
            pull = torch.zeros_like(out["forces"])
            pull[:, 2] = FIELD
            out["forces"] = out["forces"] + pull
            return out

    return Field(adapted)


def field_calculator(calc):
    """The ASE calculator with ``FIELD e_z`` added to its forces."""
    from ase.calculators.calculator import Calculator, all_changes

    class Field(Calculator):
        implemented_properties = list(calc.implemented_properties)

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            atoms = self.atoms.copy()
            atoms.calc = calc
            self.results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().copy()}
            if "stress" in properties and atoms.pbc.all():
                self.results["stress"] = atoms.get_stress()
            self.results["forces"][:, 2] += FIELD

    return Field()


# --- the two codebases ---------------------------------------------------------------------

# each codebase: the float32 model, and its calculator on the model in a dtype (a float64
# calculator runs a float64 copy of the float32 model, as the audit's float64 column does)

def mace():
    sys.path.insert(0, str(ROOT / "examples"))
    from mace_equivariance import tiny_mace  # random weights, built in float64

    return tiny_mace().float()


def mace_calculator(model, dtype: torch.dtype, folder: Path):
    from mace.calculators import MACECalculator

    return MACECalculator(models=copy.deepcopy(model).to(dtype), device="cpu",
                          default_dtype=str(dtype).replace("torch.", ""))


def _import_schnetpack():
    if not hasattr(torch.utils.data.dataloader, "T_co"):  # schnetpack 2.1.1 on newer torch (see its tests)
        torch.utils.data.dataloader.T_co = typing.TypeVar("T_co", covariant=True)
    import schnetpack

    return schnetpack


def schnetpack():
    spk = _import_schnetpack()
    torch.manual_seed(0)
    rbf, cut = spk.nn.GaussianRBF(n_rbf=8, cutoff=CUTOFF), spk.nn.CosineCutoff(CUTOFF)
    rep = spk.representation.PaiNN(n_atom_basis=16, n_interactions=2, radial_basis=rbf, cutoff_fn=cut)
    return spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.Strain(), spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=16, output_key="energy"), spk.atomistic.Forces(calc_stress=True)],
    ).float()


def schnetpack_calculator(model, dtype: torch.dtype, folder: Path):
    spk = _import_schnetpack()
    from schnetpack.interfaces import SpkCalculator

    path = folder / f"painn-{dtype}.pt"
    torch.save(copy.deepcopy(model).to(dtype), path)  # SpkCalculator loads its model from a file
    return SpkCalculator(str(path), neighbor_list=spk.transform.ASENeighborList(cutoff=CUTOFF), stress_key="stress",
                         energy_unit="eV", position_unit="Ang", dtype=dtype)


CODEBASES = {"mace": (mace, mace_calculator), "schnetpack": (schnetpack, schnetpack_calculator)}


# --- the comparison ------------------------------------------------------------------------

def clock() -> tuple:
    return time.perf_counter(), time.process_time()


def since(start: tuple) -> dict:
    """Wall seconds, and CPU seconds of this process: on a VM shared with other jobs the
    CPU time moves far less than the wall time (one thread: it is the compute)."""
    return {"wall": time.perf_counter() - start[0], "cpu": time.process_time() - start[1]}

def serial(calc, atoms: list, K: int, seed: int):
    """The serial route against zero targets: per head, L_equiv and L_mean (against a zero
    target: ||fbar||^2) of the structures the head applies to."""
    import fastequiv.ase as fa

    zero = [{"energy": 0.0, "forces": np.zeros((len(a), 3)), **({"stress": np.zeros(6)} if a.pbc.all() else {})}
            for a in atoms]
    start = clock()
    d = fa.equivariance_error(field_calculator(calc), atoms, zero, samples=K, seed=seed, batched=False)
    seconds = since(start)
    periodic = np.array([bool(a.pbc.all()) for a in atoms])
    keep = {h: periodic if h == "stress" else np.ones(len(atoms), bool) for h in d.heads}
    return {h: (d.heads[h].per_sample.equiv.numpy()[keep[h]], d.heads[h].per_sample.mean.numpy()[keep[h]])
            for h in d.heads}, seconds


def audited(model, atoms: list, K: int, seed: int, max_atoms: int, float64: bool = True):
    import fastequiv as fe
    from fastequiv.audit import audit

    models = {"isolated": field_adapted(fe.adapt(model)), "periodic": field_adapted(fe.adapt(model, stress=True))}
    start = clock()
    a = audit(models, atoms, samples=K, seed=seed, max_atoms=max_atoms, float64=float64)
    return a, since(start)


def column(a, head: str, key: str, periodic_only: bool) -> np.ndarray:
    return np.array([r[f"{head}_{key}"] for r in a.rows if r["periodic"] or not periodic_only], dtype=float)


def compare(name: str, atoms: list, K: int, seed: int, max_atoms: int, folder: Path) -> dict:
    make, calculator = CODEBASES[name]
    model32 = make()
    calc32, calc64 = calculator(model32, torch.float32, folder), calculator(model32, torch.float64, folder)
    audited(model32, atoms[:4], 2, seed, max_atoms)  # warm: imports, first calls of each dtype
    serial(calc32, atoms[:2], 2, seed)
    serial(calc64, atoms[:2], 2, seed)
    a, t_audit = audited(model32, atoms, K, seed, max_atoms)
    a32, t_audit32 = audited(model32, atoms, K, seed, max_atoms, float64=False)
    s32, t32 = serial(calc32, atoms, K, seed)
    s64, t64 = serial(calc64, atoms, K, seed)
    row = {"codebase": name, "structures": len(atoms), "periodic": int(sum(a.pbc.all() for a in atoms)), "K": K,
           "model_calls": a.calls, "float64": a.float64 or "measured"}
    for clock_name in ("wall", "cpu"):
        t = {k: v[clock_name] for k, v in (("audit", t_audit), ("audit32", t_audit32), ("s32", t32), ("s64", t64))}
        row[clock_name] = {"audit_s": t["audit"], "audit_no_float64_s": t["audit32"], "serial_f32_s": t["s32"],
                           "serial_f64_s": t["s64"],
                           # the same work: both precisions, or float32 alone
                           "ratio_both": (t["s32"] + t["s64"]) / t["audit"], "ratio_f32": t["s32"] / t["audit32"],
                           "ratio_f32_vs_full_audit": t["s32"] / t["audit"]}
    # without the float64 copy the model's own pipeline builds the batch (MACE's in float32):
    # the float32 numbers move by float32 rounding only
    np.testing.assert_allclose(column(a32, "forces", "equiv", False), column(a, "forces", "equiv", False), rtol=1e-5)
    for head, (equiv64, norm) in s64.items():
        periodic_only = head == "stress"
        f64 = column(a, head, "equiv_f64", periodic_only)
        if head == "forces":
            row["forces_f64_max_rel_diff"] = float(np.max(np.abs(f64 - equiv64) / equiv64))
            f32 = column(a, head, "equiv", periodic_only)
            row["forces_f32_max_rel_diff"] = float(np.max(np.abs(f32 - s32[head][0]) / s32[head][0]))
            row["forces_equiv_mean"] = float(f64.mean())
            row["forces_floor_mean"] = float(column(a, head, "floor", periodic_only).mean())
        else:
            row[f"{head}_f64_max_diff_over_norm"] = float(np.max(np.abs(f64 - equiv64) / norm))
            row[f"{head}_rel_f64_max"] = float(np.max(column(a, head, "rel_f64", periodic_only)))
    print(json.dumps(row, indent=1))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-atoms", type=int, default=20000)
    parser.add_argument("--codebases", default="mace,schnetpack")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    atoms = structures(args.structures)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.codebases.split(","):
            rows.append(compare(name, atoms, args.samples, args.seed, args.max_atoms, Path(tmp)))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
