"""Stacking: the K rotated copies of a batch pushed through the model in one call.

Every measuring function (:func:`fastequiv.equivariance_error`, :func:`fastequiv.twirl_loss`,
:class:`fastequiv.Twirled`, the monitor, the diagnostics) runs the same five steps:

1. :func:`read_inputs`: the input leaves, the layout (dense, or a graph batch), the
   batch size and the mask;
2. :func:`draw_rotations`: the group element of every copy (an exhaustive finite group,
   or K i.i.d. draws from the seeded Philox stream, on the device, no host sync), as an
   :class:`~fastequiv.ops.Action` that builds each rep's matrices once for the step;
3. :func:`stack_copies`: every input leaf stacked copy-major (copy ``k`` of sample ``b``
   is row ``k * B + b``), rotated by its rep, graph indices offset;
4. :func:`call_model`: one model call over the ``K * B`` rows (or chunks of them);
5. :func:`split_heads`: every output head as ``(K, rows, ...)`` with the batch index and
   mask it is reduced with.

:func:`stack` runs all five and returns a :class:`Stacked`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import graph, groups
from .graph import GraphLayout, Role
from .ops import rotate_copies
from .ops.action import Action
from .ops.layout import accumulate_dtype, mask_for
from .ops.random_rotations import random_rotations_seeded, seed_tensor
from .reps import Rep, Voigt
from .spec import Spec, describe

__all__ = ["Inputs", "Stacked", "eval_mode", "stack", "read_inputs", "draw_rotations", "stack_copies", "call_model",
           "split_heads", "plan"]


def plan(spec: Spec, samples: Optional[int], default: int) -> tuple[int, bool]:
    """``(K, exhaustive)``: a finite group is twirled exhaustively when ``samples`` is
    None or its order; otherwise K i.i.d. draws (K >= 2 to estimate L_equiv)."""
    if not isinstance(spec, Spec):
        raise ValueError(f"spec must be a fastequiv.Spec, got {type(spec).__name__}")
    order = groups.group_order(spec.group)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive int or None, got {samples!r}")
    if order is not None and samples in (None, order):
        return order, True
    K = default if samples is None else samples
    return K, False


@dataclass
class Inputs:
    """One batch as the spec reads it."""

    leaves: list  # (name, value, rep or Role or None)
    obj: Any  # the object the inputs came in (e.g. a PyG Batch), or None
    layout: Optional[GraphLayout]
    B: int  # samples (graphs)
    rows: int  # rows of a per-element tensor: B (dense) or N nodes (graph)
    mask: Optional[torch.Tensor]
    device: torch.device
    dtype: torch.dtype  # accumulation dtype of the floating inputs


def read_inputs(inputs, spec: Spec, mask: Optional[torch.Tensor], chunk_size: Optional[int]) -> Inputs:
    """Step 1: the leaves, layout, batch size and mask of ``inputs`` (checked)."""
    obj = inputs if graph.is_object_input(inputs, spec) else None  # e.g. a PyG Batch
    if obj is not None:
        inputs = graph.object_leaves(obj, spec)
    leaves = spec.input_leaves(inputs)
    tensors = [(n, v) for n, v, r in leaves if isinstance(r, Rep)]
    layout = GraphLayout(leaves, spec.graph, obj) if spec.graph else None
    if layout is not None:
        if chunk_size is not None:
            raise ValueError(f"chunk_size={chunk_size!r}: chunking supports the dense layout only, "
                             "not a graph batch (pass a smaller batch instead)")
        B, rows = layout.B, layout.N
    else:
        sizes = {n: v.shape[0] for n, v in tensors}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every input needs the same batch size in dim 0, got {sizes}")
        B = rows = next(iter(sizes.values()))
        if B == 0:
            raise ValueError("inputs have batch size 0: there is no sample to decompose")
    _check_kept(leaves, layout, B)
    spec_mask = spec.mask_of(inputs)
    if spec_mask is not None and mask is not None:
        raise ValueError("pass mask= or name a mask input in the Spec, not both")
    mask = spec_mask if spec_mask is not None else mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 1 or mask.shape[0] != rows:
            what = f"N={rows} nodes" if layout is not None else f"B={B}"
            raise ValueError(f"mask must be a bool tensor of shape ({what}, ...), got {describe(mask)}")
    floats = [v for _, v in tensors if v.is_floating_point()]
    dtype = accumulate_dtype(*floats) if floats else torch.float32
    return Inputs(leaves, obj, layout, B, rows, mask, tensors[0][1].device, dtype)


def _check_kept(leaves: list, layout: Optional[GraphLayout], B: int) -> None:
    """Raise before the model call when a tensor the spec does not name (``unnamed="keep"``)
    has as many rows as the batch has samples, nodes or edges: the model would get it
    unstacked (``B`` rows next to inputs of ``K * B``) and fail deep inside, or worse, not."""
    sizes = layout.sizes() if layout is not None else {"sample": B}
    found = []
    for name, value, rep in leaves:
        if rep is None and isinstance(value, torch.Tensor) and value.dim() >= 1:
            levels = [lvl for lvl, n in sizes.items() if value.shape[0] == n]
            if levels:
                found.append((name, value.shape[0], levels))
    if not found:
        return
    what = "; ".join(f"{name!r} has {rows} rows, the number of {' and of '.join(l + 's' for l in levels)}"
                     for name, rows, levels in found)
    hint = ("declare each in spec.inputs by where its rows live, e.g. \"scalar@graph\", \"scalar@node\", "
            "\"vector@edge\"" if layout is not None else "give each a rep in spec.inputs (e.g. \"scalar\")")
    raise ValueError(f"inputs the spec does not name (unnamed=\"keep\" hands them over unstacked) have a row per "
                     f"sample, node or edge of the batch, so the model would see them next to K stacked copies of "
                     f"the rest: {what}. To stack them with the batch, {hint}; to keep them out of the model, "
                     "drop them from the inputs")


def draw_rotations(spec: Spec, K: int, exhaustive: bool, batch: Inputs, *, seed, generator,
                   backend: str) -> Action:
    """Step 2: the element of every copy, ``(K, B, 3, 3)``, as an :class:`Action`."""
    if exhaustive:
        G = groups.group_elements(spec.group, device=batch.device, dtype=batch.dtype)
        R = G[:, None].expand(K, batch.B, 3, 3)
    else:
        key = seed_tensor(seed, generator, batch.device)  # on the device: no host sync
        R = random_rotations_seeded(K * batch.B, key, spec.group, batch.dtype, backend=backend)
        R = R.reshape(K, batch.B, 3, 3)
    return Action(R, backend)


def _stack_graph_leaf(layout: GraphLayout, name: str, value, rep, action: Action, mask, backend: str):
    """The K stacked copies of one input of a graph batch (``rep`` a Rep or a Role)."""
    K = action.R.shape[0]
    if isinstance(rep, Role):
        if rep.kind == "batch":
            return (value[None] + layout.B * torch.arange(K, device=value.device)[:, None]).reshape(K * layout.N)
        if rep.kind == "index":
            off = layout.N * torch.arange(K, device=value.device).reshape((K,) + (1,) * value.dim())
            return torch.cat(list(value[None] + off), dim=-1)
        if rep.kind == "ptr":
            if value.shape[0] != layout.B + 1:
                raise ValueError(f"{name} is the node offsets (ptr) and must have B + 1 = {layout.B + 1} entries, "
                                 f"got {value.shape[0]}")
            return graph.stack_ptr(value, layout.N, K)
        return K * value if isinstance(value, torch.Tensor) else K * layout.B
    level = layout.level(value.shape[0], name, rep)
    if rep.cell and value.dim() == 2:  # MACE's flattened (3 B, 3) cells: three lattice vectors a graph
        cells = rotate_copies(value.reshape(layout.B, 3, 3), action, rep, None, backend=backend)
        return cells.reshape(3 * K * layout.B, 3)
    if level == "node":
        return rotate_copies(value, action, rep, mask, batch=layout.batch, backend=backend)
    if level == "graph":
        return rotate_copies(value, action, rep, None, backend=backend)
    if rep.kind == "position":
        raise ValueError(f"{name} is a per-edge input with rep position: edges have no centroid to turn "
                         "about; give edge vectors (rep vector) instead")
    if layout.edge_batch is None:
        raise ValueError(f"{name} is per edge, but the first index input {layout.index_names[0]!r} is neither a (2, E) "
                         "edge_index nor a 1-D (E,) index of the edges' first nodes, so an edge's graph is unknown")
    return rotate_copies(value, action, rep, None, batch=layout.edge_batch, backend=backend)


def stack_copies(batch: Inputs, action: Action, backend: str) -> tuple[list, list]:
    """Step 3: ``(names, values)``, every input leaf as its K stacked copies."""
    names, values = [], []
    for name, value, rep in batch.leaves:
        names.append(name)
        if rep is None:
            values.append(value)  # a non-tensor dict value passes through
        elif isinstance(rep, Voigt) and value.shape[-1] == 6:  # turned as the 3 x 3 tensor it stands for
            values.append(rep.from_matrix(_stack_leaf(batch, name, rep.to_matrix(value), rep.rank2, action, backend)))
        else:
            values.append(_stack_leaf(batch, name, value, rep, action, backend))
    return names, values


def _stack_leaf(batch: Inputs, name: str, value, rep, action: Action, backend: str):
    if batch.layout is not None:
        return _stack_graph_leaf(batch.layout, name, value, rep, action, batch.mask, backend)
    return rotate_copies(value, action, rep, batch.mask, backend=backend)


def call_model(model: Callable, spec: Spec, batch: Inputs, names: list, values: list, K: int,
               chunk_size: Optional[int]):
    """Step 4: the model on the ``K * B`` stacked rows: one call, or one per chunk.

    A model that differentiates inside its forward (``spec.model_grad``) runs with
    gradients enabled; in a no-grad measurement its outputs are then detached, so no
    graph outlives the call."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    measuring = not torch.is_grad_enabled()
    try:
        with torch.enable_grad() if spec.model_grad else contextlib.nullcontext():
            out = _call(model, spec, batch, names, values, K, chunk_size)
    except RuntimeError as err:
        if measuring and not spec.model_grad and "does not require grad" in str(err):
            raise ValueError(
                "the model called torch.autograd inside its forward (e.g. forces = -dE/dpos) while fastequiv "
                "measured it without gradients: declare it with fe.Spec(..., model_grad=True)") from err
        raise
    if spec.model_grad and measuring:
        out = _detached(out)
    return out


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict):
        return {k: _detached(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_detached(v) for v in out)
    return out


def _call(model, spec, batch, names, values, K, chunk_size):
    if batch.obj is not None:
        return model(graph.rebuild_object(batch.obj, dict(zip(names, values)), batch.layout, K))
    rows = K * batch.B
    if chunk_size is None or chunk_size >= rows:
        args, kwargs = spec.build_inputs(names, values)
        return model(*args, **kwargs)
    pieces = []
    for start in range(0, rows, chunk_size):
        part = [v[start:start + chunk_size] if isinstance(v, torch.Tensor) else v for v in values]
        args, kwargs = spec.build_inputs(names, part)
        pieces.append([v for _, v, _ in spec.output_leaves(model(*args, **kwargs))])
    return spec.build_output([torch.cat(col, dim=0) for col in zip(*pieces)])


@dataclass
class Head:
    """One output head on the K copies: ``value`` ``(K, rows, ...)``, its rep, and the batch
    index (graph layout, per node) and mask it is reduced with."""

    name: str
    value: torch.Tensor
    rep: Rep
    batch: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    declared: Optional[Rep] = None  # the spec's rep, where it differs (a Voigt head is reduced as rank2)


def split_heads(out, spec: Spec, batch: Inputs, K: int, check_finite: bool) -> list[Head]:
    """Step 5: every output head as ``(K, rows, ...)``, checked."""
    layout, B = batch.layout, batch.B
    heads = []
    for name, value, rep in spec.output_leaves(out):
        declared = rep
        if isinstance(rep, Voigt):  # reduced as the 3 x 3 tensor it stands for
            value, rep = rep.to_matrix(value), rep.rank2
        if rep.kind == "vector" and value.dim() >= 3 and tuple(value.shape[-2:]) == (3, 3) \
                and any(word in name.lower() for word in ("stress", "virial")):
            warnings.warn(f"model output {name!r} of shape {tuple(value.shape)} is declared \"vector\": that rotates "
                          "the rows of each 3 x 3 matrix only (S -> R S); a stress or virial tensor is \"rank2\" "
                          "(S -> R S R^T)", stacklevel=4)
        if layout is not None and value.shape[0] == K * layout.N:
            n, index, mask = layout.N, layout.batch, batch.mask
        elif value.shape[0] == K * B:  # per sample (dense), or per graph
            n, index, mask = B, None, batch.mask if layout is None else None
        else:
            what = f"{K * layout.N} (per node) or {K * B} (per graph)" if layout is not None else f"{K * B}"
            raise ValueError(
                f"model output {name!r} has {value.shape[0]} rows in dim 0 but expected {what}: the model "
                f"was called on {K} stacked copies of a batch of {B}; the model must keep the batch size"
            )
        value = value.reshape((K, n) + tuple(value.shape[1:]))
        if check_finite:
            _check_finite(value, mask, name)
        heads.append(Head(name, value, rep, index, mask, declared))
    return heads


def _check_finite(value: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> None:
    """Raise a ValueError if a valid element of ``value`` ``(K, rows, ...)`` is NaN or inf
    (masked-out elements may hold anything). One host copy; skipped inside torch.compile
    and CUDA-graph capture."""
    if torch.compiler.is_compiling() or (value.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = ~torch.isfinite(value)
    m = mask_for(mask, value.shape[1:], f"output {name!r}") if value.is_floating_point() else None
    if m is not None:
        bad = bad & m
    if bool(bad.any()):
        raise ValueError(f"model output {name!r} has non-finite values (NaN or inf) at valid elements of the "
                         "rotated copies (check_finite=False skips this check)")


@contextlib.contextmanager
def eval_mode(model):
    """Evaluate ``model`` (if an ``nn.Module``) in eval mode and restore every submodule's
    own mode afterwards: a measurement must not count dropout noise as equivariance error
    nor move BatchNorm's running statistics."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, training in zip(modules, modes):
            m.training = training


@dataclass
class Stacked:
    """The K rotated copies of a batch, pushed through the model once."""

    action: Action
    heads: list[Head]
    inputs: Inputs
    K: int
    exhaustive: bool

    @property
    def R(self) -> torch.Tensor:
        return self.action.R

    @property
    def B(self) -> int:
        return self.inputs.B


def stack(model: Callable, inputs, spec: Spec, K: int, exhaustive: bool, *, mask=None, seed=None, generator=None,
          chunk_size=None, backend: str = "auto", check_finite: bool = True) -> Stacked:
    """Steps 1 to 5: the model's outputs on the K rotated copies of ``inputs``."""
    batch = read_inputs(inputs, spec, mask, chunk_size)
    action = draw_rotations(spec, K, exhaustive, batch, seed=seed, generator=generator, backend=backend)
    names, values = stack_copies(batch, action, backend)
    out = call_model(model, spec, batch, names, values, K, chunk_size)
    heads = split_heads(out, spec, batch, K, check_finite)
    return Stacked(action, heads, batch, K, exhaustive)
