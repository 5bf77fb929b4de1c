"""How much of a MACE model's loss is equivariance error? (It should be none.)

MACE is equivariant by construction, so its L_equiv is float noise; a variant with a
deliberately non-equivariant term is not. ``fe.adapt(model)`` reads MACE's own batches
and carries the spec (below, for reference, the same as a plain fe.Spec).

    python examples/mace_equivariance.py            # a tiny random MACE, float64
    python examples/mace_equivariance.py --periodic # a triclinic cell, with stress

Needs mace-torch (``pip install mace-torch``; MACE pins e3nn 0.4.4, fastequiv works with
it and with newer e3nn).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fastequiv as fe
from fastequiv.adapters.mace import AdaptedMACE

# The Spec route, for readers who want to see what fe.adapt declares for MACE: positions
# rotate (about each graph's centroid), the cell's rows are lattice vectors (flattened to
# (3 B, 3)), the Cartesian shifts of periodic edges rotate with their edge, integer unit
# shifts and one-hot elements do not. The inputs are the batch's keys the model reads.
MACE_SPEC = fe.Spec(
    inputs={"positions": "position", "cell": "cell", "shifts": "vector@edge", "unit_shifts": "scalar@edge",
            "node_attrs": "scalar@node", "head": "scalar@graph",
            "batch": "batch", "ptr": "ptr", "edge_index": "index"},
    output={"energy": "scalar", "forces": "vector"},
    call="dict", model_grad=True,
)
MACE_STRESS_SPEC = fe.Spec(inputs=MACE_SPEC.inputs, output={"energy": "scalar", "forces": "vector", "stress": "rank2"},
                           call="dict", model_grad=True)


def model_inputs(batch) -> dict:
    """The keys of a MACE batch its model reads (its labels and weights left out)."""
    return {k: batch[k] for k in MACE_SPEC.inputs}


def tiny_mace(seed: int = 0):
    """A small MACE (random weights, float64) over H, C, O."""
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn's constants built in float32 would carry its rounding
    try:
        return modules.MACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=3, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=2, num_elements=3, hidden_irreps=o3.Irreps("8x0e + 8x1o"), MLP_irreps=o3.Irreps("8x0e"),
            gate=torch.nn.functional.silu, atomic_energies=np.zeros(3), avg_num_neighbors=4.0,
            atomic_numbers=[1, 6, 8], correlation=2,
        ).double()
    finally:
        torch.set_default_dtype(default)


def structures(periodic: bool, count: int = 3, seed: int = 0):
    """A few random H/C/O structures, molecules or in a triclinic cell."""
    import ase

    rng = np.random.default_rng(seed)
    out = []
    for n in range(4, 4 + count):
        pos = rng.normal(size=(n, 3)) * 1.3
        if periodic:
            cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
            atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=pos % 4.0, cell=cell, pbc=True)
        else:
            atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=pos)
        out.append(atoms)
    return out


def mace_batch(atoms_list, r_max: float = 4.0):
    """The MACE batch of ``atoms_list`` (energies and forces targets from a fixed random rule)."""
    from mace import data, tools
    from mace.tools import torch_geometric

    z_table = tools.AtomicNumberTable([1, 6, 8])
    configs = [data.config_from_atoms(a) for a in atoms_list]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # MACE builds its tensors in the default dtype
    try:
        graphs = [data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max) for c in configs]
    finally:
        torch.set_default_dtype(default)
    return next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


def targets(batch, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B, N = batch.num_graphs, batch.positions.shape[0]
    return {"energy": torch.randn(B, generator=g, dtype=torch.float64),
            "forces": torch.randn(N, 3, generator=g, dtype=torch.float64),
            "stress": torch.randn(B, 3, 3, generator=g, dtype=torch.float64) * 0.01}


class BrokenMACE(AdaptedMACE):
    """MACE plus a term that depends on the absolute orientation: an external field that
    pulls every atom along +z (energy -a z, forces +a e_z). Not equivariant."""

    def __init__(self, mace, strength: float = 0.3, stress: bool = False):
        super().__init__(mace, ("energy", "forces", "stress") if stress else ("energy", "forces"))
        self.strength = strength

    def forward(self, data):
        out = super().forward(data)
        z = data["positions"][:, 2]
        out["energy"] = out["energy"] + torch.zeros_like(out["energy"]).index_add(0, data["batch"], -self.strength * z)
        pull = torch.zeros_like(out["forces"])
        pull[:, 2] = self.strength
        out["forces"] = out["forces"] + pull
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--periodic", action="store_true", help="a triclinic cell, with stress")
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)

    mace = tiny_mace()
    batch = mace_batch(structures(args.periodic, args.structures))
    y = targets(batch)
    if not args.periodic:
        y = {k: y[k] for k in ("energy", "forces")}
    model = fe.adapt(mace, stress=args.periodic)  # carries MACE's spec; reads MACE's batch as it comes
    start = time.perf_counter()
    d = fe.equivariance_error(model, batch, y, samples=args.samples, seed=0)
    seconds = time.perf_counter() - start
    print(f"MACE ({'periodic, with stress' if args.periodic else 'molecules'}): pct = {float(d.pct):.3g} "
          f"(L_equiv {float(d.equiv):.3g} of L_total {float(d.total):.3g}) in {seconds:.2f} s")
    broken = BrokenMACE(mace, stress=args.periodic)
    d = fe.equivariance_error(broken, batch, y, samples=args.samples, seed=0)
    print(f"MACE + an external field: pct = {float(d.pct):.3g} (L_equiv {float(d.equiv):.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
