"""The batched ASE route: many structures, K rotated copies each, one model call.

Used by :func:`fastequiv.ase.equivariance_error` and
:class:`fastequiv.ase.TwirledCalculator` when :func:`fastequiv.adapt` recognises the
calculator. The structures go through the codebase's own data pipeline once
(``Adapted.batch_from_atoms``: neighbour lists, cells, shifts as its calculator builds
them), and fastequiv stacks the rotated copies of that batch: a rotation leaves every
distance, hence every edge, as it was, so the copies are the structures the serial route
would build, up to float rounding. Positions turn about each structure's centroid; for a
periodic structure that differs from the serial route's turn about the origin by a
translation, which a periodic potential does not see.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.stress import voigt_6_to_full_3x3_stress

from .adapted import Adapted
from .adapters import adapt
from .estimators import Decomposition, pool
from .groups import SEED_MAX
from .twirl import Twirled, equivariance_error

__all__ = ["adapted_calculator", "decompose_batched", "twirled_results"]


def adapted_calculator(calc, heads: tuple, group: str) -> Adapted:
    """``fe.adapt(calc)`` with ``heads``, measured under ``group``."""
    model = adapt(calc, heads=heads)
    if group != model.spec.group:
        model.spec.group = group  # a fresh adapter: its spec is its own
    return model


def _targets(model: Adapted, atoms_list: list, targets: list, heads: list, batch) -> dict:
    """The per-structure target dicts as the heads' tensors, in the batch's atom order."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out = {}
    for head in heads:
        if head == "energy":
            v = np.array([float(t[head]) for t in targets])
        elif head == "forces":
            v = np.concatenate([np.asarray(t[head], dtype=np.float64).reshape(len(a), 3)
                                for t, a in zip(targets, atoms_list)])
        else:
            v = np.stack([np.asarray(t[head], dtype=np.float64) if np.shape(t[head]) == (3, 3)
                          else voigt_6_to_full_3x3_stress(np.asarray(t[head], dtype=np.float64)) for t in targets])
        out[head] = torch.as_tensor(v, dtype=dtype, device=device)
    return out


def decompose_batched(calc, atoms_list: list, targets: list, heads: list, weights: dict, *, samples: int | None,
                      group: str, seed: int, chunk_size: int | None, backend: str,
                      design: tuple | None = None) -> Decomposition:
    """The decomposition of ``calc`` on ``atoms_list`` by the batched route (see module docs);
    ``design``: ``(Design, replicates)`` instead of ``samples`` draws. Chunks are pooled
    sample by sample (:func:`fastequiv.estimators.pool`, which also pools a design's
    ``rotation_stderr``)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (structures per model call) or None, got {chunk_size!r}")
    model = adapted_calculator(calc, tuple(heads), group)
    size = chunk_size or len(atoms_list)
    parts = []
    for c, start in enumerate(range(0, len(atoms_list), size)):
        chunk = atoms_list[start:start + size]
        batch = model.batch_from_atoms(chunk)
        y = _targets(model, chunk, targets[start:start + size], heads, batch)
        how = {"samples": samples} if design is None else {"rotations": design[0], "replicates": design[1]}
        parts.append(equivariance_error(model, batch, y, seed=(seed + c) % SEED_MAX,
                                        loss_weights={h: weights[h] for h in heads}, backend=backend, **how))
    return parts[0] if len(parts) == 1 else pool(parts)


def twirled_results(model: Twirled, atoms, voigt: bool = True) -> dict:
    """The twirled model's energy, forces and stress (ASE's Voigt order) on one structure."""
    batch = model.model.batch_from_atoms([atoms])
    with torch.no_grad():
        out = model(batch)
    results = {}
    for head, value in out.items():
        v = value.detach().cpu().to(torch.float64).numpy()
        if head == "energy":
            results[head] = float(v.reshape(-1)[0])
        elif head == "forces":
            results[head] = v
        else:
            S = v.reshape(3, 3)
            results[head] = S.flat[[0, 4, 8, 5, 2, 1]].copy() if voigt else S
    return results
