"""SchNetPack: ``fe.adapt(model)`` or ``fe.adapt(SpkCalculator(...))``.

Tested with schnetpack 2.1.1. The model is a ``schnetpack.model.AtomisticModel``, e.g.
``spk.model.NeuralNetworkPotential`` with a PaiNN or SchNet representation, an
``Atomwise`` energy and a ``Forces`` output module (with ``calc_stress=True`` and
``spk.atomistic.Strain()`` among its input modules for the stress).

The batch is a dict of tensors as SchNetPack's own pipeline yields it: an
``ASEAtomsData`` (or an ``AtomsDataModule``'s dataset) with its transforms (a neighbour
list such as ``ASENeighborList``, ``CastTo32``/``CastTo64``), collated by ``AtomsLoader``
(``_atoms_collate_fn``), or the ``AtomsConverter`` of ``SpkCalculator``. The keys read
are those the standard modules read: ``_positions``, ``_cell`` ``(B, 3, 3)`` (rows are
lattice vectors), ``_offsets`` (the Cartesian periodic shift of each edge, so that the
edge vector is ``R[j] - R[i] + offset``), the edge's two 1-D node indices ``_idx_i``
(its centre atom, the first) and ``_idx_j``, ``_idx_m`` (the graph of each atom),
``_atomic_numbers`` and ``_n_atoms``. Other keys (``_idx``, ``_pbc``, the local
indices, labels) are not handed to the model.

The model is called as SchNetPack's task and calculator call it, ``model(inputs)`` on a
fresh dict (its input modules replace entries in place), with its post-processors as the
model has them switched (``do_postprocessing``); forces (and stress) come from autograd
inside it (``Forces``). Heads: the model's outputs ``energy``, ``forces`` and ``stress``
``(B, 3, 3)``, which already has ASE's sign (``(1/V) dE/d strain``; the calculator hands
it to ASE unchanged), under the keys the model was built with (options ``energy_key``,
``force_key``, ``stress_key``, SpkCalculator's names). Labels: the batch's properties of
those same keys, in the dataset's units. An adapted calculator uses its keys, converts
units to eV and Angstrom as the calculator does, and builds batches with its converter.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .common import HEAD_REPS, MLIPAdapted, check_cells, choose_heads, no_options

__all__ = ["AdaptedSchNetPack", "adapt"]

FAMILY = "schnetpack"
INPUTS = {"_positions": "position", "_cell": "cell", "_offsets": "vector@edge", "_atomic_numbers": "scalar@node",
          "_n_atoms": "scalar@graph", "_idx_m": "batch", "_idx_i": "index", "_idx_j": "index"}
# the model's output keys SchNetPack uses by default (schnetpack.properties), per head
DEFAULT_KEYS = {"energy": "energy", "forces": "forces", "stress": "stress"}
KEY_OPTIONS = {"energy": "energy_key", "forces": "force_key", "stress": "stress_key"}  # and SpkCalculator's


class AdaptedSchNetPack(MLIPAdapted):
    """A SchNetPack ``AtomisticModel`` (see module docs)."""

    family = FAMILY

    def __init__(self, model, heads: tuple, keys: dict, calculator=None):
        super().__init__(model, INPUTS, heads)
        self.output_keys = dict(keys)
        self.label_keys = dict(keys)  # a dataset's property names are the model's output keys
        self.calculator = calculator
        self.scale = {}
        if calculator is not None:
            units = calculator.property_units  # ASE name -> factor to eV and Angstrom
            self.scale = {h: float(units[h]) for h in HEAD_REPS}

    def prepare(self, batch: Any) -> dict:
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a SchNetPack batch (a dict of tensors, as AtomsLoader and AtomsConverter "
                             f"yield it), got {type(batch).__name__}")
        missing = [k for k in INPUTS if k not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing}: build it with a neighbour-list transform (e.g. "
                             "spk.transform.ASENeighborList) and collate it with spk.data.AtomsLoader")
        data = {k: batch[k] for k in INPUTS}
        if "stress" in self.heads:
            check_cells(data["_cell"])
        return data

    def forward(self, inputs: dict) -> dict:
        data = dict(inputs)
        # the model sets _positions.requires_grad_() in place: hand it its own tensor (the
        # same values) so that the caller's batch is left as it was
        pos = data["_positions"]
        data["_positions"] = pos if pos.requires_grad else pos.detach()
        return self.outputs(self.model(data), self.scale)

    def batch_from_atoms(self, atoms_list: list) -> dict:
        """SchNetPack's batch of ``atoms_list``: the calculator's ``AtomsConverter``, or for
        a model one with an ``ASENeighborList`` at its representation's cutoff."""
        from schnetpack.interfaces import AtomsConverter
        from schnetpack.transform import ASENeighborList

        converter = getattr(self.calculator, "converter", None)
        if converter is None:
            cutoff = getattr(getattr(self.model, "representation", None), "cutoff", None)
            if cutoff is None:
                raise ValueError("the SchNetPack model's representation has no cutoff to build neighbour lists with: "
                                 "adapt an SpkCalculator (its converter builds the batches)")
            parameter = next(self.model.parameters())
            converter = AtomsConverter(neighbor_list=ASENeighborList(cutoff=float(cutoff)), device=parameter.device,
                                       dtype=parameter.dtype)
        return converter(list(atoms_list))


def output_keys(given: dict) -> dict:
    """Head -> the model's output key: the names ``given`` (None: SchNetPack's default)."""
    for head, key in given.items():
        if key is not None and not isinstance(key, str):
            raise ValueError(f"{KEY_OPTIONS[head]} must be a str (a key of the model's outputs), got {key!r}")
    return {head: given.get(head) or default for head, default in DEFAULT_KEYS.items()}


def adapt(obj, *, stress: bool = False, heads: Optional[Sequence[str]] = None, energy_key: Optional[str] = None,
          force_key: Optional[str] = None, stress_key: Optional[str] = None, **options) -> AdaptedSchNetPack:
    """Adapt a SchNetPack ``AtomisticModel``, or an ``SpkCalculator`` (its model, keys and
    units). ``energy_key``, ``force_key``, ``stress_key``: the model's output keys, if not
    SchNetPack's defaults ``energy``, ``forces``, ``stress``."""
    from schnetpack.model import AtomisticModel

    no_options(FAMILY, options)
    given = {"energy": energy_key, "forces": force_key, "stress": stress_key}
    calculator = None
    if hasattr(obj, "converter") and hasattr(obj, "property_map"):  # SpkCalculator
        if any(key is not None for key in given.values()):
            raise ValueError(f"fe.adapt: an SpkCalculator names its model's keys itself ({obj.property_map}); leave "
                             f"{', '.join(KEY_OPTIONS.values())} out")
        calculator, obj = obj, obj.model
        given = {"energy": calculator.energy_key, "forces": calculator.force_key, "stress": calculator.stress_key}
    if not isinstance(obj, AtomisticModel):
        raise ValueError(f"fe.adapt: expected a SchNetPack model (schnetpack.model.AtomisticModel, e.g. "
                         f"NeuralNetworkPotential) or an SpkCalculator, got {type(obj).__name__}")
    keys = output_keys(given)
    outputs = list(obj.model_outputs or ())
    if (stress or "stress" in (heads or ())) and keys["stress"] not in outputs:
        raise ValueError(f"the stress head was asked for, but the SchNetPack model does not output "
                         f"{keys['stress']!r} (its outputs: {outputs}): build it with "
                         "spk.atomistic.Forces(calc_stress=True) and spk.atomistic.Strain() first among its "
                         "input_modules, or give SpkCalculator a stress_key")
    available = tuple(head for head, key in keys.items() if key in outputs)
    return AdaptedSchNetPack(obj, choose_heads(FAMILY, heads, stress, available), keys, calculator)
