"""Triton kernels for voxel grids: K resampled copies in one pass, and the back-resampling of
K output grids fused with the twirl reduction.

Both evaluate ``a[q] = M (x[M^T (q - c) + c])`` for every voxel ``q`` of a cubic grid of side
``n`` (``c = (n - 1) / 2``; axes ``(D, H, W)`` = ``(x, y, z)``), where ``M`` is ``R`` for a
forward copy and ``R^T`` for a back-rotation, and the outer ``M`` mixes the three channels
of every vector. ``EXACT`` reads the nearest voxel (the source points of a cube element are
integers); otherwise trilinear with zeros outside the grid. Arithmetic is in ``M``'s dtype
(float32, or float64); grids of any float dtype are loaded and converted. The pure-torch
reference is ``fastequiv.voxels._resample_torch`` / ``_reduce_torch``.

Launch: one program per block of ``BLOCK`` elements of the flat (row, voxel) index (rows are
copies, or samples for the reduction). Each program finds its source points and the weights
of their taps once per copy and loops over channels. The reduction writes each voxel's
three sums (over channels) and torch sums them per sample: deterministic, no atomics, and
3 values per voxel against the ``C (K + 2)`` it reads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import device_guard, interpreting


@triton.jit
def _narrow(val, dtype: tl.constexpr):
    """``val`` as ``dtype``; half types go through float32 (the interpreter cannot convert
    float64 to them directly)."""
    if dtype == tl.float64:
        out = val.to(tl.float64)
    else:
        out = val.to(tl.float32).to(dtype)
    return out


@triton.jit
def flat_elements(pid, count_a, count_b, BLOCK: tl.constexpr):
    """``(e, live, total)``: program ``pid``'s block of the flat index over
    ``total = count_a * count_b`` elements and which of them exist. Everything is int64:
    ``B * n^3`` reaches 2^31 on large batches of grids (16 grids of 512^3), where an int32
    product wraps and would mask off every lane."""
    total = tl.cast(count_a, tl.int64) * count_b
    e = tl.cast(pid, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return e, e < total, total


@triton.jit
def _matrices(M_ptr, row, live):
    """The nine entries of the row-major 3x3 matrix of every element's row, ``(BLOCK,)`` each."""
    m = M_ptr + row * 9
    return (tl.load(m + 0, mask=live, other=0.0), tl.load(m + 1, mask=live, other=0.0),
            tl.load(m + 2, mask=live, other=0.0), tl.load(m + 3, mask=live, other=0.0),
            tl.load(m + 4, mask=live, other=0.0), tl.load(m + 5, mask=live, other=0.0),
            tl.load(m + 6, mask=live, other=0.0), tl.load(m + 7, mask=live, other=0.0),
            tl.load(m + 8, mask=live, other=0.0))


@triton.jit
def _taps(m00, m01, m02, m10, m11, m12, m20, m21, m22, v, n, live, EXACT: tl.constexpr):
    """Where voxel ``v`` reads from: offsets ``(BLOCK, T)`` into a grid, their validity and
    weights (``T = 1`` nearest voxel, ``T = 8`` trilinear), at the point ``M^T (q - c) + c``."""
    h = (n - 1) * 0.5
    qi = (v // (n * n)).to(m00.dtype) - h
    qj = ((v // n) % n).to(m00.dtype) - h
    qk = (v % n).to(m00.dtype) - h
    pi = m00 * qi + m10 * qj + m20 * qk + h
    pj = m01 * qi + m11 * qj + m21 * qk + h
    pk = m02 * qi + m12 * qj + m22 * qk + h
    if EXACT:
        i = tl.floor(pi + 0.5).to(tl.int32)[:, None]
        j = tl.floor(pj + 0.5).to(tl.int32)[:, None]
        k = tl.floor(pk + 0.5).to(tl.int32)[:, None]
        w = tl.full([v.shape[0], 1], 1.0, m00.dtype)
    else:
        fi, fj, fk = tl.floor(pi), tl.floor(pj), tl.floor(pk)
        ti, tj, tk = (pi - fi)[:, None], (pj - fj)[:, None], (pk - fk)[:, None]
        corner = tl.arange(0, 8)[None, :]
        di, dj, dk = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
        i = fi.to(tl.int32)[:, None] + di
        j = fj.to(tl.int32)[:, None] + dj
        k = fk.to(tl.int32)[:, None] + dk
        w = tl.where(di == 1, ti, 1.0 - ti) * tl.where(dj == 1, tj, 1.0 - tj) * tl.where(dk == 1, tk, 1.0 - tk)
    ok = live[:, None] & (i >= 0) & (i < n) & (j >= 0) & (j < n) & (k >= 0) & (k < n)
    return (i * n + j) * n + k, ok, w


@triton.jit
def _gather(ptr, off, ok, w):
    """``sum_t w[:, t] grid[off[:, t]]`` for the per-element grid pointers ``ptr``; a masked
    load, not a weight of 0, so a value outside the grid never leaks in (even inf)."""
    return tl.sum(w * tl.load(ptr[:, None] + off, mask=ok, other=0.0).to(w.dtype), axis=1)


@triton.jit
def _resample_kernel(x_ptr, M_ptr, out_ptr, scal_ptr, vec_ptr, n_scal, n_vec, B, C, n, V, rows,
                     EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """``out[r]`` ``(C, V)`` from ``x[r mod B]`` and ``M[r]``, over the flat ``(rows, V)`` index."""
    e, live, _ = flat_elements(tl.program_id(0), rows, V, BLOCK)
    r = e // V
    v = e % V
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = _matrices(M_ptr, r, live)
    off, ok, w = _taps(m00, m01, m02, m10, m11, m12, m20, m21, m22, v, n, live, EXACT)
    src = x_ptr + (r % B) * C * V
    dst = out_ptr + r * C * V + v
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    for s in range(n_scal):
        ch = tl.load(scal_ptr + s).to(tl.int64)
        tl.store(dst + ch * V, _narrow(_gather(src + ch * V, off, ok, w), out_ty), mask=live)
    for g in range(n_vec):
        ch = tl.load(vec_ptr + g).to(tl.int64)
        u0 = _gather(src + ch * V, off, ok, w)
        u1 = _gather(src + (ch + 1) * V, off, ok, w)
        u2 = _gather(src + (ch + 2) * V, off, ok, w)
        tl.store(dst + ch * V, _narrow(m00 * u0 + m01 * u1 + m02 * u2, out_ty), mask=live)
        tl.store(dst + (ch + 1) * V, _narrow(m10 * u0 + m11 * u1 + m12 * u2, out_ty), mask=live)
        tl.store(dst + (ch + 2) * V, _narrow(m20 * u0 + m21 * u1 + m22 * u2, out_ty), mask=live)


@triton.jit
def _welford(mean, m2, a, count):
    """One step of Welford's update: the spread is built from deviations, with no cancellation."""
    d = a - mean
    mean = mean + d / count
    return mean, m2 + d * (a - mean)


@triton.jit
def _reduce_kernel(out_ptr, M_ptr, y_ptr, w_ptr, mean_ptr, sums_ptr, scal_ptr, vec_ptr, n_scal, n_vec,
                   K, B, C, n, V, HAS_W: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """Over the flat ``(B, V)`` index: ``a_k = M[k, b] out[k, b](M[k, b]^T (q - c) + c)`` for
    every copy ``k``, ``mean[b] = (1/K) sum_k a_k``, and the voxel's (total, bias, spread)
    summed over channels, written to ``sums[:, b, v]``."""
    acc: tl.constexpr = M_ptr.dtype.element_ty
    e, live, BV = flat_elements(tl.program_id(0), B, V, BLOCK)
    b = e // V
    v = e % V
    at = b * C * V + v  # element (b, channel 0, v) of y, w and mean
    # counts as acc-typed blocks: an int argument may arrive as a constexpr (K == 1)
    inv_k = 1.0 / (tl.zeros([BLOCK], dtype=acc) + K)
    tot = tl.zeros([BLOCK], dtype=acc)
    bia = tl.zeros([BLOCK], dtype=acc)
    spr = tl.zeros([BLOCK], dtype=acc)
    for s in range(n_scal):
        ch = tl.load(scal_ptr + s).to(tl.int64)
        y = tl.load(y_ptr + at + ch * V, mask=live, other=0.0).to(acc)
        mean = tl.zeros([BLOCK], dtype=acc)
        m2 = tl.zeros([BLOCK], dtype=acc)
        sq = tl.zeros([BLOCK], dtype=acc)
        for k in range(K):
            kb = k * B + b
            m00, m01, m02, m10, m11, m12, m20, m21, m22 = _matrices(M_ptr, kb, live)
            off, ok, w = _taps(m00, m01, m02, m10, m11, m12, m20, m21, m22, v, n, live, EXACT)
            a = _gather(out_ptr + (kb * C + ch) * V, off, ok, w)
            mean, m2 = _welford(mean, m2, a, tl.zeros([BLOCK], dtype=acc) + (k + 1))
            sq += (a - y) * (a - y)
        tl.store(mean_ptr + at + ch * V, mean, mask=live)
        if HAS_W:
            wt = tl.load(w_ptr + at + ch * V, mask=live, other=0.0)
        else:
            wt = live.to(acc)
        tot += wt * sq * inv_k
        bia += wt * (mean - y) * (mean - y)
        spr += wt * m2 * inv_k
    for g in range(n_vec):
        ch = tl.load(vec_ptr + g).to(tl.int64)
        y0 = tl.load(y_ptr + at + ch * V, mask=live, other=0.0).to(acc)
        y1 = tl.load(y_ptr + at + (ch + 1) * V, mask=live, other=0.0).to(acc)
        y2 = tl.load(y_ptr + at + (ch + 2) * V, mask=live, other=0.0).to(acc)
        # per component: a mask may weigh the three channels of a vector differently
        mean0, m2_0, sq0 = tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc)
        mean1, m2_1, sq1 = tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc)
        mean2, m2_2, sq2 = tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc), tl.zeros([BLOCK], dtype=acc)
        for k in range(K):
            kb = k * B + b
            m00, m01, m02, m10, m11, m12, m20, m21, m22 = _matrices(M_ptr, kb, live)
            off, ok, w = _taps(m00, m01, m02, m10, m11, m12, m20, m21, m22, v, n, live, EXACT)
            base = out_ptr + (kb * C + ch) * V
            u0 = _gather(base, off, ok, w)
            u1 = _gather(base + V, off, ok, w)
            u2 = _gather(base + 2 * V, off, ok, w)
            a0 = m00 * u0 + m01 * u1 + m02 * u2
            a1 = m10 * u0 + m11 * u1 + m12 * u2
            a2 = m20 * u0 + m21 * u1 + m22 * u2
            cnt = tl.zeros([BLOCK], dtype=acc) + (k + 1)
            mean0, m2_0 = _welford(mean0, m2_0, a0, cnt)
            mean1, m2_1 = _welford(mean1, m2_1, a1, cnt)
            mean2, m2_2 = _welford(mean2, m2_2, a2, cnt)
            sq0 += (a0 - y0) * (a0 - y0)
            sq1 += (a1 - y1) * (a1 - y1)
            sq2 += (a2 - y2) * (a2 - y2)
        tl.store(mean_ptr + at + ch * V, mean0, mask=live)
        tl.store(mean_ptr + at + (ch + 1) * V, mean1, mask=live)
        tl.store(mean_ptr + at + (ch + 2) * V, mean2, mask=live)
        if HAS_W:
            wt0 = tl.load(w_ptr + at + ch * V, mask=live, other=0.0)
            wt1 = tl.load(w_ptr + at + (ch + 1) * V, mask=live, other=0.0)
            wt2 = tl.load(w_ptr + at + (ch + 2) * V, mask=live, other=0.0)
        else:
            wt0 = live.to(acc)
            wt1 = wt0
            wt2 = wt0
        tot += (wt0 * sq0 + wt1 * sq1 + wt2 * sq2) * inv_k
        bia += wt0 * (mean0 - y0) * (mean0 - y0) + wt1 * (mean1 - y1) * (mean1 - y1) + wt2 * (mean2 - y2) * (mean2 - y2)
        spr += (wt0 * m2_0 + wt1 * m2_1 + wt2 * m2_2) * inv_k
    tl.store(sums_ptr + e, tot, mask=live)
    tl.store(sums_ptr + BV + e, bia, mask=live)
    tl.store(sums_ptr + 2 * BV + e, spr, mask=live)


def _block(total: int) -> int:
    # the interpreter runs a block as numpy arrays, at a fixed cost per operation: fewer,
    # larger blocks are much faster there
    if interpreting():
        return min(1 << 14, triton.next_power_of_2(max(total, 16)))
    return 128


def _check_grid(n: int) -> None:
    """Voxel offsets within one grid are int32 in the kernels (``n^3 < 2^31``); the flat
    index over grids is int64."""
    if n ** 3 >= 2**31:
        raise ValueError(f"grid side n={n}: n^3 voxels must stay below 2^31 (n <= 1290)")


def _tables(vec: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 tables of the scalar channels and of the first channel of every vector."""
    is_vec = torch.zeros(C, dtype=torch.bool, device=vec.device)
    if vec.numel():
        is_vec[(vec.long()[:, None] + torch.arange(3, device=vec.device)).reshape(-1)] = True
    # the scalar channels in order without torch.nonzero (a host sync, which a CUDA graph
    # cannot capture): a stable sort puts them first, and there are C - 3 G of them
    scal = torch.argsort(is_vec.to(torch.uint8), stable=True)[: C - 3 * vec.numel()].to(torch.int32)
    return scal, vec.to(torch.int32).contiguous()


def resample(x: torch.Tensor, M: torch.Tensor, vec: torch.Tensor, exact: bool) -> torch.Tensor:
    """``(rows, C, n, n, n)`` in ``x.dtype``: row ``r`` is ``x[r mod B]`` moved by ``M[r]``.

    ``x``: ``(B, C, n, n, n)`` contiguous; ``M``: ``(rows, 3, 3)`` contiguous float32/64;
    ``vec``: int32 ``(G,)`` first channel of each vector.
    """
    B, C, n = x.shape[0], x.shape[1], x.shape[-1]
    rows, V = M.shape[0], n ** 3
    out = torch.empty((rows, C, n, n, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _check_grid(n)
    scal, vec = _tables(vec, C)
    BLOCK = _block(rows * V)
    with device_guard(x):
        _resample_kernel[(triton.cdiv(rows * V, BLOCK),)](
            x, M, out, scal, vec, scal.numel(), vec.numel(), B, C, n, V, rows, EXACT=exact, BLOCK=BLOCK)
    return out


def twirl_reduce(out: torch.Tensor, M: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], vec: torch.Tensor,
                 exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` ``(B, C, V)`` and ``sums`` ``(3, B)`` (total, bias, spread), both in ``M.dtype``.

    ``out``: ``(K, B, C, n, n, n)``; ``M``: ``(K, B, 3, 3)`` (``R^T`` for a back-rotation);
    ``y``: ``(B, C, n, n, n)``; ``w``: ``(B, C, V)`` weights in ``M.dtype`` or None; all
    contiguous.
    """
    K, B, C, n = out.shape[0], out.shape[1], out.shape[2], out.shape[-1]
    V, acc = n ** 3, M.dtype
    mean = torch.empty((B, C, V), dtype=acc, device=out.device)
    sums = torch.zeros((3, B, V), dtype=acc, device=out.device)
    if B and C and V and K:
        _check_grid(n)
        scal, vec = _tables(vec, C)
        BLOCK = _block(B * V)
        with device_guard(out):
            _reduce_kernel[(triton.cdiv(B * V, BLOCK),)](
                out, M, y, mean if w is None else w, mean, sums, scal, vec, scal.numel(), vec.numel(),
                K, B, C, n, V, HAS_W=w is not None, EXACT=exact, BLOCK=BLOCK)
    return mean, sums.sum(dim=2)
