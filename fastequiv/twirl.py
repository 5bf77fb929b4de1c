"""The public API: equivariance_error, twirl_loss and Twirled.

All three stack K rotated copies of every input along dim 0 (copy ``k`` of sample ``b``
is row ``k * B + b``), call the model once on the ``K * B`` rows (or in chunks of
``chunk_size`` rows), and back-rotate the outputs. The model must map each row
independently (no batch statistics across rows: put BatchNorm in eval mode).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import distributed, graph, groups
from .estimators import Decomposition, combine, decompose, from_kernel, label_free
from .ops import twirl_reduce
from .ops.layout import accumulate_dtype, mask_for, per_sample_sum, valid_count
from .ops.twirl_reduce import back_rotate
from .adapted import Adapted, bind, own_spec
from .design_twirl import design_average, design_decompose, design_for, replicates_of
from .penalty import EquivWeight, WeightLike, check_margin, equiv_penalty, weight_at
from .reps import Voigt
from .spec import Spec, describe
from .ops.action import Action
from .ops.decomposition import decompose_heads
from .stacking import CallPlan, Head, Stacked, call_model, call_plan, plan, read_inputs, split_heads, stack
from .stacking import eval_mode as stacking_eval_mode

__all__ = ["equivariance_error", "twirl_loss", "Twirled", "wrapped_inputs", "averaged_heads"]

LossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def _require_two(K: int, exhaustive: bool) -> None:
    if K < 2 and not exhaustive:
        raise ValueError(
            f"samples={K} cannot estimate L_equiv: it needs samples >= 2 i.i.d. rotations "
            "(or an exhaustive twirl over a finite group); L_equiv is never reported as 0"
        )


def _design_args(rotations, replicates, loss) -> Optional[int]:
    """The replicates of a design call (default 2), checked; None without a design."""
    R = replicates_of(rotations, replicates)
    if R is not None and loss != "mse":
        raise ValueError(f"rotations={rotations!r} takes loss='mse' (the design estimators are those of the squared "
                         f"error), got loss={loss!r}")
    return R


def _decompose(model, inputs, target, spec, samples, default_samples, loss, mask, loss_weights, seed, generator,
               chunk_size, backend, check_finite) -> tuple[Decomposition, dict]:
    """The decomposition and the samples that count, ``{"": (B,) bool, head: (B,) bool}``."""
    spec, inputs = bind(model, inputs, spec)
    K, exhaustive = plan(spec, samples, default_samples)
    _require_two(K, exhaustive)
    if not (loss == "mse" or callable(loss)):
        raise ValueError(f"loss must be 'mse' or a callable returning elementwise losses, got {loss!r}")
    weights = spec.head_weights(loss_weights)
    # finiteness is checked on the per-sample sums below (a NaN or inf at a valid element
    # reaches them; a masked-out one never does), which costs nothing next to the outputs
    if target is None and loss != "mse":
        raise ValueError("target=None measures L_equiv with the MSE estimators (loss='mse'); a convex loss= needs "
                         "a target")
    planned = call_plan(spec, inputs, K, exhaustive, mask=mask, chunk_size=chunk_size, backend=backend)
    if planned is None:
        st = stack(model, inputs, spec, K, exhaustive, mask=mask, seed=seed, generator=generator,
                   chunk_size=chunk_size, backend=backend, check_finite=False)
    else:
        st, done = _decompose_planned(planned, model, inputs, target, mask, loss, weights, seed, generator,
                                      check_finite)
        if done is not None:
            return done
    # without a target: a zero one, against which L_mean is the twirled prediction's size
    targets = [None] * len(st.heads) if target is None else [y for _, y, _ in spec.output_leaves(target, "target")]
    heads, head_valid = {}, {}
    for head, y in zip(st.heads, targets):
        name, out = head.name, head.value
        if y is None:
            y = torch.zeros(out.shape[1:], dtype=out.dtype, device=out.device)
        if isinstance(head.declared, Voigt):  # reduced as the 3 x 3 tensor it stands for
            y = head.declared.to_matrix(y)
        if y.shape != out.shape[1:]:
            where = "target" if name == "output" else f"target[{name!r}]"
            raise ValueError(f"{where} has shape {tuple(y.shape)}, but the model's output for it has shape "
                             f"{tuple(out.shape[1:])} (batch {st.B})")
        if loss == "mse":
            s = twirl_reduce(out, st.action, y, head.rep, head.mask, batch=head.batch, backend=backend)
            d = decompose(s.total, s.bias, s.spread, s.count, samples=K, exhaustive=exhaustive)
            count = s.count
        else:
            d, count = _jensen_gap(loss, st, head, y)
        heads[name] = d
        head_valid[name] = count > 0
    _check_heads(heads, head_valid, check_finite)
    if len(heads) == 1 and not isinstance(spec.output, (dict, tuple)):
        d = next(iter(heads.values()))
        return d, {"": head_valid[name]}
    d = combine(heads, weights, head_valid)
    return d, {"": torch.stack(list(head_valid.values())).any(0), **head_valid}


def _decompose_planned(p: CallPlan, model, inputs, target, mask, loss, weights: dict, seed, generator,
                       check_finite: bool):
    """:func:`_decompose` on the hot path of a planned call (:class:`fastequiv.stacking.CallPlan`):
    ``(None, (d, head_valid))``, the same values; or ``(stacked, None)`` when the heads are
    not planned (a position or Voigt output, a convex ``loss=``), for the steps above to go
    on from the model's outputs."""
    spec, K = p.spec, p.K
    values = p.leaf_values(inputs)
    batch = p.inputs_of(values, p.mask_of(inputs, mask))
    try:
        action = Action(p.rotations(seed, generator), p.backend)
        out = call_model(model, spec, batch, p.names, p.copies(values, action, batch.mask), K, None)
        grad = torch.is_grad_enabled()
        rows = p.head_rows(out, target, action, batch, grad) if loss == "mse" else None
        if rows is None:
            return Stacked(action, split_heads(out, spec, batch, K, check_finite=False), batch, K, p.exhaustive), None
        names = spec.output_names()
        combine = isinstance(spec.output, (dict, tuple))
        r = decompose_heads(rows, p.B, K, p.exhaustive, [weights[n] for n in names], combine=combine,
                            grad=grad and any(h.out.requires_grad for h in rows))
    except ValueError:
        # the plan reads a batch's values only where a kernel checks them for free: where one
        # refused an index, the steps' checks name the input and its range
        read_inputs(inputs, spec, mask, None)
        raise
    if check_finite:
        flags = [(r.flags >> (2 * h)) & 3 for h in range(len(names))]
        _raise_unless_finite(names, [bool(f & 2) for f in flags], names, [bool(f & 1) for f in flags])
    d = from_kernel(r.per_sample, r.scalars, r.valid, names if combine else [], weights, K, p.exhaustive, r.total,
                    r.equiv)
    return None, (d, {"": r.valid[0], **dict(zip(names, r.valid[1:]))} if combine else {"": r.valid[0]})


def _check_heads(heads: dict, head_valid: dict, check_finite: bool) -> None:
    """With ``check_finite``, raise a ValueError when a head has no valid element in the
    whole batch (its loss is undefined) or a non-finite per-sample loss (a NaN or inf in the
    model's output or the target at a valid element). One host copy of a few flags; not
    checked inside torch.compile or CUDA-graph capture. Without it nothing is read back:
    such a batch then gives a NaN, never a silent number."""
    if not check_finite:
        return
    flags = [v.any() for v in head_valid.values()]
    flags += [torch.isfinite(d.per_sample.total).all() for d in heads.values()]
    flags = torch.stack(flags)
    if torch.compiler.is_compiling() or (flags.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    flags = flags.tolist()
    _raise_unless_finite(list(heads), flags[len(head_valid):], list(head_valid), flags[:len(head_valid)])


def _raise_unless_finite(heads: list, finite: list, valid_heads: list, some_valid: list) -> None:
    """The errors of :func:`_check_heads` from its flags: ``finite`` per head of ``heads``,
    ``some_valid`` per head of ``valid_heads``."""
    bad = [name for name, ok in zip(heads, finite) if not ok]
    if bad:
        raise ValueError(f"model output(s) {bad} have non-finite values (NaN or inf) at valid elements of the rotated "
                         "copies, or the target does (check_finite=False skips this check)")
    empty = [name for name, ok in zip(valid_heads, some_valid) if not ok]
    if empty:
        what = "the batch" if valid_heads == ["output"] else f"output head(s) {empty}"
        raise ValueError(f"every element of {what} is masked out: there is nothing to decompose (the loss of an "
                         "empty set is undefined; drop the batch, or unmask at least one element)")


def _sync(d: Decomposition, head_valid: dict, sync: bool, process_group) -> Decomposition:
    """``d`` over every rank's batch when ``sync`` (a no-op outside torch.distributed)."""
    if not isinstance(sync, bool):
        raise ValueError(f"sync must be a bool, got {sync!r}")
    if not sync:
        return d
    heads = {k: v for k, v in head_valid.items() if k}
    return distributed.all_reduce(d, valid=head_valid[""], head_valid=heads, group=process_group)


def _jensen_gap(loss, st: Stacked, head: Head, y):
    name, out = head.name, head.value
    if head.batch is not None:
        raise ValueError(f"loss= callables support the dense layout and per-graph outputs; output {name!r} is "
                         "per node of a graph batch (use loss='mse')")
    m = mask_for(head.mask, y.shape, "target")
    acc = accumulate_dtype(out, y)
    a = back_rotate(out, st.action, head.rep, m, acc)
    y = y.to(acc)
    lk = loss(a, y.expand_as(a))
    lbar = loss(a.mean(0), y)
    if not isinstance(lk, torch.Tensor) or lk.shape != a.shape:
        raise ValueError(f"loss must return elementwise losses of shape {tuple(a.shape)} (reduction='none'), "
                         f"got {describe(lk)} for output {name!r}")
    count = valid_count(y, m, acc)
    total = per_sample_sum(lk.mean(0), m) / count.clamp_min(1)
    bias = per_sample_sum(lbar, m) / count.clamp_min(1)
    d = decompose(total, bias, total - bias, count, samples=st.K, exhaustive=st.exhaustive, exact=st.exhaustive)
    return d, count


_COMMON_ARGS = """
        model: a callable taking the inputs as given (a tensor, positional args or keyword
            args, mirroring ``spec.inputs``) with the K copies stacked along dim 0.
        inputs: a tensor, a tuple of tensors or a dict (non-tensor dict values pass through).
        target: mirrors ``spec.output``; given in the frame of the unrotated input.
            ``None`` in :func:`equivariance_error` and the monitor: no labels (a benchmark
            set, an MD trajectory), and only L_equiv and its relative size are reported.
        spec: a :class:`fastequiv.Spec`; leave it out for a model adapted with
            :func:`fastequiv.adapt`, which carries its own (``inputs`` is then the
            codebase's own batch).
        rotations: a rotation design instead of i.i.d. draws (:mod:`fastequiv.designs`):
            ``"design:L"`` (the fewest rotations exact to degree L), ``"lebedev:L"``,
            ``"octahedral"``, ``"icosahedral"`` or a :class:`fastequiv.designs.Design`, on
            ``spec.group`` (SO3 or O3); not with ``samples``. Each sample's design is turned
            by ``replicates`` independent Haar rotations (turn ``r`` of sample ``b`` is
            rotation ``r * B + b`` of the ``seed`` stream; the estimators of
            :mod:`fastequiv.design_twirl`, MSE only): unbiased for any model with
            ``replicates >= 2``, and lower variance than as many i.i.d. draws where the
            model's twisted prediction has little content above the design's degree. The
            result is a :class:`fastequiv.design_twirl.DesignDecomposition` (or
            ``DesignLabelFree``) with ``design``, ``replicates`` and ``rotation_stderr``
            (the rotations' own standard error, from 3 replicates on).
        replicates: R independent turns of the design per sample (default 2 with
            ``rotations``; R * K copies a sample); 1 is unbiased only where the design's
            degree reaches the model's band limit (``exact=False``). Only with ``rotations``.
        loss: ``"mse"`` (exact estimators) or a callable ``loss(pred, target)`` returning
            elementwise losses (reduction ``'none'``): its plug-in Jensen gap is reported
            with ``exact=False``.
        mask: optional bool ``(B, *inner)`` of valid elements (e.g. real atoms), unless the
            spec names a mask input.
        loss_weights: per-head weights of a multi-head output (dict or tuple like
            ``spec.output``); default 1 each.
        seed: the Philox stream of the rotations (rotation ``k * B + b`` rotates copy ``k``
            of sample ``b``); generator: draw the seed from it. Default: a fresh seed from
            torch's default generator.
        chunk_size: call the model on at most this many stacked rows at a time.
        backend: ``"auto"``, ``"torch"``, ...; an unavailable one raises an error.
        check_finite: raise a ValueError if a valid element of the model's outputs (or of
            the target) is NaN or inf, or a head has no valid element at all. Read from the
            per-sample sums, which any such value reaches (masked-out elements never do): one
            host read of a few flags (a sync with the device), skipped inside
            ``torch.compile`` and CUDA-graph capture. Default True for the measuring
            functions, False for :func:`twirl_loss` (every training step: no sync; a bad
            batch gives a NaN loss instead of an error).
        sync: under ``torch.distributed`` (e.g. DDP), report the decomposition of the
            union of every rank's batch (two small all-reduces, no host copy; see
            :mod:`fastequiv.distributed`); a no-op when it is not initialised.
        process_group: the group to reduce over with ``sync`` (default: the world).
"""


def equivariance_error(
    model: Callable,
    inputs: Any,
    target: Any = None,
    *,
    spec: Optional[Spec] = None,
    samples: Optional[int] = None,
    rotations=None,
    replicates: Optional[int] = None,
    loss: LossLike = "mse",
    mask: Optional[torch.Tensor] = None,
    loss_weights=None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    check_finite: bool = True,
    sync: bool = False,
    process_group=None,
    eval_mode: bool = True,
) -> Decomposition:
    """Decompose the augmented loss of ``model`` on a batch into L_mean + L_equiv (no grad).

    Args:
        samples: group elements per input, K: default 8 i.i.d. Haar draws for SO(3)/O(3),
            and every element once (exact) for a finite group.
        eval_mode: evaluate an ``nn.Module`` in eval mode (no dropout noise counted as
            equivariance error, BatchNorm's running statistics untouched) and restore each
            submodule's own mode afterwards. ``False`` measures the model as it is.
    """
    if not isinstance(eval_mode, bool):
        raise ValueError(f"eval_mode must be a bool, got {eval_mode!r}")
    if target is None and sync:
        raise ValueError("sync=True needs a target (target=None: measure each rank's L_equiv on its own)")
    R = _design_args(rotations, replicates, loss)
    with torch.no_grad(), (stacking_eval_mode(model) if eval_mode else contextlib.nullcontext()):
        if R is not None:
            d, head_valid = design_decompose(model, inputs, target, spec, rotations, R, mask=mask,
                                             loss_weights=loss_weights, seed=seed, generator=generator,
                                             chunk_size=chunk_size, backend=backend, check_finite=check_finite,
                                             samples=samples)
            return d if target is None else _sync(d, head_valid, sync, process_group)
        d, head_valid = _decompose(model, inputs, target, spec, samples, 8, loss, mask, loss_weights, seed,
                                   generator, chunk_size, backend, check_finite)
        if target is None:
            return label_free(d)
        return _sync(d, head_valid, sync, process_group)


equivariance_error.__doc__ += _COMMON_ARGS + """
    Returns:
        a :class:`fastequiv.Decomposition` (0-dim tensors ``total``, ``mean``, ``equiv``,
        ``pct``; ``per_sample``, ``stderr``, ``samples``, ``exact``, ``heads``); with
        ``target=None``, a :class:`fastequiv.LabelFree` (``equiv``, ``norm``, ``rel``: L_equiv
        and its size relative to the twirled prediction, which need no labels).
"""


def twirl_loss(
    model: Callable,
    inputs: Any,
    target: Any,
    *,
    spec: Optional[Spec] = None,
    samples: Optional[int] = None,
    rotations=None,
    replicates: Optional[int] = None,
    equiv_weight: WeightLike = 0.0,
    equiv_margin: float = 0.0,
    step: Optional[int] = None,
    loss: LossLike = "mse",
    mask: Optional[torch.Tensor] = None,
    loss_weights=None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    check_finite: bool = False,
    sync: bool = False,
    process_group=None,
) -> tuple[torch.Tensor, Decomposition]:
    """The augmented training loss ``L_total + w * relu(L_equiv - equiv_margin)`` and its
    decomposition.

    One forward over the K stacked copies gives both: with ``equiv_weight=0`` the loss is
    plain random-rotation augmentation with K rotations per sample, and the
    decomposition comes for free. ``equiv_weight > 0`` also penalises the
    equivariance error: with ``equiv_margin=0`` the penalty is the unbiased
    ``w * L_equiv`` (so its gradient is unbiased too); with a margin ``eps > 0`` it is 0,
    with a zero gradient, while the batch's ``L_equiv`` estimate is at most ``eps``, and
    ``w * (L_equiv - eps)`` above. The margin applies to the batch mean, not per sample;
    ``relu`` of an unbiased estimate is biased upward near the margin (Jensen): see
    :mod:`fastequiv.penalty` for what is and is not guaranteed.

    Args:
        samples: K, default 2 i.i.d. Haar draws (every element once for a finite group).
        equiv_weight: the weight ``w`` of the penalty: a number >= 0; a callable
            ``step -> weight`` (a schedule of the training step, which ``step=`` gives); or a
            :class:`fastequiv.EquivWeight` that steers the weight toward a target share
            ``L_equiv / L_total`` (updated with this batch's decomposition after use).
        equiv_margin: ``eps >= 0``, in units of L_equiv: the batch's L_equiv is penalised
            only above it.
        step: the training step, read by a callable ``equiv_weight`` only.
    """
    if target is None:
        raise ValueError("twirl_loss needs a target (the training loss is L_total against it); "
                         "fe.equivariance_error(..., target=None) measures L_equiv without labels")
    if not (callable(equiv_weight) or isinstance(equiv_weight, EquivWeight)):
        weight_at(equiv_weight, step, None)  # a bad number raises before the model runs
    margin = check_margin(equiv_margin)
    R = _design_args(rotations, replicates, loss)
    if R is not None:
        d, head_valid = design_decompose(model, inputs, target, spec, rotations, R, mask=mask,
                                         loss_weights=loss_weights, seed=seed, generator=generator,
                                         chunk_size=chunk_size, backend=backend, check_finite=check_finite,
                                         samples=samples)
    else:
        d, head_valid = _decompose(model, inputs, target, spec, samples, 2, loss, mask, loss_weights, seed,
                                   generator, chunk_size, backend, check_finite)
    penalty = equiv_penalty(d.equiv, weight_at(equiv_weight, step, d.equiv), margin)
    total = d.total if penalty is None else d.total + penalty
    # the loss stays this rank's own (DDP averages gradients); only the logged values are global
    logged = _sync(d.detach(), head_valid, sync, process_group)
    if isinstance(equiv_weight, EquivWeight):
        equiv_weight.update(logged)
    return total, logged


twirl_loss.__doc__ += _COMMON_ARGS + """
    Returns:
        ``(loss, decomposition)``: ``loss`` is a 0-dim tensor with a graph (this rank's
        own, also with ``sync``); the decomposition is detached.
"""


class Twirled(nn.Module):
    """The group-averaged model ``fbar(x) = mean_k rho_out(g_k)^-1 f(rho_in(g_k) x)``.

    Call it like the wrapped model. With a finite group and ``samples=None`` the average
    is over every element (an exactly invariant/equivariant model for that group);
    otherwise over ``samples`` i.i.d. Haar draws, fresh at each call unless ``seed`` is
    set. Gradients flow to the wrapped model's parameters. A mask of padded elements is
    named in the spec (``Spec(..., mask="mask")``) and passed like any input.

    With ``rotations=`` (a design, :mod:`fastequiv.designs`) the average is the design's
    weighted one, deterministic: equal to ``fbar(x)`` to float rounding wherever the model's
    twisted prediction has no content above ``self.design.degree``.

    Args:
        model: the model (an ``nn.Module`` is registered as a submodule).
        spec: a :class:`fastequiv.Spec`.
        samples: K (default 16 for SO(3)/O(3); every element for a finite group).
        rotations: a design instead of draws: ``"design:L"`` (the fewest rotations exact to
            degree L), ``"lebedev:L"``, ``"octahedral"``, ``"icosahedral"`` or a
            :class:`fastequiv.designs.Design`, on ``spec.group`` (SO3 or O3); not with
            ``samples`` or ``seed``.
        seed: fix the rotations (the same ones at every call).
        chunk_size, backend, check_finite: as in :func:`equivariance_error`.
    """

    def __init__(self, model: Callable, *, spec: Optional[Spec] = None, samples: Optional[int] = None,
                 rotations=None, seed: Optional[int] = None, chunk_size: Optional[int] = None,
                 backend: str = "auto", check_finite: bool = True):
        super().__init__()
        spec = own_spec(model, spec)
        self.model = model
        self.spec = spec
        self.design = None if rotations is None else design_for(rotations, spec, samples=samples, seed=seed)
        self.K, self.exhaustive = (self.design.size, False) if self.design is not None else plan(spec, samples, 16)
        if seed is not None:
            groups.resolve_seed(seed)
        self.seed, self.chunk_size, self.backend, self.check_finite = seed, chunk_size, backend, check_finite

    def prepare(self, inputs):
        """The wrapped model's inputs from ``inputs``: an adapted model's codebase batch
        is prepared by it (so a Twirled adapted model measures like the model itself)."""
        return self.model.prepare(inputs) if isinstance(self.model, Adapted) else inputs

    def forward(self, *args, **kwargs):
        inputs = wrapped_inputs(self.model, self.spec, args, kwargs, type(self).__name__)
        if self.design is not None:
            return design_average(self.model, inputs, self.spec, self.design, chunk_size=self.chunk_size,
                                  backend=self.backend, check_finite=self.check_finite)
        st = stack(self.model, inputs, self.spec, self.K, self.exhaustive, seed=self.seed,
                   chunk_size=self.chunk_size, backend=self.backend, check_finite=self.check_finite)
        return self.spec.build_output(averaged_heads(st, self.backend))

    def extra_repr(self) -> str:
        if self.design is not None:
            return (f"group={self.spec.group!r}, design={self.design.name!r}, samples={self.K}, "
                    f"degree={self.design.degree}")
        return f"group={self.spec.group!r}, samples={self.K}, exhaustive={self.exhaustive}"


def wrapped_inputs(model: Callable, spec: Spec, args: tuple, kwargs: dict, wrapper: str = "Twirled"):
    """The inputs of one call of a module that wraps ``model`` and is called like it
    (:class:`Twirled`, :class:`fastequiv.FrameAveraged`): an adapted model's batch
    (prepared), an object holding the inputs (a PyG Batch), ``model(data)`` for
    ``call="dict"``, keyword arguments for dict inputs, else positional ones."""
    if isinstance(model, Adapted):
        if len(args) != 1 or kwargs:
            raise TypeError(f"a {wrapper} {model.family} model takes one batch, got {len(args)} positional "
                            f"and {len(kwargs)} keyword arguments")
        return model.prepare(args[0])
    if isinstance(spec.inputs, dict) and len(args) == 1 and not kwargs and graph.is_object_input(args[0], spec):
        return args[0]  # an object holding the inputs, e.g. a PyG Batch
    if isinstance(spec.inputs, dict) and len(args) == 1 and not kwargs and isinstance(args[0], dict) \
            and spec.call == "dict":
        return args[0]  # called like the model: model(data)
    if isinstance(spec.inputs, dict):
        if args:
            raise TypeError(f"this {wrapper} model's spec has dict inputs: call it with keyword arguments")
        return kwargs
    if kwargs:
        raise TypeError(f"unexpected keyword arguments {list(kwargs)} for a spec with positional inputs")
    return args if isinstance(spec.inputs, tuple) else (args[0] if len(args) == 1 else args)


def averaged_heads(st: Stacked, backend: str) -> list:
    """Every output head of ``st`` back-rotated and averaged over its K copies, in the
    model's dtype and form (a Voigt head is averaged as its 3 x 3 tensor and given back
    in Voigt form): the list :meth:`Spec.build_output` takes."""
    means = []
    for head in st.heads:
        out = head.value
        if head.batch is not None:  # per node of a graph batch: the op's twirled mean
            s = twirl_reduce(out, st.action, torch.zeros_like(out[0]), head.rep, head.mask, batch=head.batch,
                             backend=backend)
            means.append(s.twirled.to(out.dtype))
            continue
        m = mask_for(head.mask, out.shape[1:], f"output {head.name!r}")
        means.append(back_rotate(out, st.action, head.rep, m, accumulate_dtype(out)).mean(0).to(out.dtype))
    return [h.declared.from_matrix(v) if isinstance(h.declared, Voigt) else v for h, v in zip(st.heads, means)]
