"""Spec: how a model's inputs and outputs transform, and under which group.

``inputs`` mirrors how the model is called: one rep for ``model(x)``, a tuple of reps
for ``model(*args)``, a dict of reps for ``model(**kwargs)``. ``output`` mirrors what the
model returns: one rep, a tuple (multi-head, e.g. energy and forces) or a dict.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Union

import torch

from .graph import as_role, graph_roles, unnamed_error
from .groups import GROUPS
from .reps import Rep, as_rep, describe

__all__ = ["Spec", "describe", "read_field"]


def _parse(struct, name: str, roles: bool = False):
    # inputs may also name graph roles ("batch", "index", "num_graphs"): see fastequiv.graph
    entry = (lambda v, n: as_role(v) or as_rep(v, n)) if roles else as_rep
    o3 = sys.modules.get("e3nn.o3")
    if o3 is not None and isinstance(struct, o3.Irreps):  # a tuple subclass, but one rep
        return as_rep(struct, name)
    if isinstance(struct, dict):
        if not struct:
            raise ValueError(f"{name} is an empty dict")
        return {k: entry(v, f"{name}[{k!r}]") for k, v in struct.items()}
    if isinstance(struct, (tuple, list)):
        if not struct:
            raise ValueError(f"{name} is an empty tuple")
        return tuple(entry(v, f"{name}[{i}]") for i, v in enumerate(struct))
    return as_rep(struct, name)


class Spec:
    """What rotates how.

    Args:
        inputs: rep(s) of the model's inputs: a rep, a tuple of reps (positional
            arguments) or a dict of reps (keyword arguments). A rep is ``"scalar"``,
            ``"pseudoscalar"``, ``"vector"``, ``"pseudovector"``, ``"position"``, an
            e3nn irreps string or an ``e3nn.o3.Irreps`` (see :mod:`fastequiv.reps`).
            A graph batch (PyG style) names its structure inputs by role instead:
            ``"batch"`` (the graph of each node), ``"index"`` (node indices such as
            ``edge_index``) and optionally ``"num_graphs"`` (see :mod:`fastequiv.graph`).
        output: rep(s) of the model's output, likewise: a rep, a tuple or a dict.
        group: ``"SO3"``, ``"O3"``, ``"octahedral"``, ``"octahedral_O3"`` or
            ``"icosahedral"``. Default: ``"SO3"``, or ``"octahedral"`` (the 24 rotations
            of the cube, exact on a grid) when any rep is a voxel grid.
        mask: name (dict inputs) or index (tuple inputs) of an input that is the
            bool mask of valid elements, shape ``(B, *inner)``, e.g. ``(B, atoms)``. It is
            passed to the model like any scalar input and also removes padded elements
            from the losses and the centroids.
        unnamed: what happens to a tensor input (a dict key, or an attribute of an input
            object such as a PyG ``Batch``) that ``inputs`` does not name: ``"error"``
            (default: a ValueError listing them) or ``"keep"`` (handed to the model
            unchanged, not stacked: for targets or bookkeeping the model does not read).
        call: how the model takes dict inputs: ``"kwargs"`` (default, ``model(**inputs)``)
            or ``"dict"`` (``model(inputs)``, as MACE, NequIP and fairchem models do).
        model_grad: the model differentiates inside its forward (forces as ``-dE/dpos``
            by ``torch.autograd.grad``, as MACE, NequIP and SchNet do): the measuring
            functions then call it with gradients enabled (the outputs are detached; no
            parameter gets a gradient and no graph outlives the call).

    Example::

        spec = fe.Spec(inputs={"pos": "position", "z": "scalar"},
                       output={"energy": "scalar", "forces": "vector"})
    """

    def __init__(self, inputs: Any, output: Any, *, group: Optional[str] = None, mask: Optional[Union[str, int]] = None,
                 unnamed: str = "error", call: str = "kwargs", model_grad: bool = False):
        if group is not None and group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        if unnamed not in ("error", "keep"):
            raise ValueError(f"unnamed must be 'error' or 'keep', got {unnamed!r}")
        if call not in ("kwargs", "dict"):
            raise ValueError(f"call must be 'kwargs' (model(**inputs)) or 'dict' (model(inputs)), got {call!r}")
        if not isinstance(model_grad, bool):
            raise ValueError(f"model_grad must be a bool, got {model_grad!r}")
        self.unnamed, self.call, self.model_grad = unnamed, call, model_grad
        self.inputs = _parse(inputs, "spec.inputs", roles=True)
        self.graph = graph_roles(self.inputs)  # {} for the dense layout
        self.output = _parse(output, "spec.output")
        if group is None:
            # a grid is twirled exactly by the cube's rotations (no interpolation); else SO(3)
            reps = [r for s in (self.inputs, self.output)
                    for r in (s.values() if isinstance(s, dict) else s if isinstance(s, tuple) else (s,))]
            group = "octahedral" if any(r.kind == "voxels" for r in reps) else "SO3"
        self.group = group
        if call == "dict" and not isinstance(self.inputs, dict):
            raise ValueError(f"call='dict' passes dict inputs as one argument; spec.inputs is {self.inputs!r}, not a dict")
        if mask is not None:
            keys = self.inputs.keys() if isinstance(self.inputs, dict) else range(len(self.inputs)) if isinstance(self.inputs, tuple) else ()
            if mask not in keys:
                raise ValueError(f"spec mask={mask!r} names no entry of spec.inputs (entries: {list(keys)})")
        self.mask = mask

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k, default in
                        (("unnamed", "error"), ("call", "kwargs"), ("model_grad", False)) if getattr(self, k) != default)
        return f"Spec(inputs={self.inputs!r}, output={self.output!r}, group={self.group!r}, mask={self.mask!r}{extra})"

    # -- structures ---------------------------------------------------------------------------

    def input_leaves(self, inputs) -> list[tuple[str, Any, Optional[Rep]]]:
        """``(name, value, rep)`` for every input; non-tensor dict values pass through with rep None."""
        return _leaves(inputs, self.inputs, "inputs", allow_passthrough=True, single="inputs",
                       keep_tensors=self.unnamed == "keep")

    def output_leaves(self, outputs, name: str = "model output") -> list[tuple[str, torch.Tensor, Rep]]:
        return _leaves(outputs, self.output, name, allow_passthrough=False, single="output")

    def output_names(self) -> list[str]:
        if isinstance(self.output, dict):
            return list(self.output)
        if isinstance(self.output, tuple):
            return [str(i) for i in range(len(self.output))]
        return ["output"]

    def head_weights(self, loss_weights) -> dict:
        """``{head: weight}`` from a ``loss_weights=`` argument: a dict (dict outputs) or tuple
        (tuple outputs) like :attr:`output`; None weighs every head 1."""
        names = self.output_names()
        if loss_weights is None:
            return {n: 1.0 for n in names}
        if isinstance(self.output, dict):
            if not isinstance(loss_weights, dict) or set(loss_weights) != set(names):
                raise ValueError(f"loss_weights must be a dict with keys {names}, got {loss_weights!r}")
            return dict(loss_weights)
        if isinstance(self.output, tuple):
            if not isinstance(loss_weights, (tuple, list)) or len(loss_weights) != len(names):
                raise ValueError(f"loss_weights must be a tuple of {len(names)} weights, got {loss_weights!r}")
            return dict(zip(names, loss_weights))
        raise ValueError(f"loss_weights weighs the heads of a dict or tuple output; spec.output is a single "
                         f"{self.output}, got loss_weights={loss_weights!r} (scale the loss instead)")

    def build_inputs(self, names: list, values: list) -> tuple[tuple, dict]:
        """``(args, kwargs)`` to call the model with, from input_leaves' names and new values."""
        if isinstance(self.inputs, dict):
            return ((dict(zip(names, values)),), {}) if self.call == "dict" else ((), dict(zip(names, values)))
        if isinstance(self.inputs, tuple):
            return tuple(values), {}
        return (values[0],), {}

    def build_output(self, values: list):
        """A model-shaped output from leaf values in output_leaves order."""
        if isinstance(self.output, dict):
            return dict(zip(self.output, values))
        if isinstance(self.output, tuple):
            return tuple(values)
        return values[0]

    def mask_of(self, inputs) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        mask = inputs[self.mask]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"inputs[{self.mask!r}] is the spec's mask and must be a bool tensor, got {describe(mask)}")
        return mask


_MISSING = object()


def read_field(obj, key):
    """``obj[key]`` for a dict or an object that indexes by name (a PyG ``Data``, SevenNet's
    batch), else the attribute ``obj.key`` (dataclasses, named tuples); ``_MISSING`` if neither."""
    if isinstance(obj, dict):
        return obj.get(key, _MISSING)
    if isinstance(key, str) and hasattr(type(obj), "__getitem__") and not isinstance(obj, (tuple, list, torch.Tensor)):
        try:
            return obj[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
    return getattr(obj, key, _MISSING)


def _leaves(value, struct, name: str, allow_passthrough: bool, single: str, keep_tensors: bool = False):
    if isinstance(struct, dict):
        if not allow_passthrough:
            # outputs and targets: the spec's heads, in the spec's order, read by key or by
            # attribute from whatever the model returns (a dict, a batch object, a dataclass);
            # other fields (a model's extra diagnostics) are not decomposed
            got = {k: read_field(value, k) for k in struct}
            missing = [k for k, v in got.items() if v is _MISSING]
            if missing:
                have = list(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(f"{name} lacks the heads {missing} that the spec names (got {have}): a dict, or an "
                                 "object with those keys or attributes, is expected")
            for k in struct:
                if got[k] is None:
                    raise ValueError(f"{name}[{k!r}] is None, but the spec names it as a head ({struct[k]}): the model "
                                     "did not compute it (e.g. MACE computes stress only with compute_stress=True); "
                                     "make the model return it, or leave it out of spec.output")
                struct[k].check(got[k], f"{name}[{k!r}]")
            return [(k, got[k], struct[k]) for k in struct]
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict with keys {list(struct)} to match the spec, got {describe(value)}")
        missing = [k for k in struct if k not in value]
        if missing:
            raise ValueError(f"{name} lacks the keys {missing} that the spec names (got keys {list(value)})")
        out, unnamed = [], []
        for k, v in value.items():
            if k in struct:
                struct[k].check(v, f"{name}[{k!r}]")
                out.append((k, v, struct[k]))
            elif keep_tensors or not isinstance(v, torch.Tensor):
                out.append((k, v, None))
            else:
                unnamed.append(k)
        if unnamed:  # every one of them, not only the first
            raise unnamed_error(", ".join(f"{name}[{k!r}] ({describe(value[k])})" for k in unnamed), len(unnamed))
        return out
    if isinstance(struct, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(struct):
            raise ValueError(f"{name} must be a tuple of {len(struct)} tensors to match the spec, got {describe(value)}"
                             + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else ""))
        for i, (v, r) in enumerate(zip(value, struct)):
            r.check(v, f"{name}[{i}]")
        return [(str(i), v, r) for i, (v, r) in enumerate(zip(value, struct))]
    struct.check(value, name)
    return [(single, value, struct)]
