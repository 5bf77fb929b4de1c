"""Rotation groups: Haar sampling of SO(3) and O(3), and the finite rotation groups.

Conventions (shared by every backend):

* A rotation acts on column vectors, ``v' = R v``; ``R`` has shape ``(..., 3, 3)``.
* Quaternions are ``(w, x, y, z)`` with ``w`` the real part; ``q`` and ``-q`` are the
  same rotation. :func:`quaternion_to_matrix` is the usual active-rotation formula.
* Random rotations come from a counter-based stream so that every backend draws the
  same ones: rotation number ``i`` of the stream keyed by ``seed`` is one
  Philox-4x32-10 block with key ``(seed mod 2^32, seed >> 32)`` and counter
  ``(i mod 2^32, i >> 32, 0, 0)`` (the four uint32 words the Triton kernel hands
  ``tl.philox``; ``tl.randint4x(seed, i)`` means this only from Triton 3.4). Its
  first three words ``x0, x1, x2`` give uniforms ``u_j = (x_j >> 8) * 2^-24`` and
  Shoemake's construction turns them into a Haar-uniform unit quaternion:
  ``a = sqrt(1 - u0), b = sqrt(u0)``,
  ``q = (a sin 2 pi u1, a cos 2 pi u1, b sin 2 pi u2, b cos 2 pi u2)``.
  For O(3), bit 0 of the fourth word ``x3`` marks an improper element, whose matrix is
  ``-R(q)`` (a rotation times the inversion; det -1).
* Finite groups are listed with the identity first, in a fixed order, as float64
  matrices; :func:`group_elements` gives them in any dtype and device (the copy on a
  device is made once: see :func:`refuse_during_capture` for CUDA graphs).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

__all__ = [
    "GROUPS",
    "philox4x32_10",
    "resolve_seed",
    "random_quaternions",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "orientation",
    "philox_words",
    "elements_from_words",
    "group_elements",
    "group_order",
    "is_finite_group",
    "capturing",
    "refuse_during_capture",
]

GROUPS = ("SO3", "O3", "octahedral", "octahedral_O3", "icosahedral")
_FINITE_ORDERS = {"octahedral": 24, "octahedral_O3": 48, "icosahedral": 60}

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
SEED_MAX = 2**63 - 1


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of the 64-bit product of the constant ``a`` and ``b``.

    ``b`` holds uint32 values in an int64 tensor. The product can reach 2^64, past
    int64, so ``b`` is split in 16-bit halves and the words are put back together.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2^48
    mid = a * b_hi + (p_lo >> 16)  # < 2^49: product = mid * 2^16 + (p_lo & 0xFFFF)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox-4x32-10 (Salmon et al., Random123) in plain torch integer arithmetic.

    ``counter`` is an int64 tensor ``(..., 4)`` of uint32 words, ``key`` two uint32
    words. Returns the four output words as int64 ``(..., 4)``.
    """
    c0, c1, c2, c3 = (counter[..., j] & _MASK32 for j in range(4))
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def resolve_seed(seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> int:
    """The Philox stream to use: ``seed`` if given, else one drawn from ``generator``,
    else one drawn from torch's default CPU generator (so ``torch.manual_seed`` makes a
    run reproducible). Drawing from a CUDA generator synchronises with the host.
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("pass seed= or generator=, not both")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, SEED_MAX, (), generator=generator, device=device))


def philox_words(n: int, seed, offset: int, device=None) -> torch.Tensor:
    """Philox words ``(n, 4)`` of rotations ``offset .. offset + n - 1``, keyed by ``seed``:
    a Python int, or an int64 0-dim tensor read where it lives (no host sync, so it works
    under CUDA-graph capture and ``torch.compile``; the words are made on its device)."""
    check_offset(offset, n)
    if isinstance(seed, torch.Tensor):
        device = seed.device
    idx = torch.arange(n, device=device, dtype=torch.int64) + offset  # offset + n may be 2**63
    zeros = torch.zeros_like(idx)
    counter = torch.stack([idx & _MASK32, idx >> 32, zeros, zeros], dim=-1)
    return philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))


def _shoemake(words: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (float64) from Philox words ``(..., >=3)``."""
    u = (words[..., :3] >> 8).to(torch.float64) * 2.0**-24
    a, b = torch.sqrt(1.0 - u[..., 0]), torch.sqrt(u[..., 0])
    t1, t2 = 2.0 * math.pi * u[..., 1], 2.0 * math.pi * u[..., 2]
    return torch.stack([a * torch.sin(t1), a * torch.cos(t1), b * torch.sin(t2), b * torch.cos(t2)], dim=-1)


def random_quaternions(
    n: int,
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    offset: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``n`` Haar-uniform unit quaternions ``(n, 4)`` as ``(w, x, y, z)``: rotations
    ``offset .. offset + n - 1`` of the stream keyed by ``seed`` (see module docs)."""
    check_count(n)
    check_offset(offset, n)
    seed = resolve_seed(seed, generator)
    q = _shoemake(philox_words(n, seed, offset, device))
    return q.to(dtype or torch.get_default_dtype())


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` of unit quaternions ``(..., 4)`` = ``(w, x, y, z)``."""
    if q.shape[-1:] != (4,):
        raise ValueError(f"q must have shape (..., 4) as (w, x, y, z), got {tuple(q.shape)}")
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` with ``w >= 0`` of proper rotations ``(..., 3, 3)``.

    Shepperd's method: each sample uses the largest of ``|w|, |x|, |y|, |z|`` as the
    pivot, so the result is accurate everywhere (no acos, no catastrophic division).
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {tuple(R.shape)}")
    m = R
    t = torch.stack(
        [
            1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2],
            1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
            1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
            1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2],
        ],
        dim=-1,
    )  # 4 w^2, 4 x^2, 4 y^2, 4 z^2
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s21, s02, s10 = m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1]
    # candidate k: 4 q_k * q, computed from the pivot component k
    cand = torch.stack(
        [
            torch.stack([t[..., 0], d21, d02, d10], -1),
            torch.stack([d21, t[..., 1], s10, s02], -1),
            torch.stack([d02, s10, t[..., 2], s21], -1),
            torch.stack([d10, s02, s21, t[..., 3]], -1),
        ],
        dim=-2,
    )
    k = t.argmax(dim=-1, keepdim=True)
    best = torch.take_along_dim(cand, k[..., None], dim=-2).squeeze(-2)
    q = best / best.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def orientation(R: torch.Tensor) -> torch.Tensor:
    """``(...)``: +1 where ``R`` ``(..., 3, 3)`` is proper (det > 0), -1 where improper.

    The determinant is the triple product: batched, no LAPACK call, no host sync.
    """
    det = (R[..., 0, :] * torch.linalg.cross(R[..., 1, :], R[..., 2, :], dim=-1)).sum(-1)
    return torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))


def check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def check_offset(offset, n: int) -> None:
    """A stream position: rotations ``offset .. offset + n - 1`` must have counters below
    2**63 (int64 on every backend; a larger one would wrap on some and not on others)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + n > 2**63:
        raise ValueError(f"offset: rotations offset .. offset + n - 1 must lie below 2**63, got offset={offset} "
                         f"with n={n}")


def is_finite_group(group: str) -> bool:
    check_group(group)
    return group in _FINITE_ORDERS


def group_order(group: str) -> Optional[int]:
    """Number of elements of a finite group, ``None`` for SO(3) and O(3)."""
    check_group(group)
    return _FINITE_ORDERS.get(group)


def check_group(group) -> None:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _closure(generators: list[torch.Tensor]) -> torch.Tensor:
    """All products of ``generators`` (float64), identity first, breadth-first order."""
    eye = torch.eye(3, dtype=torch.float64)
    elements, keys = [eye], {tuple(eye.round(decimals=8).flatten().tolist())}
    frontier = [eye]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                key = tuple(p.round(decimals=8).flatten().tolist())
                if key not in keys:
                    keys.add(key)
                    elements.append(p)
                    new.append(p)
        frontier = new
    return torch.stack(elements)


def _axis_angle(axis, angle: float) -> torch.Tensor:
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    q = torch.cat([torch.tensor([math.cos(angle / 2)], dtype=torch.float64), math.sin(angle / 2) * axis])
    return quaternion_to_matrix(q)


@functools.lru_cache(maxsize=None)
def _finite_group(group: str) -> torch.Tensor:
    if group == "octahedral_O3":
        # the full symmetry group of the cube: the 24 rotations, then each times the inversion
        rotations = _finite_group("octahedral")
        return torch.cat([rotations, -rotations])
    if group == "octahedral":
        # rotations of the cube [-1, 1]^3: quarter turns about x and z generate all 24
        gens = [_axis_angle([1, 0, 0], math.pi / 2), _axis_angle([0, 0, 1], math.pi / 2)]
    else:
        # rotations of the icosahedron with vertices (0, +-1, +-phi) and cyclic
        # permutations: a fifth turn about a vertex and a half turn about z
        phi = (1 + math.sqrt(5)) / 2
        gens = [_axis_angle([0, 1, phi], 2 * math.pi / 5), _axis_angle([0, 0, 1], math.pi)]
    elements = _closure(gens)
    # exact zeros and +-1 where they are meant (cube group entries are integers)
    elements = torch.where(elements.abs() < 1e-12, torch.zeros_like(elements), elements)
    if group == "octahedral":
        elements = elements.round()
    assert elements.shape[0] == _FINITE_ORDERS[group], elements.shape
    return elements


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (``False`` on CPU-only
    builds of torch, and while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def refuse_during_capture(what: str) -> None:
    """Raise a RuntimeError if a CUDA graph is being captured: ``what`` (a table the step
    reads on the device) is copied from the host on first use, which a capture cannot
    record. ``fastequiv.warmup`` (or one eager step) builds every table before."""
    if capturing():
        raise RuntimeError(
            f"fastequiv builds {what} on its first use, and that first use is inside a CUDA-graph capture, "
            "which cannot record a copy from the host: call fastequiv.warmup(spec, device) (or run one eager "
            "step with the same spec) before capturing")


# a finite group's elements on each (device, dtype), copied from the host once; constants
# to torch.compile (a plain dict: dynamo warns on tracing through an lru_cache wrapper)
_ON_DEVICE: dict = {}


@torch.compiler.assume_constant_result
def _finite_group_on(group: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (group, device, dtype)
    if key not in _ON_DEVICE:
        refuse_during_capture(f"the {group} group's elements on {device}")
        _ON_DEVICE[key] = _finite_group(group).to(device=device, dtype=dtype)
    return _ON_DEVICE[key]


def _with_index(device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def group_elements(group: str, *, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every element of a finite rotation group as matrices ``(order, 3, 3)``, identity first.

    ``"octahedral"``: the 24 rotations of the cube ``[-1, 1]^3`` (signed permutation
    matrices of det +1). ``"octahedral_O3"``: all 48 symmetries of the cube (every signed
    permutation matrix), the 24 rotations first and then the same ones times -1 (det -1).
    ``"icosahedral"``: the 60 rotations of the icosahedron with
    vertices ``(0, +-1, +-phi)`` and their cyclic permutations.
    """
    if not is_finite_group(group):
        raise ValueError(f"group {group!r} is not finite; finite groups: {tuple(_FINITE_ORDERS)}")
    return _finite_group_on(group, _with_index(device), dtype or torch.get_default_dtype()).clone()


def elements_from_words(words: torch.Tensor, group: str) -> torch.Tensor:
    """The group elements ``(n, 3, 3)`` (float64) drawn by Philox words ``(n, 4)``: the one
    definition of a draw that every torch-side sampler uses."""
    if group in _FINITE_ORDERS:
        # uniform element index from the first word (bias < order / 2^32, far below any test)
        return _finite_group_on(group, words.device, torch.float64)[words[..., 0] % _FINITE_ORDERS[group]]
    R = quaternion_to_matrix(_shoemake(words))
    if group == "O3":
        improper = (words[..., 3] & 1).bool()
        R = torch.where(improper[:, None, None], -R, R)
    return R
