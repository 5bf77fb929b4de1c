"""Triton kernel of ``random_rotations_seeded``: Haar rotations from the Philox stream.

Contract (``fastequiv/ops/random_rotations.py`` and :mod:`fastequiv.groups`): rotation number ``i``
of the stream keyed by the int64 ``seed`` is one Philox-4x32-10 block with key
``(seed mod 2^32, seed >> 32)`` and counter ``(i mod 2^32, i >> 32, 0, 0)``
(:func:`philox_words`). Its words ``x0, x1, x2`` give uniforms
``u_j = (x_j >> 8) 2^-24`` and Shoemake's quaternion
``(a sin 2 pi u1, a cos 2 pi u1, b sin 2 pi u2, b cos 2 pi u2)``, ``a = sqrt(1 - u0)``,
``b = sqrt(u0)``, turned into the usual active-rotation matrix; for O(3), bit 0 of
``x3`` flips ``R`` to ``-R``.

The seed is read from device memory inside the kernel (a 0-dim int64 tensor), never
synced to the host, so the launch can be captured in a CUDA graph.

Layout: output ``(n, 3, 3)`` row-major; one program per block of ``BLOCK`` rotations,
one lane per rotation. Computes in float64 for float64 output, else in float32. In
float32 the angles are reduced to a quadrant in integer arithmetic and the diagonal uses
``a^2 + b^2 = 1`` exactly, which keeps every entry within 3e-7 of the float64 stream
(1e6 draws, interpreter); the textbook formulas reached 6e-7.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import device_guard, interpreting, sqrt_rn

_BLOCK_GPU = 256
_BLOCK_INTERPRETER = 4096


@triton.jit
def _sin_cos_turns(n, dtype: tl.constexpr):
    """``(sin 2 pi u, cos 2 pi u)`` for ``u = n 2^-24``, ``n`` a 24-bit integer.

    The quadrant is split off exactly in integers, ``2 pi u = q pi/2 + theta`` with
    ``|theta| <= pi/4``, so float32 rounds only the small angle ``theta``.
    """
    q = (n + (1 << 21)) >> 22
    theta = (n - (q << 22)).to(dtype) * 3.7450702829239286e-07  # 2 pi / 2^24
    q = q & 3
    st = tl.sin(theta)
    ct = tl.cos(theta)
    s = tl.where(q == 0, st, tl.where(q == 1, ct, tl.where(q == 2, -st, -ct)))
    c = tl.where(q == 0, ct, tl.where(q == 1, -st, tl.where(q == 2, -ct, st)))
    return s, c


@triton.jit
def philox_words(seed, idx):
    """The four 32-bit words of Philox-4x32-10 block ``idx`` (int64) of the stream ``seed``:
    key ``(seed mod 2^32, seed >> 32)``, counter ``(idx mod 2^32, idx >> 32, 0, 0)``.

    The counter is handed to ``tl.philox`` as explicit uint32 words, which selects the 4x32
    generator in every Triton from 3.0 on. ``tl.randint4x(seed, idx)`` with an int64 ``idx``
    means the same only from Triton 3.4: before, it ran Philox-4x64 on the int64 counter
    (other words, and uniforms outside [0, 1), so NaN rotations).
    """
    lo = idx.to(tl.uint32)  # truncates: idx mod 2^32
    hi = (idx >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def haar_matrix(seed, idx, FLIP_IMPROPER: tl.constexpr, dtype: tl.constexpr):
    """The 9 entries (row-major) of rotation number ``idx`` (int64) of the stream ``seed``."""
    r0, r1, r2, r3 = philox_words(seed, idx)
    u0 = (r0 >> 8).to(dtype) * 5.9604644775390625e-08  # 2^-24
    a2 = 1.0 - u0  # a^2 and b^2, exact
    a = sqrt_rn(a2)
    b = sqrt_rn(u0)
    s1, c1 = _sin_cos_turns((r1 >> 8).to(tl.int32), dtype)
    s2, c2 = _sin_cos_turns((r2 >> 8).to(tl.int32), dtype)
    w, x, y, z = a * s1, a * c1, b * s2, b * c2
    # the diagonal from a^2 + b^2 = 1 rather than 1 - 2 (y^2 + z^2), ...: no rounding of 1
    d1 = (s1 - c1) * (s1 + c1)
    d2 = (s2 - c2) * (s2 + c2)
    m00 = a2 - u0
    m01 = 2.0 * (x * y - w * z)
    m02 = 2.0 * (x * z + w * y)
    m10 = 2.0 * (x * y + w * z)
    m11 = a2 * d1 + u0 * d2
    m12 = 2.0 * (y * z - w * x)
    m20 = 2.0 * (x * z - w * y)
    m21 = 2.0 * (y * z + w * x)
    m22 = a2 * d1 - u0 * d2
    if FLIP_IMPROPER:
        sign = tl.where((r3 & 1) != 0, -1.0, 1.0).to(dtype)
        m00, m01, m02 = m00 * sign, m01 * sign, m02 * sign
        m10, m11, m12 = m10 * sign, m11 * sign, m12 * sign
        m20, m21, m22 = m20 * sign, m21 * sign, m22 * sign
    return m00, m01, m02, m10, m11, m12, m20, m21, m22


@triton.jit
def _random_rotations_kernel(seed_ptr, out_ptr, n, offset, IMPROPER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2^31
    m = i < n
    seed = tl.load(seed_ptr)
    dtype = out_ptr.dtype.element_ty
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = haar_matrix(seed, offset + i, IMPROPER, dtype)
    o = out_ptr + i * 9
    tl.store(o + 0, m00, mask=m)
    tl.store(o + 1, m01, mask=m)
    tl.store(o + 2, m02, mask=m)
    tl.store(o + 3, m10, mask=m)
    tl.store(o + 4, m11, mask=m)
    tl.store(o + 5, m12, mask=m)
    tl.store(o + 6, m20, mask=m)
    tl.store(o + 7, m21, mask=m)
    tl.store(o + 8, m22, mask=m)


def _check_seed(seed: torch.Tensor) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.dim() != 0:
        got = f"{seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise ValueError(f"seed must be an int64 0-dim tensor, got {got}")


def random_rotations_seeded(seed: torch.Tensor, n: int, offset: int, improper: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rotations ``offset .. offset + n - 1`` of the stream keyed by ``seed``: ``(n, 3, 3)``.

    Computed in float64 for a float64 ``dtype``, else in float32 and cast to ``dtype``.
    """
    _check_seed(seed)
    if n < 0 or offset < 0 or offset + n > 2**64:
        raise ValueError(f"n and offset must be >= 0 with offset + n <= 2**64, got n={n}, offset={offset}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(n, 3, 3, dtype=work, device=seed.device)
    if n == 0:
        return out.to(dtype)
    block = min(_BLOCK_INTERPRETER, triton.next_power_of_2(n)) if interpreting() else _BLOCK_GPU
    # offsets at or past 2^63 would not fit the kernel's int64 argument: pass their two's complement
    # (the counter words are the same bits)
    off = offset - 2**64 if offset >= 2**63 else offset
    with device_guard(seed):
        _random_rotations_kernel[(math.ceil(n / block),)](seed, out, n, off, IMPROPER=bool(improper), BLOCK=block)
    return out.to(dtype)
