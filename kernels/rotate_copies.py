"""Triton kernels of ``rotate_copies``: K rotated copies of rows in one pass over them.

Contract (the torch references in ``fastequiv/ops/rotate_copies.py``):

* :func:`rotate_rows` ``(x (N, d), M (K, B, d, d), sample, P, center (B, d) | None)`` ->
  ``(K, N, d)`` in ``x.dtype``: ``out[k, r] = M[k, s] (x[r] - c[s]) + c[s]``, ``s = s(r)``
  (``r // P`` in the dense layout, ``sample[r]`` in the graph layout).
* :func:`rotate_rows_backward` ``(grad (K, N, d), M, sample, P)`` -> ``(N, d)`` in
  ``M.dtype``: ``sum_k M[k, s]^T grad[k, r]``.

Layout: one program per block of ``BLOCK_N`` rows; it reads its rows once, in their own
dtype, and loops over the K copies, computing in ``M.dtype`` (float32 or float64). Rows
wider than one tile (``d > BLOCK_D``, :func:`~.triton_common.row_block`) are walked in
``BLOCK_D``-column chunks of the matrix, re-reading the row's chunks for every copy.
Inputs are made contiguous by the launchers (a no-op for contiguous ones).
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
def _rotate_rows_kernel(x_ptr, M_ptr, sample_ptr, center_ptr, out_ptr, N, B, K, P,
                        D: tl.constexpr, GRAPH: tl.constexpr, HAS_CENTER: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_D)
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    row_off = rows.to(tl.int64)[:, None] * D
    copy_stride = tl.cast(N, tl.int64) * D
    if D <= BLOCK_D:
        # the row is one tile: read it once, keep it for every copy
        tmask = rmask[:, None] & (cols[None, :] < D)
        offs = row_off + cols[None, :]
        x = tl.load(x_ptr + offs, mask=tmask, other=0.0).to(acc_ty)
        if HAS_CENTER:
            c = tl.load(center_ptr + s[:, None] * D + cols[None, :], mask=tmask, other=0.0)
            x = x - c
        for k in range(K):
            y = matvec(load_tile(M_ptr, k * B + s, rmask, 0, 0, D, BLOCK_D), x)
            if HAS_CENTER:
                y = y + c
            tl.store(out_ptr + k * copy_stride + offs, to_store(y, out_ty), mask=tmask)
    else:
        # a wide row: output chunk i0 of copy k is the sum over column chunks j0
        for k in range(K):
            mat = k * B + s
            for i0 in range(0, D, BLOCK_D):
                ci = i0 + cols
                imask = rmask[:, None] & (ci[None, :] < D)
                y = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
                for j0 in range(0, D, BLOCK_D):
                    cj = j0 + cols
                    jmask = rmask[:, None] & (cj[None, :] < D)
                    xj = tl.load(x_ptr + row_off + cj[None, :], mask=jmask, other=0.0).to(acc_ty)
                    if HAS_CENTER:
                        xj = xj - tl.load(center_ptr + s[:, None] * D + cj[None, :], mask=jmask, other=0.0)
                    y += matvec(load_tile(M_ptr, mat, rmask, i0, j0, D, BLOCK_D), xj)
                if HAS_CENTER:
                    y = y + tl.load(center_ptr + s[:, None] * D + ci[None, :], mask=imask, other=0.0)
                tl.store(out_ptr + k * copy_stride + row_off + ci[None, :], to_store(y, out_ty), mask=imask)


@triton.jit
def _rotate_rows_backward_kernel(grad_ptr, M_ptr, sample_ptr, out_ptr, N, B, K, P,
                                 D: tl.constexpr, GRAPH: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_D)
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    row_off = rows.to(tl.int64)[:, None] * D
    copy_stride = tl.cast(N, tl.int64) * D
    # output chunk j0 (one chunk when D <= BLOCK_D): sum over copies and row chunks i0
    for j0 in range(0, D, BLOCK_D):
        cj = j0 + cols
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
        for k in range(K):
            mat = k * B + s
            for i0 in range(0, D, BLOCK_D):
                ci = i0 + cols
                imask = rmask[:, None] & (ci[None, :] < D)
                g = tl.load(grad_ptr + k * copy_stride + row_off + ci[None, :], mask=imask, other=0.0).to(acc_ty)
                acc += matvec_t(load_tile(M_ptr, mat, rmask, i0, j0, D, BLOCK_D), g)
        tl.store(out_ptr + row_off + cj[None, :], acc, mask=rmask[:, None] & (cj[None, :] < D))


def _check_M(M: torch.Tensor, d: int) -> None:
    check_acc(M)
    if M.dim() != 4 or M.shape[2:] != (d, d):
        raise ValueError(f"M must have shape (K, B, {d}, {d}), got {tuple(M.shape)}")


def rotate_rows(x: torch.Tensor, M: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                center: Optional[torch.Tensor]) -> torch.Tensor:
    """``(K, N, d)`` rotated copies of ``x`` ``(N, d)``; see the module docs."""
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, d), got {tuple(x.shape)}")
    N, d = x.shape
    _check_M(M, d)
    if x.dtype == torch.float64 and M.dtype != torch.float64:
        raise ValueError(f"M: expected float64 (the accumulation dtype) for float64 x, got {M.dtype}")
    K, B = M.shape[:2]
    check_sample(sample, N, P)
    check_rows(N, K, d)
    out = torch.empty(K, N, d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, M, sample, center = contiguous(x), contiguous(M), contiguous(sample), contiguous(center)
    if center is not None and center.dtype != M.dtype:
        raise ValueError(f"center must have M's dtype {M.dtype}, got {center.dtype}")
    block_n, block_d = row_block(N, d)
    with device_guard(x):
        _rotate_rows_kernel[(triton.cdiv(N, block_n),)](
            x, M, sample if sample is not None else x, center if center is not None else M, out,
            N, B, K, max(P, 1),
            D=d, GRAPH=sample is not None, HAS_CENTER=center is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out


def rotate_rows_backward(grad: torch.Tensor, M: torch.Tensor, sample: Optional[torch.Tensor], P: int) -> torch.Tensor:
    """``sum_k M[k, s]^T grad[k, r]`` ``(N, d)`` in ``M.dtype``; see the module docs."""
    if grad.dim() != 3:
        raise ValueError(f"grad must have shape (K, N, d), got {tuple(grad.shape)}")
    K, N, d = grad.shape
    _check_M(M, d)
    if M.shape[0] != K:
        raise ValueError(f"M must have K={K} copies like grad, got shape {tuple(M.shape)}")
    B = M.shape[1]
    check_sample(sample, N, P)
    check_rows(N, K, d)
    if K == 0 or N * d == 0:
        return torch.zeros(N, d, dtype=M.dtype, device=grad.device)
    out = torch.empty(N, d, dtype=M.dtype, device=grad.device)
    grad, M, sample = contiguous(grad), contiguous(M), contiguous(sample)
    block_n, block_d = row_block(N, d)
    with device_guard(grad):
        _rotate_rows_backward_kernel[(triton.cdiv(N, block_n),)](
            grad, M, sample if sample is not None else grad, out, N, B, K, max(P, 1),
            D=d, GRAPH=sample is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out
