"""Triton kernels of ``rotate_copies``: K rotated copies of rows in one pass over them.

Contract (``fastequiv/ops/_rows.py``):

* :func:`rotate_rows` ``(x (N, d), M (K, B, d, d), sample, P, center (B, d) | None)`` ->
  ``(K, N, d)`` in ``x.dtype``: ``out[k, r] = M[k, s] (x[r] - c[s]) + c[s]``, ``s = s(r)``
  (``r // P`` in the dense layout, ``sample[r]`` in the graph layout).
* :func:`rotate_rows_backward` ``(grad (K, N, d), M, sample, P)`` -> ``(N, d)`` in
  ``M.dtype``: ``sum_k M[k, s]^T grad[k, r]``.
* :func:`rotate_rows_seeded` ``(x (N, 3), seed, offset, K, B, sample, P, center, improper,
  pseudo)`` -> ``(copies (K, N, 3), R (K, B, 3, 3))``: :func:`rotate_rows` of 3-vectors
  with the rotations drawn in the kernel from the Philox stream keyed by the int64 0-dim
  tensor ``seed`` (rotation ``offset + k * B + b``, as
  :func:`~fastequiv.kernels.random_rotations.random_rotations_seeded`), so no ``M`` is read.
  ``pseudo`` multiplies by ``det R`` (pseudovectors). ``R`` is written as well.

Layout: one program per block of ``BLOCK_N`` rows; it reads its rows once, in their own
dtype, and loops over the K copies, computing in ``M.dtype`` (float32 or float64).
Inputs are made contiguous by the launchers (a no-op for contiguous ones).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_common import (
    check_acc,
    check_rows,
    check_sample,
    contiguous,
    device_guard,
    load_matrices,
    matvec,
    matvec_t,
    row_block,
    sample_of,
)
from .random_rotations import haar_matrix, random_rotations_seeded


@triton.jit
def _rotate_rows_kernel(x_ptr, M_ptr, sample_ptr, center_ptr, out_ptr, N, B, K, P,
                        D: tl.constexpr, GRAPH: tl.constexpr, HAS_CENTER: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_D)
    tmask = rmask[:, None] & (cols[None, :] < D)
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=tmask, other=0.0).to(acc_ty)
    if HAS_CENTER:
        c = tl.load(center_ptr + s[:, None] * D + cols[None, :], mask=tmask, other=0.0)
        x = x - c
    copy_stride = tl.cast(N, tl.int64) * D
    for k in range(K):
        y = matvec(load_matrices(M_ptr, k * B + s, rmask, D, BLOCK_D), x)
        if HAS_CENTER:
            y = y + c
        tl.store(out_ptr + k * copy_stride + offs, y.to(out_ptr.dtype.element_ty), mask=tmask)


@triton.jit
def _rotate_rows_backward_kernel(grad_ptr, M_ptr, sample_ptr, out_ptr, N, B, K, P,
                                 D: tl.constexpr, GRAPH: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = M_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_D)
    tmask = rmask[:, None] & (cols[None, :] < D)
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    copy_stride = tl.cast(N, tl.int64) * D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_ty)
    for k in range(K):
        g = tl.load(grad_ptr + k * copy_stride + offs, mask=tmask, other=0.0).to(acc_ty)
        acc += matvec_t(load_matrices(M_ptr, k * B + s, rmask, D, BLOCK_D), g)
    tl.store(out_ptr + offs, acc, mask=tmask)


@triton.jit
def _rotate_rows_seeded_kernel(x_ptr, seed_ptr, sample_ptr, center_ptr, out_ptr, N, B, K, P, offset,
                               GRAPH: tl.constexpr, HAS_CENTER: tl.constexpr, FLIP_IMPROPER: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    acc_ty = center_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    s = sample_of(rows, rmask, sample_ptr, P, GRAPH)
    base = rows.to(tl.int64) * 3
    x0 = tl.load(x_ptr + base + 0, mask=rmask, other=0.0).to(acc_ty)
    x1 = tl.load(x_ptr + base + 1, mask=rmask, other=0.0).to(acc_ty)
    x2 = tl.load(x_ptr + base + 2, mask=rmask, other=0.0).to(acc_ty)
    if HAS_CENTER:
        c0 = tl.load(center_ptr + s * 3 + 0, mask=rmask, other=0.0)
        c1 = tl.load(center_ptr + s * 3 + 1, mask=rmask, other=0.0)
        c2 = tl.load(center_ptr + s * 3 + 2, mask=rmask, other=0.0)
        x0, x1, x2 = x0 - c0, x1 - c1, x2 - c2
    seed = tl.load(seed_ptr)
    copy_stride = tl.cast(N, tl.int64) * 3
    out_ty = out_ptr.dtype.element_ty
    for k in range(K):
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = haar_matrix(
            seed, offset + tl.cast(k, tl.int64) * B + s, FLIP_IMPROPER, acc_ty)
        y0 = m00 * x0 + m01 * x1 + m02 * x2
        y1 = m10 * x0 + m11 * x1 + m12 * x2
        y2 = m20 * x0 + m21 * x1 + m22 * x2
        if HAS_CENTER:
            y0, y1, y2 = y0 + c0, y1 + c1, y2 + c2
        o = out_ptr + k * copy_stride + base
        tl.store(o + 0, y0.to(out_ty), mask=rmask)
        tl.store(o + 1, y1.to(out_ty), mask=rmask)
        tl.store(o + 2, y2.to(out_ty), mask=rmask)


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


def rotate_rows_seeded(x: torch.Tensor, seed: torch.Tensor, offset: int, K: int, B: int,
                       sample: Optional[torch.Tensor], P: int, center: Optional[torch.Tensor],
                       improper: bool, pseudo: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K rotated copies of 3-vectors with the rotations sampled in the kernel.

    Returns ``(copies (K, N, 3) in x.dtype, R (K, B, 3, 3))``, ``R`` in the accumulation
    dtype (float64 for float64 ``x`` or ``center``, else float32); rotation ``k, b`` is
    number ``offset + k * B + b`` of the stream keyed by ``seed``.
    """
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3), got {tuple(x.shape)}")
    N = x.shape[0]
    acc = torch.float64 if torch.float64 in (x.dtype, getattr(center, "dtype", None)) else torch.float32
    check_sample(sample, N, P)
    check_rows(N, K, 3)
    R = random_rotations_seeded(seed, K * B, offset, improper, acc).reshape(K, B, 3, 3)
    out = torch.empty(K, N, 3, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, R
    x, sample, center = contiguous(x), contiguous(sample), contiguous(center)
    if center is not None:
        center = center.to(acc)
    block_n = row_block(N, 3)[0]
    with device_guard(x):
        _rotate_rows_seeded_kernel[(triton.cdiv(N, block_n),)](
            x, seed, sample if sample is not None else x,
            center if center is not None else torch.empty(0, dtype=acc, device=x.device), out,
            N, B, K, max(P, 1), offset,
            GRAPH=sample is not None, HAS_CENTER=center is not None,
            # pseudovectors take det(R) R: the proper part, whether or not the draw is improper
            FLIP_IMPROPER=bool(improper) and not pseudo, BLOCK_N=block_n,
        )
    return out, R
