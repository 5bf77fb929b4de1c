"""warmup: build, on a device, every table a step reads there, before a CUDA graph is captured.

A step reads a few small constant tables on its device: the elements of a finite group,
the Wigner-D recursion tables of each irreps (per backend) and the block layout of its
matrix. Each is copied from the host on its first use and kept. A CUDA-graph capture
cannot record a copy from the host, so that first use must come before the capture:
:func:`warmup` does it for a spec (a first eager step does too); a table first asked for
during a capture raises a RuntimeError naming it (:func:`fastequiv.groups.refuse_during_capture`).

What else a captured step needs (see the README's "CUDA graphs"): ``check_finite`` is
skipped while capturing; ``seed=None`` draws a new key on the device each replay (an int
seed replays the same rotations; a ``generator`` must live on the device); voxel grids
take the trilinear path (same values at cube elements); graph batches pass
``num_graphs``. Run one eager step with the shapes to be captured first anyway, as
``torch.cuda.graphs`` asks: the Triton kernels compile on their first launch.
"""

from __future__ import annotations

import torch

from .. import groups
from ..backends import registry
from ..reps import Rep
from .action import Action
from .rotate_copies import rotate_copies
from .twirl_reduce import twirl_reduce

__all__ = ["warmup", "spec_reps"]


def spec_reps(spec) -> list[Rep]:
    """The reps of a spec's inputs and outputs (graph roles left out), in order."""
    reps = []
    for struct in (spec.inputs, spec.output):
        items = struct.values() if isinstance(struct, dict) else struct if isinstance(struct, tuple) else (struct,)
        reps.extend(r for r in items if isinstance(r, Rep))
    return reps


def _dummy(rep: Rep, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of one sample carrying ``rep``: ``(1, 2, d)`` rows (``(1, 2, 3, 3)`` for rank-2
    tensors, ``(1, 3, 3)`` for a cell, ``(1, 2)`` for scalars)."""
    if rep.kind == "rank2":
        shape = (1, 2, 3, 3)
    elif getattr(rep, "cell", False):
        shape = (1, 3, 3)
    elif rep.dim is None:
        shape = (1, 2)
    else:
        shape = (1, 2, rep.dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def warmup(spec, device, *, backend: str = "auto") -> None:
    """Build on ``device`` the tables a step with ``spec`` reads (in float32 and float64),
    so that the step can then be captured in a CUDA graph.

    It runs the step's ops (``rotate_copies`` and ``twirl_reduce`` of every rep of the
    spec, on a zero sample with two identity copies) and draws from its group, so every
    table they build on first use is built here.

    Args:
        spec: the :class:`fastequiv.Spec` of the steps to capture.
        device: where they run (``"cuda"``, ``"cuda:1"``, a ``torch.device``; CPU works
            and does nothing useful).
        backend: the ``backend=`` the steps pass.
    """
    registry.check_backend(backend)
    device = torch.empty(0, device=device).device  # with its index, as the step's tensors have it
    finite = groups.is_finite_group(spec.group) if isinstance(spec.group, str) else False
    for dtype in (torch.float32, torch.float64):
        if finite:
            groups.group_elements(spec.group, device=device, dtype=dtype)
        action = Action(torch.eye(3, dtype=dtype, device=device).expand(2, 1, 3, 3), backend)
        for rep in spec_reps(spec):
            if rep.kind == "voxels":  # no table: while capturing, grids take the trilinear path
                continue
            if rep.kind != "scalar":
                action.matrices(rep, dtype)
            x = _dummy(rep, dtype, device)
            try:
                out = rotate_copies(x, action, rep, backend=backend)
                twirl_reduce(out.reshape((2,) + tuple(x.shape)), action, x, rep, backend=backend)
            except ValueError:  # a rep these zeros do not fit: its matrices are built above
                pass
    if finite:  # finite-group draws index a float64 copy on the device
        groups.elements_from_words(torch.zeros(1, 4, dtype=torch.int64, device=device), spec.group)
