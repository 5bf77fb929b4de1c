"""SevenNet: ``fe.adapt(model)`` or ``fe.adapt(SevenNetCalculator(...))``.

Tested with sevenn 0.13.0. The model is a ``sevenn.nn.sequential.AtomGraphSequential``,
what ``sevenn.model_build.build_E3_equivariant_model(config)`` and a checkpoint's
``build_model()`` return.

The batch is what SevenNet's own pipeline yields: ``AtomGraphData`` graphs (a
torch_geometric ``Data``) from ``sevenn.train.dataload.graph_build`` /
``atoms_to_graph`` (training) or ``unlabeled_atoms_to_graph`` (the calculator),
collated by torch_geometric's ``DataLoader`` into a ``Batch``. The keys read are those
the model reads: ``edge_vec`` (the Cartesian edge vector ``pos[j] - pos[i] + shift``,
already periodic: the model takes forces and stress from its gradient, not from
``pos``), ``pos`` (only to rotate about each graph's centroid), ``edge_index``,
``batch``, ``x`` and ``atomic_numbers`` (the model maps the latter to type indices),
``num_atoms`` and ``cell_volume``; for a multi-fidelity model (one with a ``modal_map``)
also ``data_modality``, the fidelity name of each graph, which is carried as its index
in the map. SevenNet's pipeline makes float32 tensors whatever the model's dtype;
prepare casts the floating ones to the model's dtype.

The model is called as SevenNet's trainer calls it, ``model(AtomGraphData(...))`` on a
fresh data object (the model writes its results into it and clamps ``cell_volume`` in
place), in batch mode (a model taken from a ``SevenNetCalculator`` is in single-graph
mode: it is switched for the call and back). Forces and stress come from autograd inside
it (``ForceStressOutputFromEdge``). Heads: ``inferred_total_energy``,
``inferred_force`` and ``inferred_stress``, the latter Voigt ``(xx, yy, zz, xy, yz, zx)``
with the opposite sign of ASE's (the calculator negates and reorders it), returned as
``(B, 3, 3)`` in ASE's sign. Units are eV and Angstrom, as the calculator hands them to
ASE. Labels: the batch's ``total_energy``, ``force_of_atoms`` and ``stress`` (SevenNet
stores ``-`` ASE's stress in its Voigt order, converted likewise).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch

from ..reps import Voigt
from .common import MLIPAdapted, choose_heads, no_options

__all__ = ["AdaptedSevenNet", "adapt"]

FAMILY = "sevenn"
INPUTS = {"pos": "position", "edge_vec": "vector@edge", "x": "scalar@node", "atomic_numbers": "scalar@node",
          "num_atoms": "scalar@graph", "cell_volume": "scalar@graph", "batch": "batch", "edge_index": "index"}
MODALITY = "data_modality"  # sevenn._keys.DATA_MODALITY: a name per graph, or one for the graph
MODAL_INDEX = "modal_index"  # the adapter's own input: each graph's index in the model's modal_map
# SevenNet's Voigt order (sevenn._keys: "[xx, yy, zz, xy, yz, zx]"), for predictions and labels
SEVENN_VOIGT = Voigt(("xx", "yy", "zz", "xy", "yz", "zx"))


class AdaptedSevenNet(MLIPAdapted):
    """A SevenNet ``AtomGraphSequential`` (see module docs)."""

    family = FAMILY
    label_keys = {"energy": "total_energy", "forces": "force_of_atoms", "stress": "stress"}
    output_keys = {"energy": "inferred_total_energy", "forces": "inferred_force", "stress": "inferred_stress"}

    def __init__(self, model, heads: tuple, calculator=None):
        self.modal_names = modal_names(model)
        inputs = dict(INPUTS, **({MODAL_INDEX: "scalar@graph"} if self.modal_names else {}))
        super().__init__(model, inputs, heads)
        self.calculator = calculator

    def prepare(self, batch: Any) -> dict:
        missing = [k for k in INPUTS if k not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing}: build it with SevenNet's pipeline (graph_build or "
                             "atoms_to_graph, AtomGraphData, torch_geometric's DataLoader)")
        dtype = next(self.model.parameters()).dtype  # SevenNet's pipeline builds float32 (dtype_correct)
        data = {}
        for k in INPUTS:
            value = batch[k]
            data[k] = value.to(dtype) if value.is_floating_point() else value
        if self.modal_names:
            data[MODAL_INDEX] = batch[MODAL_INDEX] if MODAL_INDEX in batch else self.modal_index(batch)
        if "stress" in self.heads:
            check_volumes(data["cell_volume"])
        return data

    def modal_index(self, batch: Any) -> torch.Tensor:
        """Each graph's index in the model's ``modal_map``, from the batch's fidelity names."""
        names = batch[MODALITY] if MODALITY in batch else None
        names = [names] if isinstance(names, str) else names
        graphs = batch["num_atoms"].shape[0]
        known = isinstance(names, (list, tuple)) and all(n in self.modal_names for n in names)
        if not known or len(names) != graphs:
            raise ValueError(f"the SevenNet model is multi-fidelity (modal_map {self.modal_names}): the batch needs "
                             f"{MODALITY!r}, one of those names for each of its {graphs} graphs, got {names!r}")
        return torch.tensor([self.modal_names[n] for n in names], device=batch["num_atoms"].device)

    def forward(self, inputs: dict) -> dict:
        from sevenn.atom_graph_data import AtomGraphData

        data = {k: v for k, v in inputs.items() if k != MODAL_INDEX}
        # the model sets edge_vec.requires_grad_() and clamps cell_volume in place: hand it
        # its own tensors (the same values) so that the caller's batch is left as it was
        edge_vec = data["edge_vec"]
        data["edge_vec"] = edge_vec if edge_vec.requires_grad else edge_vec.detach().requires_grad_()
        data["cell_volume"] = data["cell_volume"].clone()
        if self.modal_names:
            by_index = {i: n for n, i in self.modal_names.items()}
            data[MODALITY] = [by_index[i] for i in inputs[MODAL_INDEX].tolist()]
        with batch_mode(self.model):
            out = self.model(AtomGraphData(**data))
        heads = self.outputs(out)
        if "stress" in heads:
            heads["stress"] = -SEVENN_VOIGT.to_matrix(heads["stress"])  # to ASE's sign, (B, 3, 3)
        return heads

    def label(self, head: str, value: torch.Tensor, batch: Any) -> torch.Tensor:
        if head == "stress":  # SevenNet stores -(ASE's stress), in its Voigt order
            return -SEVENN_VOIGT.to_matrix(value.reshape(-1, 6))
        return super().label(head, value, batch)

    def batch_from_atoms(self, atoms_list: list) -> Any:
        """SevenNet's batch of ``atoms_list``, each graph built as ``SevenNetCalculator``
        builds it (``unlabeled_atoms_to_graph``, ``AtomGraphData.from_numpy_dict``, the
        calculator's fidelity), collated by torch_geometric's DataLoader."""
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.loader import DataLoader

        cutoff = float(self.calculator.cutoff if self.calculator is not None else self.model.cutoff)
        modal = getattr(self.calculator, "modal", None)
        graphs = []
        for atoms in atoms_list:
            graph = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, cutoff, with_shift=False))
            if modal:
                graph[MODALITY] = modal
            graphs.append(graph)
        batch = next(iter(DataLoader(graphs, batch_size=len(graphs), shuffle=False)))
        return batch.to(next(self.model.parameters()).device)


def modal_names(model) -> dict:
    """``{fidelity name: index}`` of a multi-fidelity model that maps names itself, else {}."""
    if not getattr(model, "eval_modal_map", False):
        return {}
    return dict(getattr(model, "modal_map", None) or {})


@contextmanager
def batch_mode(model):
    """``model`` in SevenNet's batch mode for the block (SevenNetCalculator leaves it in
    single-graph mode, which sums over every node as one graph)."""
    was = bool(model.is_batch_data)
    if not was:
        model.set_is_batch_data(True)
    try:
        yield model
    finally:
        if not was:
            model.set_is_batch_data(False)


def check_volumes(volume: torch.Tensor) -> None:
    """Raise unless every graph has a cell of non-zero volume (SevenNet's stress of a
    molecule divides by a clamped 1e-3)."""
    flat = volume <= 0
    if bool(flat.any()):
        raise ValueError(f"stress=True needs a periodic cell for every structure, but graphs "
                         f"{flat.nonzero().flatten().tolist()} of the batch have cell_volume 0 (molecules): adapt "
                         "without the stress head for them")


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, **options) -> AdaptedSevenNet:
    """Adapt a SevenNet ``AtomGraphSequential``, or a ``SevenNetCalculator`` built on one."""
    from sevenn.nn.sequential import AtomGraphSequential

    no_options(FAMILY, options)
    calculator = None
    if hasattr(obj, "output_to_results") and hasattr(obj, "get_property"):  # SevenNetCalculator
        calculator, obj = obj, obj.model
    if not isinstance(obj, AtomGraphSequential):
        raise ValueError(f"fe.adapt: expected a SevenNet model (AtomGraphSequential, what build_E3_equivariant_model "
                         f"and a checkpoint's build_model return) or a SevenNetCalculator, got {type(obj).__name__} "
                         "(for SevenNetD3Calculator, adapt its SevenNet part: the D3 term is not a torch model)")
    return AdaptedSevenNet(obj, choose_heads(FAMILY, heads, stress), calculator)
