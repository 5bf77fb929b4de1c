"""Orb (orb-models): ``fe.adapt(model)`` or ``fe.adapt(ORBCalculator(...))``.

Tested with orb-models 0.5.5. The model is a ``DirectForcefieldRegressor`` or a
``ConservativeForcefieldRegressor`` (``orb_models.forcefield``), as the ``pretrained``
architecture functions build them.

The batch is an ``AtomGraphs`` as Orb's own pipeline yields it: ``ase_atoms_to_atom_graphs``
(what ``AseSqliteDataset`` and ``ORBCalculator`` call) and ``base.batch_graphs`` (the
collate function of its loaders). The fields read are those the model reads:
``node_features`` ``positions``, ``atomic_numbers`` and ``atomic_numbers_embedding``;
``edge_features`` ``vectors`` (Cartesian, ``positions[receivers] - positions[senders] +
unit_shifts @ cell``) and ``unit_shifts`` (integer cell shifts, so invariant);
``system_features`` ``cell`` ``(B, 3, 3)`` (rows are lattice vectors; zero for a molecule)
and, for a model with a charge and spin conditioner, ``total_charge`` and ``total_spin``;
``senders`` and ``receivers`` (the edge's two 1-D node indices, the sender first), ``n_node``
and ``n_edge``; ``radius`` and ``max_num_neighbors`` are carried along. The graph of each
node, which fastequiv needs, is built from ``n_node``. Other fields (``pbc``, ``lattice``,
tags, fixed atoms, targets) are not handed to the model, which reads them only in its
loss. Extra node or edge features a model names (``node_feature_names`` other than
``feat``) are refused: how they rotate is unknown.

The model is called as ``ORBCalculator`` calls it, ``model.predict(graphs)``, on a new
``AtomGraphs`` holding the (stacked) tensors: its outputs are in eV and Angstrom, the
heads denormalised. A conservative model takes forces ``-dE/dpos`` and the stress
``(1/V) dE/d strain`` by autograd inside (``grad_forces``, ``grad_stress``); a direct one
predicts them (``forces``, ``stress``), which is not equivariant by construction. The
stress is Voigt ``(B, 6)`` in ASE's order ``(xx, yy, zz, yz, xz, xy)`` with ASE's sign
(the calculator hands it to ASE unchanged), turned into ``(B, 3, 3)`` here. Option
``conservative`` chooses the heads as the calculator's does: ``False`` measures a
conservative model's direct heads. Labels: the batch's ``system_targets`` (energy,
stress in Voigt) and ``node_targets`` (forces), under the names of the model's targets
(``energy``, ``forces``, ``stress``, or with a level of theory, e.g. ``forces-d3``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..reps import Voigt
from .common import MLIPAdapted, check_cells, choose_heads, no_options

__all__ = ["AdaptedOrb", "adapt"]

FAMILY = "orb"
INPUTS = {"positions": "position", "atomic_numbers": "scalar@node", "atomic_numbers_embedding": "scalar@node",
          "vectors": "vector@edge", "unit_shifts": "scalar@edge", "cell": "cell", "n_node": "scalar@graph",
          "n_edge": "scalar@graph", "max_num_neighbors": "scalar@graph", "senders": "index", "receivers": "index",
          "batch": "batch"}
# where each input lives in an AtomGraphs
NODE = ("positions", "atomic_numbers", "atomic_numbers_embedding")
EDGE = ("vectors", "unit_shifts")
SYSTEM = ("cell",)
CHARGE_SPIN = {"total_charge": "scalar@graph", "total_spin": "scalar@graph"}
STRESS = Voigt()  # ASE's order, Orb's too


class AdaptedOrb(MLIPAdapted):
    """An Orb forcefield regressor (see module docs)."""

    family = FAMILY

    def __init__(self, model, heads: tuple, keys: dict, labels: dict, conservative: bool, charge_spin: bool,
                 calculator=None):
        inputs = {**INPUTS, **(CHARGE_SPIN if charge_spin else {})}
        super().__init__(model, inputs, heads, model_grad=conservative)
        self.output_keys = keys
        self.label_keys = labels
        self.conservative = conservative
        self.system_keys = SYSTEM + (tuple(CHARGE_SPIN) if charge_spin else ())
        self.calculator = calculator

    def prepare(self, batch: Any) -> dict:
        if isinstance(batch, dict) and set(self.spec.inputs) | {"radius"} <= set(batch):
            return {k: batch[k] for k in (*self.spec.inputs, "radius")}  # prepared already
        if not all(hasattr(batch, f) for f in ("node_features", "edge_features", "system_features", "n_node")):
            raise ValueError(f"batch must be an Orb AtomGraphs (as ase_atoms_to_atom_graphs and batch_graphs build "
                             f"it), got {type(batch).__name__}")
        system = batch.system_features or {}
        missing = [k for k in self.system_keys if k not in system]
        if missing:
            raise ValueError(f"the batch's system_features lack {missing}: the model's conditioner reads the total "
                             "charge and spin (ase_atoms_to_atom_graphs takes them from atoms.info['charge'] and "
                             "atoms.info['spin'])")
        data = {k: batch.node_features[k] for k in NODE}
        data.update({k: batch.edge_features[k] for k in EDGE})
        data.update({k: system[k] for k in self.system_keys})
        n_node = batch.n_node
        data.update(senders=batch.senders, receivers=batch.receivers, n_node=n_node, n_edge=batch.n_edge,
                    max_num_neighbors=batch.max_num_neighbors, radius=batch.radius,
                    batch=torch.repeat_interleave(torch.arange(n_node.shape[0], device=n_node.device), n_node))
        if "stress" in self.heads:
            check_cells(data["cell"])
        return data

    def forward(self, inputs: dict) -> dict:
        from orb_models.forcefield.base import AtomGraphs

        pos = inputs["positions"]
        # a conservative model calls positions.requires_grad_(): hand it a tensor of its
        # own (the same values) so that the caller's batch is left as it was
        pos = pos if pos.requires_grad else pos.detach()
        # fresh dicts: a conservative model writes its edge vectors and strain into them
        graphs = AtomGraphs(
            senders=inputs["senders"], receivers=inputs["receivers"], n_node=inputs["n_node"],
            n_edge=inputs["n_edge"], node_features={"positions": pos, **{k: inputs[k] for k in NODE[1:]}},
            edge_features={k: inputs[k] for k in EDGE}, system_features={k: inputs[k] for k in self.system_keys},
            node_targets=None, edge_targets=None, system_targets=None, system_id=None, fix_atoms=None, tags=None,
            radius=inputs["radius"], max_num_neighbors=inputs["max_num_neighbors"])
        out = self.outputs(self.model.predict(graphs))
        if "stress" in out:
            out["stress"] = STRESS.to_matrix(out["stress"])
        return out

    def targets(self, batch: Any) -> dict:
        """The labels an ``AtomGraphs`` carries (``system_targets``, ``node_targets``), stress as ``(B, 3, 3)``."""
        out = {}
        for head in self.heads:
            where = "node_targets" if head == "forces" else "system_targets"
            found = getattr(batch, where, None) or {}
            key = self.label_keys[head]
            if not isinstance(found.get(key), torch.Tensor):
                raise ValueError(f"the batch has no {head} label (looked for {where}[{key!r}], found keys "
                                 f"{sorted(found)}): build it with a PropertyConfig that names {key!r}, or pass "
                                 "target= yourself")
            value = found[key]
            out[head] = STRESS.to_matrix(value.reshape(-1, 6)) if head == "stress" else self.label(head, value, batch)
        return out

    def batch_from_atoms(self, atoms_list: list) -> Any:
        """Orb's batch of ``atoms_list``: ``ase_atoms_to_atom_graphs`` with the calculator's
        settings (system config, neighbours, edge method) in the model's dtype, and
        ``batch_graphs``."""
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs
        from orb_models.forcefield.base import batch_graphs

        calc = self.calculator
        config = calc.system_config if calc is not None else self.model.system_config
        if config is None:
            raise ValueError("the Orb model has no system_config (radius, max_num_neighbors) to build graphs with: "
                             "build it with system_config=SystemConfig(...), or adapt an ORBCalculator given one")
        param = next(self.model.parameters())
        options = {}
        if calc is not None:
            options = dict(max_num_neighbors=calc.max_num_neighbors, edge_method=calc.edge_method,
                           half_supercell=calc.half_supercell)
        # ORBCalculator builds graphs in the default dtype, which Orb's set_torch_precision sets
        # to the model's: the model's dtype here, whatever the default
        graphs = [ase_atoms_to_atom_graphs(a, config, device=param.device, output_dtype=param.dtype,
                                           graph_construction_dtype=param.dtype, **options) for a in atoms_list]
        return batch_graphs(graphs)


def head_keys(model, conservative: bool) -> tuple[dict, dict]:
    """``(output keys, label keys)``: per head, the key of ``model.predict``'s output and
    of the batch's target, for the heads the model computes."""
    if conservative:
        keys = {"energy": model.energy_name, "forces": model.grad_forces_name, "stress": model.grad_stress_name}
        labels = {"energy": model.energy_name, "forces": model.forces_name, "stress": model.stress_name}
        if not model.has_stress:
            del keys["stress"], labels["stress"]
        return keys, labels
    if hasattr(model, "grad_forces_name"):  # a conservative model's direct heads, as ORBCalculator's
        names = {"energy": model.energy_name, "forces": model.forces_name, "stress": model.stress_name}
        keys = {h: n for h, n in names.items() if n is not None and (h == "energy" or n in model.extra_properties)}
    else:
        keys = {h: h for h in ("energy", "forces", "stress") if h in model.heads}
    labels = {h: model.heads[k].target.fullname if k in model.heads else k for h, k in keys.items()}
    return keys, labels


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, conservative: Optional[bool] = None,
          **options) -> AdaptedOrb:
    """Adapt an Orb forcefield regressor, or an ``ORBCalculator`` (its model, its
    ``conservative`` setting and graph settings).

    ``conservative``: measure the heads taken by autograd (a conservative model's default)
    or, with ``False``, the directly predicted ones (a direct model's only heads)."""
    from orb_models.forcefield.nn_util import ChargeSpinConditioner

    no_options(FAMILY, options)
    calculator = None
    if hasattr(obj, "model") and hasattr(obj, "get_property"):  # ORBCalculator
        calculator, obj = obj, obj.model
        conservative = calculator.conservative if conservative is None else conservative
    if not (isinstance(obj, torch.nn.Module) and hasattr(obj, "heads") and hasattr(obj, "predict")):
        raise ValueError(f"fe.adapt: expected an Orb DirectForcefieldRegressor or ConservativeForcefieldRegressor, or "
                         f"an ORBCalculator, got {type(obj).__name__}")
    is_conservative = hasattr(obj, "grad_forces_name")  # as ORBCalculator tells them apart
    if conservative is None:
        conservative = is_conservative
    if not isinstance(conservative, bool):
        raise ValueError(f"conservative must be a bool or None, got {conservative!r}")
    if conservative and not is_conservative:
        raise ValueError(f"conservative=True, but the model is a {type(obj).__name__}, which predicts forces directly "
                         "(a ConservativeForcefieldRegressor takes them by autograd)")
    gns = obj.model
    extra = [f"node_features[{k!r}]" for k in getattr(gns, "node_feature_names", []) if k != "feat"]
    extra += [f"edge_features[{k!r}]" for k in getattr(gns, "edge_feature_names", []) if k != "feat"]
    if extra:
        raise ValueError(f"the Orb model reads the extra features {extra}, whose rotation the adapter cannot know")
    keys, labels = head_keys(obj, conservative)
    chosen = choose_heads(FAMILY, heads, stress, available=tuple(keys))
    charge_spin = isinstance(getattr(gns, "conditioner", None), ChargeSpinConditioner)
    return AdaptedOrb(obj, chosen, keys, labels, conservative, charge_spin, calculator)
