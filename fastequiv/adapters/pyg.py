"""torch-geometric: its energy models (SchNet, DimeNet, DimeNet++, ViSNet) and any model
that takes a PyG ``Batch``.

Tested with torch-geometric 2.8.1. Two kinds of model:

* PyG's own energy models, called ``model(z, pos, batch)``: recognised by class. The
  adapter reads ``z``, ``pos`` and ``batch`` from a ``Data``/``Batch`` (as PyG's
  ``DataLoader`` yields them), returns the energy ``(B,)`` and, by autograd, the forces
  ``-dE/dpos`` (ViSNet computes its own with ``derivative=True``). Labels: ``energy`` (or
  PyG's ``y``) and ``force``/``forces`` (PyG's MD17 names them ``energy`` and ``force``);
  ``labels=`` renames them.
* Any other model whose forward takes one PyG ``Batch``: ``fe.adapt(model, family="pyg",
  output={"energy": "scalar", "forces": "vector"}, inputs={"x": "scalar"})``. The batch
  is handed over as it is, K stacked copies in one ``Batch`` (``pos`` turned about each
  graph's centroid, ``batch``, ``edge_index`` and ``ptr`` offset, ``num_graphs`` K B);
  ``inputs`` gives the rep of every other attribute the model reads (a tensor attribute
  with no rep raises, listing them all). Heads are read by key or attribute from what the
  model returns.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..adapted import Adapted
from ..reps import describe
from ..spec import Spec, read_field
from .common import HEAD_REPS, MLIPAdapted, choose_heads, no_options

__all__ = ["AdaptedPyGBatchModel", "AdaptedPyGEnergy", "adapt"]

FAMILY = "pyg"
ENERGY_MODELS = ("SchNet", "DimeNet", "DimeNetPlusPlus", "ViSNet")
INPUTS = {"z": "scalar@node", "pos": "position", "batch": "batch"}


class AdaptedPyGEnergy(MLIPAdapted):
    """One of PyG's energy models (see module docs)."""

    family = FAMILY

    def __init__(self, model, heads: tuple, labels: dict):
        super().__init__(model, INPUTS, heads)
        self.label_names = labels

    def prepare(self, batch: Any) -> dict:
        if isinstance(batch, dict) and set(batch) == set(INPUTS):
            return batch
        z, pos = read_field(batch, "z"), read_field(batch, "pos")
        if not isinstance(z, torch.Tensor) or not isinstance(pos, torch.Tensor):
            raise ValueError(f"a PyG energy model reads z and pos from its batch (a torch_geometric Data or Batch); "
                             f"got {describe(batch)} with z {describe(z)} and pos {describe(pos)}")
        index = read_field(batch, "batch")
        if not isinstance(index, torch.Tensor):  # a single Data: one graph
            index = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
        return {"z": z, "pos": pos, "batch": index}

    def forward(self, inputs: dict) -> dict:
        z, pos, batch = inputs["z"], inputs["pos"], inputs["batch"]
        if "forces" not in self.heads:
            out = self.model(z, pos, batch)
            return {"energy": (out[0] if isinstance(out, tuple) else out).reshape(-1)}
        if not pos.requires_grad:
            pos = pos.requires_grad_(True)  # a stacked copy: a fresh tensor, the caller's pos is untouched
        out = self.model(z, pos, batch)
        if isinstance(out, tuple) and out[1] is not None:  # ViSNet(derivative=True): its own forces
            energy, forces = out
        else:
            energy = out[0] if isinstance(out, tuple) else out
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
            forces = -grad
        return {h: v for h, v in (("energy", energy.reshape(-1)), ("forces", forces)) if h in self.heads}

    def targets(self, batch: Any) -> dict:
        out = {}
        for head in self.heads:
            names = (self.label_names[head],) if head in self.label_names else \
                {"energy": ("energy", "y"), "forces": ("force", "forces")}[head]
            value = next((v for v in (read_field(batch, n) for n in names) if isinstance(v, torch.Tensor)), None)
            if value is None:
                raise ValueError(f"the batch has no {head} label (looked for {list(names)}): pass labels= to "
                                 "fe.adapt, or target= yourself")
            out[head] = value.reshape(-1) if head == "energy" else value
        return out


class AdaptedPyGBatchModel(Adapted):
    """A model whose forward takes one PyG ``Batch`` (see module docs)."""

    family = FAMILY

    def __init__(self, model, inputs: dict, output: dict):
        roles = {"pos": "position", "batch": "batch", "edge_index": "index", "ptr": "ptr"}
        clash = sorted(set(inputs) & set(roles))
        if clash:
            raise ValueError(f"inputs= gives reps for {clash}, which the PyG adapter declares itself "
                             f"({ {k: roles[k] for k in clash} })")
        super().__init__(model, Spec(inputs={**roles, **inputs}, output=output))

    def prepare(self, batch: Any) -> Any:
        missing = [k for k in self.spec.inputs if not hasattr(batch, k) or getattr(batch, k) is None]
        if missing:
            raise ValueError(f"the batch ({type(batch).__name__}) lacks the attributes {missing} the adapter reads; "
                             "a PyG Batch from torch_geometric.loader.DataLoader has batch, ptr and edge_index")
        return batch

    def forward(self, batch: Any) -> dict:
        out = self.model(batch)
        return {h: read_field(out, h) for h in self.spec.output}


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, labels: Optional[dict] = None,
          inputs: Optional[dict] = None, output: Optional[dict] = None, **options) -> Adapted:
    """Adapt a PyG energy model (``heads``, ``labels``), or any model that takes a PyG
    ``Batch`` (``output`` and ``inputs`` required, see module docs)."""
    no_options(FAMILY, options)
    if type(obj).__name__ in ENERGY_MODELS and type(obj).__module__.startswith("torch_geometric"):
        if inputs is not None or output is not None:
            raise ValueError(f"inputs=/output= describe a model that takes a Batch; {type(obj).__name__} is called "
                             "model(z, pos, batch) and the adapter knows its heads (choose them with heads=)")
        if stress:
            raise ValueError(f"stress=True: {type(obj).__name__} has no periodic cell, so no stress")
        labels = dict(labels or {})
        unknown = sorted(set(labels) - set(HEAD_REPS))
        if unknown:
            raise ValueError(f"labels= maps heads {tuple(HEAD_REPS)} to batch attributes, got heads {unknown}")
        return AdaptedPyGEnergy(obj, choose_heads(FAMILY, heads, False, ("energy", "forces")), labels)
    if output is None:
        raise ValueError(f"fe.adapt(model, family='pyg') of a {type(obj).__name__} needs output= (the rep of each "
                         "head the model returns, e.g. {'energy': 'scalar', 'forces': 'vector'}) and inputs= (the "
                         "rep of every batch attribute it reads besides pos, batch, edge_index and ptr)")
    if heads is not None or stress or labels is not None:
        raise ValueError("heads=, stress= and labels= apply to PyG's energy models; for a Batch model, output= "
                         "names its heads")
    return AdaptedPyGBatchModel(obj, dict(inputs or {}), output)
