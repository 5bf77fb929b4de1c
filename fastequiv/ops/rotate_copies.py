"""rotate_copies: K rotated copies of an input, stacked along dim 0.

Copy ``k`` of sample ``b`` is row ``k * B + b`` and is rotated by ``R[k, b]``; with the
Philox stream of :mod:`fastequiv.groups`, that is rotation number ``k * B + b``. In the
graph layout (``batch=``), copy ``k`` of node ``i`` is row ``k * N + i`` and is rotated by
``R[k, batch[i]]``.

In this file, side by side:

* :func:`rotate_rows_reference` / :func:`rotate_rows_backward_reference`: the pure-torch
  ground truth of the row kernels (contract: :mod:`fastequiv.ops.layout`);
* ``torch.ops.fastequiv.rotate_rows`` (+ ``rotate_rows_backward``): the same on a compiled
  backend, with its fake implementation and autograd formula;
* :func:`rotate_copies`: the public op; :func:`rotate_copies_reference`: its definition
  through ``Rep.act``, which the row path is tested against.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..backends import registry
from ..reps import Rep
from ..wigner import groups_inverse
from .action import Action, as_action
from .interop import accepts_arrays
from .layout import accumulate_dtype, by_sample, centroids, check_batch, group_rows, mask_for, per_irrep, rows_of, \
    sample_index, segment_outer, segment_sum, tile
from .voxels import rotate_copies as rotate_grids

__all__ = ["rotate_copies", "rotate_copies_reference", "rotate_rows_reference", "rotate_rows_backward_reference"]


# --- the reference of the row kernels ---------------------------------------------------------

def rotate_rows_reference(x: Tensor, M: Tensor, sample: Optional[Tensor], P: int, center: Optional[Tensor]) -> Tensor:
    """Reference of ``torch.ops.fastequiv.rotate_rows``: K rotated copies of the rows.

    Args:
        x: ``(N, d)`` rows, any float dtype.
        M: ``(K, B, d, d)`` in acc.
        sample, P: the sample of each row (see :mod:`fastequiv.ops.layout`).
        center: ``(B, d)`` in acc, or None.
    Returns:
        ``(K, N, d)`` in ``x.dtype``: ``out[k, r] = M[k, s] (x[r] - c[s]) + c[s]``, ``s = s(r)``.
    """
    K, N = M.shape[0], x.shape[0]
    xa = x.to(M.dtype)
    if center is not None:
        c = center[sample_index(N, P, sample, x.device)]
        xa = xa - c
    y = by_sample(M, xa.expand(K, N, x.shape[1]), sample, P, transpose=False)
    if center is not None:
        y = y + c
    return y.to(x.dtype).contiguous()


def rotate_rows_backward_reference(grad: Tensor, M: Tensor, sample: Optional[Tensor], P: int) -> Tensor:
    """Reference of ``torch.ops.fastequiv.rotate_rows_backward``: ``sum_k M[k, s]^T grad[k, r]``
    ``(N, d)`` in acc, the gradient of :func:`rotate_rows_reference` with respect to ``x``
    for a fixed centre (the autograd formula adds the centre's part)."""
    return by_sample(M, grad.to(M.dtype), sample, P, transpose=True).sum(0).contiguous()


registry.register("rotate_rows", "torch")(rotate_rows_reference)
registry.register("rotate_rows_backward", "torch")(rotate_rows_backward_reference)


# --- the op on compiled backends: torch.library registration ----------------------------------

@torch.library.custom_op("fastequiv::rotate_rows", mutates_args=())
def rotate_rows(x: Tensor, M: Tensor, sample: Optional[Tensor], P: int, center: Optional[Tensor],
                backend: str) -> Tensor:
    return registry.implementation("rotate_rows", backend)(x, M, sample, P, center)


@rotate_rows.register_fake
def _(x, M, sample, P, center, backend):
    return x.new_empty((M.shape[0],) + tuple(x.shape))


@torch.library.custom_op("fastequiv::rotate_rows_backward", mutates_args=())
def rotate_rows_backward(grad: Tensor, M: Tensor, sample: Optional[Tensor], P: int, backend: str) -> Tensor:
    return registry.implementation("rotate_rows_backward", backend)(grad, M, sample, P)


@rotate_rows_backward.register_fake
def _(grad, M, sample, P, backend):
    return grad.new_empty(tuple(grad.shape[1:]), dtype=M.dtype)


def _rotate_setup(ctx, inputs, output):
    x, M, sample, P, center, backend = inputs
    ctx.save_for_backward(M, sample, x, center)
    ctx.P, ctx.backend, ctx.x_dtype, ctx.has_center = P, backend, x.dtype, center is not None


def _rotate_backward(ctx, grad):
    M, sample, x, center = ctx.saved_tensors
    B = M.shape[1]
    gx = rotate_rows_backward(grad.contiguous(), M, sample, ctx.P, ctx.backend)
    gc = gM = None
    if ctx.has_center and ctx.needs_input_grad[4]:
        # out = M (x - c) + c: dc = sum over rows and copies of (g - M^T g)
        gc = segment_sum(grad.to(M.dtype).sum(0), sample, ctx.P, B) - segment_sum(gx, sample, ctx.P, B)
    if ctx.needs_input_grad[1]:
        # dL/dM[k, b] = sum over the sample's rows of g (x - c)^T
        u = x.to(M.dtype)
        if center is not None:
            u = u - center[sample_index(x.shape[0], ctx.P, sample, x.device)]
        gM = segment_outer(grad.to(M.dtype), u, sample, ctx.P, B)
    return gx.to(ctx.x_dtype), gM, None, None, gc, None


rotate_rows.register_autograd(_rotate_backward, setup_context=_rotate_setup)


# --- the public op ------------------------------------------------------------------------------

def rotate_copies_reference(x: Tensor, R: Tensor, rep: Rep, mask: Optional[Tensor]) -> Tensor:
    """The definition of :func:`rotate_copies` through ``Rep.act`` (dense layout): what the
    row path is tested against."""
    K, B = R.shape[:2]
    return rep.act(tile(x, K), R.reshape(K * B, 3, 3), mask=tile(mask, K))


@accepts_arrays
def rotate_copies(
    x: Tensor,
    R: Union[Tensor, Action],
    rep: Rep,
    mask: Optional[Tensor] = None,
    *,
    batch: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Stack ``rho(R[k, b]) x[b]`` for every copy ``k`` and sample ``b``.

    Args:
        x: ``(B, *inner, d)``, one sample per row; with ``batch``, ``(N, *inner, d)`` nodes.
        R: ``(K, B, 3, 3)``, the group element of each copy (float32 or float64: the math
            runs in ``R.dtype``), or an :class:`~fastequiv.ops.Action` holding it.
        rep: how ``x`` transforms (:class:`fastequiv.reps.Rep`).
        mask: optional bool ``(B, *inner)`` (``(N, *inner)`` with ``batch``); positions
            rotate about the centroid of their valid points.
        batch: optional int64 ``(N,)``, the sample of each node (graph layout).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``, ``"cupy"``.
            CuPy (or NumPy) arrays in any tensor argument are taken without a copy
            (DLPack) and the results come back as arrays of the same kind.
    Returns:
        ``(K * B, *inner, d)`` (``(K * N, *inner, d)``) in ``x.dtype``.
    """
    action = as_action(R, backend)
    R = action.R
    # the math runs in float32/float64 whatever autocast region the caller is in
    with torch.autocast(x.device.type, enabled=False):
        if R.dim() != 4 or R.shape[2:] != (3, 3):
            raise ValueError(f"R must have shape (K, B, 3, 3), got {tuple(R.shape)}")
        K, B = R.shape[:2]
        if batch is None and R.shape[1] != x.shape[0]:
            raise ValueError(f"R must have shape (K, B={x.shape[0]}, 3, 3), got {tuple(R.shape)}")
        check_batch(batch, x.shape[0], "x", B, values=False)
        if rep.kind == "voxels" and batch is None:
            return rotate_grids(x, R, rep, backend=backend)
        mask = mask_for(mask, x.shape, "x")
        rows = rows_of(x.shape, rep, mask, batch)
        if rows is None:
            raise ValueError(f"rep {rep} supports only the dense layout (batch=None)")
        name = registry.resolve_name("rotate_rows", backend, x.device)
        # the cpu kernels check the indices they read; positions' centroids read them first
        check_batch(batch, x.shape[0], "x", B, values=name != "cpu" or rep.kind == "position")
        if rep.kind == "scalar":
            return tile(x, K)
        acc = accumulate_dtype(x, R)
        xr = x.reshape(rows.N, rows.d)

        def run(rows_x, M, sample, P, center):
            args = (rows_x.contiguous(), M, sample, P, center)
            if name == "torch":
                return rotate_rows_reference(*args)
            try:
                if registry.direct(args[0], M, sample, center):
                    return registry.implementation("rotate_rows", name)(*args)
                return rotate_rows(*args, name)
            except ValueError:
                check_batch(batch, x.shape[0], "x", B)  # a kernel refused an index: say which, as `batch`
                raise

        if per_irrep(rep):
            out = _rotate_per_irrep(xr, rows, action.irrep_blocks(rep, acc), groups_inverse(rep.key, x.device), run, K)
        else:
            center = centroids(xr.to(acc), rows, B) if rep.kind == "position" else None
            out = run(xr, action.matrices(rep, acc), rows.sample, rows.P, center)
        return out.reshape((K * x.shape[0],) + tuple(x.shape[1:]))


def _rotate_per_irrep(xr: Tensor, rows, blocks: list, inverse, run, K: int) -> Tensor:
    """K copies of irreps rows, one ``(l, p)`` group at a time: each group's components are
    gathered into rows of ``2l + 1`` and rotated by that group's Wigner-D block only; the
    groups are concatenated and, unless already in order, put back in one gather."""
    parts = []
    for l, p, columns, M in blocks:
        n = 2 * l + 1
        g = group_rows(rows, columns, n)
        part = xr.index_select(1, columns).reshape(g.N, n)
        if l == 0 and p == 1:  # scalars: copies, no product
            moved = part.unsqueeze(0).expand(K, g.N, n)
        else:
            moved = run(part, M, g.sample, g.P, None)
        parts.append(moved.reshape(K, rows.N, columns.numel()))
    out = torch.cat(parts, dim=-1)
    return out if inverse is None else out.index_select(2, inverse)
