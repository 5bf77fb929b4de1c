"""The one place where fastequiv's kernels become torch ops.

Every compiled backend ("triton", "cpu", "cuda", "cupy") implements the row-level contract
of :mod:`fastequiv.ops._rows` and registers it with :mod:`fastequiv._backend`. This module
wraps each contract function in a ``torch.library`` custom op (namespace ``fastequiv``)
that takes the backend's name as its last argument, with

* a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it;
* an autograd formula that calls the backward kernel of the same backend, so the
  gradient of ``fe.twirl_loss`` runs the fused backward.

The ``"torch"`` backend never goes through these ops: the public ops call the
:mod:`~fastequiv.ops._rows` functions directly and autograd differentiates them, which
keeps the reference independent of the kernels it checks.

Nothing here syncs with the host: the Philox seed is an int64 0-dim tensor that the
kernels read where it lives, so a captured CUDA graph replays with whatever seed the
tensor holds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _rows

_ROW_OPS = ("rotate_rows", "rotate_rows_backward", "reduce_rows", "reduce_rows_backward",
            "random_rotations_seeded", "wigner_blocks")

for _name in _ROW_OPS:
    _backend.register(_name, "torch")(getattr(_rows, _name))


def _impl(name: str, backend: str, device: torch.device):
    return _backend.resolve(name, backend, device)[1]


# --- rotate_rows ---------------------------------------------------------------------------

@torch.library.custom_op("fastequiv::rotate_rows", mutates_args=())
def rotate_rows(x: Tensor, M: Tensor, sample: Optional[Tensor], P: int, center: Optional[Tensor],
                backend: str) -> Tensor:
    return _impl("rotate_rows", backend, x.device)(x, M, sample, P, center)


@rotate_rows.register_fake
def _(x, M, sample, P, center, backend):
    return x.new_empty((M.shape[0],) + tuple(x.shape))


@torch.library.custom_op("fastequiv::rotate_rows_backward", mutates_args=())
def rotate_rows_backward(grad: Tensor, M: Tensor, sample: Optional[Tensor], P: int, backend: str) -> Tensor:
    return _impl("rotate_rows_backward", backend, grad.device)(grad, M, sample, P)


@rotate_rows_backward.register_fake
def _(grad, M, sample, P, backend):
    return grad.new_empty(tuple(grad.shape[1:]), dtype=M.dtype)


def _rotate_setup(ctx, inputs, output):
    x, M, sample, P, center, backend = inputs
    ctx.save_for_backward(M, sample)
    ctx.P, ctx.backend, ctx.x_dtype, ctx.has_center = P, backend, x.dtype, center is not None


def _rotate_backward(ctx, grad):
    M, sample = ctx.saved_tensors
    B = M.shape[1]
    gx = rotate_rows_backward(grad.contiguous(), M, sample, ctx.P, ctx.backend)
    gc = None
    if ctx.has_center and ctx.needs_input_grad[4]:
        # out = M (x - c) + c: dc = sum over rows and copies of (g - M^T g)
        gc = _rows.segment_sum(grad.to(M.dtype).sum(0), sample, ctx.P, B) - _rows.segment_sum(gx, sample, ctx.P, B)
    return gx.to(ctx.x_dtype), None, None, None, gc, None


rotate_rows.register_autograd(_rotate_backward, setup_context=_rotate_setup)


# --- reduce_rows ---------------------------------------------------------------------------

@torch.library.custom_op("fastequiv::reduce_rows", mutates_args=())
def reduce_rows(out: Tensor, M: Tensor, target: Tensor, sample: Optional[Tensor], P: int, valid: Optional[Tensor],
                center: Optional[Tensor], B: int, backend: str) -> tuple[Tensor, Tensor]:
    return _impl("reduce_rows", backend, out.device)(out, M, target, sample, P, valid, center, B)


@reduce_rows.register_fake
def _(out, M, target, sample, P, valid, center, B, backend):
    return out.new_empty(tuple(out.shape[1:]), dtype=M.dtype), out.new_empty((3, B), dtype=M.dtype)


@torch.library.custom_op("fastequiv::reduce_rows_backward", mutates_args=())
def reduce_rows_backward(grad_mean: Optional[Tensor], grad_sums: Tensor, out: Tensor, M: Tensor, target: Tensor,
                         sample: Optional[Tensor], P: int, valid: Optional[Tensor], center: Optional[Tensor],
                         mean: Tensor, backend: str) -> Tensor:
    return _impl("reduce_rows_backward", backend, out.device)(
        grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean)


@reduce_rows_backward.register_fake
def _(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, backend):
    return torch.empty_like(out)


def _reduce_setup(ctx, inputs, output):
    out, M, target, sample, P, valid, center, B, backend = inputs
    ctx.save_for_backward(out, M, target, sample, valid, center, output[0])
    ctx.P, ctx.backend = P, backend
    ctx.target_dtype = target.dtype


def _reduce_backward(ctx, grad_mean, grad_sums):
    out, M, target, sample, valid, center, mean = ctx.saved_tensors
    B = M.shape[1]
    if grad_sums is None:
        grad_sums = M.new_zeros(3, B)
    grad_out = reduce_rows_backward(grad_mean, grad_sums.contiguous(), out, M, target, sample, ctx.P, valid,
                                    center, mean, ctx.backend)
    acc = M.dtype
    grad_target = grad_center = None
    if ctx.needs_input_grad[2]:
        s = _rows.sample_index(out.shape[1], ctx.P, sample, out.device)
        g = grad_sums.to(acc)[:, s]
        if valid is not None:
            g = g * valid.to(acc)
        # total and bias are the only sums that see y: d/dy = -2 (g_total + g_bias) (abar - y)
        grad_target = (-2.0 * (g[0] + g[1])[:, None] * (mean - target.to(acc))).to(ctx.target_dtype)
    if center is not None and ctx.needs_input_grad[6]:
        # a = M^T (o - c) + c: dc = sum over rows of (I - M^T) dL/da, and dL/do = M dL/da
        S = _rows.segment_sum(grad_out.to(acc), sample, ctx.P, B)
        grad_center = torch.einsum("kbji,kbj->kbi", M, S) - S
    return grad_out, None, grad_target, None, None, None, grad_center, None, None


reduce_rows.register_autograd(_reduce_backward, setup_context=_reduce_setup)


# --- sampling and Wigner-D (no gradients: rotations are not differentiated) --------------------

@torch.library.custom_op("fastequiv::random_rotations_seeded", mutates_args=())
def random_rotations_seeded(seed: Tensor, n: int, offset: int, improper: bool, dtype: torch.dtype,
                            backend: str) -> Tensor:
    return _impl("random_rotations_seeded", backend, seed.device)(seed, n, offset, improper, dtype)


@random_rotations_seeded.register_fake
def _(seed, n, offset, improper, dtype, backend):
    return seed.new_empty((n, 3, 3), dtype=dtype)


@torch.library.custom_op("fastequiv::wigner_blocks", mutates_args=())
def wigner_blocks(R: Tensor, lmax: int, backend: str) -> Tensor:
    return _impl("wigner_blocks", backend, R.device)(R, lmax)


@wigner_blocks.register_fake
def _(R, lmax, backend):
    return R.new_empty((R.shape[0], sum((2 * l + 1) ** 2 for l in range(lmax + 1))))


OPS = {
    "rotate_rows": rotate_rows,
    "rotate_rows_backward": rotate_rows_backward,
    "reduce_rows": reduce_rows,
    "reduce_rows_backward": reduce_rows_backward,
    "random_rotations_seeded": random_rotations_seeded,
    "wigner_blocks": wigner_blocks,
}


def call(name: str, backend: str, device, *args):
    """Run row op ``name`` on ``backend`` (``"auto"`` resolved for ``device``).

    The torch reference is called directly (native autograd); every other backend goes
    through its ``torch.library`` op.
    """
    resolved, impl = _backend.resolve(name, backend, device)
    if resolved == "torch":
        return impl(*args)
    return OPS[name](*args, resolved)
