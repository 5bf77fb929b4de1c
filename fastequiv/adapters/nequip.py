"""NequIP (and Allegro): ``fe.adapt(model)`` or ``fe.adapt(NequIPCalculator(...))``.

Tested with nequip 0.19.1. The model is a ``nequip.nn.GraphModel``, what
``nequip.model.NequIPGNNModel(...)`` (or any nequip model builder, Allegro's too) and
``ModelFromCheckpoint`` / ``ModelFromPackage`` return; a model compiled by
``nequip-compile`` for ASE takes one frame per call and is refused.

The batch is an ``AtomicDataDict`` (a dict of tensors) as nequip's own pipeline yields
it: ``from_ase`` (or a dataset's ``from_dict``), its transforms
(``ChemicalSpeciesToAtomTypeMapper``, ``NeighborListTransform``) and
``AtomicDataDict.batched_from_list`` (its DataLoader's collate function). The keys read
are those the model reads: ``pos``, ``cell`` ``(B, 3, 3)`` (rows are lattice vectors),
``edge_cell_shift`` (integer cell shifts per edge, so invariant: the edge vector is
``pos[j] - pos[i] + edge_cell_shift @ cell``), ``edge_index``, ``batch``, ``num_atoms``
and ``atom_types``. An unbatched frame gets nequip's ``with_batch_`` keys; a batch
without a cell (a molecule from ``from_dict``) gets a zero cell and zero shifts, which is
what ``from_ase`` gives a molecule and leaves energy and forces as they are. A batch
carrying another key the model would read (precomputed ``edge_vectors``,
``edge_transpose_perm``, LAMMPS keys) is refused: stacking them is not implemented.

The model is called as nequip's trainer and calculator call it, ``model(data)``; its
``ForceStressOutput`` takes forces ``-dE/dpos`` and the stress ``(1/V) dE/d strain``
by autograd inside. Heads: ``total_energy`` ``(B, 1)`` as ``(B,)``, ``forces``, and
``stress`` ``(B, 3, 3)``, already in ASE's sign convention (the calculator hands it to
ASE unchanged). Labels: the batch's ``total_energy``, ``forces`` and ``stress`` (from_ase
turns ASE's Voigt stress into ``3 x 3``). An adapted calculator converts units as the
calculator does (``energy_units_to_eV``, ``length_units_to_A``) and builds batches with
its own transforms.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .common import MLIPAdapted, check_cells, choose_heads, no_options, unit_scale

__all__ = ["AdaptedNequIP", "adapt"]

FAMILY = "nequip"
INPUTS = {"pos": "position", "cell": "cell", "edge_cell_shift": "scalar@edge", "atom_types": "scalar@node",
          "num_atoms": "scalar@graph", "batch": "batch", "edge_index": "index"}
# nequip keeps data in float64 whatever the model's dtype (its global dtype): the model
# casts inside
DATA_DTYPE = torch.float64


class AdaptedNequIP(MLIPAdapted):
    """A nequip ``GraphModel`` (see module docs)."""

    family = FAMILY
    label_keys = {"energy": "total_energy", "forces": "forces", "stress": "stress"}
    output_keys = {"energy": "total_energy", "forces": "forces", "stress": "stress"}

    def __init__(self, model, heads: tuple, calculator=None):
        super().__init__(model, INPUTS, heads)
        self.calculator = calculator
        self.scale = unit_scale(calculator)

    def prepare(self, batch: Any) -> dict:
        from nequip.data import AtomicDataDict

        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a nequip AtomicDataDict (a dict of tensors), got {type(batch).__name__}")
        unstacked = [k for k in self.model.model_input_fields if k in batch and k not in INPUTS]
        if unstacked:
            raise ValueError(f"the batch holds {unstacked}, which the nequip model reads but the adapter does not "
                             f"stack (it stacks {list(INPUTS)}): drop them from the batch (nequip recomputes "
                             "edge vectors from pos, cell and edge_cell_shift)")
        data = AtomicDataDict.with_batch_(dict(batch))  # an unbatched frame: one graph
        if "cell" not in data:
            data["cell"] = data["pos"].new_zeros(data["num_atoms"].shape[0], 3, 3)
            data["edge_cell_shift"] = data["pos"].new_zeros(data["edge_index"].shape[1], 3)
        if "stress" in self.heads:
            check_cells(data["cell"])
        return {k: data[k] for k in INPUTS}

    def forward(self, inputs: dict) -> dict:
        out = self.outputs(self.model(dict(inputs)), self.scale)
        if "energy" in out:
            out["energy"] = out["energy"].reshape(-1)
        return out

    def batch_from_atoms(self, atoms_list: list) -> dict:
        """nequip's batch of ``atoms_list``: ``from_ase``, the calculator's transforms (or
        the ones nequip's calculator builds for a saved model: type names as chemical
        symbols, a neighbour list at the model's cutoff), ``batched_from_list``."""
        from nequip.data import AtomicDataDict, from_ase
        from nequip.integrations.utils import basic_transforms

        if self.calculator is not None:
            transforms = self.calculator.transforms
        else:
            metadata = self.model.metadata
            types = list(self.model.type_names)
            transforms = basic_transforms(metadata, float(metadata["r_max"]), types, {t: t for t in types})
        default = torch.get_default_dtype()
        torch.set_default_dtype(DATA_DTYPE)  # from_ase builds its tensors in the default dtype
        try:
            frames = []
            for atoms in atoms_list:
                data = from_ase(atoms)
                for transform in transforms:
                    data = transform(data)
                frames.append(data)
        finally:
            torch.set_default_dtype(default)
        device = next(self.model.parameters()).device
        return AtomicDataDict.to_(AtomicDataDict.batched_from_list(frames), device)


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, **options) -> AdaptedNequIP:
    """Adapt a nequip ``GraphModel``, or a ``NequIPCalculator`` built on one."""
    no_options(FAMILY, options)
    calculator = None
    if hasattr(obj, "atoms_to_data") and hasattr(obj, "get_property"):  # NequIPCalculator
        calculator, obj = obj, obj.model
    if not getattr(obj, "is_graph_model", False):
        raise ValueError(f"fe.adapt: expected a nequip GraphModel (what nequip.model.NequIPGNNModel and the other "
                         f"model builders, ModelFromCheckpoint and ModelFromPackage return) or a NequIPCalculator on "
                         f"one, got {type(obj).__name__}; a model compiled by nequip-compile takes one frame per call "
                         "and cannot take stacked copies")
    return AdaptedNequIP(obj, choose_heads(FAMILY, heads, stress), calculator)
