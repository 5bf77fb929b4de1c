"""Triton kernels of ``twirl_reduce``: back-rotation, twirled mean and decomposition sums.

Contract (the torch references in ``fastequiv/ops/twirl_reduce.py``):

* :func:`reduce_rows` ``(out (K, N, d), M (K, B, d, d), target (N, d), sample, P, valid,
  center (K, B, d) | None, B)`` -> ``(mean (N, d), sums (3, B))`` in ``M.dtype``, with
  ``a_k = M[k, s]^T (out[k, r] - c[k, s]) + c[k, s]``, ``mean = abar = (1/K) sum_k a_k`` and
  per sample, over its valid rows and their components, the sums of
  ``(1/K) sum_k |a_k - y|^2`` (total), ``|abar - y|^2`` (bias) and
  ``(1/K) sum_k |a_k - abar|^2`` (spread).
* :func:`reduce_rows_backward` ``(grad_mean (N, d) | None, grad_sums (3, B), out, M,
  target, sample, P, valid, center, mean)`` -> ``(K, N, d)`` in ``out.dtype``:
  ``M[k, s] dL/da_k`` with ``dL/da_k = (2/K) (g_total (a_k - y) + g_bias (abar - y) +
  g_spread (a_k - abar)) + grad_mean / K``.
* With ``weights`` ``(K,)`` (acc), every ``(1/K) sum_k`` is ``sum_k w_k`` and
  ``dL/da_k = 2 w_k (g_total (a_k - y) + g_bias (abar - y) + g_spread (a_k - abar - (1 - S) abar))
  + w_k grad_mean`` (``S = sum_k w_k``): the forward forms ``abar`` in a first pass over the
  copies and the spread from the deviations in a second (no Welford update).

Both are one pass over ``out``: a program owns a block of rows, loads its K copies one
after the other (in their own dtype, fp16/bf16/fp32/fp64) and computes in ``M.dtype``.
Rows wider than one tile (``d > BLOCK_D``, :func:`~.triton_common.row_block`) are walked
in ``BLOCK_D``-column chunks of the matrix: the forward keeps its Welford state per
chunk of columns; the backward writes ``dL/da_k`` of the copy to a scratch row (acc)
before multiplying it by ``M_k``.
The forward keeps a running mean and the sum of squared deviations (Welford's update),
so the spread is a sum of squares of deviations ``a_k - abar`` in registers, never the
difference of two large sums.

Per-sample sums: in the dense layout (row ``r`` in sample ``r // P``) a program covers
``BLOCK_S`` whole samples of ``BLOCK_P >= P`` lanes each, or one chunk of ``BLOCK_P`` rows
of one sample, and writes its partial sums to ``(3, B, chunks)``; a deterministic sum over
the chunks finishes them. In the graph layout (``sample`` given) rows add into ``(3, B)``
with atomics, one per row, or one per program when all its valid rows share a sample.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import (
    check_acc,
    check_rows,
    check_sample,
    contiguous,
    device_guard,
    load_tile,
    matvec,
    matvec_t,
    row_block,
    sample_of,
    to_store,
)


@triton.jit
def _back_rotate(out_ptr, M_ptr, center_ptr, k, copy_stride, row_off, rmask, s, B, j0,
                 D: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``j0 .. j0 + BLOCK_D`` of ``a_k = M^T (out_k - c) + c`` in acc, summed over
    the row chunks ``i0`` of ``out_k`` (one chunk when ``D <= BLOCK_D``)."""
    acc_ty = M_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    mat = k * B + s
    if D <= BLOCK_D:  # one tile (j0 = 0): the centre is read once
        tmask = rmask[:, None] & (cols[None, :] < D)
        o = tl.load(out_ptr + k * copy_stride + row_off + cols[None, :], mask=tmask, other=0.0).to(acc_ty)
        Mt = load_tile(M_ptr, mat, rmask, 0, 0, D, BLOCK_D)
        if HAS_CENTER:
            c = tl.load(center_ptr + mat[:, None] * D + cols[None, :], mask=tmask, other=0.0)
            a = matvec_t(Mt, o - c) + c
        else:
            a = matvec_t(Mt, o)
    else:
        a = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
        for i0 in range(0, D, BLOCK_D):
            ci = i0 + cols
            imask = rmask[:, None] & (ci[None, :] < D)
            o = tl.load(out_ptr + k * copy_stride + row_off + ci[None, :], mask=imask, other=0.0).to(acc_ty)
            if HAS_CENTER:
                o = o - tl.load(center_ptr + mat[:, None] * D + ci[None, :], mask=imask, other=0.0)
            a += matvec_t(load_tile(M_ptr, mat, rmask, i0, j0, D, BLOCK_D), o)
        if HAS_CENTER:
            cj = j0 + cols
            a += tl.load(center_ptr + mat[:, None] * D + cj[None, :], mask=rmask[:, None] & (cj[None, :] < D),
                         other=0.0)
    return a


@triton.jit
def _reduce_rows_kernel(out_ptr, M_ptr, target_ptr, sample_ptr, valid_ptr, center_ptr, mean_ptr, sums_ptr, w_ptr,
                        N, B, K, P, n_chunks,
                        D: tl.constexpr, GRAPH: tl.constexpr, HAS_VALID: tl.constexpr, HAS_CENTER: tl.constexpr,
                        WEIGHTED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    LANES: tl.constexpr = BLOCK_S * BLOCK_P
    pid = tl.program_id(0)
    lane = tl.arange(0, LANES)
    if GRAPH:
        rows = pid * LANES + lane
        rmask = rows < N
    else:
        # lane -> (sample of this program, position in the sample's chunk)
        s_dense = (pid // n_chunks) * BLOCK_S + lane // BLOCK_P
        p = (pid % n_chunks) * BLOCK_P + lane % BLOCK_P
        rows = s_dense * P + p
        rmask = (s_dense < B) & (p < P) & (rows < N)  # the last sample may be short
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    cols = tl.arange(0, BLOCK_D)
    row_off = tl.cast(rows, tl.int64)[:, None] * D
    copy_stride = tl.cast(N, tl.int64) * D

    # per row, summed over its column chunks (one chunk when D <= BLOCK_D)
    total_row = tl.zeros((LANES,), dtype=acc_ty)
    bias_row = tl.zeros((LANES,), dtype=acc_ty)
    spread_row = tl.zeros((LANES,), dtype=acc_ty)
    for j0 in range(0, D, BLOCK_D):
        cj = j0 + cols
        jmask = rmask[:, None] & (cj[None, :] < D)
        y = tl.load(target_ptr + row_off + cj[None, :], mask=jmask, other=0.0).to(acc_ty)
        mean = tl.zeros((LANES, BLOCK_D), dtype=acc_ty)
        m2 = tl.zeros((LANES, BLOCK_D), dtype=acc_ty)
        tot = tl.zeros((LANES, BLOCK_D), dtype=acc_ty)
        if WEIGHTED:  # abar first, then the spread from the deviations
            for k in range(K):
                a = _back_rotate(out_ptr, M_ptr, center_ptr, k, copy_stride, row_off, rmask, s, B, j0,
                                 D, HAS_CENTER, LANES, BLOCK_D)
                wk = tl.load(w_ptr + k)
                e = a - y
                tot += wk * (e * e)
                mean += wk * a
            for k in range(K):
                a = _back_rotate(out_ptr, M_ptr, center_ptr, k, copy_stride, row_off, rmask, s, B, j0,
                                 D, HAS_CENTER, LANES, BLOCK_D)
                dev = a - mean
                m2 += tl.load(w_ptr + k) * (dev * dev)
        else:
            for k in range(K):
                a = _back_rotate(out_ptr, M_ptr, center_ptr, k, copy_stride, row_off, rmask, s, B, j0,
                                 D, HAS_CENTER, LANES, BLOCK_D)
                e = a - y
                tot += e * e
                delta = a - mean
                mean += delta / (k + 1)
                m2 += delta * (a - mean)
        tl.store(mean_ptr + row_off + cj[None, :], mean, mask=jmask)
        bias = mean - y
        total_row += tl.sum(tot, axis=1)
        bias_row += tl.sum(bias * bias, axis=1)
        spread_row += tl.sum(m2, axis=1)

    keep = rmask
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + rows, mask=rmask, other=0) != 0)
    if WEIGHTED:
        total_row = tl.where(keep, total_row, 0.0)
        spread_row = tl.where(keep, spread_row, 0.0)
    else:
        total_row = tl.where(keep, total_row / K, 0.0)
        spread_row = tl.where(keep, spread_row / K, 0.0)
    bias_row = tl.where(keep, bias_row, 0.0)
    if GRAPH:
        # a block inside one sample (sorted batches of large graphs) adds its sums once
        s_lo = tl.min(tl.where(keep, s, B), axis=0)
        s_hi = tl.max(tl.where(keep, s, -1), axis=0)
        if s_lo == s_hi:
            tl.atomic_add(sums_ptr + s_lo, tl.sum(total_row, axis=0))
            tl.atomic_add(sums_ptr + B + s_lo, tl.sum(bias_row, axis=0))
            tl.atomic_add(sums_ptr + 2 * B + s_lo, tl.sum(spread_row, axis=0))
        else:
            tl.atomic_add(sums_ptr + s, total_row, mask=keep)
            tl.atomic_add(sums_ptr + B + s, bias_row, mask=keep)
            tl.atomic_add(sums_ptr + 2 * B + s, spread_row, mask=keep)
    else:
        sb = (pid // n_chunks) * BLOCK_S + tl.arange(0, BLOCK_S)
        part = tl.cast(sb, tl.int64) * n_chunks + pid % n_chunks
        pmask = sb < B
        stride = tl.cast(B, tl.int64) * n_chunks
        tl.store(sums_ptr + part, tl.sum(tl.reshape(total_row, (BLOCK_S, BLOCK_P)), axis=1), mask=pmask)
        tl.store(sums_ptr + stride + part, tl.sum(tl.reshape(bias_row, (BLOCK_S, BLOCK_P)), axis=1), mask=pmask)
        tl.store(sums_ptr + 2 * stride + part, tl.sum(tl.reshape(spread_row, (BLOCK_S, BLOCK_P)), axis=1),
                 mask=pmask)


@triton.jit
def _grad_a(a, y, mean, g_total, g_bias, g_spread, grad_mean_ptr, offs, tmask, K, HAS_GRAD_MEAN: tl.constexpr,
            w_ptr, k, rest_ptr, WEIGHTED: tl.constexpr):
    """``dL/da_k = (2/K) (g_total (a_k - y) + g_bias (abar - y) + g_spread (a_k - abar)) + grad_mean / K``;
    weighted: ``2 w_k (... + g_spread (a_k - abar - (1 - S) abar)) + w_k grad_mean``, ``rest_ptr``
    holding ``1 - S``."""
    if WEIGHTED:
        wk = tl.load(w_ptr + k)
        spread = a - mean - tl.load(rest_ptr) * mean
        ga = 2.0 * wk * (g_total[:, None] * (a - y) + g_bias[:, None] * (mean - y) + g_spread[:, None] * spread)
        if HAS_GRAD_MEAN:
            ga += wk * tl.load(grad_mean_ptr + offs, mask=tmask, other=0.0).to(a.dtype)
    else:
        ga = 2.0 * (g_total[:, None] * (a - y) + g_bias[:, None] * (mean - y) + g_spread[:, None] * (a - mean)) / K
        if HAS_GRAD_MEAN:
            ga += tl.load(grad_mean_ptr + offs, mask=tmask, other=0.0).to(a.dtype) / K
    return ga


@triton.jit
def _reduce_rows_backward_kernel(grad_mean_ptr, grad_sums_ptr, out_ptr, M_ptr, target_ptr, sample_ptr, valid_ptr,
                                 center_ptr, mean_ptr, grad_out_ptr, work_ptr, w_ptr, rest_ptr, N, B, K, P,
                                 D: tl.constexpr, GRAPH: tl.constexpr, HAS_VALID: tl.constexpr,
                                 HAS_CENTER: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr, WEIGHTED: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    out_ty = grad_out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    cols = tl.arange(0, BLOCK_D)
    row_off = tl.cast(rows, tl.int64)[:, None] * D
    copy_stride = tl.cast(N, tl.int64) * D

    keep = rmask
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + rows, mask=rmask, other=0) != 0)
    g_total = tl.load(grad_sums_ptr + s, mask=keep, other=0.0).to(acc_ty)
    g_bias = tl.load(grad_sums_ptr + B + s, mask=keep, other=0.0).to(acc_ty)
    g_spread = tl.load(grad_sums_ptr + 2 * B + s, mask=keep, other=0.0).to(acc_ty)
    if D <= BLOCK_D:
        # the row is one tile: y and abar read once, each copy's matrix tile used twice
        tmask = rmask[:, None] & (cols[None, :] < D)
        offs = row_off + cols[None, :]
        y = tl.load(target_ptr + offs, mask=tmask, other=0.0).to(acc_ty)
        mean = tl.load(mean_ptr + offs, mask=tmask, other=0.0).to(acc_ty)
        for k in range(K):
            mat = k * B + s
            Mt = load_tile(M_ptr, mat, rmask, 0, 0, D, BLOCK_D)
            o = tl.load(out_ptr + k * copy_stride + offs, mask=tmask, other=0.0).to(acc_ty)
            if HAS_CENTER:
                c = tl.load(center_ptr + mat[:, None] * D + cols[None, :], mask=tmask, other=0.0)
                a = matvec_t(Mt, o - c) + c
            else:
                a = matvec_t(Mt, o)
            ga = _grad_a(a, y, mean, g_total, g_bias, g_spread, grad_mean_ptr, offs, tmask, K, HAS_GRAD_MEAN,
                         w_ptr, k, rest_ptr, WEIGHTED)
            tl.store(grad_out_ptr + k * copy_stride + offs, to_store(matvec(Mt, ga), out_ty), mask=tmask)
    else:
        # a wide row, per copy in two passes over its column chunks: dL/da_k into the
        # program's rows of the scratch ``work`` (acc), then M_k dL/da_k chunk by chunk
        for k in range(K):
            mat = k * B + s
            for j0 in range(0, D, BLOCK_D):
                cj = j0 + cols
                jmask = rmask[:, None] & (cj[None, :] < D)
                offs = row_off + cj[None, :]
                y = tl.load(target_ptr + offs, mask=jmask, other=0.0).to(acc_ty)
                mean = tl.load(mean_ptr + offs, mask=jmask, other=0.0).to(acc_ty)
                a = _back_rotate(out_ptr, M_ptr, center_ptr, k, copy_stride, row_off, rmask, s, B, j0,
                                 D, HAS_CENTER, BLOCK_N, BLOCK_D)
                ga = _grad_a(a, y, mean, g_total, g_bias, g_spread, grad_mean_ptr, offs, jmask, K, HAS_GRAD_MEAN,
                             w_ptr, k, rest_ptr, WEIGHTED)
                tl.store(work_ptr + offs, ga, mask=jmask)
            tl.debug_barrier()
            for i0 in range(0, D, BLOCK_D):
                ci = i0 + cols
                acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
                for j0 in range(0, D, BLOCK_D):
                    cj = j0 + cols
                    ga = tl.load(work_ptr + row_off + cj[None, :], mask=rmask[:, None] & (cj[None, :] < D), other=0.0)
                    acc += matvec(load_tile(M_ptr, mat, rmask, i0, j0, D, BLOCK_D), ga)
                tl.store(grad_out_ptr + k * copy_stride + row_off + ci[None, :], to_store(acc, out_ty),
                         mask=rmask[:, None] & (ci[None, :] < D))
            tl.debug_barrier()  # the next copy overwrites work


def _check(out: torch.Tensor, M: torch.Tensor, target: torch.Tensor, sample, P: int, valid, center, B: int):
    check_acc(M)
    if out.dim() != 3:
        raise ValueError(f"out must have shape (K, N, d), got {tuple(out.shape)}")
    K, N, d = out.shape
    if tuple(M.shape) != (K, B, d, d):
        raise ValueError(f"M must have shape (K, B, d, d) = {(K, B, d, d)}, got {tuple(M.shape)}")
    if tuple(target.shape) != (N, d):
        raise ValueError(f"target must have shape (N, d) = {(N, d)}, got {tuple(target.shape)}")
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (N,)):
        raise ValueError(f"valid must be a bool tensor of shape ({N},), got {valid.dtype} {tuple(valid.shape)}")
    if center is not None and (center.dtype != M.dtype or tuple(center.shape) != (K, B, d)):
        raise ValueError(f"center must be {M.dtype} of shape {(K, B, d)}, got {center.dtype} {tuple(center.shape)}")
    check_sample(sample, N, P, None if sample is not None else B)
    check_rows(N, K, d)
    return K, N, d


def _check_weights(weights: Optional[torch.Tensor], M: torch.Tensor) -> None:
    if weights is not None and (weights.dtype != M.dtype or tuple(weights.shape) != (M.shape[0],)
                                or weights.device != M.device):
        raise ValueError(f"weights must be {M.dtype} of shape ({M.shape[0]},) on {M.device}, got {weights.dtype} "
                         f"{tuple(weights.shape)} on {weights.device}")


def _dense_blocks(P: int, block_n: int) -> tuple[int, int, int]:
    """``(BLOCK_S, BLOCK_P, chunks)``: whole samples per program, or chunks of one sample."""
    block_p = min(triton.next_power_of_2(P), block_n)
    return block_n // block_p, block_p, triton.cdiv(P, block_p)


def reduce_rows(out: torch.Tensor, M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                valid: Optional[torch.Tensor], center: Optional[torch.Tensor], B: int,
                weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (N, d), sums (3, B))`` in ``M.dtype``; see the module docs."""
    K, N, d = _check(out, M, target, sample, P, valid, center, B)
    _check_weights(weights, M)
    acc = M.dtype
    mean = torch.empty(N, d, dtype=acc, device=out.device)
    if N * d == 0 or K == 0:
        return mean.zero_(), torch.zeros(3, B, dtype=acc, device=out.device)
    out, M, target, sample, center = (contiguous(t) for t in (out, M, target, sample, center))
    valid_u8 = None if valid is None else contiguous(valid).view(torch.uint8)
    block_n, block_d = row_block(N, d)
    if sample is not None:
        sums = torch.zeros(3, B, dtype=acc, device=out.device)
        block_s, block_p, chunks, grid = 1, block_n, 1, triton.cdiv(N, block_n)
    else:
        block_s, block_p, chunks = _dense_blocks(P, block_n)
        sums = torch.empty(3, B, chunks, dtype=acc, device=out.device)
        grid = triton.cdiv(B, block_s) * chunks
    with device_guard(out):
        _reduce_rows_kernel[(grid,)](
            out, M, target, sample if sample is not None else out, valid_u8 if valid_u8 is not None else out,
            center if center is not None else M, mean, sums, contiguous(weights) if weights is not None else M,
            N, B, K, max(P, 1), chunks,
            D=d, GRAPH=sample is not None, HAS_VALID=valid is not None, HAS_CENTER=center is not None,
            WEIGHTED=weights is not None, BLOCK_S=block_s, BLOCK_P=block_p, BLOCK_D=block_d,
        )
    if sample is None:
        sums = sums[..., 0] if chunks == 1 else sums.sum(dim=-1)
    return mean, sums


def reduce_rows_backward(grad_mean: Optional[torch.Tensor], grad_sums: torch.Tensor, out: torch.Tensor,
                         M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                         valid: Optional[torch.Tensor], center: Optional[torch.Tensor], mean: torch.Tensor,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dL/dout`` ``(K, N, d)`` in ``out.dtype``; see the module docs."""
    B = grad_sums.shape[-1] if grad_sums.dim() == 2 else -1
    if grad_sums.dim() != 2 or grad_sums.shape[0] != 3 or M.dim() != 4 or M.shape[1] != B:
        raise ValueError(f"grad_sums must have shape (3, B) with B = M.shape[1], got {tuple(grad_sums.shape)} "
                         f"and M {tuple(M.shape)}")
    K, N, d = _check(out, M, target, sample, P, valid, center, B)
    _check_weights(weights, M)
    for name, t in (("mean", mean), ("grad_mean", grad_mean)):
        if t is not None and tuple(t.shape) != (N, d):
            raise ValueError(f"{name} must have shape (N, d) = {(N, d)}, got {tuple(t.shape)}")
    grad_out = torch.empty(K, N, d, dtype=out.dtype, device=out.device)
    if grad_out.numel() == 0:
        return grad_out
    acc = M.dtype  # the kernel reads the mean and the incoming gradients in the accumulation dtype
    mean, grad_sums = mean.to(acc), grad_sums.to(acc)
    grad_mean = None if grad_mean is None else grad_mean.to(acc)
    grad_mean, grad_sums, out, M, target, sample, center, mean = (
        contiguous(t) for t in (grad_mean, grad_sums, out, M, target, sample, center, mean))
    valid_u8 = None if valid is None else contiguous(valid).view(torch.uint8)
    block_n, block_d = row_block(N, d)
    # rows wider than one tile keep dL/da_k of the copy at hand here (acc)
    work = torch.empty(N, d, dtype=M.dtype, device=out.device) if d > block_d else M
    # 1 - S on the device (no sync): the weighted spread term's correction
    rest = (1 - weights.sum()).reshape(1) if weights is not None else M
    with device_guard(out):
        _reduce_rows_backward_kernel[(triton.cdiv(N, block_n),)](
            grad_mean if grad_mean is not None else M, grad_sums, out, M, target,
            sample if sample is not None else out, valid_u8 if valid_u8 is not None else out,
            center if center is not None else M, mean, grad_out, work,
            contiguous(weights) if weights is not None else M, rest, N, B, K, max(P, 1),
            D=d, GRAPH=sample is not None, HAS_VALID=valid is not None, HAS_CENTER=center is not None,
            HAS_GRAD_MEAN=grad_mean is not None, WEIGHTED=weights is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return grad_out
