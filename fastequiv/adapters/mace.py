"""MACE (mace-torch): ``fe.adapt(model)`` or ``fe.adapt(MACECalculator(...))``.

Tested with mace-torch 0.3.16. The batch is what MACE's own loader yields
(``mace.tools.torch_geometric`` batches of ``mace.data.AtomicData``, or their
``.to_dict()``): positions, the cell flattened to ``(3 B, 3)``, Cartesian shifts per edge,
integer unit shifts, one-hot ``node_attrs``, ``batch``, ``ptr``, ``edge_index`` and the
head index. The model is called as MACE's trainer calls it, ``model(data,
training=model.training, compute_stress=...)``; forces (and stress) come from autograd
inside it. Labels: the batch's ``energy``, ``forces``, ``stress``. An adapted calculator
converts units as the calculator does (``energy_units_to_eV``, ``length_units_to_A``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .common import MLIPAdapted, choose_heads, no_options, unit_scale

__all__ = ["AdaptedMACE", "adapt"]

FAMILY = "mace"
INPUTS = {"positions": "position", "cell": "cell", "shifts": "vector@edge", "unit_shifts": "scalar@edge",
          "node_attrs": "scalar@node", "head": "scalar@graph", "batch": "batch", "ptr": "ptr", "edge_index": "index"}


class AdaptedMACE(MLIPAdapted):
    """A MACE model (see module docs)."""

    family = FAMILY

    def __init__(self, model, heads: tuple, calculator=None):
        super().__init__(model, INPUTS, heads)
        self.calculator = calculator
        self.scale = unit_scale(calculator)

    def prepare(self, batch: Any) -> dict:
        data = {k: batch[k] for k in INPUTS if k != "head"}
        head = batch["head"] if "head" in _keys(batch) else None
        data["head"] = head if head is not None else torch.zeros_like(data["ptr"][:-1])  # MACE's default head 0
        return data

    def forward(self, inputs: dict) -> dict:
        out = self.model(dict(inputs), training=self.model.training, compute_force="forces" in self.heads,
                         compute_stress="stress" in self.heads)
        return self.outputs(out, self.scale)

    def batch_from_atoms(self, atoms_list: list) -> Any:
        """MACE's batch of ``atoms_list``, built as the calculator (or MACE's loader) builds it."""
        from mace import data as mace_data
        from mace.tools import AtomicNumberTable, torch_geometric

        model = self.model
        z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
        heads = list(getattr(model, "heads", None) or ["Default"])
        head = getattr(self.calculator, "head", None) or heads[0]
        dtype = next(model.parameters()).dtype
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # MACE builds its tensors in the default dtype
        try:
            graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a, head_name=head), z_table=z_table,
                                                       cutoff=float(model.r_max), heads=heads) for a in atoms_list]
        finally:
            torch.set_default_dtype(default)
        loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)
        return next(iter(loader)).to(next(model.parameters()).device)


def _keys(batch) -> list:
    keys = getattr(batch, "keys", None)
    keys = keys() if callable(keys) else keys
    return list(keys) if keys is not None else []


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, **options) -> AdaptedMACE:
    """Adapt a MACE model, or a ``MACECalculator`` (its first model; a committee's
    other members are not measured)."""
    no_options(FAMILY, options)
    calculator = None
    if hasattr(obj, "models") and hasattr(obj, "get_property"):  # MACECalculator
        calculator, obj = obj, obj.models[0]
    if not isinstance(obj, torch.nn.Module):
        raise ValueError(f"fe.adapt: expected a MACE model (torch.nn.Module) or MACECalculator, got {type(obj).__name__}")
    return AdaptedMACE(obj, choose_heads(FAMILY, heads, stress), calculator)
