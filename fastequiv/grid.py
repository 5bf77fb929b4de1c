"""Resampling a field on a cubic grid under a rotation: the math of voxel reps.

Conventions (axes ``(D, H, W) = (x, y, z)``, rotations about the grid centre, the action
``out[q] = D(R) x[R^T (q - c) + c]``, the exact cube-element path and the trilinear path)
are stated in :mod:`fastequiv.voxels`. The functions here are the pure-torch reference of
the voxel ops (:mod:`fastequiv.ops.voxels`), which the Triton kernels are tested against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .groups import capturing

__all__ = ["grid_shape", "is_cube_element", "resample", "resample_acc", "permute_flip", "reduce"]


def grid_shape(shape) -> tuple[int, int, int]:
    """``(lead, C, n)`` of a checked voxel tensor shape ``(N, *lead, C, n, n, n)``."""
    return math.prod(shape[1:-4]), shape[-4], shape[-1]


def is_cube_element(R: torch.Tensor) -> bool:
    """Whether every ``R`` is a signed permutation matrix (an orthogonal matrix with integer
    entries). One host sync on a GPU; under ``torch.compile`` and while a CUDA graph is
    captured (where a sync is not allowed) the trilinear path is taken, which gives the
    same values at cube elements."""
    if R.numel() == 0 or torch.compiler.is_compiling() or capturing():
        return False
    return bool((R == R.round()).all())


def resample(x: torch.Tensor, M: torch.Tensor, vec: torch.Tensor, exact: bool) -> torch.Tensor:
    """``out[r, ch, q] = (M_r x_b)[ch](M_r^T (q - c) + c)``, ``b = r mod B``.

    Args:
        x: ``(B, C', n, n, n)`` any float dtype (``C'`` flattened channels).
        M: ``(rows, 3, 3)`` in acc; ``rows`` a multiple of ``B``.
        vec: int32 ``(G,)`` first channel of each vector.
        exact: every ``M`` is a signed permutation: move axes (permute and flip), no
            interpolation. Otherwise trilinear, by ``F.affine_grid`` + ``F.grid_sample``.
    Returns:
        ``(rows, C', n, n, n)`` in ``x.dtype``.
    """
    return resample_acc(x, M, vec, exact).to(x.dtype)


def resample_acc(x: torch.Tensor, M: torch.Tensor, vec: torch.Tensor, exact: bool) -> torch.Tensor:
    """:func:`resample` before the cast back: ``(rows, C', n, n, n)`` in ``M.dtype``."""
    B, Cp, n = x.shape[0], x.shape[1], x.shape[-1]
    rows, acc = M.shape[0], M.dtype
    src = x.to(acc)
    if rows == 0 or src.numel() == 0:
        return src.new_zeros((rows,) + tuple(src.shape[1:]))
    if exact:
        out = permute_flip(src, M)
    else:
        if rows != B:  # copy-major: row r reads sample r mod B
            src = src.repeat((rows // B,) + (1,) * (src.dim() - 1))
        # grid_sample orders its grid (W, H, D): the map in its coordinates is P M^T P
        P = torch.eye(3, dtype=acc, device=x.device).flip(0)
        theta = torch.cat([P @ M.transpose(1, 2) @ P, M.new_zeros(rows, 3, 1)], dim=2)
        grid = F.affine_grid(theta, [rows, Cp, n, n, n], align_corners=True)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return mix_vectors(out, M, vec)


def mix_vectors(out: torch.Tensor, M: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """The vector channels of moved grids ``out`` ``(rows, C', n, n, n)`` turned by their
    row's ``M`` (the channels of vector ``g`` are ``vec[g] .. vec[g] + 2``)."""
    if not vec.numel():
        return out
    rows, n = out.shape[0], out.shape[-1]
    chans = (vec.long()[:, None] + torch.arange(3, device=out.device)).reshape(-1)
    v = out[:, chans].reshape(rows, vec.numel(), 3, n, n, n)
    mixed = torch.einsum("rab,rgbijk->rgaijk", M, v).reshape(rows, 3 * vec.numel(), n, n, n)
    return out.index_copy(1, chans, mixed)


_CUBE_INDEX: dict = {}


def cube_index(key: tuple, n: int, device) -> torch.Tensor:
    """The flat source voxel of every output voxel under the signed permutation ``key``
    (its 9 integer entries, row-major): ``out[q] = x[M^T (q - c) + c]`` as one int64
    index ``(n^3,)`` into ``x.flatten()`` (built once per element, side and device)."""
    cache_key = (key, n, str(device))
    if cache_key not in _CUBE_INDEX:
        M = torch.tensor(key, dtype=torch.int64).reshape(3, 3)
        q = torch.stack(torch.meshgrid(*(torch.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
        p = ((2 * q - (n - 1)) @ M + (n - 1)) // 2  # M^T (q - c) + c, in half-voxel integers
        _CUBE_INDEX[cache_key] = (p[:, 0] * n * n + p[:, 1] * n + p[:, 2]).to(device)
    return _CUBE_INDEX[cache_key]


def permute_flip(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r mod B]`` moved by the signed permutation ``M[r]`` (channels unmixed).

    ``out[q] = x[M^T (q - c) + c]``: every element of the cube group moves voxels onto
    voxels, so each copy is one gather with the element's precomputed index
    (:func:`cube_index`); a copy whose ``B`` rows share one element (copy ``k`` of a twirl)
    is one gather for the whole batch. Reading the elements costs one copy of ``M`` to the
    host.
    """
    B, rows = x.shape[0], M.shape[0]
    n = x.shape[-1]
    src = x.reshape(B, x.shape[1], n ** 3)
    keys = [tuple(k) for k in M.detach().round().to(device="cpu", dtype=torch.int64).reshape(rows, 9).tolist()]
    differentiable = torch.is_grad_enabled() and x.requires_grad  # out= gathers do not record autograd
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dst = out.view(rows, x.shape[1], n ** 3)
    copies = rows // B
    if copies * B == rows and all(len(set(keys[k * B:(k + 1) * B])) == 1 for k in range(copies)):
        # the K copies of a twirl (every copy one element for the whole batch): one gather
        elements = tuple(keys[k * B] for k in range(copies))
        cache_key = ("stack", elements, n, str(x.device))
        if cache_key not in _CUBE_INDEX:
            _CUBE_INDEX[cache_key] = torch.stack([cube_index(e, n, x.device) for e in elements])
        index = _CUBE_INDEX[cache_key]
        shape = (copies,) + tuple(src.shape)
        source, index = src.unsqueeze(0).expand(shape), index[:, None, None, :].expand(shape)
        if differentiable:
            return torch.gather(source, 3, index).reshape(out.shape)
        torch.gather(source, 3, index, out=dst.view(shape))
        return out
    parts, r = [], 0
    while r < rows:
        whole = r % B == 0 and r + B <= rows and len(set(keys[r:r + B])) == 1
        count = B if whole else 1
        source = src if whole else src[r % B:r % B + 1]
        # a gather with the index broadcast over rows and channels (stride 0: it stays in cache)
        index = cube_index(keys[r], n, x.device).expand(source.shape)
        if differentiable:
            parts.append(torch.gather(source, 2, index))
        else:
            torch.gather(source, 2, index, out=dst[r:r + count])
        r += count
    if differentiable:
        return torch.cat(parts).reshape(out.shape)
    return out


def reduce(out: torch.Tensor, M: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], vec: torch.Tensor,
                  exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-resample and reduce: ``a_k = _resample(out_k, M_k)``; returns ``mean`` ``(B, C', V)`` and
    ``sums`` ``(3, B)`` (total, bias, spread summed over the weighted elements), both in acc.

    ``out``: ``(K, B, C', n, n, n)``; ``M``: ``(K, B, 3, 3)`` (already ``R^T``); ``y``:
    ``(B, C', n, n, n)``; ``w``: ``(B, C', n^3)`` weights in acc or None.
    """
    K, B = M.shape[:2]
    Cp, n = out.shape[2], out.shape[-1]
    acc = M.dtype
    # in acc throughout: a bf16 output is back-rotated without rounding to bf16 again
    a = resample_acc(out.reshape(K * B, Cp, n, n, n), M.reshape(K * B, 3, 3), vec, exact)
    a = a.reshape(K, B, Cp, n ** 3)
    yy = y.to(acc).reshape(B, Cp, n ** 3)
    abar = a.mean(0)
    per = torch.stack([((a - yy) ** 2).mean(0), (abar - yy) ** 2, ((a - abar) ** 2).mean(0)])
    if w is not None:
        per = per * w
    return abar, per.reshape(3, B, -1).sum(-1)
