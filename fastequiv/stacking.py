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

:func:`stack` runs all five and returns a :class:`Stacked`. On the cpu backend a measuring
call is planned once per spec, options and batch shapes (:class:`CallPlan`,
:func:`call_plan`): later calls of the kind run the same five steps in a few kernels.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import graph, groups
from .backends import native, registry
from .graph import GraphLayout, Role
from .ops import rotate_copies
from .ops.action import Action
from .ops.decomposition import HeadRows
from .ops.layout import ROW_KINDS, accumulate_dtype, centroids, mask_for, per_irrep, rows_of
from .ops.random_rotations import random_rotations_seeded, seed_tensor
from .reps import Rep, Voigt
from .spec import Spec, describe

__all__ = ["Inputs", "Stacked", "eval_mode", "stack", "read_inputs", "draw_rotations", "stack_copies", "call_model",
           "split_heads", "plan", "CallPlan", "HeadPlan", "call_plan"]


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


# --- the hot path: one kind of call, planned once ----------------------------------------------

#: plans per spec (dropped with the spec), at most PLANS_PER_SPEC kinds of call each
_PLANS: "weakref.WeakKeyDictionary[Spec, dict]" = weakref.WeakKeyDictionary()
PLANS_PER_SPEC = 64
_SCALARS = (int, float, bool, str, type(None))


def _signature(value):
    """What a plan depends on in ``value`` (the inputs, a target or a mask): the layout of
    its tensors and the value of everything else, or None when that cannot be told cheaply
    (an object, a list)."""
    t = type(value)
    if t is torch.Tensor or isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device, value.is_contiguous(), value.requires_grad
    if t is dict:
        parts = []
        for k, v in value.items():
            s = _signature(v)
            if s is None:
                return None
            parts.append((k, s))
        return t, tuple(parts)
    if t is tuple:
        parts = tuple(_signature(v) for v in value)
        return None if None in parts else (t, parts)
    return (t, value) if t in _SCALARS else None


class HeadPlan(NamedTuple):
    """One output head of a planned call: its place, rep and the rows the kernels see."""

    index: int
    name: str
    rep: Rep
    shape: torch.Size  # of one copy (the target's shape)
    acc: torch.dtype
    node: bool  # per node of a graph batch (reduced with the batch index)
    masked: bool
    N: int  # rows of d components
    d: int
    P: int  # rows a sample (dense), rows a node (graph)


class CallPlan:
    """Steps 1 to 5 of one kind of measuring call, worked out once (the hot path of the
    ``"cpu"`` backend; :func:`call_plan` makes and keeps them).

    A call's spec, options and the shapes, dtypes and layout of its batch decide everything
    but the numbers: how each input is stacked, the batch size, the rows of every output
    head, which kernels run. The first call of a kind goes through :func:`read_inputs` (every
    check of the batch, graph indices read and checked against the batch's size) and
    :func:`split_heads`; later calls of the kind hand their numbers to the kernels on data
    pointers (no DLPack import, no custom-op dispatch), with the values the steps above
    compute, bit for bit:

    * the rotations drawn in place (an int seed stays an int);
    * graph indices offset by one kernel, positions of a graph batch turned about centroids
      the kernel sums in the order ``index_add_`` does, scalars repeated, every other rep
      rotated by ``rotate_rows`` with the matrices of :class:`~fastequiv.ops.Action`;
    * each output head's rows handed to :func:`fastequiv.ops.decomposition.decompose_heads`.

    What a later call's values can get wrong is checked where it is free: every sample index
    a CPU kernel reads is bounds-checked there (a ValueError); an edge index out of range
    fails where the model indexes with it. Tensors that need a gradient, half-precision
    inputs, object inputs (a PyG Batch), chunking, Voigt and voxel reps, per-irrep blocks
    and position outputs are not planned: those calls take the steps above.
    """

    def __init__(self, spec: Spec, K: int, exhaustive: bool, batch: Inputs, backend: str):
        self.spec, self.K, self.exhaustive, self.backend = spec, K, exhaustive, backend
        self.B, self.acc, self.layout = batch.B, batch.dtype, batch.layout
        layout = batch.layout
        self.model_inputs = Inputs([], None, layout, batch.B, batch.rows, None, batch.device, batch.dtype)
        self.finite = groups.is_finite_group(spec.group)
        self.improper = spec.group == "O3"
        self.R_shape = (K, batch.B, 3, 3)
        self.R_fixed = None
        if exhaustive:  # the group's elements: the same every call
            G = groups.group_elements(spec.group, device=batch.device, dtype=batch.dtype)
            self.R_fixed = G[:, None].expand(self.R_shape).contiguous()
        self.constants: dict = {}  # (shape, dtype) -> zeros the kernels read; ("mean", head, shape) -> scratch
        self.heads: dict = {}  # output signature -> list of HeadPlan, or None (not planned)
        self.steps = [self._step(name, value, rep, batch) for name, value, rep in batch.leaves]
        self.names = [name for name, _, _ in batch.leaves]
        self.reps = [rep for _, _, rep in batch.leaves]
        self.ok = all(step is not None for step in self.steps)
        if layout is not None:
            self.batch_pos = self.names.index(spec.graph["batch"])
            first = layout.index_names[0] if layout.index_names else None
            self.edge_pos = self.names.index(first) if layout.edge_batch is not None else None
            self.edge_2d = first is not None and batch.leaves[self.names.index(first)][1].dim() == 2

    def zeros(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Zeros the kernels only read (the centre of a rep without one, a zero target),
        made once."""
        key = (shape, dtype)
        if key not in self.constants:
            self.constants[key] = torch.zeros(shape, dtype=dtype)
        return self.constants[key]

    def matrices(self, action: Action, rep: Rep, dtype: torch.dtype) -> torch.Tensor:
        """``action.matrices(rep, dtype)``; for scalars (ones) made once."""
        if rep.kind == "scalar":
            key = ("ones", dtype)
            if key not in self.constants:
                self.constants[key] = action.matrices(rep, dtype)
            return self.constants[key]
        return action.matrices(rep, dtype)

    def _step(self, name, value, rep, batch: Inputs):
        """How one input leaf is stacked (a tuple read by :meth:`copies`), or None."""
        layout = batch.layout
        if rep is None:
            return ("pass",)
        if isinstance(rep, Role):
            if rep.kind == "num_graphs":
                return ("num_graphs",)
            if rep.kind == "batch":
                return ("offset", 1, layout.N, layout.B)
            if rep.kind == "index" and value.shape[-1] > 0:
                return ("offset", value.numel() // value.shape[-1], value.shape[-1], layout.N)
            return None  # ptr, empty indices
        level, masked = "dense", batch.mask
        if layout is not None:
            level = layout.level(value.shape[0], name, rep)  # a ValueError where no level fits
            masked = batch.mask if level == "node" else None
        if isinstance(rep, Voigt) or rep.kind not in ROW_KINDS or per_irrep(rep) or rep.cell:
            return None
        if rep.kind == "scalar":
            mask_for(masked, value.shape, "x")  # a ValueError for a mask of another shape
            return ("tile", (self.K,) + (1,) * (value.dim() - 1))
        if value.dtype not in (torch.float32, torch.float64):
            return None
        m = mask_for(masked, value.shape, "x")
        rows = rows_of(value.shape, rep, m, None)
        sample = "batch" if level == "node" else "edge" if level == "edge" else None
        if level == "edge" and layout.edge_batch is None:
            return None
        centre = None
        if rep.kind == "position":
            centre = "kernel" if level == "node" and rows.P == 1 else "torch"
        return ("rotate", rep, level, sample, rows.P, rows.N, rows.d, centre, m is not None,
                (self.K * value.shape[0],) + tuple(value.shape[1:]))

    # -- steps 2 and 3 ----------------------------------------------------------------------

    def rotations(self, seed, generator) -> torch.Tensor:
        """Step 2: ``R`` ``(K, B, 3, 3)`` in acc, as :func:`draw_rotations` draws it."""
        if self.R_fixed is not None:
            return self.R_fixed
        if seed is not None:
            key = groups.resolve_seed(seed, generator)
        elif generator is not None:
            key = int(seed_tensor(None, generator, torch.device("cpu")))
        else:
            key = int(torch.randint(0, groups.SEED_MAX, ()))
        if self.finite:  # a finite-group draw is an index gather (as random_rotations_seeded)
            words = groups.philox_words(self.K * self.B, torch.tensor(key), 0)
            R = groups.elements_from_words(words, self.spec.group).to(self.acc)
            return R.reshape(self.R_shape)
        R = torch.empty(self.R_shape, dtype=self.acc)
        native.raw().random_rotations_raw_cpu(R.data_ptr(), native.CODES[self.acc], self.K * self.B, key, 0,
                                              self.improper)
        return R

    def copies(self, values: list, action: Action, mask: Optional[torch.Tensor]) -> list:
        """Step 3: every input leaf's K stacked copies (``values`` in leaf order)."""
        C, K, B, acc = native.raw(), self.K, self.B, self.acc
        code = native.CODES[acc]
        batch = edge = None
        if self.layout is not None:
            batch = values[self.batch_pos]
        out = []
        for step, value in zip(self.steps, values):
            kind = step[0]
            if kind == "pass":
                out.append(value)
            elif kind == "tile":
                out.append(value.repeat(step[1]))
            elif kind == "offset":
                _, rows, width, shift = step
                stacked = torch.empty(value.shape[:-1] + (K * width,), dtype=torch.int64)
                src = value.contiguous()  # held while the kernel reads it
                C.offset_copies_raw_cpu(src.data_ptr(), stacked.data_ptr(), rows, width, K, shift)
                out.append(stacked)
            elif kind == "num_graphs":
                out.append(K * value)
            else:
                _, rep, level, which, P, N, d, centre, masked, shape = step
                if which == "edge" and edge is None:
                    first = values[self.edge_pos]
                    edge = batch[first[0] if self.edge_2d else first]
                sample = batch if which == "batch" else edge if which == "edge" else None
                valid = None
                if masked or (sample is not None and P > 1):
                    rows = rows_of(value.shape, rep, mask_for(mask if masked else None, value.shape, "x"), sample)
                    sample, valid = rows.sample, rows.valid
                    if valid is not None:
                        valid = valid.contiguous()
                M = self.matrices(action, rep, acc)
                x = value.contiguous()
                # every tensor whose pointer a kernel gets is held by a name until it returns
                if centre is None:
                    c = self.zeros((B, d), acc)
                elif centre == "kernel":
                    c = None  # the kernel sums the centroids
                else:
                    rows = rows_of(value.shape, rep, mask_for(mask if masked else None, value.shape, "x"), sample)
                    c = centroids(x.reshape(N, d).to(acc), rows, B)
                stacked = torch.empty(shape, dtype=x.dtype)
                C.rotate_rows_raw_cpu(x.data_ptr(), M.data_ptr(), native.ptr(sample), 0 if sample is not None else P,
                                      native.ptr(c), stacked.data_ptr(), K, N, B, d, native.CODES[x.dtype], code,
                                      native.ptr(valid), c is None)
                out.append(stacked)
        return out

    # -- step 5 and the heads' rows -------------------------------------------------------------

    def _head_plan(self, out, target, mask) -> Optional[list]:
        """The rows of every output head for outputs and targets like these (checked by
        :func:`split_heads` and as :func:`fastequiv.ops.twirl_reduce` checks them), or None."""
        K = self.K
        heads = split_heads(out, self.spec, dataclasses.replace(self.model_inputs, mask=mask), K, check_finite=False)
        targets = [None] * len(heads) if target is None else \
            [y for _, y, _ in self.spec.output_leaves(target, "target")]
        plans = []
        for i, (head, y) in enumerate(zip(heads, targets)):
            value, rep = head.value, head.rep
            if isinstance(head.declared, Voigt) or rep.kind not in ROW_KINDS or rep.kind == "position" \
                    or per_irrep(rep) or value.dtype not in (torch.float32, torch.float64):
                return None
            shape = value.shape[1:]
            if y is not None:
                if not isinstance(y, torch.Tensor) or y.shape != shape:
                    return None  # the steps above raise the error
                if y.requires_grad or not (y.is_floating_point() or y.dtype == value.dtype):
                    return None  # a target's gradient: the steps give it
            acc = accumulate_dtype(value) if y is None else accumulate_dtype(value, y)
            masked = head.mask is not None
            rows = rows_of(shape, rep, mask_for(head.mask, shape, "target"), None)
            node = head.batch is not None
            plans.append(HeadPlan(i, head.name, rep, shape, acc, node, masked, rows.N, rows.d,
                                  rows.P))
        if len({p.acc for p in plans}) != 1:
            return None
        return plans

    def head_rows(self, out, target, action: Action, batch: Inputs, grad: bool, replicates: int = 1) -> Optional[list]:
        """Step 5 on planned heads: every head as :class:`~fastequiv.ops.decomposition.HeadRows`.
        With ``replicates`` > 1 (a rotation design's, :mod:`fastequiv.design_twirl`), each
        head's ``mean`` is ``(replicates, N, d)``, one twirled mean a replicate, and a target
        is given in acc."""
        spec = self.spec
        if type(out) is dict and isinstance(spec.output, dict):
            values = [out[name] if name in out else None for name in spec.output]
        elif isinstance(spec.output, tuple) and isinstance(out, (tuple, list)) and len(out) == len(spec.output):
            values = list(out)
        elif isinstance(spec.output, Rep) and isinstance(out, torch.Tensor):
            values = [out]
        else:
            return None
        if any(not isinstance(v, torch.Tensor) for v in values):
            return None
        if target is None:
            targets = [None] * len(values)
        elif type(target) is dict and isinstance(spec.output, dict):
            targets = [target.get(name) for name in spec.output]
        elif isinstance(spec.output, tuple) and isinstance(target, (tuple, list)):
            targets = list(target)
        elif isinstance(spec.output, Rep):
            targets = [target]
        else:
            return None
        key = tuple((v.shape, v.dtype, v.requires_grad) for v in values) + \
            tuple(None if y is None else (type(y), getattr(y, "shape", None), getattr(y, "dtype", None),
                                          getattr(y, "requires_grad", None)) for y in targets)
        mask = batch.mask
        if key not in self.heads:
            self.heads[key] = self._head_plan(out, target, mask)
        plans = self.heads[key]
        if plans is None:
            return None
        K, B = self.K, self.B
        batch_index = batch.layout.batch if batch.layout is not None else None
        rows = []
        for p, value, y in zip(plans, values, targets):
            if y is None:  # no labels: L_mean against zeros is the twirled prediction's size
                y = self.zeros(tuple(p.shape), value.dtype)
            elif y.dtype != p.acc and (replicates > 1 or y.dtype != value.dtype):
                y = y.to(p.acc)
            sample, valid, P = None, None, p.P
            if p.node:
                sample, P = batch_index, 0
            if p.masked or (p.node and p.P > 1):
                r = rows_of(p.shape, p.rep, mask_for(mask if p.masked else None, p.shape, "target"),
                            batch_index if p.node else None)
                sample, valid = r.sample, r.valid
                if valid is not None:
                    valid = valid.contiguous()
            shape = (p.N, p.d) if replicates == 1 else (replicates, p.N, p.d)
            mean = torch.empty(shape, dtype=p.acc) if grad else self.scratch(p, shape)
            rows.append(HeadRows(value.contiguous(), self.matrices(action, p.rep, p.acc), y.contiguous(), sample, P, valid,
                                 p.N, p.d, self.zeros((K, B, p.d), p.acc), mean))
        return rows

    def scratch(self, p: "HeadPlan", shape: Optional[tuple] = None) -> torch.Tensor:
        """The twirled mean's buffer of a head of a call without gradient (``shape``, default
        ``(N, d)``): written by the kernels and read only within the call, so one buffer
        serves every call."""
        shape = (p.N, p.d) if shape is None else shape
        key = ("mean", p.index, shape)
        if key not in self.constants:
            self.constants[key] = torch.empty(shape, dtype=p.acc)
        return self.constants[key]

    def inputs_of(self, values: list, mask: Optional[torch.Tensor]) -> Inputs:
        """Step 1's :class:`Inputs` of a planned call (``values`` in leaf order)."""
        layout = self.layout
        if layout is not None:
            layout = copy.copy(layout)
            layout.batch = values[self.batch_pos]
            if layout.edge_batch is not None:
                first = values[self.edge_pos]
                layout.edge_batch = layout.batch[first[0] if self.edge_2d else first]
        leaves = list(zip(self.names, values, self.reps))
        return dataclasses.replace(self.model_inputs, leaves=leaves, layout=layout, mask=mask)

    def leaf_values(self, inputs) -> list:
        """The input leaves of ``inputs`` in the plan's order."""
        if type(inputs) is dict:
            return [inputs[name] for name in self.names]
        if type(inputs) is tuple:
            return list(inputs)
        return [inputs]

    def mask_of(self, inputs, mask):
        return inputs[self.spec.mask] if self.spec.mask is not None else mask


def _on_cpu_kernels(inputs, backend: str) -> bool:
    """Whether the row kernels of ``backend`` are the cpu backend's for these inputs (on the
    device of their first tensor)."""
    values = inputs.values() if type(inputs) is dict else inputs if type(inputs) is tuple else (inputs,)
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None or first.device.type != "cpu":
        return False
    try:
        return all(registry.resolve_name(op, backend, first.device) == "cpu" for op in ("rotate_rows", "reduce_rows"))
    except (ValueError, registry.BackendUnavailableError):
        return False  # the steps raise it, naming the op that cannot run


def _planned(spec: Spec, inputs, K: int, exhaustive: bool, mask, backend: str) -> Optional[CallPlan]:
    """A new plan for this kind of call, or None where the steps above must run (see
    :class:`CallPlan`). Raises what :func:`read_inputs` raises for a bad batch."""
    batch = read_inputs(inputs, spec, mask, None)
    if batch.device.type != "cpu" or batch.obj is not None:
        return None
    if any(isinstance(v, torch.Tensor) and v.requires_grad for _, v, _ in batch.leaves):
        return None
    if batch.mask is not None and not batch.mask.is_contiguous():
        return None
    plan = CallPlan(spec, K, exhaustive, batch, backend)
    return plan if plan.ok else None


def call_plan(spec: Spec, inputs, K: int, exhaustive: bool, *, mask=None, chunk_size=None,
              backend: str = "auto") -> Optional[CallPlan]:
    """The :class:`CallPlan` of this kind of call (made on its first call, then kept with
    the spec), or None: the call takes the steps above (chunking, an object input, a GPU,
    another backend, inside ``torch.compile``, ...)."""
    if chunk_size is not None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return None  # chunking; traced (torch.compile, make_fx, fake tensors): the steps
    sig = _signature(inputs)
    if sig is None or not _on_cpu_kernels(inputs, backend):
        return None
    B = None
    if spec.graph and "num_graphs" not in spec.graph and type(inputs) is dict:
        # the number of graphs is the batch index's largest value: read on each call (a CPU
        # tensor: no device sync), so it can key the plan
        index = inputs.get(spec.graph["batch"])
        if isinstance(index, torch.Tensor) and index.device.type == "cpu" and index.numel():
            B = int(index.max()) + 1
    key = (sig, None if mask is None else _signature(mask), K, exhaustive, backend, B)
    try:
        plans = _PLANS.get(spec)
        if plans is None:
            plans = _PLANS[spec] = {}
    except TypeError:  # a spec that cannot be a weak dict key (unhashable): not planned
        return None
    if key not in plans:
        if len(plans) >= PLANS_PER_SPEC:
            plans.clear()
        plans[key] = _planned(spec, inputs, K, exhaustive, mask, backend)
    return plans[key]
