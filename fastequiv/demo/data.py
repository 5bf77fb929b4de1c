"""The demo's data: Morse clusters with exact forces, or structures read from a file, split
into training, held-out and training-evaluation sets.

A set of structures is ``({"pos": (B, N, 3), "species": (B, N), "mask": (B, N)}, forces
(B, N, 3))``, padded to its largest structure (``mask`` marks the real atoms).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = ["SPECIES", "CUTOFF", "DATA_CUTOFF", "HELDOUT_SEED", "Structures", "morse_energy", "ForceTask", "take",
           "count", "load_structures", "Datasets", "datasets"]

SPECIES = 2
# Morse parameters per species pair (AA, AB, BB): well depth, width, equilibrium distance.
_DEPTH = torch.tensor([[1.0, 0.8], [0.8, 0.6]])
_WIDTH = torch.tensor([[1.0, 0.9], [0.9, 0.8]])
_R0 = torch.tensor([[1.0, 1.15], [1.15, 1.3]])
CUTOFF = 3.0
# the radial features of the model on --data structures (Angstrom)
DATA_CUTOFF = 6.0
# the held-out set does not depend on --seed
HELDOUT_SEED = 10_000


def morse_energy(pos: torch.Tensor, species: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Energy ``(B,)`` of clusters ``pos`` ``(B, N, 3)`` under a Morse pair potential.

    ``V(r) = D ((1 - exp(-a (r - r0)))^2 - 1) fc(r)`` with species-pair parameters and the
    smooth cutoff ``fc(r) = (1 + cos(pi r / rc)) / 2`` for ``r < rc`` (0 beyond), so energy
    and forces are continuous. Padded atoms (``mask`` False) take no part.
    """
    N = pos.shape[1]
    rel = pos[:, :, None] - pos[:, None, :]
    eye = torch.eye(N, dtype=torch.bool, device=pos.device)
    pair = mask[:, :, None] & mask[:, None, :] & ~eye
    # sqrt has an infinite derivative at 0: keep excluded pairs (diagonal, padding) away from it
    r = torch.sqrt((rel ** 2).sum(-1) + (~pair).to(pos.dtype))
    si, sj = species[:, :, None], species[:, None, :]
    D, a, r0 = (p.to(pos)[si, sj] for p in (_DEPTH, _WIDTH, _R0))
    fc = torch.where(r < CUTOFF, 0.5 * (1 + torch.cos(math.pi * r / CUTOFF)), torch.zeros_like(r))
    v = D * ((1 - torch.exp(-a * (r - r0))) ** 2 - 1) * fc
    return 0.5 * (v * pair).sum(dim=(1, 2))


class ForceTask:
    """Random clusters of ``atoms`` (a range) atoms and their exact Morse forces.

    Positions are Gaussian with a spread that keeps the density of a cluster about
    constant; forces are ``-dE/dpos`` by autograd, divided by one fixed scale so that their
    mean square is about 1 (losses are then in units of the force variance).
    """

    def __init__(self, atoms: tuple[int, int] = (5, 8), device="cpu", dtype=torch.float32):
        self.atoms, self.device, self.dtype = atoms, torch.device(device), dtype
        g = torch.Generator().manual_seed(12345)
        _, _, mask, f = self._draw(1024, g, scale=1.0)
        self.scale = float((f.pow(2).sum(-1).sum() / mask.sum() / 3).sqrt())

    def _draw(self, B: int, generator: torch.Generator, scale: float):
        lo, hi = self.atoms
        n = torch.randint(lo, hi + 1, (B,), generator=generator)
        mask = torch.arange(hi)[None, :] < n[:, None]
        species = torch.randint(0, SPECIES, (B, hi), generator=generator) * mask
        spread = 0.55 * n.to(torch.float64).pow(1 / 3)[:, None, None]
        pos = (torch.randn(B, hi, 3, generator=generator, dtype=torch.float64) * spread) * mask[..., None]
        pos.requires_grad_(True)
        energy = morse_energy(pos, species, mask)
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        forces = -grad / scale
        cast = dict(device=self.device, dtype=self.dtype)
        return pos.detach().to(**cast), species.to(self.device), mask.to(self.device), forces.to(**cast)

    def batch(self, B: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        """``({"pos", "species", "mask"}, forces)`` for ``B`` fresh clusters, padded to the largest size."""
        pos, species, mask, forces = self._draw(B, generator, self.scale)
        return {"pos": pos, "species": species, "mask": mask}, forces


Structures = tuple  # ({"pos": (B, N, 3), "species": (B, N), "mask": (B, N)}, forces (B, N, 3))


def take(structures: Structures, idx: torch.Tensor) -> Structures:
    inputs, forces = structures
    return {k: v[idx] for k, v in inputs.items()}, forces[idx]


def count(structures: Optional[Structures]) -> int:
    return 0 if structures is None else int(structures[1].shape[0])


def load_structures(path: str, device="cpu", dtype=torch.float32) -> tuple[dict, torch.Tensor, dict]:
    """Read structures with forces from any file ``ase.io.read(path, index=":")`` takes.

    Returns ``(inputs, forces, info)``: ``inputs`` is ``{"pos", "species", "mask"}`` padded
    to the largest structure, species are indices into ``info["elements"]`` (the atomic
    numbers present, sorted), forces come from ``atoms.get_forces()`` in the file's units.
    Periodic cells are not used: every structure is an isolated cluster to the model
    (``info["periodic"]`` counts the structures that had one).
    """
    try:
        import ase.io
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('--data needs ase: pip install "fastequiv[ase]"') from e
    frames = ase.io.read(path, index=":")
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise ValueError(f"{path}: no structures")
    elements = sorted({int(z) for atoms in frames for z in atoms.numbers})
    index = {z: i for i, z in enumerate(elements)}
    B, N = len(frames), max(len(atoms) for atoms in frames)
    pos = torch.zeros(B, N, 3, dtype=torch.float64)
    forces = torch.zeros(B, N, 3, dtype=torch.float64)
    species = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, atoms in enumerate(frames):
        n = len(atoms)
        try:
            f = atoms.get_forces()
        except RuntimeError:
            f = atoms.arrays.get("forces")
            if f is None:
                raise ValueError(f"{path}: structure {b} has no forces") from None
        pos[b, :n] = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)
        forces[b, :n] = torch.as_tensor(f, dtype=torch.float64)
        species[b, :n] = torch.tensor([index[int(z)] for z in atoms.numbers])
        mask[b, :n] = True
    info = {"elements": elements, "periodic": sum(bool(atoms.pbc.any()) for atoms in frames)}
    cast = dict(device=torch.device(device), dtype=dtype)
    inputs = {"pos": pos.to(**cast), "species": species.to(cast["device"]), "mask": mask.to(cast["device"])}
    return inputs, forces.to(**cast), info


class Datasets(NamedTuple):
    """The data of one run; every set is ``({"pos", "species", "mask"}, forces)``.

    ``train`` is None for infinite data (``task`` then draws fresh training batches);
    ``train_eval`` is the fixed subset of ``train`` decomposed during training (its first
    structures, which are in random order). ``heldout`` does not depend on the seed.
    """

    train: Optional[Structures]
    heldout: Structures
    train_eval: Optional[Structures]
    task: Optional[ForceTask]
    species: int
    cutoff: float
    description: str


def datasets(train_size: Optional[int] = None, held_out: int = 2048, train_eval: int = 512, seed: int = 0,
             device="cpu", data: Optional[str] = None) -> Datasets:
    """The training, held-out and training-evaluation sets of a run.

    Synthetic (``data=None``): ``train_size`` Morse clusters (default 500; 0: none, fresh
    clusters every step) drawn from a generator seeded by ``seed``, and ``held_out``
    clusters from a fixed generator. ``data=FILE``: the file's structures (see
    :func:`load_structures`) in a fixed random order: the first ``min(held_out, 20%)``
    are held out, the next ``train_size`` (default: all the rest) are the training set;
    forces are divided by their root mean square over the training set.
    """
    if held_out < 1:
        raise ValueError(f"held_out must be >= 1, got {held_out}")
    if train_size is not None and train_size < 0:
        raise ValueError(f"train_size must be >= 0, got {train_size}")
    dev = torch.device(device)
    if data is None:
        task = ForceTask(device=dev)
        train_size = 500 if train_size is None else train_size
        heldout = task.batch(held_out, torch.Generator().manual_seed(HELDOUT_SEED))
        train = task.batch(train_size, torch.Generator().manual_seed(seed)) if train_size else None
        what = f"{train_size} training clusters" if train_size else "fresh training clusters every step"
        species, cutoff = SPECIES, CUTOFF
        description = f"Morse forces of 5-8 atom clusters: {what}, {held_out} held-out clusters"
    else:
        if train_size == 0:
            raise ValueError("--train-size 0 (fresh data every step) needs the generated clusters, not --data")
        inputs, forces, info = load_structures(data, device=dev)
        n = forces.shape[0]
        if n < 2:
            raise ValueError(f"{data}: {n} structure(s); a training and a held-out set need at least 2")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(HELDOUT_SEED)).to(dev)
        n_held = max(1, min(held_out, n // 5))
        rest = order[n_held:]
        rest = rest[:train_size] if train_size is not None else rest
        heldout, train = take((inputs, forces), order[:n_held]), take((inputs, forces), rest)
        m = train[0]["mask"]
        scale = float(train[1][m].pow(2).mean().sqrt().clamp_min(1e-12))
        train, heldout = (train[0], train[1] / scale), (heldout[0], heldout[1] / scale)
        task, species, cutoff = None, len(info["elements"]), DATA_CUTOFF
        from ase.data import chemical_symbols

        elems = "".join(chemical_symbols[z] for z in info["elements"])
        description = (f"{data} ({n} structures of {elems}, forces / {scale:.4g}): {count(train)} for training, "
                       f"{n_held} held out")
        if info["periodic"]:
            description += f"; the cells of {info['periodic']} periodic structures are ignored"
    sub = None if train is None else take(train, torch.arange(min(train_eval, count(train)), device=dev))
    if sub is not None and count(sub) == 0:
        sub = None
    return Datasets(train, heldout, sub, task, species, cutoff, description)

