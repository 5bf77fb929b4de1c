"""Loading the compiled extension ``fastequiv._C`` and describing this install.

``load()`` imports the extension lazily (first call, then cached) and returns ``None``
when it is missing or broken, keeping the reason (:func:`load_error`); importing
fastequiv itself never imports torch.cuda, triton or cupy.

A source checkout shadows the installed package when Python runs from the repository
root (``python -c``, ``python -m pytest``): its ``fastequiv/`` has neither ``_C`` nor
``fastequiv.kernels`` (built and copied in by ``pip install``).
:func:`warn_if_source_checkout` says so once, on ``import fastequiv``.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

#: what to do when a source checkout shadows the installed package
SOURCE_CHECKOUT_ADVICE = ("install the package (pip install .) and run Python from another directory, so "
                          "that it imports the installed fastequiv instead of this tree")


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
            root = source_checkout()
            if root is not None:
                _error += f" (fastequiv is imported from the source checkout {root}: {SOURCE_CHECKOUT_ADVICE})"
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


def source_checkout() -> Optional[str]:
    """The repository root when this ``fastequiv/`` is a source checkout's (it sits beside
    pyproject.toml and CMakeLists.txt), else ``None`` (an installed package)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file():
        return str(root)
    return None


def warn_if_source_checkout() -> None:
    """Warn (a ``UserWarning``) when fastequiv is imported from a source checkout that has no
    compiled extension; nothing for an installed package (a failed build there is
    :func:`load_error`'s) or an editable install (whose ``_C`` is found)."""
    root = source_checkout()
    if root is None or importlib.util.find_spec("fastequiv._C") is not None:
        return
    warnings.warn(f"fastequiv is imported from the source checkout {root}, which has no compiled extension "
                  f"(fastequiv._C) and no fastequiv.kernels: the 'cpu', 'cuda' and 'triton' backends are "
                  f"unavailable here. To use them, {SOURCE_CHECKOUT_ADVICE}.", UserWarning, stacklevel=3)
