"""The Lie derivative: the infinitesimal equivariance error, by forward-mode AD.

For a generator ``X`` of so(3) the Lie derivative of a model ``f`` at ``x`` is the
derivative of its twisted prediction along the one-parameter group ``exp(t X)``::

    (L_X f)(x) = d/dt|_{t=0} rho_out(exp(tX))^-1 f(rho_in(exp(tX)) x)
               = J_f(x) [drho_in(X) x] - drho_out(X) f(x)

with the generators ``X_i v = e_i x v`` (``(X_i)_jk = -eps_ijk``), so ``exp(t X_i)`` is
the right-handed rotation by angle ``t`` about axis ``i`` (x, y, z). ``L_X f = 0`` for
every ``X`` iff ``f`` is equivariant to first order at ``x``. Sign convention: for
``f(x) = A x`` with vector input and output, ``L_X f(x) = [A, X] x = (A X - X A) x``.

Relation to L_equiv. Fix ``x`` and view the twisted prediction as a function on the
group, ``phi(g) = f_g(x)``. Its derivative along ``X_i`` at ``g`` has the norm of
``(L_i f)(g x)``, and L_equiv is its variance over Haar ``g``. The Poincare inequality on
SO(3) (the Laplacian ``-sum_i X_i^2`` has eigenvalue ``l (l + 1)`` on spin ``l``, so its
smallest non-zero one is 2) gives, with ``n`` the valid elements of a sample as in the
MSE normalisation::

    L_equiv(x) <= 1/2 * E_{g ~ Haar} (1/n) sum_i ||(L_i f)(g x)||^2

with equality iff ``g -> f_g(x)`` has no component of spin ``l >= 2`` (e.g. ``f = A x``
with antisymmetric ``A``). For a model ``f_eq + eps h`` with ``f_eq`` equivariant both
sides are ``eps^2`` times a quadratic form in ``h``. Averaged over a rotation-invariant
data distribution (what augmentation trains on) the ``E_g`` drops out, so the batch mean
of ``1/(2n) sum_i ||L_i f(x)||^2`` is a cheap upper estimate of the mean L_equiv.

:func:`lie_derivative` returns the three ``L_i f(x)`` themselves; it costs one forward
pass (with forward-mode AD) over the 3 stacked copies ``x, x, x``, no rotation sampling.
A model that computes forces as ``-dE/dpos`` is differentiated forward over its backward
pass; where torch has no forward-mode formula for one of its backward ops (MACE's SiLU),
``method="central"`` takes central differences of the twisted model instead: one call
on 6 copies at ``exp(+-h X_i)``.
The tangents ``drho(X_i) x`` come from differentiating the reference of
:func:`fastequiv.ops.rotate_copies` at the identity, so every rep, every graph level
(node, edge, graph, cells) and masks are handled as the measuring functions handle them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp

from .adapted import bind
from .ops import rotate_copies
from .ops.action import Action
from .ops.layout import mask_for, per_sample_sum, valid_count
from .reps import Rep
from .spec import Spec
from .stacking import call_model, read_inputs, split_heads, stack_copies

__all__ = ["lie_derivative", "lie_loss", "so3_generators", "holds_torchscript"]


def _model_jvp(call: Callable, primals: list, tangents: list, model_grad: bool):
    """The model's outputs and their forward-mode derivatives along ``tangents``.

    Dual tensors (``torch.autograd.forward_ad``) rather than ``torch.func.jvp``: a model that
    differentiates inside its forward (forces as ``-dE/dpos``, ``spec.model_grad``) calls
    ``torch.autograd.grad``, which functorch transforms refuse but forward-over-reverse AD
    differentiates. Such a model runs with gradients enabled; if the caller measured
    without them, the results are detached, as in the measuring functions."""
    measuring = not torch.is_grad_enabled()
    with fwAD.dual_level(), torch.enable_grad() if model_grad else contextlib.nullcontext():
        out = call(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        unpacked = [fwAD.unpack_dual(o) for o in out]
    values = tuple(u.primal for u in unpacked)
    # an output that does not depend on the moving inputs has no tangent: its derivative is 0
    derivs = tuple(torch.zeros_like(u.primal) if u.tangent is None else u.tangent for u in unpacked)
    if model_grad and measuring:
        values, derivs = tuple(v.detach() for v in values), tuple(d.detach() for d in derivs)
    return values, derivs


def _model_jvp_reverse(call: Callable, primals: list, tangents: list, model_grad: bool):
    """The same as :func:`_model_jvp` by two reverse-mode passes (the double-backward
    trick): ``g(u) = J^T u`` with a dummy cotangent ``u``, then ``J v = d<g(u), v>/du``.
    For a model whose forward-mode derivatives autograd cannot differentiate again (a
    backward through the tangents of ``scaled_dot_product_attention`` fails in torch 2.x),
    or that has no forward-mode formula for an op (MACE's ``silu_backward``); it needs
    double backward instead. Both passes run with gradients enabled, whatever
    ``model_grad`` says; with gradients enabled by the caller the result keeps its graph
    (a training penalty), measured without them it is detached."""
    measuring = not torch.is_grad_enabled()
    with torch.enable_grad():
        xs = [p if p.requires_grad else p.detach().requires_grad_(True) for p in primals]
        out = call(*xs)
        live = [i for i, o in enumerate(out) if o.requires_grad]
        us = [torch.zeros_like(out[i], requires_grad=True) for i in live]
        derivs = [torch.zeros_like(o) for o in out]
        if live:
            gs = torch.autograd.grad([out[i] for i in live], xs, grad_outputs=us, create_graph=True,
                                     allow_unused=True)
            dot = sum((g * t).sum() for g, t in zip(gs, tangents) if g is not None)
            if isinstance(dot, torch.Tensor) and dot.requires_grad:
                jv = torch.autograd.grad(dot, us, create_graph=not measuring, allow_unused=True)
                for i, d in zip(live, jv):
                    if d is not None:
                        derivs[i] = d
    values = tuple(out)
    if measuring:
        values, derivs = tuple(v.detach() for v in values), [d.detach() for d in derivs]
    return values, tuple(derivs)


def so3_generators(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``(3, 3, 3)``: ``X_i`` with ``X_i v = e_i x v`` (``exp(t X_i)`` rotates by ``t`` about axis ``i``)."""
    X = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        X[i, k, j], X[i, j, k] = 1.0, -1.0
    return X


_METHODS = ("jvp", "reverse", "central")


def lie_derivative(model: Callable, inputs: Any, *, spec: Optional[Spec] = None, mask: Optional[torch.Tensor] = None,
                   method: str = "jvp", delta: Optional[float] = None, backend: str = "auto",
                   step: Optional[float] = None):
    """The Lie derivatives ``L_i f(x)`` along the three generators of so(3) (see module docs).

    Args:
        model: called like in :func:`fastequiv.equivariance_error`; it must map rows
            independently. With ``method="jvp"`` every op it runs needs a forward-mode
            derivative; a model that differentiates inside its forward (``model_grad``)
            needs them for its backward ops too (forward-over-reverse).
        inputs: a tensor, tuple or dict mirroring ``spec.inputs``, dense or a graph batch
            (the spec names its roles, as in :func:`fastequiv.equivariance_error`).
        spec: a :class:`fastequiv.Spec`; its group is ignored (the generators are those of SO(3)).
            Leave it out for a model adapted with :func:`fastequiv.adapt`.
        mask: optional bool ``(B, *inner)`` of valid elements, unless the spec names one:
            positions turn about the centroid of their valid points, and the derivatives of
            invalid output elements are set to 0.
        method: ``"jvp"`` (default): exact, by forward-mode AD over the 3 stacked copies
            (by the reverse-mode passes for a model holding TorchScript modules, where
            forward-mode AD was found wrong: :func:`holds_torchscript`).
            ``"reverse"``: the same derivatives by two reverse-mode passes (double
            backward) over the 3 copies: for models whose forward-mode derivative cannot
            be differentiated again in training (:func:`lie_loss` of a model with
            ``scaled_dot_product_attention``) or lacks a forward-mode formula.
            ``"central"``: central differences of the twisted model, ``(f_{exp(hX)} -
            f_{exp(-hX)}) / 2h``, over 6 stacked copies in one model call: for models with
            an op torch cannot differentiate forward, such as MACE's autograd forces
            (``silu_backward``). Its error is ``O(h^2)`` plus rounding ``O(eps / h)``:
            about 1e-10 relative in float64, 1e-4 in float32.
        delta: ``h`` for ``method="central"``: default 1e-5 for float64 inputs, 5e-3 otherwise.
        backend: of the rotations and back-rotations with ``method="central"``.
            ``method="jvp"`` differentiates the pure-torch reference of the ops (forward-mode
            AD needs it), whatever ``backend`` says.
        step: the old name of ``delta`` (deprecated: ``step`` means a training step elsewhere).
    Returns:
        the model's output structure (a tensor, tuple or dict) with every leaf of shape
        ``(3, B, *E)``: entry ``i`` is ``L_{X_i} f(x)`` for the x, y, z generators, in the
        accumulation dtype (float64 for float64 outputs, else float32).
    """
    spec, inputs = bind(model, inputs, spec)
    if not isinstance(spec, Spec):
        raise ValueError(f"spec must be a fastequiv.Spec, got {type(spec).__name__}")
    if step is not None:
        warnings.warn("lie_derivative(step=...) is deprecated: call it delta= (step means a training step in "
                      "fastequiv's other functions)", DeprecationWarning, stacklevel=2)
        if delta is not None:
            raise ValueError(f"pass delta= only (got delta={delta!r} and its deprecated name step={step!r})")
        delta = step
    batch = read_inputs(inputs, spec, mask, None)
    _, lies = _derivatives(model, spec, batch, method, delta, backend)
    return spec.build_output(lies)


def _derivatives(model: Callable, spec: Spec, batch, method: str, delta: Optional[float], backend: str):
    """``(heads, lies)`` by ``method`` (checked, with its ``delta``)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if delta is not None and (method != "central" or isinstance(delta, bool) or not isinstance(delta, (int, float))
                              or not 0 < delta < 1):
        raise ValueError(f"delta is the central-difference step h, a float in (0, 1) with method='central', "
                         f"got delta={delta!r} with method={method!r}")
    if method == "central":
        return _central(model, spec, batch, delta, backend)
    return _jvp(model, spec, batch, reverse=method == "reverse" or holds_torchscript(model))


def holds_torchscript(model) -> bool:
    """Whether ``model`` (an ``nn.Module``) has a TorchScript submodule. Forward-mode AD
    through TorchScript graphs that its profiling executor has optimized gave wrong
    tangents, silently (a float64 MACE whose e3nn code was scripted, built a second time:
    Lie derivatives of 2e-5 (energy) and 5e-2 (forces) where reverse mode and central
    differences give 1e-17 and 1e-11): ``method="jvp"`` takes the reverse-mode passes for
    such a model instead, the same exact derivatives. TorchScript functions called from a
    plain module's forward cannot be seen here."""
    return isinstance(model, torch.nn.Module) and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


def lie_loss(model: Callable, inputs: Any, *, spec: Optional[Spec] = None, mask: Optional[torch.Tensor] = None,
             loss_weights=None, method: str = "reverse", delta: Optional[float] = None,
             backend: str = "auto") -> torch.Tensor:
    """The squared norm of the Lie derivative, a penalty to train with (a 0-dim tensor).

    For each output head ``h``, the batch mean over samples of
    ``(1/n) sum_i ||L_{X_i} f_h(x)||^2`` over the three generators (``n`` the sample's valid
    elements of that head, as the MSE losses normalise; a graph's per-node head is summed
    over its nodes), and the ``loss_weights``-weighted sum of the heads. It is the sum of
    squares of :func:`lie_derivative`'s output, and differentiable: called with gradients
    enabled (training), the result has a graph to the model's parameters, so
    ``(loss + w * fe.lie_loss(model, inputs, spec=spec)).backward()`` trains against it.
    By the Poincare inequality of :mod:`fastequiv.lie`, half of it bounds the mean
    ``L_equiv`` from above on rotation-invariant data (``L_equiv <= lie_loss / 2``), so
    ``w * lie_loss / 2`` is comparable with ``twirl_loss``'s ``w * L_equiv``.

    Every head the spec declares counts: direct (non-conservative) forces like any
    output, and forces a model computes as ``-dE/dpos`` inside its forward
    (``model_grad=True``), differentiated forward over its backward. Such a model must
    build the graph of its forces (``torch.autograd.grad(..., create_graph=True)``, as
    MACE does in training mode) for the penalty to reach its parameters.

    Cost and methods: no rotation is sampled. ``method="reverse"`` (default) gets the
    Jacobian-vector products from one forward and two reverse passes over the 3 stacked
    copies ``x, x, x`` (double backward), and ``backward()`` of the result is one more
    pass through that graph. ``method="jvp"`` (:func:`lie_derivative`'s default) gets them
    by forward-mode AD, at about the same cost (0.10 s and 0.097 s for a 3-layer MLP on
    64 x 16 atoms, one thread), but autograd cannot always differentiate forward-mode
    tangents again: a model calling ``scaled_dot_product_attention`` (the demo's
    transformer) fails in ``backward()`` on an in-place ``exp`` in torch 2.x, which is why
    the penalty defaults to ``"reverse"``. ``method="central"`` (no derivative of the
    model at all) is one call on 6 copies at ``exp(+-h X_i)``, with the central-difference
    error of :func:`lie_derivative`.

    Args:
        model, inputs, spec, mask, delta, backend: as in :func:`lie_derivative`.
        method: ``"reverse"`` (default), ``"jvp"`` or ``"central"`` (see above).
        loss_weights: per-head weights (a dict or tuple like ``spec.output``); default 1 each.
    Returns:
        a 0-dim tensor in the accumulation dtype (float64 for float64 outputs, else float32).
    """
    spec, inputs = bind(model, inputs, spec)
    batch = read_inputs(inputs, spec, mask, None)
    weights = spec.head_weights(loss_weights)
    heads, lies = _derivatives(model, spec, batch, method, delta, backend)
    total = None
    for head, lie in zip(heads, lies):
        term = weights[head.name] * _batch_mean_square(lie, head, batch.B)
        total = term if total is None else total + term
    return total


def _batch_mean_square(lie: torch.Tensor, head, B: int) -> torch.Tensor:
    """Mean over the samples with a valid element of ``(1/n) sum_i ||lie[i]||^2`` (``lie``
    ``(3, rows, ...)``; rows are nodes of a graph where ``head.batch`` is set)."""
    sq = lie.pow(2).sum(0)
    m = mask_for(head.mask, sq.shape, f"output {head.name!r}")
    total, count = per_sample_sum(sq, m), valid_count(sq, m, sq.dtype)
    if head.batch is not None:  # per node: summed per graph
        total = sq.new_zeros(B).index_add(0, head.batch, total)
        count = sq.new_zeros(B).index_add(0, head.batch, count)
    valid = count > 0
    per_sample = torch.where(valid, total / count.clamp_min(1), torch.zeros((), dtype=sq.dtype, device=sq.device))
    return per_sample.sum() / valid.sum().clamp_min(1).to(sq.dtype)


def _jvp(model: Callable, spec: Spec, batch, reverse: bool = False) -> tuple[list, list]:
    """``(heads, lies)``: the output heads (:func:`fastequiv.stacking.split_heads` of the 3
    identical copies) and each head's ``(3, rows, ...)`` Lie derivatives; the model's
    Jacobian-vector products by forward-mode AD, or by two reverse passes (``reverse``)."""
    B, acc = batch.B, batch.dtype
    # the three "copies" are the three generators: copy i moves along exp(t X_i) at t = 0
    X = so3_generators(acc, batch.device)
    identity = torch.eye(3, dtype=acc, device=batch.device).expand(3, B, 3, 3).contiguous()
    along = X[:, None].expand(3, B, 3, 3).contiguous()

    def tangent(fn):
        """``fn(R)`` at the identity and its derivative along the generators (torch reference,
        which forward-mode AD differentiates)."""
        return jvp(fn, (identity,), (along,))

    names, fixed, moving, primals, tangents = [], {}, [], [], []
    for name, value, rep in batch.leaves:
        names.append(name)
        moves = isinstance(rep, Rep) and rep.kind not in ("scalar", "pseudoscalar") and value.is_floating_point()
        if not moves:
            stacked = stack_copies(dataclasses.replace(batch, leaves=[(name, value, rep)]), Action(identity, "torch"),
                                   "torch")[1][0]
            fixed[name] = stacked
            continue
        p, t = tangent(lambda R, n=name, v=value, r=rep: stack_copies(
            dataclasses.replace(batch, leaves=[(n, v, r)]), Action(R, "torch"), "torch")[1][0])
        moving.append(name)
        primals.append(p)
        tangents.append(t.to(p.dtype))

    def call(*moved):
        values = dict(fixed, **dict(zip(moving, moved)))
        out = call_model(model, spec, batch, names, [values[n] for n in names], 3, None)
        return tuple(v for _, v, _ in spec.output_leaves(out))

    if primals:
        try:
            out, dout = (_model_jvp_reverse if reverse else _model_jvp)(call, primals, tangents, spec.model_grad)
        except NotImplementedError as err:
            if "forward AD" not in str(err):
                raise
            raise NotImplementedError(f"{err}\nlie_derivative's default method differentiates the model forward; "
                                      "method='reverse' and method='central' need no forward-mode "
                                      "derivatives") from err
    else:  # only invariant inputs: the model's part is zero
        out = call()
        dout = tuple(torch.zeros_like(o) for o in out)

    results = []
    heads = split_heads(spec.build_output(list(out)), spec, batch, 3, False)
    for head, do in zip(heads, dout):
        o = head.value  # (3, rows, ...): three identical primal copies
        do = do.reshape(o.shape).to(acc)
        # drho_out(X_i) f(x), from copy 0
        _, own = tangent(lambda R, h=head: rotate_copies(h.value[0].to(acc), R, h.rep, h.mask, batch=h.batch,
                                                         backend="torch"))
        results.append(_zero_invalid(do - own.reshape(o.shape), head, acc))
    return heads, results


def _central(model: Callable, spec: Spec, batch, step: Optional[float], backend: str) -> tuple[list, list]:
    """``method="central"``: the twisted model at ``exp(+-h X_i)``, 6 copies in one call;
    ``(heads, lies)`` as :func:`_jvp` returns them."""
    B, acc = batch.B, batch.dtype
    h = step if step is not None else (1e-5 if acc == torch.float64 else 5e-3)
    X = so3_generators(torch.float64, batch.device)
    R = torch.linalg.matrix_exp(torch.cat([h * X, -h * X])).to(acc)  # copies 0-2: +h, 3-5: -h
    R = R[:, None].expand(6, B, 3, 3).contiguous()
    names, values = stack_copies(batch, Action(R, backend), backend)
    out = call_model(model, spec, batch, names, values, 6, None)
    results = []
    heads = split_heads(out, spec, batch, 6, False)
    for head in heads:
        # rho_out(R_k)^-1 y_k, copy by copy (rho(R^T) = rho(R)^-1 for rotations)
        back = torch.stack([rotate_copies(head.value[k].to(acc), R[k:k + 1].transpose(-1, -2), head.rep, head.mask,
                                          batch=head.batch, backend=backend) for k in range(6)])
        results.append(_zero_invalid((back[:3] - back[3:]) / (2 * h), head, acc))
    return heads, results


def _zero_invalid(lie: torch.Tensor, head, acc: torch.dtype) -> torch.Tensor:
    """``lie`` ``(3, rows, ...)`` with the derivatives of the head's invalid elements set to 0."""
    m = mask_for(head.mask, lie.shape[1:], f"output {head.name!r}") if head.mask is not None else None
    return lie if m is None else torch.where(m, lie, torch.zeros((), dtype=acc, device=lie.device))
