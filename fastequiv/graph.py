"""The graph layout (PyG style): flat node tensors, a batch index and edge indices.

A graph batch is ``N`` nodes of ``B`` graphs in flat tensors ``(N, ...)``, with the graph
of each node in ``batch`` ``(N,)`` (int64) and node indices such as ``edge_index``
``(2, E)``. The spec names these inputs by role instead of a rep::

    spec = fe.Spec(inputs={"pos": "position", "z": "scalar",
                           "batch": "batch", "edge_index": "index"},
                   output={"energy": "scalar", "forces": "vector"})

======================  =============================================================
role                    the K stacked copies (one model call)
======================  =============================================================
``"batch"``             ``cat_k (batch + k * B)``: copy ``k`` of graph ``b`` is graph ``k * B + b``
``"index"``             ``cat_k (index + k * N)`` along the last dim (``(2, K * E)`` for ``edge_index``,
                        ``(K * E,)`` for each of a pair of 1-D indices)
``"num_graphs"``        ``K * B`` (an int, or a tensor like the input)
``"ptr"``               ``(K B + 1,)`` node offsets of the stacked graphs
======================  =============================================================

Every tensor with a rep is stacked along dim 0 by its level:

* per node (``N`` rows): copy ``k`` of node ``i`` is row ``k * N + i``, rotated by
  rotation number ``k * B + batch[i]``; positions turn about their graph's centroid.
* per graph (``B`` rows; a cell may also come flattened as ``3 B`` rows, MACE's layout):
  row ``k * B + b``.
* per edge (``E`` rows, the last dim of the first ``"index"`` input): edge vectors, the
  periodic shifts of MACE and NequIP, rotated with the graph of the edge's first node
  (``index[0]``). Edges given as two 1-D index tensors (SchNetPack's ``_idx_i`` and
  ``_idx_j``, Orb's ``senders`` and ``receivers``) are declared as two ``"index"``
  inputs, the edge's first node first in the spec: ``{"idx_i": "index", "idx_j":
  "index", ...}``.

A rep may declare its level (``"vector@edge"``, ``"scalar@graph"``, ``"cell"``); otherwise
its row count decides, and only where it is unambiguous: a tensor whose row count is
both ``N`` and ``E`` (or ``B``) raises a ValueError that says how to declare it, instead
of being rotated the wrong way. Outputs are per node (``K * N`` rows, reduced per graph
with the batch index: a graph's loss is the mean over its nodes' elements) or per graph
(``K * B`` rows, e.g. energies). So the decomposition of a graph batch equals that of the
same graphs padded into a dense batch with a mask, rotation for rotation.

The number of graphs ``B`` comes from a ``"num_graphs"`` input if there is one, else
from ``inputs.num_graphs`` for an object input (a PyG ``Batch``), else from
``batch.max() + 1``, which copies one number to the host.

Object inputs. When the inputs are one object whose attributes the spec names (a
``torch_geometric.data.Batch``, a MACE batch, or any object with those attributes), the
model is called with a shallow copy (``copy.copy``) whose attributes are the stacked
copies; its ``ptr`` (``(B + 1,)`` node offsets) and its number of graphs (PyG keeps it
in the data store as ``_num_graphs``) describe the ``K B`` stacked graphs. A tensor
attribute the spec does not name raises, as a dict key does, unless the spec says
``unnamed="keep"`` (carried unchanged). torch_geometric is never imported.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .reps import describe

__all__ = ["ROLES", "Role", "GraphLayout", "is_object_input", "object_leaves", "rebuild_object", "unnamed_error"]

ROLES = ("batch", "index", "num_graphs", "ptr")


class Role:
    """An input that describes the graph structure rather than transforming under rotations."""

    dim = None

    def __init__(self, kind: str):
        if kind not in ROLES:
            raise ValueError(f"graph role must be one of {ROLES}, got {kind!r}")
        self.kind = kind

    def __repr__(self) -> str:
        return f"Role({self.kind!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Role) and other.kind == self.kind

    def __hash__(self) -> int:
        return hash(("role", self.kind))

    def check(self, x, name: str) -> None:
        if self.kind == "num_graphs":
            if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, torch.Tensor) and x.numel() == 1)):
                raise ValueError(f"{name} is the number of graphs: an int or a one-element tensor, got {describe(x)}")
            return
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise ValueError(f"{name} is a graph {self.kind} input and must be an int64 tensor, got {describe(x)}")
        if self.kind == "batch" and x.dim() != 1:
            raise ValueError(f"{name} is the batch index and must have shape (N,), got {tuple(x.shape)}")
        if self.kind == "ptr" and x.dim() != 1:
            raise ValueError(f"{name} is the node offsets (ptr) and must have shape (B + 1,), got {tuple(x.shape)}")
        if self.kind == "index" and x.dim() < 1:
            raise ValueError(f"{name} is a node index and needs at least one dim (e.g. (2, E)), got a 0-dim tensor")


def as_role(value) -> Optional[Role]:
    """The role named by ``value`` (or ``value`` itself if a Role), or None if it names none."""
    if isinstance(value, Role):
        return value
    return Role(value) if isinstance(value, str) and value in ROLES else None


def graph_roles(struct) -> dict:
    """``{"batch": name, "index": [names], "num_graphs": name}`` from parsed spec inputs ({} if none)."""
    # tuple inputs are named "0", "1", ... like their leaves (Spec.input_leaves)
    items = struct.items() if isinstance(struct, dict) else \
        ((str(i), r) for i, r in enumerate(struct)) if isinstance(struct, tuple) else ()
    roles: dict = {}
    for name, r in items:
        if isinstance(r, Role):
            if r.kind == "index":
                roles.setdefault("index", []).append(name)
            elif r.kind in roles:
                raise ValueError(f"spec.inputs names two {r.kind!r} inputs: {roles[r.kind]!r} and {name!r}")
            else:
                roles[r.kind] = name
    if roles and "batch" not in roles:
        raise ValueError(f"spec.inputs has graph inputs {roles} but no \"batch\" input (the graph of each node)")
    return roles


def unnamed_error(listed: str, count: int) -> ValueError:
    """The error for inputs the spec does not name (``listed``: all of them, described)."""
    verb = "has" if count == 1 else "have"
    return ValueError(
        f"{listed} {verb} no rep in the spec: add each to spec.inputs (\"scalar\" if rotations leave it unchanged, "
        "\"scalar@graph\" if per graph, \"vector@edge\" for edge shifts...), or pass fe.Spec(..., unnamed=\"keep\") "
        "to hand them to the model unchanged (not stacked)")


def is_object_input(inputs, spec) -> bool:
    """An object (e.g. a PyG Batch) whose attributes are the spec's dict inputs."""
    return (isinstance(spec.inputs, dict) and not isinstance(inputs, (dict, tuple, list, torch.Tensor))
            and all(hasattr(inputs, k) for k in spec.inputs))


def _attribute_names(obj) -> list:
    keys = getattr(obj, "keys", None)
    if keys is not None:
        keys = keys() if callable(keys) else keys  # PyG: a method; MACE's batch: a list
        return [k for k in keys if isinstance(k, str)]
    return [k for k in vars(obj) if not k.startswith("_")]


def object_leaves(obj, spec) -> dict:
    """The inputs held by ``obj``: the spec's names, and (``unnamed="keep"``) the rest.

    A tensor attribute the spec does not name raises unless ``unnamed="keep"``; the
    node offsets ``ptr`` of a PyG/MACE batch, which describe the structure, are stacked
    with the batch whether named or not."""
    values = {k: getattr(obj, k) for k in spec.inputs}
    unnamed = [k for k in _attribute_names(obj)
               if k not in spec.inputs and k != "ptr" and isinstance(getattr(obj, k, None), torch.Tensor)]
    if unnamed and spec.unnamed != "keep":
        raise unnamed_error(f"the input object's tensor attributes {unnamed} ("
                            + ", ".join(describe(getattr(obj, k)) for k in unnamed) + ")", len(unnamed))
    if spec.unnamed == "keep":
        values.update({k: getattr(obj, k) for k in unnamed})  # checked for per-row sizes like dict inputs
    return values


def rebuild_object(obj, values: dict, layout: "GraphLayout", K: int):
    """A shallow copy of ``obj`` holding the stacked ``values``, its ``ptr`` and number of
    graphs describing the ``K B`` stacked graphs."""
    new = copy.copy(obj)
    for k, v in values.items():
        setattr(new, k, v)
    ptr = getattr(obj, "ptr", None)
    if isinstance(ptr, torch.Tensor) and "ptr" not in values and ptr.dim() == 1 and ptr.numel() == layout.B + 1:
        setattr(new, "ptr", stack_ptr(ptr, layout.N, K))
    # PyG keeps the number of graphs in its data store, read through hasattr/getattr
    if "_num_graphs" in getattr(obj, "__dict__", {}):
        new.__dict__["_num_graphs"] = K * layout.B
    elif hasattr(obj, "_num_graphs"):
        setattr(new, "_num_graphs", K * layout.B)
    return new


def stack_ptr(ptr: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The ``(K B + 1,)`` node offsets of K stacked copies of a batch with offsets ``ptr``."""
    shifted = [ptr[:-1] + k * N for k in range(K)] + [ptr[-1:] + (K - 1) * N]
    return torch.cat(shifted)


def index_range(index: torch.Tensor) -> Optional[tuple[int, int]]:
    """``(min, max)`` of an index tensor (one host copy), or None where reading it is not
    allowed: an empty tensor, inside ``torch.compile``, during CUDA-graph capture."""
    if index.numel() == 0 or torch.compiler.is_compiling():
        return None
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    lo, hi = torch.stack(torch.aminmax(index)).tolist()
    return lo, hi


def check_index_values(index: torch.Tensor, upper: int, name: str, what: str) -> None:
    """Raise a ValueError unless every value of ``index`` is in ``[0, upper)`` (see
    :func:`index_range` for when the values are read)."""
    span = index_range(index)
    if span is not None and (span[0] < 0 or span[1] >= upper):
        raise ValueError(f"{name} holds values from {span[0]} to {span[1]}, but it indexes {what}: every value "
                         f"must be in [0, {upper})")


class GraphLayout:
    """The sizes of a graph batch and how each of its inputs is stacked (see module docs)."""

    def __init__(self, leaves: list, roles: dict, obj: Any = None):
        values = {name: value for name, value, _ in leaves}
        self.batch = values[roles["batch"]]
        self.N = self.batch.shape[0]
        self.index_names = roles.get("index", [])
        first = values[self.index_names[0]] if self.index_names else None
        self.E = first.shape[-1] if first is not None else None
        # the graph of each edge is that of its first node: index[0] of a (2, E) edge_index,
        # or the first of a pair of 1-D indices (SchNetPack's idx_i, Orb's senders)
        if first is None or not self.E or first.dim() > 2:
            self.edge_batch = None
        else:
            self.edge_batch = self.batch[first[0] if first.dim() == 2 else first]
        self.num_graphs_name = roles.get("num_graphs")
        # the batch index is read once per call (one host copy on a GPU; none inside
        # torch.compile or CUDA-graph capture, where it is trusted)
        span = index_range(self.batch)
        if self.num_graphs_name is not None:
            self.B = int(values[self.num_graphs_name])
        elif obj is not None and isinstance(getattr(obj, "num_graphs", None), int):
            self.B = obj.num_graphs
        elif self.N:
            if span is None:
                raise ValueError(f"the number of graphs cannot be read from {roles['batch']!r} here (inside "
                                 "torch.compile or CUDA-graph capture): name a \"num_graphs\" input")
            self.B = span[1] + 1
        else:
            self.B = 0
        if self.B <= 0:
            raise ValueError("the graph batch has no graph (batch size 0): there is nothing to decompose")
        if span is not None and (span[0] < 0 or span[1] >= self.B):
            raise ValueError(f"{roles['batch']!r} holds graph indices from {span[0]} to {span[1]}, but the batch "
                             f"has B = {self.B} graphs: every value must be in [0, {self.B})")
        for name in self.index_names:
            check_index_values(values[name], max(self.N, 1), repr(name), f"the N = {self.N} nodes")

    def sizes(self) -> dict:
        return {"node": self.N, "graph": self.B, **({"edge": self.E} if self.E is not None else {})}

    def level(self, rows: int, name: str, rep=None) -> str:
        """Where a tensor of ``rows`` rows lives: its rep's declared level, or the one level
        whose size is ``rows`` (a ValueError when none is, or several are)."""
        sizes = self.sizes()
        what = ", ".join(f"{n} = {s} {lvl}s" for lvl, n, s in
                         [("node", "N", self.N), ("graph", "B", self.B)] + ([("edge", "E", self.E)] if self.E is not None else []))
        declared = getattr(rep, "level", None)
        if declared is None and getattr(rep, "kind", None) == "position":
            declared = "node"  # positions are the nodes' (an edge has no centroid to turn about)
        if declared is not None:
            if declared == "edge" and self.E is None:
                raise ValueError(f"{name} is declared per edge, but the spec names no \"index\" input (edge_index)")
            want = sizes[declared]
            if rows == want or (getattr(rep, "cell", False) and rows == 3 * self.B):
                return declared
            raise ValueError(f"{name} is declared per {declared} but has {rows} rows in dim 0; the graph batch has {what}")
        found = [lvl for lvl, size in sizes.items() if rows == size]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(f"{name} has {rows} rows in dim 0; the graph batch has {what}")
        base = rep.name if rep is not None else "scalar"
        options = " or ".join(f"'{base}@{lvl}'" for lvl in found)
        raise ValueError(f"{name} has {rows} rows in dim 0, which is the number of {' and of '.join(l + 's' for l in found)} "
                         f"in this graph batch: declare where its rows live in the spec, {options}")
