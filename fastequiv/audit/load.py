"""The command line's MODEL and DATA: a model file or a ``module:function``, and any file
ASE reads."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["load_model", "load_structures"]


def _function(ref: str):
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    where, _, name = ref.rpartition(":")
    if where.endswith(".py"):
        if not os.path.exists(where):
            raise ValueError(f"MODEL {ref!r}: no file {where!r}")
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"MODEL {ref!r}: cannot import module {where!r} ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"MODEL {ref!r}: {where} has no function {name!r}")  # noqa: TRY004 (a bad argument)
    return fn


def load_model(ref: str, device: str = "cpu") -> Any:
    """The model ``ref`` names: a file that ``torch.load`` reads whole (a MACE ``.model``
    file; it is unpickled, so load only files you trust), or ``module:function`` /
    ``file.py:function``, called without arguments, returning what :func:`fastequiv.audit.audit`
    takes (a model, an ASE calculator, an adapted model, or a dict of adapted models)."""
    if os.path.isfile(ref):
        import torch

        if ref.endswith((".nequip.zip", ".nequip.pth", ".nequip.pt2")):
            raise ValueError(f"MODEL {ref!r}: packaged and compiled nequip models are not read by the audit yet; "
                             "pass module:function returning nequip.model.ModelFromCheckpoint(...) or a "
                             "NequIPCalculator built on a GraphModel")
        model = torch.load(ref, map_location=device, weights_only=False)
        weights_only = isinstance(model, dict) and (
            "state_dict" in model or all(isinstance(v, torch.Tensor) for v in model.values()))
        if weights_only:
            raise ValueError(f"MODEL {ref!r} holds a state dict (weights only), not a model: pass module:function "
                             "that builds the model and loads it")
        return model
    if ":" in ref:
        return _function(ref)()
    raise ValueError(f"MODEL must be a model file or module:function (file.py:function), got {ref!r}: no such file")


def load_structures(ref: str, index: str = ":", format: str | None = None) -> list:
    """Every structure of ``ref`` that ``ase.io.read`` finds (``index`` selects, as ASE's)."""
    import ase.io

    if not os.path.isfile(ref):
        raise ValueError(f"DATA must be a file ASE reads (extxyz, a trajectory, ...), got {ref!r}: no such file")
    atoms = ase.io.read(ref, index=index, format=format)
    atoms = atoms if isinstance(atoms, list) else [atoms]
    if not atoms:
        raise ValueError(f"DATA {ref!r} (index {index!r}) holds no structure")
    return atoms
