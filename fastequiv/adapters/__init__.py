"""``fe.adapt``: one line from a codebase's model (or ASE calculator) to fastequiv.

::

    model = fe.adapt(mace_model, stress=True)        # or a NequIP, SevenNet, ... model
    d = fe.equivariance_error(model, batch, model.targets(batch))   # batch from MACE's loader
    loss, d = fe.twirl_loss(model, batch, model.targets(batch))

Each supported codebase has one file here that imports the codebase lazily (only when
one of its objects is adapted) and states the versions it was tested with; the object
is recognised by the module its class comes from, so nothing is imported to look.
Every adapter returns a :class:`fastequiv.adapted.Adapted` module whose ``spec`` says
how the codebase's batch rotates (positions, cells, shifts, edge indices) and whose
heads are ``"energy"`` ``(B,)``, ``"forces"`` ``(N, 3)`` and, with ``stress=True``,
``"stress"`` ``(B, 3, 3)`` (ASE's sign, converted from whatever the codebase returns).

Options shared by the adapters: ``stress`` (add the stress head; the batch must then be
periodic), ``heads`` (a subset of the heads, e.g. ``("forces",)``). Anything else is the
codebase's own (each adapter's docstring says).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..adapted import Adapted

__all__ = ["Adapted", "FAMILIES", "adapt", "family_of"]

# family -> (adapter module, the top-level packages its objects' classes come from, tested with)
FAMILIES = {
    "mace": ("mace", ("mace",), "mace-torch 0.3.16"),
    "sevenn": ("sevenn", ("sevenn",), "sevenn 0.13.0"),
    "schnetpack": ("schnetpack", ("schnetpack",), "schnetpack 2.1.1"),
    "nequip": ("nequip", ("nequip", "allegro"), "nequip 0.19.1"),
    "torchmdnet": ("torchmdnet", ("torchmdnet",), "torchmd-net 3.1.0"),
    "pyg": ("pyg", ("torch_geometric",), "torch-geometric 2.8.1"),
    "orb": ("orb", ("orb_models",), "orb-models 0.5.5"),
}


def _candidates(obj) -> list:
    """``obj`` and what it wraps: torch.compile's module, DDP's module."""
    seen = [obj]
    for attr in ("_orig_mod", "module"):
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj:
            seen.append(inner)
    return seen


def family_of(obj) -> str | None:
    """The family whose adapter recognises ``obj``, or None."""
    for candidate in _candidates(obj):
        root = type(candidate).__module__.split(".")[0]
        for family, (_, packages, _) in FAMILIES.items():
            if root in packages:
                return family
    return None


def adapt(obj: Any, *, family: str | None = None, **options: Any) -> Adapted:
    """The adapted model of ``obj``: a model (or an ASE calculator) of a supported codebase.

    Args:
        obj: a model object of one of the codebases in :data:`FAMILIES`, or its ASE
            calculator; an :class:`~fastequiv.adapted.Adapted` model is returned as is.
        family: the codebase, where the object's class does not say it: a model of your own
            that takes a PyG ``Batch`` is ``family="pyg"`` (with ``output=`` and ``inputs=``).
        **options: ``stress=True``, ``heads=(...)`` and the codebase's own (see its module
            in ``fastequiv.adapters``).

    Raises:
        ValueError: ``obj`` is of no supported codebase (the message lists them and shows
            the Spec route), or an option does not apply to it.
    """
    if isinstance(obj, Adapted):
        if options:
            raise ValueError(f"the model is already adapted ({obj.family}); options {sorted(options)} apply when "
                             "adapting the codebase's own model")
        return obj
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} or None, got {family!r}")
    family = family or family_of(obj)
    if family is None:
        supported = ", ".join(f"{f} ({tested})" for f, (_, _, tested) in FAMILIES.items())
        raise ValueError(
            f"fe.adapt does not recognise {type(obj).__module__}.{type(obj).__qualname__}: it adapts models and ASE "
            f"calculators of {supported}. For any other model, describe its inputs and outputs with a Spec: "
            "fe.equivariance_error(model, inputs, target, spec=fe.Spec(inputs={'pos': 'position', ...}, "
            "output={'energy': 'scalar', 'forces': 'vector'}))")
    module = importlib.import_module(f"{__name__}.{FAMILIES[family][0]}")
    return module.adapt(obj, **options)
