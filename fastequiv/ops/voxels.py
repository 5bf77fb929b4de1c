"""The voxel ops: K rotated copies of a batch of grids, and the fused back-resampling twirl
reduction, on any backend.

Conventions (axes, centre, channels, the exact cube path and the trilinear path) are in
:mod:`fastequiv.voxels`. In this file, side by side:

* the references, :func:`fastequiv.grid.resample` and :func:`fastequiv.grid.reduce`
  (pure torch, differentiable), registered as the ``"torch"`` backend;
* ``torch.ops.fastequiv.voxels_resample`` and ``torch.ops.fastequiv.voxels_reduce``: the
  same on a compiled backend (the Triton kernels of ``kernels/voxels.py``; for
  ``voxels_resample`` also the C++ cube copies of the cpu backend), with fake
  implementations and autograd formulas that differentiate the reference (the kernels
  have no backward of their own);
* the public functions :func:`rotate`, :func:`rotate_copies` and :func:`twirl_reduce`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import grid
from ..backends import registry
from ..reps import Voxels, as_rep
from .layout import TwirlSums, accumulate_dtype, mask_for, valid_count

__all__ = ["rotate", "rotate_copies", "twirl_reduce", "as_voxels"]

registry.register("voxels_resample", "torch")(grid.resample)
registry.register("voxels_reduce", "torch")(grid.reduce)


# --- the op on compiled backends: torch.library registration ----------------------------------

@torch.library.custom_op("fastequiv::voxels_resample", mutates_args=())
def voxels_resample(x: Tensor, M: Tensor, vec: Tensor, exact: bool, backend: str) -> Tensor:
    return registry.implementation("voxels_resample", backend)(x, M, vec, exact)


@voxels_resample.register_fake
def _(x, M, vec, exact, backend):
    return x.new_empty((M.shape[0],) + tuple(x.shape[1:]))


def _resample_setup(ctx, inputs, output):
    x, M, vec, exact, backend = inputs
    ctx.save_for_backward(M, vec)
    ctx.exact, ctx.x_shape, ctx.x_dtype = exact, x.shape, x.dtype


def _resample_backward(ctx, grad):
    M, vec = ctx.saved_tensors
    with torch.enable_grad():
        x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=grad.device, requires_grad=True)
        (gx,) = torch.autograd.grad(grid.resample(x, M, vec, ctx.exact), x, grad)
    return gx, None, None, None, None


voxels_resample.register_autograd(_resample_backward, setup_context=_resample_setup)


@torch.library.custom_op("fastequiv::voxels_reduce", mutates_args=())
def voxels_reduce(out: Tensor, M: Tensor, y: Tensor, w: Optional[Tensor], vec: Tensor, exact: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    return registry.implementation("voxels_reduce", backend)(out, M, y, w, vec, exact)


@voxels_reduce.register_fake
def _(out, M, y, w, vec, exact, backend):
    B, Cp, n = out.shape[1], out.shape[2], out.shape[-1]
    return out.new_empty((B, Cp, n ** 3), dtype=M.dtype), out.new_empty((3, B), dtype=M.dtype)


def _reduce_setup(ctx, inputs, output):
    out, M, y, w, vec, exact, backend = inputs
    ctx.save_for_backward(out, M, y, w, vec)
    ctx.exact = exact


def _reduce_backward(ctx, grad_mean, grad_sums):
    out, M, y, w, vec = ctx.saved_tensors
    with torch.enable_grad():
        o, t = out.detach().requires_grad_(), y.detach().requires_grad_()
        mean, sums = grid.reduce(o, M, t, w, vec, ctx.exact)
        go, gy = torch.autograd.grad((mean, sums), (o, t), (grad_mean, grad_sums), allow_unused=True)
    return go, None, gy, None, None, None, None


voxels_reduce.register_autograd(_reduce_backward, setup_context=_reduce_setup)


def _resample(x, M, vec, exact, backend):
    name = registry.resolve_name("voxels_resample", backend, x.device)
    if name == "torch":
        return grid.resample(x, M, vec, exact)
    if registry.direct(x, M, vec):
        return registry.implementation("voxels_resample", name)(x, M, vec, exact)
    return voxels_resample(x, M, vec, exact, name)


# --- public functions ---------------------------------------------------------------------------

def as_voxels(rep) -> Voxels:
    """``rep`` parsed as a voxel rep, or a ValueError."""
    rep = as_rep(rep, "rep")
    if not isinstance(rep, Voxels):
        raise ValueError(f"rep must be a voxel rep ('voxels' or fe.Voxels(...)), got {rep}")
    return rep


def _check_R(R: Tensor, shape: tuple, name: str = "R") -> None:
    if not isinstance(R, torch.Tensor) or tuple(R.shape) != tuple(shape) or not R.is_floating_point():
        got = f"{R.dtype} tensor of shape {tuple(R.shape)}" if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"{name} must be a floating tensor of shape {tuple(shape)}, got {got}")


def rotate(x: Tensor, R: Tensor, rep="voxels", *, inverse: bool = False, backend: str = "auto") -> Tensor:
    """``rho(R[b]) x[b]`` for every sample (``rho(R[b])^-1`` with ``inverse``).

    Args:
        x: ``(N, ..., C, n, n, n)``.
        R: ``(N, 3, 3)`` orthogonal; exact index gathers when every ``R`` is a symmetry of
            the cube, trilinear resampling otherwise (see :mod:`fastequiv.voxels`).
        rep: a voxel rep (``"voxels"``, :class:`~fastequiv.Voxels`).
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.
    Returns:
        ``(N, ..., C, n, n, n)`` in ``x.dtype``.
    """
    rep = as_voxels(rep)
    rep.check(x, "x")
    _check_R(R, (x.shape[0], 3, 3))
    lead, C, n = grid.grid_shape(x.shape)
    M = R.to(accumulate_dtype(x, R))
    M = (M.transpose(-1, -2) if inverse else M).contiguous()
    vec = rep.vector_starts(lead, C, x.device)
    out = _resample(x.reshape(x.shape[0], lead * C, n, n, n).contiguous(), M, vec, grid.is_cube_element(R), backend)
    return out.reshape(x.shape)


def rotate_copies(x: Tensor, R: Tensor, rep="voxels", *, backend: str = "auto") -> Tensor:
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
    lead, C, n = grid.grid_shape(x.shape)
    M = R.to(accumulate_dtype(x, R)).reshape(K * B, 3, 3).contiguous()
    vec = rep.vector_starts(lead, C, x.device)
    out = _resample(x.reshape(B, lead * C, n, n, n).contiguous(), M, vec, grid.is_cube_element(R), backend)
    return out.reshape((K * B,) + tuple(x.shape[1:]))


def twirl_reduce(out: Tensor, R: Tensor, target: Tensor, rep="voxels", mask: Optional[Tensor] = None, *,
                 backend: str = "auto") -> TwirlSums:
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
    lead, C, n = grid.grid_shape(target.shape)
    acc = accumulate_dtype(out, target)
    M = R.to(acc).transpose(-1, -2).contiguous()  # the inverse action
    Cp = lead * C
    w = None if m is None else m.expand(target.shape).reshape(B, Cp, n ** 3).to(acc).contiguous()
    vec = rep.vector_starts(lead, C, out.device)
    name = registry.resolve_name("voxels_reduce", backend, out.device)
    args = (out.reshape(K, B, Cp, n, n, n).contiguous(), M, target.reshape(B, Cp, n, n, n).contiguous(), w, vec,
            grid.is_cube_element(R))
    mean, sums = grid.reduce(*args) if name == "torch" else voxels_reduce(*args, name)
    count = valid_count(target, m, acc)
    k = count.clamp_min(1)
    return TwirlSums(mean.reshape(target.shape), sums[0] / k, sums[1] / k, sums[2] / k, count)
