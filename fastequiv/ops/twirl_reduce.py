"""twirl_reduce: back-rotate K stacked outputs, twirl them and form the decomposition sums.

Accumulates in float32 (float64 for float64 inputs), so bf16 and fp16 outputs lose
nothing in the sums. In this file, side by side:

* :func:`reduce_rows_reference` / :func:`reduce_rows_backward_reference`: the pure-torch
  ground truth of the row kernels (contract: :mod:`fastequiv.ops.layout`);
* ``torch.ops.fastequiv.reduce_rows`` (+ ``reduce_rows_backward``): the same on a compiled
  backend, with its fake implementation and autograd formula (the fused backward);
* :func:`twirl_reduce`: the public op; :func:`twirl_reduce_reference`: its definition
  through ``Rep.act``, which the row path is tested against.

Every sum over copies may be weighted (``weights``, a rotation design's ``w_k`` in place of
``1/K``) on the backends of :data:`WEIGHTED_BACKENDS`; the others refuse weights by name.
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
from .layout import TwirlSums, accumulate_dtype, by_sample, centroids, check_batch, group_rows, mask_for, per_irrep, \
    per_sample_sum, rows_of, sample_index, segment_outer, segment_sum, tile, valid_count
from .voxels import twirl_reduce as reduce_grids

__all__ = ["TwirlSums", "WEIGHTED_BACKENDS", "twirl_reduce", "twirl_reduce_reference", "back_rotate",
           "reduce_rows_reference", "reduce_rows_backward_reference"]


# --- the reference of the row kernels ---------------------------------------------------------

def back_rotated(out, M, sample, P, center):
    """``a_k = M[k, s]^T (out[k, r] - c[k, s]) + c[k, s]`` in acc ``(K, N, d)``."""
    o = out.to(M.dtype)
    if center is not None:
        c = center[:, sample_index(out.shape[1], P, sample, out.device)]
        o = o - c
    a = by_sample(M, o, sample, P, transpose=True)
    return a + c if center is not None else a


def reduce_rows_reference(out: torch.Tensor, M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                valid: Optional[torch.Tensor], center: Optional[torch.Tensor], B: int,
                weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.fastequiv.reduce_rows``: back-rotate K copies of the outputs
    and form the per-sample decomposition sums.

    Args:
        out: ``(K, N, d)`` the model's outputs on the copies, any float dtype.
        M: ``(K, B, d, d)`` in acc.
        target: ``(N, d)`` in the frame of the unrotated input, any float dtype.
        sample, P: the sample of each row.
        valid: ``(N,)`` bool, or None (every row valid). Invalid rows add nothing to the sums.
        center: ``(K, B, d)`` in acc, the centroid of each copy's output, or None.
        B: number of samples.
        weights: ``(K,)`` in acc, the weight ``w_k`` of each copy, or None (``1/K`` each).
    Returns:
        ``mean`` ``(N, d)`` in acc, ``abar = (1/K) sum_k a_k`` with
        ``a_k = M[k, s]^T (out[k, r] - c[k, s]) + c[k, s]``, for every row (valid or not); and
        ``sums`` ``(3, B)`` in acc, summed over the valid rows of each sample and their
        ``d`` components: ``(1/K) sum_k |a_k - y|^2``, ``|abar - y|^2`` and
        ``(1/K) sum_k |a_k - abar|^2`` (total, bias, spread; not yet divided by the count).
        The spread is formed from the deviations ``a_k - abar``, never as a difference of
        large sums, so it has no cancellation. With ``weights``, every ``(1/K) sum_k`` is
        ``sum_k w_k``.
    """
    acc = M.dtype
    a = back_rotated(out, M, sample, P, center)
    y = target.to(acc)
    if weights is None:
        abar = a.mean(dim=0)
        per_row = torch.stack([
            ((a - y) ** 2).sum(-1).mean(0),
            ((abar - y) ** 2).sum(-1),
            ((a - abar) ** 2).sum(-1).mean(0),
        ])
    else:
        w = weights.to(acc)
        abar = torch.einsum("k,knd->nd", w, a)
        per_row = torch.stack([
            torch.einsum("k,kn->n", w, ((a - y) ** 2).sum(-1)),
            ((abar - y) ** 2).sum(-1),
            torch.einsum("k,kn->n", w, ((a - abar) ** 2).sum(-1)),
        ])
    if valid is not None:  # selected, not multiplied: masked-out outputs may be inf
        per_row = torch.where(valid, per_row, torch.zeros((), dtype=acc, device=per_row.device))
    return abar.contiguous(), segment_sum(per_row.t(), sample, P, B).t().contiguous()


def reduce_rows_backward_reference(grad_mean: Optional[torch.Tensor], grad_sums: torch.Tensor, out: torch.Tensor,
                         M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                         valid: Optional[torch.Tensor], center: Optional[torch.Tensor], mean: torch.Tensor,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``torch.ops.fastequiv.reduce_rows_backward``: the gradient of
    :func:`reduce_rows_reference` with respect to ``out`` for fixed centres.

    With ``g = grad_sums[:, s]`` (zero on invalid rows) and ``abar = mean``::

        dL/da_k = (2/K) (g_total (a_k - y) + g_bias (abar - y) + g_spread (a_k - abar))
                  + grad_mean / K
        dL/dout[k, r] = M[k, s] dL/da_k

    (the spread term needs no correction because ``sum_k (a_k - abar) = 0``). With
    ``weights`` (sum ``S``), ``1/K`` is ``w_k`` and the spread term is
    ``g_spread (a_k - abar - (1 - S) abar)``, since ``sum_k w_k (a_k - abar) = (1 - S) abar``
    (zero for weights that sum to one).

    Args:
        grad_mean: ``(N, d)`` or None; grad_sums: ``(3, B)``; the rest as in
            :func:`reduce_rows_reference`, ``mean`` being its output.
    Returns:
        ``(K, N, d)`` in ``out.dtype``.
    """
    ga = grad_of_copies(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, weights)
    return by_sample(M, ga, sample, P, transpose=False).to(out.dtype).contiguous()


def grad_of_copies(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, weights=None) -> torch.Tensor:
    """``dL/da_k`` ``(K, N, d)`` in acc for the back-rotated copies ``a_k`` (see
    :func:`reduce_rows_backward_reference`); zero on invalid rows but for ``grad_mean``."""
    K, N = out.shape[:2]
    acc = M.dtype
    a = back_rotated(out, M, sample, P, center)
    y = target.to(acc)
    g = grad_sums.to(acc)[:, sample_index(N, P, sample, out.device)]
    if weights is None:
        ga = (2.0 / K) * (g[0, :, None] * (a - y) + g[1, :, None] * (mean - y) + g[2, :, None] * (a - mean))
    else:
        w = weights.to(acc)[:, None, None]
        spread = a - mean - (1 - weights.to(acc).sum()) * mean
        ga = (2.0 * w) * (g[0, :, None] * (a - y) + g[1, :, None] * (mean - y) + g[2, :, None] * spread)
    if valid is not None:  # invalid rows get no gradient from the sums, whatever they hold
        ga = torch.where(valid[:, None], ga, torch.zeros((), dtype=acc, device=ga.device))
    if grad_mean is not None:
        gm = grad_mean.to(acc)
        ga = ga + (gm / K if weights is None else weights.to(acc)[:, None, None] * gm)
    return ga


registry.register("reduce_rows", "torch")(reduce_rows_reference)
registry.register("reduce_rows_backward", "torch")(reduce_rows_backward_reference)


# --- determinism ------------------------------------------------------------------------------

def atomic_sums(backend: str, graph: bool) -> bool:
    """Whether ``backend``'s ``reduce_rows`` adds its per-sample sums with atomics, in an
    order that changes from run to run (so the sums' rounding does too): the CUDA kernel
    (and CuPy's, the same source) whenever a sample spans blocks or a block spans samples;
    Triton's in the graph layout (its dense layout sums fixed chunks). The torch reference
    and the C++ kernels (fixed per-thread partial sums) are deterministic."""
    return backend in ("cuda", "cupy") or (backend == "triton" and graph)


def reduction_backend(name: str, requested: str, graph: bool, deterministic: bool) -> str:
    """The backend that runs ``reduce_rows``: ``name`` (resolved from ``requested``), unless
    ``torch.use_deterministic_algorithms(True)`` is on (``deterministic``) and ``name`` adds
    with atomics: then ``"auto"`` takes the deterministic torch reference and a backend asked
    for by name raises."""
    if not deterministic or not atomic_sums(name, graph):
        return name
    if requested == "auto":
        return "torch"
    layout = "graph" if graph else "dense"
    raise RuntimeError(
        f"backend={requested!r} adds twirl_reduce's per-sample sums with atomics on the GPU ({layout} layout), "
        "so they may differ between runs by rounding, and torch.use_deterministic_algorithms(True) is set: pass "
        "backend='torch' (deterministic) or backend='auto' (which then takes it)")


@torch.compiler.assume_constant_result
def deterministic_algorithms() -> bool:
    """``torch.are_deterministic_algorithms_enabled()``, read once per call (a constant to ``torch.compile``)."""
    return torch.are_deterministic_algorithms_enabled()


# --- reduce_rows ---------------------------------------------------------------------------

WEIGHTED_BACKENDS = ("torch", "cpu", "triton", "cuda", "cupy")
"""The backends whose row kernels take the copies' ``weights``; the others raise for them."""


def weighted_backend(name: str, requested: str, weights: Optional[Tensor]) -> str:
    """The backend that runs ``reduce_rows`` with ``weights``: ``name`` when it takes weights
    (or there are none), the torch reference when ``requested`` is ``"auto"``; a backend asked
    for by name that cannot take them raises :class:`~fastequiv.BackendUnavailableError`."""
    if weights is None or name in WEIGHTED_BACKENDS:
        return name
    if requested == "auto":
        return "torch"
    raise registry.BackendUnavailableError(
        f"backend={requested!r} cannot run twirl_reduce with weights: its reduce_rows kernels average the copies "
        f"uniformly (backends that take weights: {list(WEIGHTED_BACKENDS)}); pass backend='auto' or 'torch'")


@torch.library.custom_op("fastequiv::reduce_rows", mutates_args=())
def reduce_rows(out: Tensor, M: Tensor, target: Tensor, sample: Optional[Tensor], P: int, valid: Optional[Tensor],
                center: Optional[Tensor], B: int, backend: str, weights: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
    impl = registry.implementation("reduce_rows", backend)
    if weights is None:
        return impl(out, M, target, sample, P, valid, center, B)
    weighted_backend(backend, backend, weights)
    return impl(out, M, target, sample, P, valid, center, B, weights)


@reduce_rows.register_fake
def _(out, M, target, sample, P, valid, center, B, backend, weights=None):
    return out.new_empty(tuple(out.shape[1:]), dtype=M.dtype), out.new_empty((3, B), dtype=M.dtype)


@torch.library.custom_op("fastequiv::reduce_rows_backward", mutates_args=())
def reduce_rows_backward(grad_mean: Optional[Tensor], grad_sums: Tensor, out: Tensor, M: Tensor, target: Tensor,
                         sample: Optional[Tensor], P: int, valid: Optional[Tensor], center: Optional[Tensor],
                         mean: Tensor, backend: str, weights: Optional[Tensor] = None) -> Tensor:
    impl = registry.implementation("reduce_rows_backward", backend)
    if weights is None:
        return impl(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean)
    weighted_backend(backend, backend, weights)
    return impl(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, weights)


@reduce_rows_backward.register_fake
def _(grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, backend, weights=None):
    return torch.empty_like(out)


def _reduce_setup(ctx, inputs, output):
    out, M, target, sample, P, valid, center, B, backend, weights = inputs
    ctx.save_for_backward(out, M, target, sample, valid, center, output[0], weights)
    ctx.P, ctx.backend = P, backend
    ctx.target_dtype = target.dtype


def _reduce_backward(ctx, grad_mean, grad_sums):
    out, M, target, sample, valid, center, mean, weights = ctx.saved_tensors
    B = M.shape[1]
    if grad_sums is None:
        grad_sums = M.new_zeros(3, B)
    grad_out = reduce_rows_backward(grad_mean, grad_sums.contiguous(), out, M, target, sample, ctx.P, valid,
                                    center, mean, ctx.backend, weights)
    acc = M.dtype
    grad_target = grad_center = grad_M = None
    if ctx.needs_input_grad[2]:
        s = sample_index(out.shape[1], ctx.P, sample, out.device)
        g = grad_sums.to(acc)[:, s]
        y = target.to(acc)
        # total and bias are the only sums that see y: d/dy = -2 (g_total + g_bias) (abar - y)
        # (with weights summing to S, the total's is -2 g_total (abar - S y))
        if weights is None:
            gy = -2.0 * (g[0] + g[1])[:, None] * (mean - y)
        else:
            gy = -2.0 * (g[0, :, None] * (mean - weights.to(acc).sum() * y) + g[1, :, None] * (mean - y))
        if valid is not None:
            gy = torch.where(valid[:, None], gy, torch.zeros((), dtype=acc, device=gy.device))
        grad_target = gy.to(ctx.target_dtype)
    if ctx.needs_input_grad[1]:
        # a_k = M^T (o_k - c_k) + c_k: dL/dM[k, b] = sum over the sample's rows of (o - c) dL/da^T
        u = out.to(acc)
        if center is not None:
            u = u - center[:, sample_index(out.shape[1], ctx.P, sample, out.device)]
        # the sums see only valid rows (whatever the others hold); the mean sees every row
        ga = grad_of_copies(None, grad_sums, out, M, target, sample, ctx.P, valid, center, mean, weights)
        uv = u if valid is None else torch.where(valid[:, None], u, torch.zeros((), dtype=acc, device=u.device))
        grad_M = segment_outer(uv, ga, sample, ctx.P, B)
        if grad_mean is not None:
            gm = grad_mean.to(acc).expand_as(u)
            gm = gm / u.shape[0] if weights is None else weights.to(acc)[:, None, None] * gm
            grad_M = grad_M + segment_outer(u, gm, sample, ctx.P, B)
    if center is not None and ctx.needs_input_grad[6]:
        # a = M^T (o - c) + c: dc = sum over rows of (I - M^T) dL/da, and dL/do = M dL/da
        S = segment_sum(grad_out.to(acc), sample, ctx.P, B)
        grad_center = torch.einsum("kbji,kbj->kbi", M, S) - S
    return grad_out, grad_M, grad_target, None, None, None, grad_center, None, None, None


reduce_rows.register_autograd(_reduce_backward, setup_context=_reduce_setup)


# --- the public op ------------------------------------------------------------------------------

def checked_weights(weights, K: int, acc: torch.dtype, device) -> Tensor:
    """``weights`` as a ``(K,)`` tensor in ``acc`` on ``device``; a ValueError naming what it
    got otherwise."""
    if not isinstance(weights, Tensor) or weights.shape != (K,) or not weights.is_floating_point():
        got = f"shape {tuple(weights.shape)}, dtype {weights.dtype}" if isinstance(weights, Tensor) \
            else type(weights).__name__
        raise ValueError(f"weights must be a float tensor of shape (K,) = ({K},), one weight per copy, got {got}")
    if weights.requires_grad:
        raise ValueError("weights require grad, but twirl_reduce treats them as constants (pass weights.detach())")
    return weights.to(device=device, dtype=acc)


def _reduce_per_irrep(o: Tensor, y: Tensor, rows, blocks: list, inverse, run):
    """:func:`reduce_rows_reference`'s ``(mean, sums)`` for irreps rows, one ``(l, p)`` group
    at a time (each back-rotated by its own Wigner-D block; the sums add up)."""
    K = o.shape[0]
    means, sums = [], 0
    for l, p, columns, M in blocks:
        n = 2 * l + 1
        g = group_rows(rows, columns, n)
        m_part, s_part = run(o.index_select(2, columns).reshape(K, g.N, n), M,
                             y.index_select(1, columns).reshape(g.N, n), g, None)
        means.append(m_part.reshape(rows.N, columns.numel()))
        sums = sums + s_part
    mean = torch.cat(means, dim=-1)
    return (mean if inverse is None else mean.index_select(1, inverse)), sums


def back_rotate(out: Tensor, R: Union[Tensor, Action], rep: Rep, mask: Optional[Tensor], dtype: torch.dtype,
                backend: str = "auto") -> Tensor:
    """``a_k = rho(R[k, b])^-1 out[k, b]`` in ``dtype``: ``(K, B, *E)`` (dense layout).

    ``R`` is ``(K, B, 3, 3)`` or an :class:`~fastequiv.ops.Action`, whose matrices (built
    on its backend) are reused."""
    action = as_action(R, backend)
    K, B = out.shape[:2]
    flat = out.reshape((K * B,) + tuple(out.shape[2:])).to(dtype)
    Rd = action.rotations(dtype).reshape(K * B, 3, 3)
    with torch.autocast(out.device.type, enabled=False):
        M = None
        if rep.kind not in ("scalar", "voxels"):
            M = action.matrices(rep, dtype)
            M = M.reshape((K * B,) + tuple(M.shape[2:]))
        a = rep.act(flat, Rd, mask=tile(mask, K), inverse=True, M=M)
    return a.reshape(out.shape)


def twirl_reduce_reference(out, R, target, rep, mask, weights=None) -> TwirlSums:
    """The definition of :func:`twirl_reduce` through ``Rep.act`` (dense layout): what the
    row path is tested against. ``weights`` ``(K,)``: each copy's weight (None: ``1/K``)."""
    acc = accumulate_dtype(out, target)
    a = back_rotate(out, R, rep, mask, acc)
    y = target.to(acc)
    if weights is None:
        def over_copies(x):
            return x.mean(dim=0)
    else:
        w = weights.to(device=a.device, dtype=acc).reshape((-1,) + (1,) * (a.dim() - 1))

        def over_copies(x):
            return (w * x).sum(dim=0)
    abar = over_copies(a)

    count = valid_count(y, mask, acc)
    n = count.clamp_min(1)
    total = per_sample_sum(over_copies((a - y) ** 2), mask) / n
    bias = per_sample_sum((abar - y) ** 2, mask) / n
    spread = per_sample_sum(over_copies((a - abar) ** 2), mask) / n
    return TwirlSums(abar, total, bias, spread, count)


@accepts_arrays
def twirl_reduce(
    out: Tensor,
    R: Union[Tensor, Action],
    target: Tensor,
    rep: Rep,
    mask: Optional[Tensor] = None,
    *,
    batch: Optional[Tensor] = None,
    backend: str = "auto",
    weights: Optional[Tensor] = None,
) -> TwirlSums:
    """Back-rotate and reduce K stacked outputs against the target (see :class:`TwirlSums`).

    One pass over ``out`` on the compiled backends; differentiable with respect to ``out``
    and ``target`` (the compiled backends run a fused backward kernel).

    Args:
        out: ``(K, B, *E)``, the model's outputs for the rotated copies; with ``batch``,
            ``(K, N, *E)`` node outputs.
        R: ``(K, B, 3, 3)``, the group element of each copy, or an
            :class:`~fastequiv.ops.Action` holding it.
        target: ``(B, *E)`` (``(N, *E)``), given in the frame of the unrotated input.
        rep: how the output transforms.
        mask: optional bool ``(B, *inner)`` (``(N, *inner)``), a prefix of the target's shape.
        batch: optional int64 ``(N,)``, the sample of each node (graph layout).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``, ``"cupy"``.
            CuPy (or NumPy) arrays in any tensor argument are taken without a copy
            (DLPack) and the results come back as arrays of the same kind. Under
            ``torch.use_deterministic_algorithms(True)``, ``"auto"`` avoids the reductions
            that add with atomics (:func:`atomic_sums`) and asking for one raises.
        weights: optional ``(K,)``, the weight ``w_k`` of each copy (a rotation design's,
            summing to one), or None (``1/K`` each): then ``twirled = sum_k w_k a_k``,
            ``total`` and ``spread`` are ``sum_k w_k`` of the squared deviations. Constants
            (not differentiated). Backends whose kernels cannot take them
            (:data:`WEIGHTED_BACKENDS`) raise :class:`~fastequiv.BackendUnavailableError`;
            ``"auto"`` picks one that can.
    """
    action = as_action(R, backend)
    R = action.R
    # the math runs in float32/float64 whatever autocast region the caller is in
    with torch.autocast(out.device.type, enabled=False):
        if out.dim() < 2 or R.dim() != 4 or R.shape[2:] != (3, 3) or R.shape[0] != out.shape[0] \
                or (batch is None and R.shape[1] != out.shape[1]):
            want = (out.shape[0], "B") if batch is not None else tuple(out.shape[:2])
            raise ValueError(f"R must have shape (K, B, 3, 3) = {want + (3, 3)}, got {tuple(R.shape)}")
        if target.shape != out.shape[1:]:
            raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(out.shape[1:])} "
                             "(the output per copy)")
        K, B = R.shape[:2]
        check_batch(batch, target.shape[0], "target", B, values=False)
        if weights is not None:
            weights = checked_weights(weights, K, accumulate_dtype(out, target), out.device)
        if rep.kind == "voxels" and batch is None:
            if weights is not None:
                raise ValueError("weights with rep 'voxels': the grids' reduction averages its copies uniformly "
                                 "(pass weights=None)")
            return reduce_grids(out, R, target, rep, mask, backend=backend)
        mask = mask_for(mask, target.shape, "target")
        rows = rows_of(target.shape, rep, mask, batch)
        if rows is None:
            raise ValueError(f"rep {rep} supports only the dense layout (batch=None)")
        acc = accumulate_dtype(out, target)
        o = out.reshape(K, rows.N, rows.d)
        y = target.reshape(rows.N, rows.d)
        name = reduction_backend(registry.resolve_name("reduce_rows", backend, out.device), backend,
                                 rows.sample is not None, deterministic_algorithms())
        name = weighted_backend(name, backend, weights)
        # the cpu kernels check the indices they read; positions' centroids read them first
        check_batch(batch, target.shape[0], "target", B, values=name != "cpu" or rep.kind == "position")

        def run(o_rows, M, y_rows, r, center):
            args = (o_rows.contiguous(), M, y_rows.contiguous(), r.sample, r.P, r.valid, center, B)
            if weights is not None:
                args = args + (weights,)
            if name == "torch":
                return reduce_rows_reference(*args)
            try:
                if registry.direct(args[0], M, args[2], r.sample, r.valid, center):
                    return registry.implementation("reduce_rows", name)(*args)
                return reduce_rows(*args[:8], name, *args[8:])
            except ValueError:
                check_batch(batch, target.shape[0], "target", B)  # a kernel refused an index: say which
                raise

        if per_irrep(rep):
            mean, sums = _reduce_per_irrep(o, y, rows, action.irrep_blocks(rep, acc), groups_inverse(rep.key, out.device),
                                           run)
        else:
            center = centroids(o.to(acc), rows, B) if rep.kind == "position" else None
            mean, sums = run(o, action.matrices(rep, acc), y, rows, center)
        per_row = torch.full((rows.N,), float(rows.d), dtype=acc, device=out.device)
        if rows.valid is not None:
            per_row = torch.where(rows.valid, per_row, torch.zeros((), dtype=acc, device=out.device))
        count = segment_sum(per_row[:, None], rows.sample, rows.P, B)[:, 0]
        n = count.clamp_min(1)
        return TwirlSums(mean.reshape(target.shape), sums[0] / n, sums[1] / n, sums[2] / n, count)
