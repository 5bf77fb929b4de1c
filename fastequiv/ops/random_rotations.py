"""random_rotations_seeded: group elements from a seed that lives on the device.

The public :func:`fastequiv.random_rotations` takes a Python ``int`` seed. Inside a
training step the seed is instead an int64 0-dim tensor on the step's device
(:func:`seed_tensor`), which the kernels read where it lives: drawing a fresh seed is a
device op, nothing syncs with the host, ``torch.compile(fullgraph=True)`` traces it and a
captured CUDA graph replays it. Rotation ``i`` is the same Philox draw as in
:func:`fastequiv.random_rotations` (key = seed, counter = ``offset + i``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import groups
from . import _library


def seed_tensor(seed: Optional[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The Philox key as an int64 0-dim tensor on ``device``.

    ``seed`` (an int in ``[0, 2**63)``) if given; else drawn from ``generator``; else from
    the default generator of ``device`` (``torch.manual_seed`` makes it reproducible).
    """
    if seed is not None:
        groups.resolve_seed(seed, generator)  # validates, and refuses seed and generator together
        return torch.tensor(seed, dtype=torch.int64, device=device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        drawn = torch.randint(0, groups.SEED_MAX, (), generator=generator, device=generator.device)
        return drawn.to(device)
    return torch.randint(0, groups.SEED_MAX, (), device=device)


def random_rotations_seeded(n: int, seed: torch.Tensor, group: str, dtype: torch.dtype, *, offset: int = 0,
                            backend: str = "auto") -> torch.Tensor:
    """Elements ``offset .. offset + n - 1`` of ``group``'s stream keyed by ``seed``: ``(n, 3, 3)``.

    ``group`` is ``"SO3"``, ``"O3"`` or a finite group (a uniform element index from the
    first Philox word, as in :func:`fastequiv.random_rotations`).
    """
    if groups.is_finite_group(group):
        # a finite-group draw is an index gather: nothing for a kernel to fuse
        return groups._elements_from_words(groups._philox_words(n, seed, offset), group).to(dtype)
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    R = _library.call("random_rotations_seeded", backend, seed.device, seed, n, offset, group == "O3", work)
    return R.to(dtype)
