"""Backends: the registry seam, loading the compiled extension, and the implementations of
the kernels on every device.

* :mod:`.registry`: ``register`` / ``resolve_name`` / ``implementation``, the one place a
  computation picks its implementation, and :class:`BackendUnavailableError`.
* :mod:`.extension`: loading ``fastequiv._C``.
* :mod:`.host`: the host side of the compiled kernels, written once.
* :mod:`.native` (``"cpu"``, ``"cuda"``), :mod:`.cupy` (``"cupy"``), :mod:`.triton`
  (``"triton"``): each registers its kernels on import (cheaply: triton and cupy are
  imported on first use) with one availability check per backend.

The ``"torch"`` references live with their ops in :mod:`fastequiv.ops`.
"""

from __future__ import annotations

import torch

from . import cupy, extension, native, triton
from .registry import BACKENDS, BackendUnavailableError, implementation, register, resolve, resolve_name

__all__ = ["BACKENDS", "BackendUnavailableError", "build_info", "implementation", "register", "resolve",
           "resolve_name"]

# the availability check of each compiled backend, on the devices it can run on
_CHECKS = {
    "cpu": (native.available("cpu"), ("cpu",)),
    "cuda": (native.available("cuda"), ("cuda",)),
    "triton": (triton.available, ("cuda", "cpu")),
    "cupy": (cupy.available, ("cuda",)),
}


def build_info() -> dict:
    """What this install contains and can run.

    Keys: ``"version"`` (str), ``"extension"`` (bool: ``fastequiv._C`` imported),
    ``"extension_error"`` (why not, or ``None``), ``"cuda"`` (bool: ``fastequiv._C`` was
    built with its CUDA kernels; they run only where torch also sees a GPU),
    ``"cuda_archs"`` (list of str, e.g. ``["80", "90"]``), ``"openmp"`` (bool),
    ``"cpu_capability"`` (the build of the CPU row kernels that runs: ``"avx2"`` or
    ``"default"``; ``None`` without the extension),
    ``"torch_cuda"`` (bool: torch sees a CUDA device), ``"backends"`` (the backends that
    can run here, by the same checks ``backend=`` uses: always ``"torch"``; ``"cpu"`` with
    the extension; ``"cuda"`` when built with CUDA and a GPU is visible; ``"triton"`` when
    triton is installed and there is a GPU or ``TRITON_INTERPRET=1``; ``"cupy"`` when cupy
    imports and sees a GPU), and ``"unavailable"`` (backend -> why not).
    """
    ext = extension.load()
    native_info = ext.build_info() if ext is not None else {}
    backends, why_not = ["torch"], {}
    for name, (check, device_types) in _CHECKS.items():
        reasons = [check(torch.device(t)) for t in device_types]
        if any(r is None for r in reasons):
            backends.append(name)
        elif len(set(reasons)) == 1:
            why_not[name] = reasons[0]
        else:  # a backend of two devices (triton) fails differently on each: both reasons
            why_not[name] = "; ".join(f"on {t}: {r}" for t, r in zip(device_types, reasons))
    return {
        "version": extension.version(),
        "extension": ext is not None,
        "cuda": bool(native_info.get("cuda", False)),
        "cuda_archs": list(native_info.get("cuda_archs", [])),
        "openmp": bool(native_info.get("openmp", False)),
        "cpu_capability": native_info.get("cpu_capability"),
        "torch_cuda": torch.cuda.is_available(),
        "backends": backends,
        "unavailable": why_not,
        "extension_error": extension.load_error(),
    }
