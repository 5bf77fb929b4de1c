"""Loading the compiled extension ``fastequiv._C`` and describing this install.

``load()`` imports the extension lazily (first call, then cached) and returns ``None``
when it is missing or broken, keeping the reason for :func:`build_info`; importing
fastequiv itself never imports torch.cuda, triton or cupy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from . import _backend

_NOT_LOADED = object()
_module: object = _NOT_LOADED
_error: str | None = None


def load() -> ModuleType | None:
    """The ``fastequiv._C`` module, or ``None`` if it cannot be imported (see ``build_info``)."""
    global _module, _error
    if _module is _NOT_LOADED:
        try:
            _module = importlib.import_module("fastequiv._C")
            _error = None
        except ImportError as exc:
            _module = None
            _error = f"{type(exc).__name__}: {exc}"
    return _module  # type: ignore[return-value]


def load_error() -> str | None:
    """Why ``fastequiv._C`` could not be imported, or ``None`` (loads it first)."""
    load()
    return _error


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastequiv")
    except PackageNotFoundError:
        return "0+unknown"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _triton_runnable() -> bool:
    # Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return _cuda_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _cupy_runnable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def build_info() -> dict:
    """What this install contains and can run.

    Keys: ``"version"`` (str), ``"extension"`` (bool: ``fastequiv._C`` imported),
    ``"extension_error"`` (why not, or ``None``), ``"cuda"`` (bool: built with CUDA),
    ``"cuda_archs"`` (list of str, e.g. ``["80", "90"]``), ``"openmp"`` (bool),
    ``"backends"`` (the backend names that implement at least one op and can run here:
    always ``"torch"``; ``"cpu"`` with the extension; ``"cuda"`` when built with CUDA
    and a GPU is visible; ``"triton"`` when triton imports and there is a GPU or
    ``TRITON_INTERPRET=1``; ``"cupy"`` when cupy imports and sees a GPU).
    """
    ext = load()
    native = ext.build_info() if ext is not None else {}
    cuda_built = bool(native.get("cuda", False))
    # a backend is listed when it implements at least one op and can run here
    implemented = _backend.implemented_anywhere()
    runnable = {
        "torch": lambda: True,
        "cpu": lambda: ext is not None,
        "cuda": lambda: cuda_built and _cuda_available(),
        "triton": _triton_runnable,
        "cupy": _cupy_runnable,
    }
    backends = [name for name, ok in runnable.items() if name in implemented and ok()]
    return {
        "version": _version(),
        "extension": ext is not None,
        "cuda": cuda_built,
        "cuda_archs": list(native.get("cuda_archs", [])),
        "openmp": bool(native.get("openmp", False)),
        "backends": backends,
        "extension_error": _error,
    }
