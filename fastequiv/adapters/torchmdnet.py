"""TorchMD-Net: ``fe.adapt(model)`` or ``fe.adapt(TMDNETCalculator(...))``.

Tested with torchmd-net 3.1.0. The model is a ``torchmdnet.models.model.TorchMD_Net``
(TensorNet, the equivariant transformer and the other representations, as
``create_model`` and ``load_model`` build them) or an ``Ensemble`` of them.

The batch is a ``torch_geometric`` batch as TorchMD-Net's own pipeline yields it: one of
its datasets (``Custom``, ``HDF5``, the memory-mapped ones) collated by the
``torch_geometric.loader.DataLoader`` of its ``DataModule``, or a dict with the same keys.
The keys read are those its trainer hands the model: ``z`` (atomic numbers), ``pos``,
``batch``, and with the options ``charge=True`` / ``spin=True`` (the trainer's ``--charge``
/ ``--spin``) the per-molecule ``q`` / ``s``. Labels: ``y`` ``(B, 1)`` and ``neg_dy``.

Periodic batches are refused. TorchMD-Net's neighbour list reads only the lower triangle
of ``box`` and wraps by minimum image: the box must be in its reduced form (``a`` along
x, ``b`` in the xy plane, ``a_x >= 2 b_x``, ..., every width at least twice the cutoff).
A rotated copy of a reduced box is not reduced, and the model then finds other
neighbours; no rotated copy of a periodic batch is a valid input, so its equivariance
cannot be measured. For the same reason a model built with ``box_vecs`` is refused.

The model is called as the trainer calls it, ``model(z, pos, batch=batch, q=q, s=s)``,
without ``extra_args`` (a prior that reads them, such as the Coulomb prior's partial
charges, is not supported), and returns ``(y (B, 1), neg_dy (N, 3))``: ``y`` is the energy head, as ``(B,)``; the
forces are ``neg_dy`` when the model was built with ``derivative=True`` (autograd inside
it), else ``-dE/dpos`` taken here by autograd, as ``TMDNETCalculator`` does (its model is
loaded with ``derivative=False``). There is no stress. Units are the model's (those of
its training data); the calculator converts none. An adapted calculator passes the
total charge ``atoms.info["charge"]`` as ``q``, as it does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..spec import read_field
from .common import MLIPAdapted, choose_heads, no_options

__all__ = ["AdaptedTorchMDNet", "adapt"]

FAMILY = "torchmdnet"
INPUTS = {"z": "scalar@node", "pos": "position", "batch": "batch"}
# the trainer's options that hand per-molecule inputs to the model
OPTIONAL_INPUTS = {"q": "scalar@graph", "s": "scalar@graph"}
PERIODIC = ("TorchMD-Net's neighbour list reads only the lower triangle of the box (a along x, b in the xy plane) "
            "and a rotated copy of such a box is not of that form, so the rotated copies of a periodic structure "
            "are no valid input to the model: measure molecules (batches without a box)")


class AdaptedTorchMDNet(MLIPAdapted):
    """A TorchMD-Net model (see module docs)."""

    family = FAMILY
    label_keys = {"energy": "y", "forces": "neg_dy"}

    def __init__(self, model, heads: tuple, charge: bool = False, spin: bool = False, calculator=None):
        per_molecule = [k for k, on in (("q", charge), ("s", spin)) if on]
        super().__init__(model, {**INPUTS, **{k: OPTIONAL_INPUTS[k] for k in per_molecule}}, heads)
        self.per_molecule = per_molecule
        self.calculator = calculator
        self.forces_inside = differentiates(model)

    def prepare(self, batch: Any) -> dict:
        if isinstance(read_field(batch, "box"), torch.Tensor):
            raise ValueError(f"the batch has a periodic box: {PERIODIC}")
        data = {}
        for key in self.spec.inputs:
            value = read_field(batch, key)
            if not isinstance(value, torch.Tensor):
                why = {"q": " (charge=True: the total charge of each molecule)",
                       "s": " (spin=True: the spin of each molecule)"}.get(key, "")
                raise ValueError(f"the batch has no tensor {key!r}{why}: a batch of TorchMD-Net's datasets, collated "
                                 f"by torch_geometric's DataLoader, has {list(INPUTS)}")
            data[key] = value
        return data

    def forward(self, inputs: dict) -> dict:
        pos = inputs["pos"]
        # the model calls pos.requires_grad_(): hand it a leaf of its own (the same values)
        # so that the caller's batch is left as it was
        pos = pos if pos.requires_grad else pos.detach().requires_grad_(True)
        # (y, neg_dy), or an Ensemble's (y, neg_dy, y_std, neg_dy_std) with return_std=True
        energy, neg_dy = self.model(inputs["z"], pos, inputs["batch"], q=inputs.get("q"), s=inputs.get("s"))[:2]
        out = {}
        if "energy" in self.heads:
            out["energy"] = energy.reshape(-1)
        if "forces" in self.heads:
            if not self.forces_inside:  # as TMDNETCalculator does: energy.backward()
                neg_dy = -torch.autograd.grad(energy.sum(), pos, create_graph=self.model.training)[0]
            out["forces"] = neg_dy
        return out

    def batch_from_atoms(self, atoms_list: list) -> Any:
        """TorchMD-Net's batch of ``atoms_list``: a ``Data(z, pos)`` per structure as its
        datasets build them (``q`` from ``atoms.info["charge"]`` as the calculator reads
        it), collated by torch_geometric's ``Batch.from_data_list``, its DataLoader's collate."""
        from torch_geometric.data import Batch, Data

        param = next(self.model.parameters())
        graphs = []
        for i, atoms in enumerate(atoms_list):
            if atoms.pbc.any():
                raise ValueError(f"atoms_list[{i}] is periodic: {PERIODIC}")
            extra = {}
            for key, info in (("q", "charge"), ("s", "spin")):
                if key in self.per_molecule:
                    if info not in atoms.info:
                        raise ValueError(f"atoms_list[{i}].info has no {info!r}: the model takes the {info} of each "
                                         f"molecule as {key!r} (TMDNETCalculator reads atoms.info['charge'])")
                    extra[key] = torch.tensor(float(atoms.info[info]), dtype=param.dtype)
            graphs.append(Data(z=torch.as_tensor(atoms.numbers, dtype=torch.long),
                               pos=torch.as_tensor(atoms.positions, dtype=param.dtype), **extra))
        return Batch.from_data_list(graphs).to(param.device)


def differentiates(model) -> bool:
    """Whether ``model`` returns forces (``derivative=True``; for an Ensemble, every member)."""
    members = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
    flags = {bool(getattr(m, "derivative", False)) for m in members}
    if len(flags) != 1:
        raise ValueError("the Ensemble mixes members built with derivative=True and derivative=False: its forces "
                         "would average some members' forces with empty tensors")
    return flags.pop()


def check_model(model) -> None:
    """Raise unless ``model`` is a TorchMD-Net model that fastequiv can call on rotated copies."""
    members = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
    if not members or not all(hasattr(m, "representation_model") and hasattr(m, "output_model") for m in members):
        raise ValueError(f"fe.adapt: expected a TorchMD-Net model (TorchMD_Net, as create_model and load_model build "
                         f"it, or an Ensemble of them) or a TMDNETCalculator, got {type(model).__name__}")
    if any(getattr(m, "use_periodic", False) for m in model.modules()):
        raise ValueError(f"the model was built with box_vecs (a periodic box it always applies): {PERIODIC}")


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, charge: Optional[bool] = None,
          spin: bool = False, **options) -> AdaptedTorchMDNet:
    """Adapt a TorchMD-Net model, or a ``TMDNETCalculator`` (its model).

    ``charge`` / ``spin``: hand the model the batch's per-molecule ``q`` / ``s``, as the
    trainer does with ``--charge`` / ``--spin``; default: off for a model, on (``q``) for
    the calculator, which always passes ``atoms.info["charge"]``."""
    no_options(FAMILY, options)
    calculator = None
    if hasattr(obj, "model") and hasattr(obj, "get_property"):  # TMDNETCalculator
        calculator, obj = obj, obj.model
    check_model(obj)
    if charge is None:
        charge = calculator is not None
    for name, value in (("charge", charge), ("spin", spin)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    chosen = choose_heads(FAMILY, heads, stress, available=("energy", "forces"))
    return AdaptedTorchMDNet(obj, chosen, charge=charge, spin=spin, calculator=calculator)
