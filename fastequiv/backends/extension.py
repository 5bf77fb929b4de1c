"""Loading the compiled extension ``fastequiv._C`` and describing this install.

``load()`` imports the extension lazily (first call, then cached) and returns ``None``
when it is missing or broken, keeping the reason (:func:`load_error`); importing
fastequiv itself never imports torch.cuda, triton or cupy.
"""

from __future__ import annotations

import importlib
from types import ModuleType


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


def version() -> str:
    """The installed version of fastequiv (``"0+unknown"`` in a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("fastequiv")
    except PackageNotFoundError:
        return "0+unknown"
