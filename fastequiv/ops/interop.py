"""Arrays of other frameworks in the public ops: CuPy (``backend="cupy"``) and NumPy.

An op called with CuPy or NumPy arrays sees them as torch tensors through DLPack (no
copy), runs, and hands its results back as arrays of the caller's framework, so a CuPy
pipeline never touches torch tensors.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch


def _framework(value) -> str | None:
    """``"cupy"``, ``"numpy"`` or None for anything else (torch tensors included)."""
    if isinstance(value, torch.Tensor):
        return None
    module = type(value).__module__.split(".")[0]
    return module if module in ("cupy", "numpy") and hasattr(value, "__dlpack__") else None


def _to_torch(value):
    return torch.from_dlpack(value) if _framework(value) else value


def _back(value, framework: str):
    if isinstance(value, torch.Tensor):
        if framework == "numpy":
            return value.detach().cpu().numpy()
        return sys.modules["cupy"].from_dlpack(value.detach())
    if isinstance(value, tuple):
        return type(value)(*(_back(v, framework) for v in value)) if hasattr(value, "_fields") \
            else tuple(_back(v, framework) for v in value)
    return value


def accepts_arrays(fn: Callable) -> Callable:
    """Let ``fn`` take CuPy/NumPy arrays for its tensor arguments and return the same kind."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced code passes torch tensors
            return fn(*args, **kwargs)
        frameworks = {f for f in map(_framework, list(args) + list(kwargs.values())) if f}
        if not frameworks:
            return fn(*args, **kwargs)
        if len(frameworks) > 1:
            raise ValueError(f"arguments mix array types {sorted(frameworks)}; pass one kind (or torch tensors)")
        framework = frameworks.pop()
        out = fn(*map(_to_torch, args), **{k: _to_torch(v) for k, v in kwargs.items()})
        return _back(out, framework)

    return wrapper
