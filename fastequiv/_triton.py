"""The ``"triton"`` backend: registers the Triton kernels of ``fastequiv.kernels`` for the
row-level contract of :mod:`fastequiv.ops._rows`.

Each implementation has exactly the signature of the ``_rows`` function of the same name.
Triton and the kernel modules are imported on the first call, so ``import fastequiv``
never imports Triton. The backend runs on CUDA tensors, and on CPU tensors in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI
tests it). ``backend="auto"`` prefers it on CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import _backend

# op name -> (kernel module of fastequiv.kernels, function)
_KERNELS = {
    "random_rotations_seeded": ("random_rotations", "random_rotations_seeded"),
    "rotate_rows": ("rotate_copies", "rotate_rows"),
    "rotate_rows_backward": ("rotate_copies", "rotate_rows_backward"),
    "rotate_rows_seeded": ("rotate_copies", "rotate_rows_seeded"),
    "reduce_rows": ("twirl_reduce", "reduce_rows"),
    "reduce_rows_backward": ("twirl_reduce", "reduce_rows_backward"),
    "wigner_blocks": ("wigner_d", "wigner_blocks"),
}


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as err:  # ImportError, or a broken install
        return f"triton is not installed or not importable ({type(err).__name__}: {err}); pip install triton"
    return None


def available(device: torch.device) -> str | None:
    """``None`` when the Triton kernels can run on ``device``, else what is missing."""
    device = torch.device(device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "set TRITON_INTERPRET=1 (before triton is imported) to run Triton kernels on CPU tensors"
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    else:
        return f"the Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
    return _triton_import_error()


@functools.lru_cache(maxsize=None)
def _kernel(op: str):
    module, name = _KERNELS[op]
    return getattr(importlib.import_module(f"fastequiv.kernels.{module}"), name)


def _lazy(op: str):
    """The implementation of ``op``: imports its kernel module on the first call."""

    def impl(*args):
        return _kernel(op)(*args)

    impl.__name__ = impl.__qualname__ = f"{op}_triton"
    impl.__doc__ = f"Triton implementation of :func:`fastequiv.ops._rows.{op}` (same arguments)."
    return impl


for _op in _KERNELS:
    _backend.register(_op, "triton", available=available)(_lazy(_op))
    _backend.set_auto_order(_op, "cuda", ("triton", "cuda"))
