"""Pieces shared by the Triton kernels of the row-level contract (``fastequiv/ops/layout.py``).

Rows ``x`` ``(N, d)`` are read as 2D tiles ``(BLOCK_N, BLOCK_D)`` of ``BLOCK_D`` columns at
a time, and the ``d x d`` matrix of every row's sample as 3D tiles
``(BLOCK_N, BLOCK_D, BLOCK_D)`` indexed ``[row, i, j]`` (rows ``i0 + i``, columns
``j0 + j`` of the matrix), so that ``M v`` is a sum over the last axis and ``M^T v`` a sum
over the middle one. ``BLOCK_D`` is the next power of two of ``d``, capped (32 on a GPU):
a row of up to ``BLOCK_D`` components is one tile (the common case, d = 1, 3, 5, 9, 25),
a wider one is walked in ``BLOCK_D x BLOCK_D`` chunks of its matrix, so the tile, and the
registers it takes, stay bounded whatever ``d`` is (d = 1152 compiles like d = 32).
Matrices are gathered per row (``M[k, s(r)]``); rows of one sample hit the same cache lines.

Launchers size their blocks for the GPU, or larger for Triton's CPU interpreter
(``TRITON_INTERPRET=1``), where every program costs a Python-level pass.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Elements of the per-program matrix tile (BLOCK_N * BLOCK_D**2): registers on a GPU,
# numpy array size under the interpreter. 1024 with 4 warps keeps the d = 3 kernels near
# 56 (rotate) and 105 (reduce) registers a thread on sm_90 (ptxas, no spills); 4096
# reached 255 and spilled.
_GPU_TILE = 1024
_GPU_MAX_ROWS = 128
_INTERPRETER_TILE = 1 << 16
# Widest column chunk of a matrix tile: 32 x 32 = _GPU_TILE on a GPU (d = 288 as one
# 512 x 512 tile spilled and took 10 s to compile; d > 1024 did not compile at all).
_GPU_MAX_BLOCK_D = 32
_INTERPRETER_MAX_BLOCK_D = 256

_ACC_DTYPES = (torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_block(N: int, d: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_D)`` for a row kernel over ``N`` rows of ``d`` components:
    ``BLOCK_D`` columns per chunk (all of them when ``d <= BLOCK_D``), and a matrix tile
    of ``BLOCK_N * BLOCK_D**2`` elements, bounded whatever ``d`` is."""
    if interpreting():
        block_d = min(triton.next_power_of_2(max(d, 1)), _INTERPRETER_MAX_BLOCK_D)
        block_n = max(1, min(triton.next_power_of_2(max(N, 1)), _INTERPRETER_TILE // block_d**2))
    else:
        block_d = min(triton.next_power_of_2(max(d, 1)), _GPU_MAX_BLOCK_D)
        block_n = max(1, min(_GPU_MAX_ROWS, _GPU_TILE // block_d**2))
    return block_n, block_d


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The contract says inputs arrive contiguous; a strided input is copied, not misread."""
    return None if t is None else t.contiguous()


def check_acc(M: torch.Tensor, name: str = "M") -> None:
    if M.dtype not in _ACC_DTYPES:
        raise ValueError(f"{name} must be float32 or float64 (the accumulation dtype), got {M.dtype}")


def check_rows(N: int, K: int, d: int) -> None:
    """Row indices are int32 inside the kernels (int64 only for addresses)."""
    if N >= 2**31 or K * d >= 2**31:
        raise ValueError(f"rows: N={N} rows of d={d} with K={K} copies is past the int32 row index")


def check_sample(sample: torch.Tensor | None, N: int, P: int, B: int | None = None) -> None:
    if sample is None:
        if P < 0 or (P == 0 and N > 0):
            raise ValueError(f"P must be >= 1 in the dense layout (sample=None) with N={N} rows, got P={P}")
        if B is not None and N > 0 and not (B - 1) * P < N <= B * P:
            raise ValueError(f"dense layout: N={N} rows must be B*P = {B}*{P}, or fewer in the last sample only")
        return
    if sample.dtype != torch.int64 or tuple(sample.shape) != (N,):
        raise ValueError(f"sample must be an int64 tensor of shape ({N},), got {sample.dtype} {tuple(sample.shape)}")


@triton.jit
def to_store(v, out_ty: tl.constexpr):
    """``v`` in ``out_ty`` for a store: 16-bit outputs go through float32 (Triton's CPU
    interpreter turns float64 into bfloat16 as zeros; on a GPU this rounds as directly,
    but for rare double-rounding ties)."""
    if out_ty.primitive_bitwidth == 16:
        v = v.to(tl.float32)
    return v.to(out_ty)


@triton.jit
def sample_of(rows, rmask, sample_ptr, P, GRAPH: tl.constexpr):
    """The sample of every row: ``sample[r]`` (graph layout) or ``r // P`` (dense), int64."""
    if GRAPH:
        s = tl.load(sample_ptr + rows, mask=rmask, other=0)
    else:
        s = rows // P
    return s.to(tl.int64)


@triton.jit
def load_tile(M_ptr, mat, rmask, i0, j0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile ``[row, i, j] = M[mat[row], i0 + i, j0 + j]`` of the ``D x D`` matrices
    (``mat`` int64), zero outside the matrix."""
    i = tl.arange(0, BLOCK_D)
    r = i0 + i
    c = j0 + i
    offs = mat[:, None, None] * (D * D) + r[None, :, None] * D + c[None, None, :]
    m = rmask[:, None, None] & (r[None, :, None] < D) & (c[None, None, :] < D)
    return tl.load(M_ptr + offs, mask=m, other=0.0)


@triton.jit
def matvec(Mt, v):
    """``M v`` per row: ``Mt`` ``(BLOCK_N, BLOCK_D, BLOCK_D)``, ``v`` ``(BLOCK_N, BLOCK_D)``."""
    return tl.sum(Mt * v[:, None, :], axis=2)


@triton.jit
def matvec_t(Mt, v):
    """``M^T v`` per row."""
    return tl.sum(Mt * v[:, :, None], axis=1)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded ``sqrt(x)``: ``tl.sqrt`` is the approximate instruction in float32
    on a GPU (the interpreter rounds exactly either way), so float32 takes ``tl.sqrt_rn``."""
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y

