"""Triton kernel of ``wigner_blocks``: packed real Wigner-D blocks ``D_0 .. D_lmax``.

Contract (``fastequiv/ops/wigner_d.py``): for proper rotations ``R`` ``(N, 3, 3)``, return
``(N, S)`` in ``R.dtype`` (float32 or float64), ``S = sum_{l <= lmax} (2l+1)^2``; block
``l`` is row-major at column ``off_l = sum_{l' < l} (2l'+1)^2 = l (4 l^2 - 1) / 3``, in
e3nn's basis (:mod:`fastequiv.wigner`): ``D_0 = 1``, ``D_1 = R`` and the
Ivanic–Ruedenberg recursion

    D_l[r, c] = sum_t coef[t] R[i[t], j[t]] D_{l-1}[a[t], b[t]]

over the term tables of :func:`fastequiv.wigner.recursion_terms`.

Layout: the tables are packed per output column ``o`` of the ``S`` columns, padded to
``T`` terms (at most 10 are used; padding terms have ``coef = 0``): ``coef (S, T)``,
``ij (S, T)`` (flat index ``3 i + j`` into ``R``) and ``prev (S, T)`` (absolute column of
``D_{l-1}[a, b]`` in the output row). One program per block of ``BLOCK_R`` rotations
writes ``D_0`` and ``D_1``, then builds each level from the previous one, which it reads
back from its own rows of the output (a barrier between levels), ``BLOCK_O`` columns at
a time. Sums run over the terms in table order.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from .triton_common import device_guard, interpreting

LMAX_SUPPORTED = 10
_TERMS = 16  # >= the most terms of any entry (10), a power of two


def n_columns(lmax: int) -> int:
    """``S = sum_{l <= lmax} (2l+1)^2``."""
    return (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) // 3


@triton.jit
def _wigner_blocks_kernel(R_ptr, out_ptr, coef_ptr, ij_ptr, prev_ptr, N,
                          S: tl.constexpr, LMAX: tl.constexpr, T: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    nmask = n < N
    n64 = tl.cast(n, tl.int64)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + n64 * S, tl.full((BLOCK_R,), 1.0, dtype), mask=nmask)
    if LMAX >= 1:
        e = tl.arange(0, 16)
        m = nmask[:, None] & (e[None, :] < 9)
        r1 = tl.load(R_ptr + n64[:, None] * 9 + e[None, :], mask=m, other=0.0)
        tl.store(out_ptr + n64[:, None] * S + 1 + e[None, :], r1, mask=m)
    tl.debug_barrier()
    t = tl.arange(0, T)
    for l in tl.static_range(2, LMAX + 1):
        off = l * (4 * l * l - 1) // 3
        end = off + (2 * l + 1) * (2 * l + 1)
        for o0 in range(off, end, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            omask = o < end
            tab = o[:, None] * T + t[None, :]
            coef = tl.load(coef_ptr + tab, mask=omask[:, None], other=0.0)
            ij = tl.load(ij_ptr + tab, mask=omask[:, None], other=0)
            prev = tl.load(prev_ptr + tab, mask=omask[:, None], other=0)
            m3 = nmask[:, None, None] & omask[None, :, None]
            r = tl.load(R_ptr + n64[:, None, None] * 9 + ij[None, :, :], mask=m3, other=0.0)
            d = tl.load(out_ptr + n64[:, None, None] * S + prev[None, :, :], mask=m3, other=0.0)
            val = tl.sum(coef[None, :, :] * r * d, axis=2)
            tl.store(out_ptr + n64[:, None] * S + o[None, :], val, mask=nmask[:, None] & omask[None, :])
        tl.debug_barrier()


@functools.lru_cache(maxsize=None)
def _tables_host(lmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from fastequiv.wigner import recursion_terms

    S = n_columns(lmax)
    coef = np.zeros((S, _TERMS), dtype=np.float64)
    ij = np.zeros((S, _TERMS), dtype=np.int32)
    prev = np.zeros((S, _TERMS), dtype=np.int32)
    for l in range(2, lmax + 1):
        r, c, cf, i, j, a, b = recursion_terms(l)
        col = n_columns(l - 1) + r * (2 * l + 1) + c
        # slot of each term within its column: terms come sorted by (r, c)
        first = np.searchsorted(col, col, side="left")
        slot = np.arange(len(col)) - first
        if slot.max() >= _TERMS:
            raise AssertionError(f"l={l}: an entry has more than {_TERMS} recursion terms")
        coef[col, slot] = cf
        ij[col, slot] = i * 3 + j
        prev[col, slot] = n_columns(l - 2) + a * (2 * l - 1) + b
    return coef, ij, prev


@functools.lru_cache(maxsize=None)
def _tables(lmax: int, device: torch.device, dtype: torch.dtype):
    from fastequiv.groups import refuse_during_capture

    refuse_during_capture(f"the Wigner-D tables of the Triton kernel (lmax={lmax}) on {device}")
    coef, ij, prev = _tables_host(lmax)
    return (torch.tensor(coef, dtype=dtype, device=device), torch.tensor(ij, device=device),
            torch.tensor(prev, device=device))


def wigner_blocks(R: torch.Tensor, lmax: int) -> torch.Tensor:
    """Packed blocks ``D_0 .. D_lmax`` ``(N, S)`` of proper rotations ``R`` ``(N, 3, 3)``."""
    if not isinstance(R, torch.Tensor) or R.dim() != 3 or tuple(R.shape[1:]) != (3, 3):
        raise ValueError(f"R must be a tensor of shape (N, 3, 3), got {getattr(R, 'shape', type(R).__name__)}")
    if R.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"R must be float32 or float64, got {R.dtype}")
    if isinstance(lmax, bool) or not isinstance(lmax, int) or not 0 <= lmax <= LMAX_SUPPORTED:
        raise ValueError(f"lmax must be an int in [0, {LMAX_SUPPORTED}], got {lmax!r}")
    N, S = R.shape[0], n_columns(lmax)
    out = torch.empty(N, S, dtype=R.dtype, device=R.device)
    if N == 0:
        return out
    R = R.contiguous()
    coef, ij, prev = _tables(lmax, R.device, R.dtype)
    if interpreting():
        block_r, block_o = min(64, triton.next_power_of_2(N)), 128
    else:
        block_r, block_o = 16, 8  # a (16, 8, 16) gather tile: 64 registers a thread on sm_90
    with device_guard(R):
        _wigner_blocks_kernel[(triton.cdiv(N, block_r),)](
            R, out, coef, ij, prev, N, S=S, LMAX=lmax, T=_TERMS, BLOCK_R=block_r, BLOCK_O=block_o,
        )
    return out
