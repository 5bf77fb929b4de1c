"""The registry: the one seam where a computation picks its implementation.

Every public function that computes takes ``backend=``: ``"auto"``, ``"torch"``,
``"triton"``, ``"cpu"``, ``"cuda"`` or ``"cupy"``. ``"torch"`` is the pure-torch
reference, available everywhere, and the ground truth every other backend is tested
against. An implementation registers itself per op; asking for a backend that has no
implementation of an op (or that this install cannot run) raises
:class:`BackendUnavailableError` naming what is missing, never a silent fallback.
"""

from __future__ import annotations

from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda", "cupy")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op in this install."""


# op name -> backend name -> (implementation, availability check returning None or why not)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[[torch.device], str | None]]]] = {}
# op name -> backend order tried by "auto" for each device type
_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}


def register(op: str, backend: str, available: Callable[[torch.device], str | None] | None = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``available(device)`` returns ``None`` when the backend can run on ``device`` and
    otherwise a sentence saying what is missing.
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = (fn, available or (lambda device: None))
        return fn

    return deco


def set_auto_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Which backends ``backend="auto"`` tries for ``op`` on ``device_type``, fastest first."""
    _AUTO_ORDER.setdefault(op, {})[device_type] = order


def check_backend(backend) -> None:
    """Raise a ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@torch.compiler.assume_constant_result
def resolve_name(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` itself, or ``"auto"``'s pick.

    Each public op calls this once per call. Availability checks import extension
    modules, so ``torch.compile`` runs this eagerly and keeps the answer as a constant
    (a traced step never reaches an import, also on its first call in a fresh process).
    """
    check_backend(backend)
    device = torch.device(device)
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        for name in _AUTO_ORDER.get(op, {}).get(device.type, ()) + ("torch",):
            if name in impls and impls[name][1](device) is None:
                return name
        raise BackendUnavailableError(f"no backend can run {op!r} on device {device}")
    if backend not in impls:
        have = sorted(impls)
        raise BackendUnavailableError(
            f"backend={backend!r} has no implementation of {op!r} in this version of fastequiv "
            f"(implemented: {have})"
        )
    why = impls[backend][1](device)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op!r} on device {device}: {why}")
    return backend


def implementation(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` by the concrete ``backend`` (already
    resolved by :func:`resolve_name`; no availability check)."""
    return _REGISTRY[op][backend][0]


def direct(*tensors) -> bool:
    """Whether an op may call its backend's implementation directly instead of through its
    ``torch.library`` registration, which costs about 20 us a call and adds nothing here: in
    eager mode (not traced by ``torch.compile``, no dispatch mode such as fake tensors), with
    plain tensors and no gradient to record. ``tensors`` are the op's tensor arguments
    (None for one not given)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def resolve(op: str, backend: str, device: torch.device | str) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for ``op`` on ``device``."""
    name = resolve_name(op, backend, torch.device(device))
    return name, implementation(op, name)


def implemented_anywhere() -> set[str]:
    """Backends that implement at least one op."""
    return {name for impls in _REGISTRY.values() for name in impls}


def runnable(op: str, device: torch.device | str) -> list[str]:
    """Backends whose implementation of ``op`` can run on ``device`` now, in registration order."""
    device = torch.device(device)
    return [name for name, (_, available) in _REGISTRY.get(op, {}).items() if available(device) is None]


def implemented(op: str) -> list[str]:
    """Backends that have an implementation of ``op`` (whether or not they can run here)."""
    return sorted(_REGISTRY.get(op, {}))
