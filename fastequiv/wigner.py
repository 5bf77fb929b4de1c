"""Real Wigner-D matrices in e3nn's basis, computed straight from rotation matrices.

This module is the math only: the recursion, the packed blocks and their assembly into
the block-diagonal matrix of an irreps. The ``wigner_D`` op (:mod:`fastequiv.ops.wigner_d`)
dispatches the packed blocks to a backend; :func:`wigner_D_matrix` here is its pure-torch
reference, the ground truth the Triton and CUDA kernels are tested against. It uses no Euler angles, no ``acos``/``atan2`` and no
``matrix_exp``: every block is a polynomial in the entries of ``R``, built by the
Ivanic–Ruedenberg recursion (J. Ivanic and K. Ruedenberg, J. Phys. Chem. 100, 6342
(1996); erratum J. Phys. Chem. A 102, 9099 (1998); the same recursion as
google/spherical-harmonics' ``RotateSH``).

Recursion
---------
The degree-``l`` block is bilinear in the ``l = 1`` block and the ``l - 1`` block::

    D_l[..., r, c] = sum_t coef[t] * D_1[..., i[t], j[t]] * D_{l-1}[..., a[t], b[t]]

The flat term table ``(r, c, coef, i, j, a, b)`` of each ``l >= 2`` is built once with
numpy (:func:`recursion_terms`) and shared with the kernels. Rows ``r`` and columns
``c`` index ``0 .. 2l`` (``m = r - l``), ``i, j`` index ``0 .. 2`` and ``a, b`` index
``0 .. 2l - 2``. Entries are in e3nn's basis throughout, so ``D_1 = R`` itself.

Convention (basis)
------------------
e3nn's ``l = 1`` basis is ``(x, y, z)`` and ``Irreps("1o").D_from_matrix(R) == R``;
its real spherical harmonics take ``y`` as the polar axis. The recursion is written for
the standard real harmonics with ``z`` polar and ``l = 1`` ordered ``m = -1, 0, 1 ->
(y, z, x)``. Relabelling the axes cyclically, ``(X, Y, Z)_standard = (z, x, y)_e3nn``,
makes the standard ``(Y, Z, X)`` order exactly e3nn's ``(x, y, z)``, so the standard
``D_1`` is ``R`` unchanged (the relabelling is a proper rotation, no sign appears).
Checked against e3nn 0.6.0 for every ``l <= 10``: with ``D_1 = R`` the recursion gives
e3nn's ``wigner_D`` with no further per-``l`` permutation or sign (the change of basis
is the identity for every ``l``).

Convention (parity)
-------------------
An improper ``R`` (``det R < 0``) is the O(3) element ``(-R) * inversion``. As in e3nn,
the irrep ``(l, p)`` (``p = +1`` for "e", ``-1`` for "o") gets
``D = p**k * D_l(-R)`` with ``k = 1`` when ``det R < 0``. The sign is taken with
``torch.where`` on a batched determinant: no host sync, no branching on tensor values.
"""

from __future__ import annotations

import functools
import typing

import numpy as np
import torch

from .groups import orientation, refuse_during_capture

if typing.TYPE_CHECKING:
    from e3nn import o3

__all__ = ["wigner_D_blocks", "wigner_D_matrix", "packed_blocks", "assemble", "irreps_key", "parse_irreps",
           "recursion_terms"]


@functools.lru_cache(maxsize=None)
def recursion_terms(l: int) -> tuple[np.ndarray, ...]:
    """Term table of the Ivanic–Ruedenberg recursion for degree ``l >= 2``.

    Returns ``(r, c, coef, i, j, a, b)``: int64 arrays and a float64 ``coef`` array, one
    entry per term, such that (in e3nn's basis, with ``D_1 = R``)::

        D_l[r, c] = sum over terms t with (r[t], c[t]) == (r, c) of
                    coef[t] * D_1[i[t], j[t]] * D_{l-1}[a[t], b[t]]

    ``r, c`` are in ``0 .. 2l``, ``i, j`` in ``0 .. 2``, ``a, b`` in ``0 .. 2l - 2``.
    Terms with a zero coefficient are left out; terms are sorted by ``(r, c)``.
    The arrays are cached and read-only.
    """
    if l < 2:
        raise ValueError(f"l must be >= 2 for the recursion table, got {l}")
    terms: list[tuple[int, int, float, int, int, int, int]] = []

    def p(i: int, a: int, b: int) -> list[tuple[float, int, int, int, int]]:
        # Ivanic–Ruedenberg P(i, l, a, b): (coef, i, j, a, b) in signed m indices.
        if b == l:
            return [(1.0, i, 1, a, l - 1), (-1.0, i, -1, a, -l + 1)]
        if b == -l:
            return [(1.0, i, 1, a, -l + 1), (1.0, i, -1, a, l - 1)]
        return [(1.0, i, 0, a, b)]

    def scaled(s: float, ts: list) -> list:
        return [(s * t[0],) + t[1:] for t in ts]

    for m in range(-l, l + 1):
        for n in range(-l, l + 1):
            d = 1.0 if m == 0 else 0.0
            den = (2 * l) * (2 * l - 1) if abs(n) == l else (l + n) * (l - n)
            u = np.sqrt((l + m) * (l - m) / den)
            v = 0.5 * np.sqrt((1 + d) * (l + abs(m) - 1) * (l + abs(m)) / den) * (1 - 2 * d)
            w = -0.5 * np.sqrt(max(l - abs(m) - 1, 0) * (l - abs(m)) / den) * (1 - d)
            parts = scaled(u, p(0, m, n))
            if m == 0:
                vt = p(1, 1, n) + p(-1, -1, n)
            elif m > 0:
                vt = scaled(np.sqrt(1.0 + (m == 1)), p(1, m - 1, n))
                if m != 1:
                    vt += scaled(-1.0, p(-1, -m + 1, n))
            else:
                vt = scaled(np.sqrt(1.0 + (m == -1)), p(-1, -m - 1, n))
                if m != -1:
                    vt += p(1, m + 1, n)
            parts += scaled(v, vt)
            if m > 0 and w != 0.0:
                parts += scaled(w, p(1, m + 1, n) + p(-1, -m - 1, n))
            elif m < 0 and w != 0.0:
                parts += scaled(w, p(1, m - 1, n) + scaled(-1.0, p(-1, -m + 1, n)))
            for coef, i, j, a, b in parts:
                if coef != 0.0:
                    terms.append((m + l, n + l, float(coef), i + 1, j + 1, a + l - 1, b + l - 1))

    cols = list(zip(*terms))
    out = tuple(np.asarray(col, dtype=np.float64 if k == 2 else np.int64) for k, col in enumerate(cols))
    for arr in out:
        arr.setflags(write=False)
    return out


# Tables built with numpy are constants to torch.compile: the functions that hand them out
# are marked assume_constant_result (run eagerly while tracing) and cache in a plain dict
# (dynamo would warn on every compiled call about tracing through an lru_cache wrapper).
_TABLES: dict = {}


def _cached(build):
    @functools.wraps(build)
    def get(*args):
        key = (build.__name__,) + args
        if key not in _TABLES:
            refuse_during_capture(f"the Wigner-D tables ({build.__name__}{args})")
            _TABLES[key] = build(*args)
        return _TABLES[key]

    return torch.compiler.assume_constant_result(get)


@_cached
def recursion_tensors(l: int, device: torch.device, dtype: torch.dtype):
    """Torch form of :func:`recursion_terms` for ``l`` on ``device``: flat indices."""
    r, c, coef, i, j, a, b = recursion_terms(l)
    n_prev = 2 * l - 1
    out_idx = torch.tensor(r * (2 * l + 1) + c, device=device)
    r1_idx = torch.tensor(i * 3 + j, device=device)
    prev_idx = torch.tensor(a * n_prev + b, device=device)
    return out_idx, torch.tensor(coef.copy(), dtype=dtype, device=device), r1_idx, prev_idx


def blocks_flat(lmax: int, R: torch.Tensor) -> list[torch.Tensor]:
    """Proper-rotation blocks for ``R`` of shape ``(N, 3, 3)``, each ``((2l+1)**2, N)``.

    The batch is the last dim so that the gathers and the ``index_add`` move whole
    contiguous rows (several times faster than gathering along the inner dim).
    """
    n = R.shape[0]
    r1 = R.reshape(n, 9).t().contiguous()
    blocks = [torch.ones(1, n, dtype=R.dtype, device=R.device)]
    if lmax >= 1:
        blocks.append(r1)
    for l in range(2, lmax + 1):
        out_idx, coef, r1_idx, prev_idx = recursion_tensors(l, R.device, R.dtype)
        prod = coef[:, None] * r1.index_select(0, r1_idx) * blocks[-1].index_select(0, prev_idx)
        out = torch.zeros((2 * l + 1) ** 2, n, dtype=R.dtype, device=R.device)
        blocks.append(out.index_add(0, out_idx, prod))
    return blocks


def check_R(R) -> None:
    if not isinstance(R, torch.Tensor):
        raise ValueError(f"R must be a torch.Tensor of shape (..., 3, 3), got {type(R).__name__}")
    if R.dim() < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got shape {tuple(R.shape)}")
    if not R.is_floating_point():
        raise ValueError(f"R must have a floating-point dtype, got {R.dtype}")


def wigner_D_blocks(lmax: int, R: torch.Tensor) -> list[torch.Tensor]:
    """Wigner-D blocks ``D_0 .. D_lmax`` of proper rotations, in e3nn's basis.

    Args:
        lmax: highest degree, ``>= 0``.
        R: rotation matrices of shape ``(..., 3, 3)``, assumed proper (``det R = +1``);
            any float dtype and device.

    Returns:
        A list of ``lmax + 1`` tensors; entry ``l`` has shape ``(..., 2l+1, 2l+1)`` and
        equals e3nn's ``o3.Irrep(l, 1).D_from_matrix(R)``. ``D_1`` is ``R`` (a copy).
        Differentiable with respect to ``R``.
    """
    check_R(R)
    if not isinstance(lmax, int) or lmax < 0:
        raise ValueError(f"lmax must be an int >= 0, got {lmax!r}")
    batch = R.shape[:-2]
    flat = blocks_flat(lmax, R.reshape(-1, 3, 3))
    out = [b.t().reshape(*batch, 2 * l + 1, 2 * l + 1) for l, b in enumerate(flat)]
    if lmax >= 1:
        out[1] = out[1].clone()  # never hand back a view of the caller's R
    return out


def parse_irreps(irreps, name: str = "irreps"):
    """``irreps`` (a string or ``e3nn.o3.Irreps``) as an ``o3.Irreps``, or a ValueError naming ``name``.

    e3nn is imported here, on first use, so that ``import fastequiv`` stays cheap and works
    without it (irreps are the only reps that need it: the ``e3nn`` extra).
    """
    try:
        from e3nn import o3
    except ImportError as err:
        raise ImportError(f"{name}={irreps!r}: irreps reps need e3nn, which cannot be imported here "
                          f'({type(err).__name__}: {err}): pip install "fastequiv[e3nn]"') from err

    try:
        return o3.Irreps(irreps)
    except Exception as err:  # e3nn raises ValueError or others on malformed input
        raise ValueError(
            f"{name} must be an e3nn Irreps or irreps string like '1x0e + 1x1o', got {irreps!r} ({err})"
        ) from None


def irreps_key(irreps: "o3.Irreps") -> tuple[tuple[int, int, int], ...]:
    """``((mul, l, p), ...)``: an irreps as plain ints, which ``torch.compile`` can guard on
    (it cannot inspect e3nn's ``Irreps`` objects)."""
    return tuple((mul, ir.l, ir.p) for mul, ir in irreps)


def packed_blocks(R: torch.Tensor, lmax: int) -> torch.Tensor:
    """Packed Wigner-D blocks ``D_0 .. D_lmax`` of proper rotations ``R`` ``(N, 3, 3)``:
    ``(N, S)`` in ``R.dtype`` with ``S = sum_l (2l+1)^2``; block ``l`` is row-major at
    column offset ``sum_{l' < l} (2l'+1)^2``. Differentiable with respect to ``R``."""
    return torch.cat(blocks_flat(lmax, R), dim=0).t().contiguous()


def packed_width(lmax: int) -> int:
    """``sum_{l <= lmax} (2l+1)^2``: the columns of the packed blocks ``D_0 .. D_lmax``
    (:func:`packed_blocks`); ``packed_width(l - 1)`` is where block ``l`` starts."""
    return (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) // 3


def packed_block(packed: torch.Tensor, sign: torch.Tensor, l: int, p: int) -> torch.Tensor:
    """The ``(n, 2l+1, 2l+1)`` Wigner-D block of degree ``l`` and parity ``p`` from the packed
    blocks ``(n, S)`` of the proper parts of the rotations and their orientation ``sign``
    ``(n,)``: e3nn's parity, ``D = p**k D_l(proper R)`` with ``k = 1`` where ``sign < 0``."""
    w, start = 2 * l + 1, packed_width(l - 1)
    block = packed[:, start:start + w * w].reshape(-1, w, w)
    return block * sign.reshape(-1, 1, 1).to(block.dtype) if p == -1 else block


def assemble(key: tuple[tuple[int, int, int], ...], packed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The block-diagonal ``(n, dim, dim)`` matrix of the irreps ``key`` from the packed
    blocks ``(n, S)`` of the proper parts of the rotations and their orientation ``sign``
    ``(n,)`` (see :func:`packed_block`).

    A zero fill, then one strided copy per ``(mul, l, p)`` entry of ``key``: its ``mul``
    diagonal blocks are one view of the output. (A gather of every output entry from the
    packed columns, the earlier form, costs about 3x more on the CPU: it indexes the
    mostly-zero output entry by entry.)"""
    n = packed.shape[0]
    dim = sum(mul * (2 * l + 1) for mul, l, _ in key)
    out = packed.new_zeros(n, dim, dim)
    offset = 0
    for mul, l, p in key:
        w = 2 * l + 1
        if mul == 0:
            continue
        diagonal = out.as_strided((n, mul, w, w), (dim * dim, (dim + 1) * w, dim, 1), offset * (dim + 1))
        diagonal.copy_(packed_block(packed, sign, l, p)[:, None].expand(n, mul, w, w))
        offset += mul * w
    return out


@_cached
def irreps_groups(key: tuple[tuple[int, int, int], ...], device: torch.device):
    """The irreps ``key`` grouped by ``(l, p)``: ``[(l, p, columns), ...]`` where ``columns``
    (int64, on ``device``) are the components of every copy of that irrep, copy after copy
    (``2l + 1`` each). Applying ``D`` per group costs ``sum mul (2l+1)^2`` a row instead of
    ``dim^2`` for the block-diagonal matrix."""
    starts: dict = {}
    offset = 0
    for mul, l, p in key:
        for _ in range(mul):
            starts.setdefault((l, p), []).append(offset)
            offset += 2 * l + 1
    return [(l, p, torch.tensor([s + i for s in group for i in range(2 * l + 1)], device=device))
            for (l, p), group in starts.items()]


@_cached
def groups_inverse(key: tuple[tuple[int, int, int], ...], device: torch.device):
    """Where component ``c`` of the irreps lands when the groups of :func:`irreps_groups` are
    concatenated (an int64 permutation on ``device``), or None when that order is already
    the irreps' own (each ``(l, p)`` appears once, in order)."""
    order = torch.cat([columns for _, _, columns in irreps_groups(key, device)])
    if torch.equal(order.cpu(), torch.arange(order.numel())):
        return None
    return torch.argsort(order)


def block_cost(key: tuple[tuple[int, int, int], ...]) -> tuple[int, int]:
    """``(sum mul (2l+1)^2, dim^2)``: multiply-adds a row per irrep block, and densely."""
    dim = sum(mul * (2 * l + 1) for mul, l, _ in key)
    return sum(mul * (2 * l + 1) ** 2 for mul, l, _ in key), dim * dim


def key_lmax(key: tuple[tuple[int, int, int], ...]) -> int:
    """The highest degree in the irreps ``key``."""
    return max([0] + [l for _, l, _ in key])


def wigner_D_matrix(key: tuple[tuple[int, int, int], ...], R: torch.Tensor) -> torch.Tensor:
    """The block-diagonal Wigner-D matrix ``(..., dim, dim)`` of the irreps ``key`` (see
    :func:`irreps_key`) for orthogonal ``R`` ``(..., 3, 3)``, in pure torch and
    differentiable: the reference of :func:`fastequiv.ops.wigner_D`."""
    batch = R.shape[:-2]
    R = R.reshape(-1, 3, 3)
    sign = orientation(R)
    packed = packed_blocks(R * sign[:, None, None], key_lmax(key))
    out = assemble(key, packed, sign)
    return out.reshape(*batch, *out.shape[-2:])
