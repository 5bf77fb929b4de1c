"""EquivarianceMonitor: the decomposition every ``every`` steps, for loops that keep their own step.

::

    monitor = fe.EquivarianceMonitor(model, spec=spec, every=100, fraction=0.125)
    for step, (inputs, target) in enumerate(loader):
        ...
        logs = monitor(step, inputs, target)     # {} on most steps, at no cost
        if logs:
            writer.add_scalars("equiv", logs, step)   # or wandb.log / self.log_dict

On a monitored step it measures, under ``torch.no_grad``, the first ``ceil(fraction * B)``
samples of the batch with K Haar-random rotations (:func:`fastequiv.equivariance_error`),
and returns a flat dict ``{prefix + "total": ..., "mean", "equiv", "pct",
"total_stderr", "mean_stderr", "equiv_stderr", "<head>/total", ...}``. The values are
0-dim tensors on the model's device (no host sync: a logger that accepts tensors copies
them when it flushes); ``materialize=True`` returns Python floats instead, with one host
copy for all of them. On every other step it returns an empty dict without touching the
device, so ``logs.update(monitor(step, ...))`` is always safe.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .groups import SEED_MAX
from .adapted import own_spec
from .design_twirl import design_for
from .graph import GraphLayout
from .spec import Spec
from .twirl import equivariance_error

__all__ = ["EquivarianceMonitor", "batch_size", "first_samples", "logged_values"]


class EquivarianceMonitor:
    """Measure the equivariance error of ``model`` every ``every`` steps (see module docs).

    Args:
        model: the model, called like in :func:`fastequiv.equivariance_error`.
        spec: a :class:`fastequiv.Spec` (left out for a model adapted with :func:`fastequiv.adapt`).
        every: measure on steps ``step % every == 0``.
        fraction: share of the batch measured, ``0 < fraction <= 1`` (the first
            ``ceil(fraction * B)`` samples; every tensor input and target is cut along
            dim 0). Graph batches (a spec with a ``"batch"`` input) are measured whole.
        samples: K rotations per sample (default 8; every element for a finite group).
        rotations, replicates: a rotation design turned by ``replicates`` (default 2)
            independent Haar rotations per sample instead of ``samples`` i.i.d. draws (as in
            :func:`fastequiv.equivariance_error`); with ``replicates >= 3`` the rotations'
            own standard errors are logged too (``..._rotation_stderr``).
        prefix: prepended to every key, e.g. ``"equiv/"``.
        materialize: return floats (one host sync) instead of 0-dim tensors.
        eval_mode: put the model in eval mode while measuring (dropout and BatchNorm
            statistics would otherwise count as equivariance error), then restore every
            submodule's own mode.
        seed: the rotations of step ``s`` are Philox stream ``seed + s``: reproducible,
            and the training's random state is never touched (so the default is 0, not a
            fresh draw as in the measuring functions; no ``generator``).
        chunk_size, backend: as in :func:`fastequiv.equivariance_error`.
        check_finite: as there, but False by default: it reads flags back from the device,
            a sync the training step would wait on.
        sync: under ``torch.distributed``, report the union of every rank's measured
            samples (:mod:`fastequiv.distributed`); every rank must call on the same steps.
        process_group: the group for ``sync``.
        **kwargs: passed on to :func:`fastequiv.equivariance_error` (``loss``,
            ``loss_weights``, ``mask``).
    """

    def __init__(self, model: Callable, *, spec: Optional[Spec] = None, every: int = 100, fraction: float = 0.125,
                 samples: Optional[int] = None, rotations=None, replicates: Optional[int] = None,
                 prefix: str = "equiv/", materialize: bool = False,
                 eval_mode: bool = True, seed: int = 0, chunk_size: Optional[int] = None, backend: str = "auto",
                 check_finite: bool = False, sync: bool = False, process_group=None, **kwargs: Any):
        spec = own_spec(model, spec)
        if not isinstance(spec, Spec):
            raise ValueError(f"spec must be a fastequiv.Spec, got {type(spec).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (steps between measurements), got {every!r}")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if "generator" in kwargs:
            raise ValueError("generator= is not a monitor option: the rotations of step s are Philox stream seed + s")
        if rotations is not None:
            design_for(rotations, spec, samples=samples)  # a bad design raises here, not on step 0
        kwargs.update(chunk_size=chunk_size, backend=backend, check_finite=check_finite, rotations=rotations,
                      replicates=replicates)
        self.model, self.spec, self.every, self.fraction = model, spec, every, float(fraction)
        self.samples, self.prefix, self.materialize, self.eval_mode = samples, prefix, materialize, eval_mode
        self.seed, self.sync, self.process_group, self.kwargs = seed, sync, process_group, kwargs

    def due(self, step: int) -> bool:
        """Whether ``step`` is a monitored step."""
        return step % self.every == 0

    def __call__(self, step: int, inputs: Any, target: Any = None) -> dict:
        """The logged values on a monitored step, ``{}`` on the others (see module docs)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not self.due(step):
            return {}
        inputs, target, kwargs = self._subset(inputs, target)
        d = equivariance_error(self.model, inputs, target, spec=None if self.spec is getattr(self.model, "spec", None)
                               else self.spec, samples=self.samples,
                               seed=(self.seed + step) % SEED_MAX, sync=self.sync, process_group=self.process_group,
                               eval_mode=self.eval_mode, **kwargs)
        return self.values(d)

    def values(self, d) -> dict:
        """The flat dict of a :class:`fastequiv.Decomposition` (tensors, or floats with ``materialize``)."""
        out = logged_values(d, self.prefix)
        if self.materialize:
            return dict(zip(out, torch.stack([v.reshape(()) for v in out.values()]).tolist()))
        return out

    def _subset(self, inputs, target):
        kwargs = dict(self.kwargs)
        if self.fraction >= 1 or _is_graph(self.spec):
            return inputs, target, kwargs
        B = _batch_size(inputs)
        n = max(1, math.ceil(self.fraction * B))
        if n >= B:
            return inputs, target, kwargs
        cut = lambda x: _cut(x, B, n)  # noqa: E731
        if "mask" in kwargs:
            kwargs["mask"] = cut(kwargs["mask"])
        return cut(inputs), cut(target), kwargs


def logged_values(d, prefix: str = "") -> dict:
    """The flat dict a logger gets from a decomposition, 0-dim tensors (no host sync): the
    keys of ``d.to_dict(prefix)`` (``total``, ``mean``, ``equiv``, ``pct``, their
    ``_stderr``, then ``<head>/...``; ``equiv``, ``norm``, ``rel`` without labels; a design
    with 3 or more replicates adds the top level's ``..._rotation_stderr``)."""
    out = {}

    def put(prefix, dec):
        fields = getattr(dec, "FIELDS", None)  # LabelFree (target=None): equiv, norm, rel
        for name in fields or ("total", "mean", "equiv", "pct"):
            out[f"{prefix}{name}"] = getattr(dec, name)
        for name in fields or ("total", "mean", "equiv"):
            out[f"{prefix}{name}_stderr"] = getattr(dec.stderr, name)
        if getattr(dec, "replicates", 1) >= 3:  # a randomised design's rotation_stderr (NaN below 3)
            for name in fields or ("total", "mean", "equiv"):
                out[f"{prefix}{name}_rotation_stderr"] = getattr(dec.rotation_stderr, name)
        for head, h in dec.heads.items():
            put(f"{prefix}{head}/", h)

    put(prefix, d)
    return out


def batch_size(inputs, spec: Spec) -> int:
    """B: the number of samples (graphs, for a graph batch) of ``inputs``."""
    if _is_graph(spec):
        if not isinstance(inputs, dict):
            raise ValueError(f"a graph batch is measured in part only as a dict of tensors, got {type(inputs).__name__}")
        return GraphLayout(spec.input_leaves(inputs), spec.graph).B
    return _batch_size(inputs)


def first_samples(inputs, target, spec: Spec, n: int):
    """``(inputs, target)`` cut to their first ``n`` samples.

    Dense: every tensor with ``B`` rows in dim 0 is cut there. Graph (a dict of tensors
    whose spec names a ``"batch"`` input): the graphs ``0..n-1``, their nodes (in their
    order) and the edges whose first node is one of them, with node indices renumbered;
    per-graph tensors (a cell also as ``3 B`` rows), ``num_graphs`` and ``ptr`` follow. A
    tensor's level is found as the stacking finds it (:meth:`GraphLayout.level`); targets
    are per node (``N`` rows) or per graph (``B`` rows). Reads the batch index (a host sync).
    """
    if not _is_graph(spec):
        B = _batch_size(inputs)
        return (_cut(inputs, B, n), _cut(target, B, n)) if n < B else (inputs, target)
    layout = GraphLayout(spec.input_leaves(inputs), spec.graph)
    if n >= layout.B:
        return inputs, target
    roles = spec.graph
    node = inputs[roles["batch"]] < n
    edge = None if layout.edge_batch is None else layout.edge_batch < n  # an edge goes with its first node
    renumber = torch.cumsum(node, 0) - 1
    out = {}
    for name, value, rep in spec.input_leaves(inputs):
        if name == roles.get("num_graphs"):
            out[name] = torch.full_like(value, n) if isinstance(value, torch.Tensor) else n
        elif rep is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[name] = value  # not stacked either (unnamed="keep", options): handed over unchanged
        elif name == roles["batch"]:
            out[name] = value[node]
        elif name in layout.index_names:
            out[name] = renumber[value if edge is None else value[..., edge]]
        elif name == roles.get("ptr"):
            out[name] = value[: n + 1]
        else:
            level = layout.level(value.shape[0], repr(name), rep)
            if level == "node":
                out[name] = value[node]
            elif level == "edge":
                out[name] = value[edge]
            elif getattr(rep, "cell", False) and value.shape[0] == 3 * layout.B:
                out[name] = value[: 3 * n]  # MACE's flattened (3 B, 3) cells
            else:
                out[name] = value[:n]
    if target is None:
        return out, None
    cut = []
    for name, y, _ in spec.output_leaves(target, "target"):
        rows = y.shape[0]
        if rows == layout.N and (rows != layout.B or torch.equal(inputs[roles["batch"]],
                                                                   torch.arange(rows, device=y.device))):
            cut.append(y[node])
        elif rows == layout.B:
            cut.append(y[:n])
        else:
            raise ValueError(f"target {name!r} has {rows} rows; the graph batch has N = {layout.N} nodes and "
                             f"B = {layout.B} graphs")
    return out, spec.build_output(cut)


def _is_graph(spec: Spec) -> bool:
    return bool(getattr(spec, "graph", None))


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("inputs have no tensor with a batch dim to take a fraction of")


def _cut(x, B: int, n: int):
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 and x.shape[0] == B else x
    if isinstance(x, dict):
        return {k: _cut(v, B, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cut(v, B, n) for v in x)
    return x
