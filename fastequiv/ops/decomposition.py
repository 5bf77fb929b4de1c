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
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import native

__all__ = ["HeadRows", "Decomposed", "decompose_heads"]


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
