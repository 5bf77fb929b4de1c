"""The ``"triton"`` backend: registers the Triton kernels of ``fastequiv.kernels``.

Each implementation has exactly the signature of the torch reference of the same name in
:mod:`fastequiv.ops` (the row contract, and the voxel resampling ops). Triton and the
kernel modules are imported on the first call, so ``import fastequiv`` never imports
Triton. The backend runs on CUDA tensors, and on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI tests it).
``backend="auto"`` prefers it on CUDA tensors.

Whether triton is installed, and whether the interpreter was asked for, is decided once,
when this module is imported; whether the kernel modules import (which imports triton) on
the first check that gets that far, then cached, and a constant to ``torch.compile``: the
availability check is safe to reach from traced code, also on its first call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from . import extension, registry

#: whether triton is installed (found, not imported)
INSTALLED = importlib.util.find_spec("triton") is not None
#: whether the Triton kernels run on CPU tensors (the interpreter)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# op name -> (kernel module of fastequiv.kernels, function)
KERNELS = {
    "random_rotations_seeded": ("random_rotations", "random_rotations_seeded"),
    "rotate_rows": ("rotate_copies", "rotate_rows"),
    "rotate_rows_backward": ("rotate_copies", "rotate_rows_backward"),
    "reduce_rows": ("twirl_reduce", "reduce_rows"),
    "reduce_rows_backward": ("twirl_reduce", "reduce_rows_backward"),
    "wigner_blocks": ("wigner_d", "wigner_blocks"),
    "voxels_resample": ("voxels", "resample"),
    "voxels_reduce": ("voxels", "twirl_reduce"),
}


def available(device: torch.device) -> str | None:
    """``None`` when the Triton kernels can run on ``device``, else what is missing."""
    device = torch.device(device)
    if not INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if not INTERPRET:
            return "set TRITON_INTERPRET=1 (before triton is imported) to run Triton kernels on CPU tensors"
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    else:
        return f"the Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
    return kernels_importable()


@torch.compiler.assume_constant_result
def kernels_importable() -> str | None:
    """``None`` when every kernel module of :data:`KERNELS` imports, else why not (a source
    checkout has no ``fastequiv.kernels``; a broken triton fails here, not in a step).
    Imports on the first call only; a constant to ``torch.compile``, which never traces it."""
    return _import_kernels()


@functools.lru_cache(maxsize=None)
def _import_kernels() -> str | None:
    for module in sorted({module for module, _ in KERNELS.values()}):
        try:
            importlib.import_module(f"fastequiv.kernels.{module}")
        except Exception as err:  # ImportError, or whatever a broken triton raises on import
            why = f"cannot import fastequiv.kernels.{module} ({type(err).__name__}: {err})"
            root = extension.source_checkout()
            if root is not None:
                why += f"; fastequiv is imported from the source checkout {root}: {extension.SOURCE_CHECKOUT_ADVICE}"
            return why
    return None


@functools.lru_cache(maxsize=None)
def kernel(op: str):
    """The Triton implementation of ``op`` (imports triton and the kernel module)."""
    module, name = KERNELS[op]
    try:
        return getattr(importlib.import_module(f"fastequiv.kernels.{module}"), name)
    except ImportError as err:
        raise registry.BackendUnavailableError(
            f"backend='triton' cannot import its kernels ({type(err).__name__}: {err}); pip install triton") from err


def _lazy(op: str):
    """The implementation of ``op``: imports its kernel module on the first call."""

    def impl(*args):
        return kernel(op)(*args)

    impl.__name__ = impl.__qualname__ = f"{op}_triton"
    impl.__doc__ = f"Triton implementation of ``{op}`` (the arguments of its torch reference in fastequiv.ops)."
    return impl


for _op in KERNELS:
    registry.register(_op, "triton", available=available)(_lazy(_op))
    registry.set_auto_order(_op, "cuda", ("triton", "cuda"))
