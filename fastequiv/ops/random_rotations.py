"""random_rotations: i.i.d. group elements from the counter-based Philox stream.

Rotation ``i`` of the stream keyed by ``seed`` is one Philox-4x32-10 draw (key = seed,
counter = ``offset + i``) turned into a rotation by Shoemake's construction
(:mod:`fastequiv.groups`), the same on every backend. In this file, side by side:

* :func:`random_rotations_seeded_reference`: the pure-torch ground truth of the kernels;
* ``torch.ops.fastequiv.random_rotations_seeded``: the same on a compiled backend (fake
  registration; rotations are not differentiated);
* :func:`random_rotations`: the public function, with a Python ``int`` seed;
* :func:`seed_tensor` / :func:`random_rotations_seeded`: what a training step uses. The
  seed is an int64 0-dim tensor on the step's device, which the kernels read where it
  lives: drawing a fresh seed is a device op, nothing syncs with the host,
  ``torch.compile(fullgraph=True)`` traces it and a captured CUDA graph replays it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import groups
from ..backends import registry

__all__ = ["random_rotations", "random_rotations_seeded", "random_rotations_seeded_reference", "seed_tensor"]


def random_rotations_seeded_reference(seed: Tensor, n: int, offset: int, improper: bool, dtype: torch.dtype) -> Tensor:
    """Reference of ``torch.ops.fastequiv.random_rotations_seeded``: rotations
    ``offset .. offset + n - 1`` of the Philox stream keyed by the int64 0-dim tensor
    ``seed`` (read on the device, never synced to the host): ``(n, 3, 3)``. ``improper``
    draws from O(3) (bit 0 of the fourth Philox word flips ``R`` to ``-R``)."""
    words = groups.philox_words(n, seed, offset)
    return groups.elements_from_words(words, "O3" if improper else "SO3").to(dtype)


registry.register("random_rotations_seeded", "torch")(random_rotations_seeded_reference)


@torch.library.custom_op("fastequiv::random_rotations_seeded", mutates_args=())
def _seeded_op(seed: Tensor, n: int, offset: int, improper: bool, dtype: torch.dtype, backend: str) -> Tensor:
    return registry.implementation("random_rotations_seeded", backend)(seed, n, offset, improper, dtype)


@_seeded_op.register_fake
def _(seed, n, offset, improper, dtype, backend):
    return seed.new_empty((n, 3, 3), dtype=dtype)


def seed_tensor(seed: Optional[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The Philox key as an int64 0-dim tensor on ``device``.

    ``seed`` (an int in ``[0, 2**63)``) if given; else drawn from ``generator``; else from
    the default generator of ``device`` (``torch.manual_seed`` makes it reproducible).

    In a captured CUDA graph: an int ``seed`` is a fill (every replay draws the same
    rotations); ``seed=None`` draws on the device's default generator (a new key every
    replay); a ``generator`` must live on ``device`` (a CPU one would copy to the GPU).
    """
    if seed is not None:
        groups.resolve_seed(seed, generator)  # validates, and refuses seed and generator together
        # a fill on the device, not a copy from the host: a CUDA graph can capture it
        return torch.full((), seed, dtype=torch.int64, device=device)
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
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.dim() != 0:
        got = f"{seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else repr(seed)
        raise ValueError(f"seed must be an int64 0-dim tensor (seed_tensor() makes one), got {got}")
    groups.check_offset(offset, n)
    name = registry.resolve_name("random_rotations_seeded", backend, seed.device)
    if groups.is_finite_group(group):
        # a finite-group draw is an index gather: nothing for a kernel to fuse
        return groups.elements_from_words(groups.philox_words(n, seed, offset), group).to(dtype)
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    args = (seed, n, offset, group == "O3", work)
    R = random_rotations_seeded_reference(*args) if name == "torch" else _seeded_op(*args, name)
    return R.to(dtype)


def random_rotations(
    n: int,
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    group: str = "SO3",
    offset: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``n`` i.i.d. Haar-uniform elements of ``group`` as matrices ``(n, 3, 3)``.

    Args:
        n: how many.
        seed: selects the Philox stream (``0 <= seed < 2**63``); the same seed gives the
            same rotations on every backend and device (to float rounding).
        generator: draw the seed from this ``torch.Generator`` instead.
        group: ``"SO3"`` (default), ``"O3"`` (half of the draws improper, det -1), or a
            finite group (``"octahedral"``, ``"octahedral_O3"``, ``"icosahedral"``: elements
            drawn uniformly).
        offset: index of the first rotation in the stream (rotation ``i`` depends only on
            ``seed`` and ``i``, so ``offset`` continues a stream).
        device, dtype: of the result (default: CPU, torch's default dtype).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ...; see :mod:`fastequiv.backends`.
    """
    groups.check_count(n)
    groups.check_group(group)
    groups.check_offset(offset, n)
    seed = groups.resolve_seed(seed, generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return random_rotations_seeded(n, torch.full((), seed, dtype=torch.int64, device=device), group, dtype,
                                   offset=offset, backend=backend)
