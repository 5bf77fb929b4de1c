"""Voxel grids: dense 3D fields ``(B, ..., C, D, H, W)`` that rotate by moving data.

A voxel rep describes a field sampled on a cubic grid ``D = H = W = n``, with scalar
channels and vector channels (groups of three channels that rotate as well as move).

Conventions
-----------
* **Axes.** The grid axes ``(D, H, W)`` are the coordinates ``(x, y, z)`` in that order:
  voxel ``x[..., i, j, k]`` sits at the point ``(i, j, k) - c`` with ``c = (n - 1) / 2``
  in every axis, in voxel units. This is ``torch.meshgrid(..., indexing="ij")`` and
  numpy's ``grid[x, y, z]``. ``torch.nn.functional.grid_sample`` orders the coordinates
  of its sampling grid the other way round, ``(W, H, D)``.
* **Centre.** Rotations act about the grid centre ``c`` (the centre of the middle voxel
  for odd ``n``, the corner shared by the eight middle voxels for even ``n``).
* **Channels.** ``Voxels(scalars=s, vectors=v)``: the first ``s`` channels are scalars
  (e3nn ``0e``), then ``v`` vectors of three consecutive channels each, components
  ``(x, y, z)`` along ``(D, H, W)`` (e3nn ``1o``: an improper element flips them too).
  ``"voxels"`` (or ``Voxels()``) is any number of scalar channels; with
  ``scalars=None`` and ``vectors=v`` the channels before the last ``3 v`` are scalars.
  Dims between the batch and the channels (``(B, T, C, D, H, W)``) share dim 0's element.
* **Action.** ``(R f)(p) = D(R) f(R^-1 p)``: ``out[q] = D(R) x[R^T (q - c) + c]`` with
  ``D(R) = 1`` on scalar channels and ``R`` on each vector.

Two ways to evaluate ``x[R^T (q - c) + c]``
-------------------------------------------
* **Exact** for the symmetries of the cube (``group="octahedral"``, 24 rotations, the
  default group of a :class:`~fastequiv.Spec` with voxel reps; ``"octahedral_O3"``, 48
  with reflections): ``R`` is a signed permutation matrix, the source of every voxel is
  another voxel, and the copy is an index gather (a permutation and flips of the axes),
  with no interpolation. An exhaustive twirl over the group is then exact twice over:
  no sampling and no resampling error.
* **Trilinear** for any other rotation (SO(3), O(3)): zero outside the grid. This is
  ``F.grid_sample(x, F.affine_grid(theta, size, align_corners=True), mode="bilinear",
  padding_mode="zeros", align_corners=True)`` with ``theta = [P R^T P | 0]`` (``P`` the
  reversal of the axis order). On a cubic grid rotated about its centre,
  ``align_corners=False`` gives the same map: both put the centre at normalised 0 and
  scale the three axes alike. Trilinear resampling at the integer points of a cube
  element is itself exact, so both paths agree there.

Which path runs is read from the values of ``R`` (integer entries: a cube element). On a
GPU that is one host sync per call; inside ``torch.compile`` the trilinear path is taken,
which agrees with the exact one to rounding.

Interpolation is not a group action: rotating by ``R`` and back loses the corners that
left the grid and blurs the rest. Under SO(3) even the identity model then has
``L_equiv > 0``. :func:`interpolation_floor` measures that floor on the same inputs and
rotations; report it next to a model's ``L_equiv`` (under the cube group it is 0).

Backends: ``"torch"`` (the reference: ``torch.permute``/``torch.flip`` for cube elements,
one batched ``F.grid_sample`` call otherwise) and ``"triton"``
(``kernels/voxels.py``: K rotated copies written in one pass, and the back-resampling of
the outputs fused with the twirl reduction). ``"auto"`` uses Triton on CUDA tensors. The
Triton kernels have no backward of their own: gradients are those of the torch reference,
recomputed in the backward pass.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend
from .ops._masks import mask_for, tile, valid_count
from .ops.twirl_reduce import TwirlSums, accumulate_dtype
from .reps import Rep

__all__ = ["Voxels", "rotate", "rotate_copies", "twirl_reduce", "interpolation_floor"]


class Voxels(Rep):
    """A field on a cubic grid ``(B, ..., C, n, n, n)``: scalar channels, then vector channels.

    Args:
        scalars: number of scalar channels (``None``: every channel before the vectors).
        vectors: number of vector channels, each three consecutive channels ``(x, y, z)``.

    See the module docs for the axis, centre and component conventions. The string
    ``"voxels"`` in a :class:`~fastequiv.Spec` is ``Voxels()``, and the string
    ``"voxels(scalars=4, vectors=2)"`` is ``Voxels(scalars=4, vectors=2)``.
    """

    def __init__(self, scalars: Optional[int] = None, vectors: int = 0):
        if scalars is not None and (isinstance(scalars, bool) or not isinstance(scalars, int) or scalars < 0):
            raise ValueError(f"scalars must be a non-negative int or None, got {scalars!r}")
        if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 0:
            raise ValueError(f"vectors must be a non-negative int, got {vectors!r}")
        if scalars == 0 and vectors == 0:
            raise ValueError("a voxel rep needs at least one channel: got scalars=0, vectors=0")
        super().__init__("voxels")
        self.scalars, self.vectors = scalars, vectors

    def __repr__(self) -> str:
        if self.scalars is None and self.vectors == 0:
            return "Rep('voxels')"
        parts = ([f"scalars={self.scalars}"] if self.scalars is not None else []) + \
            ([f"vectors={self.vectors}"] if self.vectors else [])
        return f"Voxels({', '.join(parts)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Voxels) and (self.scalars, self.vectors) == (other.scalars, other.vectors)

    def __hash__(self) -> int:
        return hash(("voxels", self.scalars, self.vectors))

    @classmethod
    def parse(cls, text: str, name: str = "rep") -> "Voxels":
        """``"voxels"`` or ``"voxels(scalars=S, vectors=V)"`` (either keyword may be left out)."""
        m = re.fullmatch(r"\s*voxels\s*(?:\((.*)\))?\s*", text)
        if m is None:
            raise ValueError(f"{name}={text!r} is not a voxel rep: expected 'voxels' or 'voxels(scalars=S, vectors=V)'")
        kwargs = {}
        for item in filter(None, (s.strip() for s in (m.group(1) or "").split(","))):
            km = re.fullmatch(r"(scalars|vectors)\s*=\s*(\d+)", item)
            if km is None or km.group(1) in kwargs:
                raise ValueError(f"{name}={text!r}: cannot read {item!r}; expected 'scalars=S' and/or 'vectors=V'")
            kwargs[km.group(1)] = int(km.group(2))
        return cls(**kwargs)

    def n_scalars(self, C: int) -> int:
        """The number of scalar channels in a grid of ``C`` channels (checked by :meth:`check`)."""
        return C - 3 * self.vectors

    def check(self, x: torch.Tensor, name: str) -> None:
        """Raise a ValueError naming ``name`` unless ``x`` is ``(B, ..., C, n, n, n)`` for this rep."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor for rep {self}, got {type(x).__name__}")
        if x.dim() < 5:
            raise ValueError(f"{name} must have shape (batch, ..., channels, n, n, n) for rep {self}, got {tuple(x.shape)}")
        D, H, W = x.shape[-3:]
        if not D == H == W:
            raise ValueError(f"{name} has grid {(D, H, W)} (shape {tuple(x.shape)}), but rep {self} needs a cubic "
                             "grid D == H == W (a rotation of the cube must map the grid onto itself)")
        C = x.shape[-4]
        want = None if self.scalars is None else self.scalars + 3 * self.vectors
        if (want is not None and C != want) or C < 3 * self.vectors:
            expected = f"{want}" if want is not None else f">= {3 * self.vectors}"
            raise ValueError(f"{name} has {C} channels (dim -4 of shape {tuple(x.shape)}), but rep {self} needs "
                             f"{expected} channels ({self.vectors} vectors of 3 channels each)")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor to resample as {self}, got dtype {x.dtype}")

    def act(self, x: torch.Tensor, R: torch.Tensor, mask: Optional[torch.Tensor] = None, inverse: bool = False,
            backend: str = "auto") -> torch.Tensor:
        """``rho(R) x`` (``rho(R)^-1 x`` with ``inverse``) sample by sample: ``x``
        ``(N, ..., C, n, n, n)``, ``R`` ``(N, 3, 3)``. ``mask`` is not used (a grid has no
        centroid). Computes in ``R.dtype`` (float64 if ``x`` is), returns ``x.dtype``."""
        return rotate(x, R, self, inverse=inverse, backend=backend)

    # -- layout ---------------------------------------------------------------------------

    def _vector_starts(self, lead: int, C: int, device) -> torch.Tensor:
        """First channel of every vector in the ``lead * C`` flattened channels: int32 ``(G,)``."""
        first = self.n_scalars(C) + 3 * torch.arange(self.vectors, device=device, dtype=torch.int32)
        return (first[None, :] + C * torch.arange(lead, device=device, dtype=torch.int32)[:, None]).reshape(-1)


def as_voxels(rep) -> Voxels:
    from .reps import as_rep

    rep = as_rep(rep, "rep")
    if not isinstance(rep, Voxels):
        raise ValueError(f"rep must be a voxel rep ('voxels' or fe.Voxels(...)), got {rep}")
    return rep


def _grid_shape(shape) -> tuple[int, int, int]:
    """``(lead, C, n)`` of a checked voxel tensor shape ``(N, *lead, C, n, n, n)``."""
    return math.prod(shape[1:-4]), shape[-4], shape[-1]


def _is_cube_element(R: torch.Tensor) -> bool:
    """Whether every ``R`` is a signed permutation matrix (an orthogonal matrix with integer
    entries). One host sync on a GPU; under ``torch.compile`` the trilinear path is taken,
    which gives the same values at cube elements."""
    if R.numel() == 0 or torch.compiler.is_compiling():
        return False
    return bool((R == R.round()).all())


# -- the torch reference ---------------------------------------------------------------------


def _resample_torch(x: torch.Tensor, M: torch.Tensor, vec: torch.Tensor, exact: bool) -> torch.Tensor:
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
    return _resample_acc(x, M, vec, exact).to(x.dtype)


def _resample_acc(x: torch.Tensor, M: torch.Tensor, vec: torch.Tensor, exact: bool) -> torch.Tensor:
    """:func:`_resample_torch` before the cast back: ``(rows, C', n, n, n)`` in ``M.dtype``."""
    B, Cp, n = x.shape[0], x.shape[1], x.shape[-1]
    rows, acc = M.shape[0], M.dtype
    src = x.to(acc)
    if rows == 0 or src.numel() == 0:
        return src.new_zeros((rows,) + tuple(src.shape[1:]))
    if exact:
        out = _permute_flip(src, M)
    else:
        if rows != B:
            src = tile(src, rows // B)
        # grid_sample orders its grid (W, H, D): the map in its coordinates is P M^T P
        P = torch.eye(3, dtype=acc, device=x.device).flip(0)
        theta = torch.cat([P @ M.transpose(1, 2) @ P, M.new_zeros(rows, 3, 1)], dim=2)
        grid = F.affine_grid(theta, [rows, Cp, n, n, n], align_corners=True)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if vec.numel():
        chans = (vec.long()[:, None] + torch.arange(3, device=x.device)).reshape(-1)
        v = out[:, chans].reshape(rows, vec.numel(), 3, n, n, n)
        mixed = torch.einsum("rab,rgbijk->rgaijk", M, v).reshape(rows, 3 * vec.numel(), n, n, n)
        out = out.index_copy(1, chans, mixed)
    return out


def _permute_flip(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r mod B]`` moved by the signed permutation ``M[r]`` (channels unmixed).

    ``out[q] = x[M^T (q - c) + c]``: if row ``a`` of ``M`` has its entry ``s_a = +-1`` in
    column ``pi(a)``, output axis ``a`` is input axis ``pi(a)``, reversed where ``s_a = -1``.
    Rows that share an element are moved together (at most 48 groups); reading the
    elements costs one copy of ``M`` to the host.
    """
    B, rows = x.shape[0], M.shape[0]
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    keys = M.detach().round().to(device="cpu", dtype=torch.int64).reshape(rows, 9)
    elements, which = torch.unique(keys, dim=0, return_inverse=True)
    for u, m in enumerate(elements.reshape(-1, 3, 3).tolist()):
        idx = torch.nonzero(which == u).reshape(-1)
        perm = [next(j for j in range(3) if m[a][j]) for a in range(3)]
        flips = [2 + a for a in range(3) if m[a][perm[a]] < 0]
        start = int(idx[0])
        whole = len(idx) == B and start % B == 0 and int(idx[-1]) == start + B - 1
        # copy k of a twirl (rows k B .. k B + B - 1, one element): move the batch in place
        src = x if whole else x.index_select(0, (idx % B).to(x.device))
        moved = src.permute(0, 1, *(2 + j for j in perm))
        moved = moved.flip(flips) if flips else moved
        if whole:
            out[start:start + B] = moved
        else:
            out.index_copy_(0, idx.to(x.device), moved)
    return out


def _reduce_torch(out: torch.Tensor, M: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], vec: torch.Tensor,
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
    a = _resample_acc(out.reshape(K * B, Cp, n, n, n), M.reshape(K * B, 3, 3), vec, exact)
    a = a.reshape(K, B, Cp, n ** 3)
    yy = y.to(acc).reshape(B, Cp, n ** 3)
    abar = a.mean(0)
    per = torch.stack([((a - yy) ** 2).mean(0), (abar - yy) ** 2, ((a - abar) ** 2).mean(0)])
    if w is not None:
        per = per * w
    return abar, per.reshape(3, B, -1).sum(-1)


_backend.register("voxels_resample", "torch")(_resample_torch)
_backend.register("voxels_reduce", "torch")(_reduce_torch)


# -- the Triton kernels (kernels/voxels.py), with the reference's gradients -------------------


def _triton_available(device: torch.device) -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"


class _ResampleTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, M, vec, exact):
        from .kernels import voxels as kv

        ctx.save_for_backward(M, vec)
        ctx.exact, ctx.x_shape, ctx.x_dtype = exact, x.shape, x.dtype
        return kv.resample(x, M, vec, exact)

    @staticmethod
    def backward(ctx, grad):
        M, vec = ctx.saved_tensors
        with torch.enable_grad():
            x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=grad.device, requires_grad=True)
            (gx,) = torch.autograd.grad(_resample_torch(x, M, vec, ctx.exact), x, grad)
        return gx, None, None, None


def _resample_triton(x, M, vec, exact):
    if torch.is_grad_enabled() and x.requires_grad:
        return _ResampleTriton.apply(x, M, vec, exact)
    from .kernels import voxels as kv

    return kv.resample(x, M, vec, exact)


class _ReduceTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, M, y, w, vec, exact):
        from .kernels import voxels as kv

        ctx.save_for_backward(out, M, y, w, vec)
        ctx.exact = exact
        return kv.twirl_reduce(out, M, y, w, vec, exact)

    @staticmethod
    def backward(ctx, grad_mean, grad_sums):
        out, M, y, w, vec = ctx.saved_tensors
        with torch.enable_grad():
            o, t = out.detach().requires_grad_(), y.detach().requires_grad_()
            mean, sums = _reduce_torch(o, M, t, w, vec, ctx.exact)
            go, gy = torch.autograd.grad((mean, sums), (o, t), (grad_mean, grad_sums), allow_unused=True)
        return go, None, gy, None, None, None


def _reduce_triton(out, M, y, w, vec, exact):
    if torch.is_grad_enabled() and (out.requires_grad or y.requires_grad):
        return _ReduceTriton.apply(out, M, y, w, vec, exact)
    from .kernels import voxels as kv

    return kv.twirl_reduce(out, M, y, w, vec, exact)


for _op, _impl in (("voxels_resample", _resample_triton), ("voxels_reduce", _reduce_triton)):
    _backend.register(_op, "triton", available=_triton_available)(_impl)
    _backend.set_auto_order(_op, "cuda", ("triton",))


# -- public functions ------------------------------------------------------------------------


def _check_R(R: torch.Tensor, shape: tuple, name: str = "R") -> None:
    if not isinstance(R, torch.Tensor) or tuple(R.shape) != tuple(shape) or not R.is_floating_point():
        got = f"{R.dtype} tensor of shape {tuple(R.shape)}" if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"{name} must be a floating tensor of shape {tuple(shape)}, got {got}")


def rotate(x: torch.Tensor, R: torch.Tensor, rep="voxels", *, inverse: bool = False,
           backend: str = "auto") -> torch.Tensor:
    """``rho(R[b]) x[b]`` for every sample (``rho(R[b])^-1`` with ``inverse``).

    Args:
        x: ``(N, ..., C, n, n, n)``.
        R: ``(N, 3, 3)`` orthogonal; exact index gathers when every ``R`` is a symmetry of
            the cube, trilinear resampling otherwise (see the module docs).
        rep: a voxel rep (``"voxels"``, :class:`Voxels`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    Returns:
        ``(N, ..., C, n, n, n)`` in ``x.dtype``.
    """
    rep = as_voxels(rep)
    rep.check(x, "x")
    _check_R(R, (x.shape[0], 3, 3))
    lead, C, n = _grid_shape(x.shape)
    acc = accumulate_dtype(x, R)
    M = R.to(acc)
    M = (M.transpose(-1, -2) if inverse else M).contiguous()
    vec = rep._vector_starts(lead, C, x.device)
    _, impl = _backend.resolve("voxels_resample", backend, x.device)
    out = impl(x.reshape(x.shape[0], lead * C, n, n, n).contiguous(), M, vec, _is_cube_element(R))
    return out.reshape(x.shape)


def rotate_copies(x: torch.Tensor, R: torch.Tensor, rep="voxels", *, backend: str = "auto") -> torch.Tensor:
    """The K rotated copies of a batch of grids in one pass: copy ``k`` of sample ``b`` is
    row ``k * B + b`` of the result, ``rho(R[k, b]) x[b]`` (as :func:`fastequiv.ops.rotate_copies`).

    Args:
        x: ``(B, ..., C, n, n, n)``; R: ``(K, B, 3, 3)``; rep, backend: as in :func:`rotate`.
    Returns:
        ``(K * B, ..., C, n, n, n)`` in ``x.dtype``.
    """
    rep = as_voxels(rep)
    rep.check(x, "x")
    if not isinstance(R, torch.Tensor) or R.dim() != 4:
        _check_R(R, ("K", x.shape[0], 3, 3))
    _check_R(R, (R.shape[0], x.shape[0], 3, 3))
    K, B = R.shape[:2]
    lead, C, n = _grid_shape(x.shape)
    M = R.to(accumulate_dtype(x, R)).reshape(K * B, 3, 3).contiguous()
    vec = rep._vector_starts(lead, C, x.device)
    _, impl = _backend.resolve("voxels_resample", backend, x.device)
    out = impl(x.reshape(B, lead * C, n, n, n).contiguous(), M, vec, _is_cube_element(R))
    return out.reshape((K * B,) + tuple(x.shape[1:]))


def twirl_reduce(out: torch.Tensor, R: torch.Tensor, target: torch.Tensor, rep="voxels",
                 mask: Optional[torch.Tensor] = None, *, backend: str = "auto") -> TwirlSums:
    """Back-resample K stacked output grids and form the decomposition sums in one pass.

    ``a_k = rho(R[k, b])^-1 out[k, b]``; the result has the semantics of
    :func:`fastequiv.ops.twirl_reduce` (:class:`~fastequiv.ops.TwirlSums`: per-sample means
    over the valid elements of ``total``, ``bias``, ``spread``, the twirled ``mean`` and
    the ``count``), which gives the same values through ``Rep.act``.

    Args:
        out: ``(K, B, ..., C, n, n, n)``, the model's outputs on the rotated copies.
        R: ``(K, B, 3, 3)``, the element each copy was rotated by.
        target: ``(B, ..., C, n, n, n)`` in the frame of the unrotated input.
        rep: the output's voxel rep.
        mask: optional bool, a prefix of the target's shape (``(B,)``, ``(B, C)``, ...,
            or the full ``(B, C, n, n, n)``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    rep = as_voxels(rep)
    rep.check(target, "target")
    if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != tuple(target.shape) or out.dim() < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must have shape (K, *target.shape) = (K, {', '.join(map(str, target.shape))}), got {got}")
    _check_R(R, tuple(out.shape[:2]) + (3, 3))
    m = mask_for(mask, target.shape, "target")
    K, B = R.shape[:2]
    lead, C, n = _grid_shape(target.shape)
    acc = accumulate_dtype(out, target)
    M = R.to(acc).transpose(-1, -2).contiguous()  # the inverse action
    Cp = lead * C
    w = None if m is None else m.expand(target.shape).reshape(B, Cp, n ** 3).to(acc).contiguous()
    vec = rep._vector_starts(lead, C, out.device)
    _, impl = _backend.resolve("voxels_reduce", backend, out.device)
    mean, sums = impl(out.reshape(K, B, Cp, n, n, n).contiguous(), M, target.reshape(B, Cp, n, n, n).contiguous(),
                      w, vec, _is_cube_element(R))
    count = valid_count(target, m, acc)
    k = count.clamp_min(1)
    return TwirlSums(mean.reshape(target.shape), sums[0] / k, sums[1] / k, sums[2] / k, count)


def interpolation_floor(x: torch.Tensor, rep="voxels", *, group: str = "SO3", samples: Optional[int] = None,
                        seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                        mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                        backend: str = "auto"):
    """The decomposition of the identity model ``f(x) = x`` on ``x`` (target ``x``).

    The identity is exactly equivariant, so every bit of its ``L_equiv`` is resampling
    error: the corners that leave the grid and the blur of trilinear interpolation. Read a
    model's ``L_equiv`` on a grid against this floor, computed with the same ``group``,
    ``samples`` and ``seed`` (the same seed and batch size give the same rotations). It is
    0 for the cube groups, whose elements move voxels without interpolation.

    Args:
        x: ``(B, ..., C, n, n, n)``, the inputs (or outputs) of the model.
        rep: their voxel rep.
        group, samples, seed, generator, mask, chunk_size, backend: as in
            :func:`fastequiv.equivariance_error` (default 8 samples for SO(3)/O(3)).
    Returns:
        a :class:`fastequiv.Decomposition`; ``.equiv`` is the floor, ``.total`` the mean
        squared error of a round trip ``rho(g)^-1 rho(g) x`` against ``x``.
    """
    from .spec import Spec
    from .twirl import equivariance_error

    rep = as_voxels(rep)
    spec = Spec(inputs=rep, output=rep, group=group)
    return equivariance_error(lambda v: v, x, x, spec=spec, samples=samples, seed=seed, generator=generator,
                              mask=mask, chunk_size=chunk_size, backend=backend)
