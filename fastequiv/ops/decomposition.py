"""decompose_heads: the loss decomposition of every output head of a call, in one step.

Each head's K back-rotated copies are reduced to per-sample sums by the ``reduce_rows``
kernel of :mod:`.twirl_reduce`, and one more kernel turns the sums of all heads into what
:func:`fastequiv.estimators.decompose` and :func:`fastequiv.estimators.combine` give: the
per-sample terms of every head and of their weighted sum, the batch means, ``pct`` and
the standard errors (csrc/decomposition_cpu.cpp). The measuring functions' hot path on
the ``"cpu"`` backend (:class:`fastequiv.stacking.CallPlan`) runs this instead of
``twirl_reduce`` and the torch estimators, which stay the reference: the per-sample
terms and the gradients are theirs bit for bit, the batch means and standard errors
(accumulated in float64, rounded once) agree to rounding (tests/test_fixed_cost.py).

The kernels are called on data pointers (:mod:`fastequiv.backends.native`): the caller
hands over contiguous arrays of the checked shapes and dtypes. With ``grad``, L_total and
L_equiv come out of a ``torch.autograd.Function`` whose backward runs the chain of the
torch estimators (csrc/decomposition_cpu.cpp) and then ``reduce_rows_backward``.

:func:`decompose_design` is the same for a rotation design's ``R`` replicates of ``K``
copies (the estimators of :mod:`fastequiv.design_twirl`): each replicate's block of copies
is one weighted ``reduce_rows`` call, as ``design_twirl.Replicates`` makes it, and one more
kernel forms the between-replicate terms, the jackknife over replicates, the combination
and the label-free ratios. Its per-sample values and gradients agree with the torch path to
rounding (the sums over a sample's elements are added in double, not in torch's order).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import native

__all__ = ["HeadRows", "Decomposed", "decompose_heads", "DesignDecomposed", "decompose_design"]


class HeadRows(NamedTuple):
    """One output head as the row kernels read it (contract: :mod:`fastequiv.ops.layout`).

    ``out``: the model's output, contiguous, ``K * N * d`` elements (float32 or float64);
    ``M``: ``(K, B, d, d)`` in acc; ``target``: contiguous, ``N * d`` elements, in ``out``'s
    dtype or acc; ``sample``/``P``: the sample of each row; ``valid``: bool ``(N,)`` or None;
    ``center``: zeros ``(K, B, d)`` in acc; ``mean``: ``(N, d)`` in acc, written (the
    twirled mean, which the backward reads)."""

    out: Tensor
    M: Tensor
    target: Tensor
    sample: Optional[Tensor]
    P: int
    valid: Optional[Tensor]
    N: int
    d: int
    center: Tensor
    mean: Tensor


class Decomposed(NamedTuple):
    """What :func:`decompose_heads` returns, slot 0 the top level and the heads after it
    when they are combined: ``per_sample``, three ``(B,)`` tensors a slot (total, mean,
    equiv); ``scalars``, seven 0-dim tensors a slot (total, mean, equiv, pct and the three
    standard errors); ``valid``, one bool ``(B,)`` a slot (the samples that count);
    ``flags`` (bit 2h: head h has a valid element; 2h + 1: its per-sample L_total is
    finite); and the top level's ``total`` and ``equiv`` (their own tensors, carrying the
    gradient with ``grad``)."""

    per_sample: tuple
    scalars: tuple
    valid: tuple
    flags: int
    total: Tensor
    equiv: Tensor


class _Call(NamedTuple):
    heads: list
    B: int
    K: int
    exhaustive: bool
    combine: bool
    weights: list
    acc: torch.dtype


def _forward(c: _Call) -> tuple[Decomposed, Tensor]:
    """The kernels: ``(result, work)``, ``work`` holding the sums ``(H, 3, B)`` and then the
    counts ``(H, B)`` the backward reads."""
    C = native.raw()
    H, B, acc = len(c.heads), c.B, c.acc
    code = native.CODES[acc]
    size = torch.finfo(acc).bits // 8
    slots = H + 1 if c.combine else 1
    work = torch.empty(4 * H * B, dtype=acc)
    per_sample = torch.empty(3 * slots, B, dtype=acc)
    scalars = torch.empty(7 * slots, dtype=acc)
    sums = work.data_ptr()
    for h, r in enumerate(c.heads):
        C.reduce_rows_raw_cpu(r.out.data_ptr(), r.M.data_ptr(), r.target.data_ptr(), native.ptr(r.sample), r.P,
                              native.ptr(r.valid), r.center.data_ptr(), r.mean.data_ptr(), sums + 3 * h * B * size,
                              c.K, r.N, B, r.d, native.CODES[r.out.dtype], native.CODES[r.target.dtype], code)
    valid = torch.empty(slots, B, dtype=torch.bool)
    heads = c.heads
    flags = C.decompose_raw_cpu(code, B, c.K, c.exhaustive, c.combine, c.weights, [r.N for r in heads],
                                [r.d for r in heads], [r.P for r in heads], [native.ptr(r.sample) for r in heads],
                                [native.ptr(r.valid) for r in heads], sums, sums + 3 * H * B * size,
                                per_sample.data_ptr(), scalars.data_ptr(), valid.data_ptr())
    values = scalars.unbind(0)
    return Decomposed(per_sample.unbind(0), values, valid.unbind(0), flags, values[0], values[2]), work


class _Differentiable(torch.autograd.Function):
    """L_total and L_equiv of :func:`decompose_heads` as functions of the heads' outputs."""

    @staticmethod
    def forward(ctx, c: _Call, holder: list, *outs):
        result, work = _forward(c)
        ctx.call, ctx.work = c, work
        holder.append(result)
        return result.total.clone(), result.equiv.clone()  # their own tensors: outputs of the Function

    @staticmethod
    def backward(ctx, g_total, g_equiv):
        c, C = ctx.call, native.raw()
        H, B, acc = len(c.heads), c.B, c.acc
        code = native.CODES[acc]
        size = torch.finfo(acc).bits // 8
        grad_sums = torch.empty(H, 3, B, dtype=acc)
        C.decompose_backward_raw_cpu(code, B, c.K, c.exhaustive, c.combine, c.weights,
                                     ctx.work.data_ptr() + 3 * H * B * size, float(g_total), float(g_equiv),
                                     grad_sums.data_ptr())
        grads = []
        for h, r in enumerate(c.heads):
            g = torch.empty_like(r.out)
            C.reduce_rows_backward_raw_cpu(0, grad_sums.data_ptr() + 3 * h * B * size, r.out.data_ptr(),
                                           r.M.data_ptr(), r.target.data_ptr(), native.ptr(r.sample), r.P,
                                           native.ptr(r.valid), r.center.data_ptr(), r.mean.data_ptr(),
                                           g.data_ptr(), c.K, r.N, B, r.d, native.CODES[r.out.dtype],
                                           native.CODES[r.target.dtype], code)
            grads.append(g)
        return (None, None, *grads)


def decompose_heads(heads: list[HeadRows], B: int, K: int, exhaustive: bool, weights: list[float], *,
                    combine: bool, grad: bool) -> Decomposed:
    """The decomposition of ``heads`` (see module docs) on the ``"cpu"`` backend.

    Args:
        heads: the rows of every head (:class:`HeadRows`), checked by the caller.
        B, K, exhaustive: samples, copies, and whether every element of a finite group was
            used once (exact estimators) rather than K i.i.d. draws (unbiased ones).
        weights: the loss weight of each head.
        combine: several heads (their weighted sum is the top level); else one head.
        grad: ``total`` and ``equiv`` carry the gradient with respect to the heads' outputs.
    """
    c = _Call(heads, B, K, exhaustive, combine, [float(w) for w in weights], heads[0].M.dtype)
    if not grad:
        return _forward(c)[0]
    holder: list = []
    total, equiv = _Differentiable.apply(c, holder, *(r.out for r in heads))
    return holder[0]._replace(total=total, equiv=equiv)


class DesignDecomposed(NamedTuple):
    """What :func:`decompose_design` returns: as :class:`Decomposed` (slot 0 the top level,
    then the heads when combined), and ``rotation`` (three 0-dim tensors: the jackknife
    standard errors of total, mean, equiv, or without labels of equiv, norm, rel; NaN for
    R < 3), ``rel`` (two 0-dim tensors a slot: rel and its standard error, without labels)
    and ``per_rel`` (one ``(B,)`` a slot, without labels)."""

    per_sample: tuple
    scalars: tuple
    valid: tuple
    flags: int
    total: Tensor
    equiv: Tensor
    rotation: tuple
    rel: tuple
    per_rel: tuple


class _DesignCall(NamedTuple):
    heads: list
    B: int
    K: int
    R: int
    design_weights: Tensor
    combine: bool
    labelled: bool
    weights: list
    acc: torch.dtype


def _pointers(c: _DesignCall):
    C = native.raw()
    heads = c.heads
    return C, ([r.N for r in heads], [r.d for r in heads], [r.P for r in heads], [native.ptr(r.sample) for r in heads],
               [native.ptr(r.valid) for r in heads], [r.mean.data_ptr() for r in heads],
               [r.target.data_ptr() for r in heads])


def _design_forward(c: _DesignCall) -> tuple[DesignDecomposed, Tensor]:
    """The kernels: ``(result, work)``, ``work`` holding the sums ``(H, R, 3, B)`` and then
    the counts ``(H, B)`` the backward reads."""
    C, (N, d, P, sample, valid, mean, target) = _pointers(c)
    H, B, K, R, acc = len(c.heads), c.B, c.K, c.R, c.acc
    code = native.CODES[acc]
    size = torch.finfo(acc).bits // 8
    slots = H + 1 if c.combine else 1
    work = torch.empty((R * 3 + 1) * H * B, dtype=acc)
    per_sample = torch.empty(4 * slots, B, dtype=acc)
    scalars = torch.empty(9 * slots + 3, dtype=acc)
    sums = work.data_ptr()
    w = c.design_weights.data_ptr()
    for h, r in enumerate(c.heads):
        osize = r.out.element_size()
        block = K * r.N * r.d  # elements of one replicate's copies
        for j in range(R):
            C.reduce_rows_raw_cpu(r.out.data_ptr() + j * block * osize, r.M.data_ptr() + j * K * B * r.d * r.d * size,
                                  r.target.data_ptr(), native.ptr(r.sample), r.P, native.ptr(r.valid),
                                  r.center.data_ptr(), r.mean.data_ptr() + j * r.N * r.d * size,
                                  sums + (h * R + j) * 3 * B * size, K, r.N, B, r.d, native.CODES[r.out.dtype],
                                  native.CODES[r.target.dtype], code, w)
    valid_out = torch.empty(slots, B, dtype=torch.bool)
    flags = C.design_decompose_raw_cpu(code, B, K, R, c.combine, c.labelled, c.weights, N, d, P, sample, valid, mean,
                                       target, sums, sums + 3 * R * H * B * size, per_sample.data_ptr(),
                                       scalars.data_ptr(), valid_out.data_ptr())
    rows, values = per_sample.unbind(0), scalars.unbind(0)
    result = DesignDecomposed(rows[:3 * slots], values[:7 * slots], valid_out.unbind(0), flags, values[0], values[2],
                              values[7 * slots:7 * slots + 3], values[7 * slots + 3:], rows[3 * slots:])
    return result, work


class _DesignDifferentiable(torch.autograd.Function):
    """L_total and L_equiv of :func:`decompose_design` as functions of the heads' outputs."""

    @staticmethod
    def forward(ctx, c: _DesignCall, holder: list, *outs):
        result, work = _design_forward(c)
        ctx.call, ctx.work = c, work
        holder.append(result)
        return result.total.clone(), result.equiv.clone()  # their own tensors: outputs of the Function

    @staticmethod
    def backward(ctx, g_total, g_equiv):
        c = ctx.call
        C, (N, d, P, sample, valid, mean, target) = _pointers(c)
        H, B, K, R, acc = len(c.heads), c.B, c.K, c.R, c.acc
        code = native.CODES[acc]
        size = torch.finfo(acc).bits // 8
        grad_sums = torch.empty(H, R, 3, B, dtype=acc)
        grad_mean = [torch.empty_like(r.mean) if R > 1 else None for r in c.heads]
        C.design_decompose_backward_raw_cpu(code, B, K, R, c.combine, c.weights, N, d, P, sample, valid, mean, target,
                                            ctx.work.data_ptr() + 3 * R * H * B * size, float(g_total),
                                            float(g_equiv), grad_sums.data_ptr(), [native.ptr(g) for g in grad_mean])
        grads = []
        w = c.design_weights.data_ptr()
        for h, r in enumerate(c.heads):
            g = torch.empty_like(r.out)
            osize = r.out.element_size()
            block = K * r.N * r.d
            for j in range(R):
                gm = 0 if grad_mean[h] is None else grad_mean[h].data_ptr() + j * r.N * r.d * size
                C.reduce_rows_backward_raw_cpu(gm, grad_sums.data_ptr() + (h * R + j) * 3 * B * size,
                                               r.out.data_ptr() + j * block * osize,
                                               r.M.data_ptr() + j * K * B * r.d * r.d * size, r.target.data_ptr(),
                                               native.ptr(r.sample), r.P, native.ptr(r.valid), r.center.data_ptr(),
                                               r.mean.data_ptr() + j * r.N * r.d * size,
                                               g.data_ptr() + j * block * osize, K, r.N, B, r.d,
                                               native.CODES[r.out.dtype], native.CODES[r.target.dtype], code, w)
            grads.append(g)
        return (None, None, *grads)


def decompose_design(heads: list[HeadRows], B: int, K: int, R: int, design_weights: Tensor, weights: list[float], *,
                     combine: bool, labelled: bool, grad: bool) -> DesignDecomposed:
    """The randomised-design decomposition of ``heads`` (see module docs) on the ``"cpu"``
    backend.

    Args:
        heads: the rows of every head (:class:`HeadRows`) on the ``R * K`` copies (copy
            ``r K + i`` is replicate ``r``'s turn of design rotation ``i``; ``M`` ``(R K, B,
            d, d)``), with ``target`` in acc and ``mean`` ``(R, N, d)`` in acc (each
            replicate's twirled mean, written), checked by the caller.
        B, K, R: samples, the design's rotations, replicates.
        design_weights: ``(K,)`` the design's weights, contiguous, in acc.
        weights: the loss weight of each head.
        combine: several heads (their weighted sum is the top level); else one head.
        labelled: a target was given (else the values are against zeros, and ``rel``,
            ``per_rel`` and the label-free ``rotation`` are filled).
        grad: ``total`` and ``equiv`` carry the gradient with respect to the heads' outputs.
    """
    c = _DesignCall(heads, B, K, R, design_weights, combine, labelled, [float(w) for w in weights], heads[0].M.dtype)
    if not grad:
        return _design_forward(c)[0]
    holder: list = []
    total, equiv = _DesignDifferentiable.apply(c, holder, *(r.out for r in heads))
    return holder[0]._replace(total=total, equiv=equiv)
