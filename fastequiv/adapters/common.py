"""What every adapter shares: choosing the heads, and reading a batch's labels."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..adapted import Adapted
from ..reps import describe
from ..spec import Spec, read_field

__all__ = ["HEAD_REPS", "MLIPAdapted", "check_cells", "choose_heads", "no_options", "unit_scale"]

# the heads every MLIP adapter returns, as fastequiv reduces them: energy per graph,
# forces per atom, stress per graph as a 3 x 3 tensor with ASE's sign (-virial / volume)
HEAD_REPS = {"energy": "scalar", "forces": "vector", "stress": "rank2"}


def choose_heads(family: str, heads: Optional[Sequence[str]], stress: bool, available=("energy", "forces", "stress"),
                 ) -> tuple:
    """The heads an adapter computes: ``heads`` if given, else energy and forces (and
    stress with ``stress=True``); checked against what the codebase can compute."""
    if not isinstance(stress, bool):
        raise ValueError(f"stress must be a bool, got {stress!r}")
    if heads is None:
        chosen = ("energy", "forces") + (("stress",) if stress else ())
    else:
        if isinstance(heads, str):
            heads = (heads,)
        chosen = tuple(heads)
        if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(HEAD_REPS):
            raise ValueError(f"heads must be distinct names among {tuple(HEAD_REPS)}, got {heads!r}")
        if stress and "stress" not in chosen:
            raise ValueError(f"stress=True but heads={heads!r} leaves the stress out")
    missing = [h for h in chosen if h not in available]
    if missing:
        raise ValueError(f"the {family} model cannot compute {missing} (it computes {list(available)})")
    return chosen


def unit_scale(calculator) -> dict:
    """Per head, the factor an ASE calculator of MACE or nequip applies to its model's
    outputs (its ``energy_units_to_eV`` and ``length_units_to_A``); ``{}`` without one."""
    if calculator is None:
        return {}
    e, x = float(calculator.energy_units_to_eV), float(calculator.length_units_to_A)
    return {"energy": e, "forces": e / x, "stress": e / x ** 3}


def check_cells(cell: torch.Tensor) -> None:
    """Raise unless every graph has a cell of non-zero volume (the stress of a structure
    without one is NaN, or a division by zero). One host read: only with a stress head."""
    flat = torch.linalg.det(cell.reshape(-1, 3, 3)) == 0
    if bool(flat.any()):
        raise ValueError(f"stress=True needs a periodic cell for every structure, but graphs "
                         f"{flat.nonzero().flatten().tolist()} of the batch have a cell of zero volume (molecules): "
                         "adapt without the stress head for them")


def no_options(family: str, options: dict) -> None:
    if options:
        raise ValueError(f"fe.adapt got options {sorted(options)} that the {family} adapter does not take")


class MLIPAdapted(Adapted):
    """An interatomic potential: heads among energy, forces and stress (see :data:`HEAD_REPS`).

    Subclasses set ``family``, ``label_keys`` (head -> the batch's key for its label) and
    implement ``prepare``, ``forward`` and, for the ASE route, ``batch_from_atoms``."""

    label_keys: dict = {}

    def __init__(self, model, inputs: dict, heads: tuple, *, call: str = "dict", model_grad: bool = True):
        spec = Spec(inputs=inputs, output={h: HEAD_REPS[h] for h in heads}, call=call, model_grad=model_grad)
        super().__init__(model, spec)
        self.heads = heads

    def targets(self, batch: Any) -> dict:
        """The labels ``batch`` carries for each head, stress as ``(B, 3, 3)``."""
        out = {}
        for head in self.heads:
            key = self.label_keys.get(head, head)
            value = read_field(batch, key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"the batch has no {head} label (looked for {key!r}, found {describe(value)}): "
                                 "pass target= yourself")
            out[head] = self.label(head, value, batch)
        return out

    def label(self, head: str, value: torch.Tensor, batch: Any) -> torch.Tensor:
        """A label as the head is reduced (override to convert units, shapes or signs)."""
        if head == "energy":
            return value.reshape(-1)
        if head == "stress":
            return value.reshape(-1, 3, 3)
        return value

    def batch_from_atoms(self, atoms_list: list) -> Any:
        """A batch of ``atoms_list`` (``ase.Atoms``) built by the codebase's own data pipeline."""
        raise NotImplementedError(f"the {self.family} adapter cannot build a batch from ase.Atoms")

    def outputs(self, out: Any, scale: Optional[dict] = None) -> dict:
        """The heads read from what the codebase's model returned, with ``scale`` per head."""
        values = {h: read_field(out, k) for h, k in self.output_keys.items() if h in self.heads}
        if scale:
            values = {h: v * scale[h] if h in scale else v for h, v in values.items()}
        return values

    output_keys: dict = {"energy": "energy", "forces": "forces", "stress": "stress"}
