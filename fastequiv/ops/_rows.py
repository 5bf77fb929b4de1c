"""The row-level kernel contract, in pure torch: what every compiled backend implements.

The public ops (:func:`~fastequiv.ops.rotate_copies`, :func:`~fastequiv.ops.twirl_reduce`)
reduce every representation to the same primitive before calling a kernel:

* A tensor with a representation is a stack of **rows** ``x`` of shape ``(N, d)``:
  ``N`` points (atoms, nodes, ...) of ``d`` components each.
* Row ``r`` belongs to sample ``s(r)``. In the dense layout ``s(r) = r // P`` (pass
  ``sample=None`` and ``P``; the ops pass ``N = B * P`` rows, and the kernels accept a
  short last sample); in the graph layout ``s`` is a batch index vector (pass ``sample``,
  an int64 tensor ``(N,)``, and ``P=0``).
* The group element of copy ``k`` of sample ``b`` acts by a ``d x d`` matrix
  ``M[k, b]`` (``M``: ``(K, B, d, d)``, contiguous, in the accumulation dtype): ``R``
  for vectors, ``det(R) R`` for pseudovectors, ``det(R)`` for pseudoscalars (``d = 1``),
  the block-diagonal Wigner-D matrix for e3nn irreps.
* Positions rotate about a centre: ``x -> M (x - c) + c`` with ``c`` the per-sample
  centroid (``center``); other reps pass ``center=None``.
* Copies are stacked copy-major: copy ``k`` of row ``r`` is ``out[k, r]``.

Accumulation dtype ("acc"): float64 if any floating input is float64, else float32
(bf16/fp16 inputs are read as such and accumulated in float32). ``M`` and the centres
come in acc; ``x``, ``out`` and ``target`` come in their own dtype.

Each function below is the ground truth of the kernel of the same name on every backend
(``kernels/*.py`` for Triton, ``kernels/*.cu`` + ``csrc/`` for CUDA and C++). A kernel
must give the same result to rounding for every dtype, any ``N`` (including 0), any
``K >= 1``, masks, and both layouts. Inputs arrive contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch


def sample_index(N: int, P: int, sample: Optional[torch.Tensor], device) -> torch.Tensor:
    """The sample of every row: ``sample`` itself, or ``r // P`` in the dense layout."""
    if sample is not None:
        return sample
    return torch.arange(N, device=device) // max(P, 1)


def _by_sample(M: torch.Tensor, v: torch.Tensor, sample: Optional[torch.Tensor], P: int, transpose: bool) -> torch.Tensor:
    """``M[k, s(r)] v[k, r]`` (``M^T`` with ``transpose``) for ``v`` ``(K, N, d)`` -> ``(K, N, d)``.

    The dense layout is a batched matmul over ``(K, B)``; the graph layout gathers ``M``.
    """
    K, N, d = v.shape
    B = M.shape[1]
    if sample is None and N == B * P:
        rows = v.reshape(K, B, P, d)
        # rows are row vectors: (M v)^T = v^T M^T
        return (rows @ (M if transpose else M.transpose(-1, -2))).reshape(K, N, d)
    Ms = M[:, sample_index(N, P, sample, v.device)]
    return torch.einsum("knji,knj->kni" if transpose else "knij,knj->kni", Ms, v)


def rotate_rows(x: torch.Tensor, M: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                center: Optional[torch.Tensor]) -> torch.Tensor:
    """K rotated copies of the rows.

    Args:
        x: ``(N, d)`` rows, any float dtype.
        M: ``(K, B, d, d)`` in acc.
        sample, P: the sample of each row (see module docs).
        center: ``(B, d)`` in acc, or None.
    Returns:
        ``(K, N, d)`` in ``x.dtype``: ``out[k, r] = M[k, s] (x[r] - c[s]) + c[s]``, ``s = s(r)``.
    """
    K, N = M.shape[0], x.shape[0]
    xa = x.to(M.dtype)
    if center is not None:
        c = center[sample_index(N, P, sample, x.device)]
        xa = xa - c
    y = _by_sample(M, xa.expand(K, N, x.shape[1]), sample, P, transpose=False)
    if center is not None:
        y = y + c
    return y.to(x.dtype).contiguous()


def rotate_rows_backward(grad: torch.Tensor, M: torch.Tensor, sample: Optional[torch.Tensor], P: int) -> torch.Tensor:
    """``sum_k M[k, s]^T grad[k, r]`` ``(N, d)`` in acc: the gradient of :func:`rotate_rows`
    with respect to ``x`` for a fixed centre (the op layer adds the centre's part)."""
    return _by_sample(M, grad.to(M.dtype), sample, P, transpose=True).sum(0).contiguous()


def _back_rotated(out, M, sample, P, center):
    """``a_k = M[k, s]^T (out[k, r] - c[k, s]) + c[k, s]`` in acc ``(K, N, d)``."""
    o = out.to(M.dtype)
    if center is not None:
        c = center[:, sample_index(out.shape[1], P, sample, out.device)]
        o = o - c
    a = _by_sample(M, o, sample, P, transpose=True)
    return a + c if center is not None else a


def reduce_rows(out: torch.Tensor, M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                valid: Optional[torch.Tensor], center: Optional[torch.Tensor], B: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-rotate K copies of the outputs and form the per-sample decomposition sums.

    Args:
        out: ``(K, N, d)`` the model's outputs on the copies, any float dtype.
        M: ``(K, B, d, d)`` in acc.
        target: ``(N, d)`` in the frame of the unrotated input, any float dtype.
        sample, P: the sample of each row.
        valid: ``(N,)`` bool, or None (every row valid). Invalid rows add nothing to the sums.
        center: ``(K, B, d)`` in acc, the centroid of each copy's output, or None.
        B: number of samples.
    Returns:
        ``mean`` ``(N, d)`` in acc, ``abar = (1/K) sum_k a_k`` with
        ``a_k = M[k, s]^T (out[k, r] - c[k, s]) + c[k, s]``, for every row (valid or not); and
        ``sums`` ``(3, B)`` in acc, summed over the valid rows of each sample and their
        ``d`` components: ``(1/K) sum_k |a_k - y|^2``, ``|abar - y|^2`` and
        ``(1/K) sum_k |a_k - abar|^2`` (total, bias, spread; not yet divided by the count).
        The spread is formed from the deviations ``a_k - abar``, never as a difference of
        large sums, so it has no cancellation.
    """
    acc = M.dtype
    a = _back_rotated(out, M, sample, P, center)
    y = target.to(acc)
    abar = a.mean(dim=0)
    per_row = torch.stack([
        ((a - y) ** 2).sum(-1).mean(0),
        ((abar - y) ** 2).sum(-1),
        ((a - abar) ** 2).sum(-1).mean(0),
    ])
    if valid is not None:
        per_row = per_row * valid.to(acc)
    return abar.contiguous(), segment_sum(per_row.t(), sample, P, B).t().contiguous()


def reduce_rows_backward(grad_mean: Optional[torch.Tensor], grad_sums: torch.Tensor, out: torch.Tensor,
                         M: torch.Tensor, target: torch.Tensor, sample: Optional[torch.Tensor], P: int,
                         valid: Optional[torch.Tensor], center: Optional[torch.Tensor], mean: torch.Tensor
                         ) -> torch.Tensor:
    """Gradient of :func:`reduce_rows` with respect to ``out`` for fixed centres.

    With ``g = grad_sums[:, s]`` (zero on invalid rows) and ``abar = mean``::

        dL/da_k = (2/K) (g_total (a_k - y) + g_bias (abar - y) + g_spread (a_k - abar))
                  + grad_mean / K
        dL/dout[k, r] = M[k, s] dL/da_k

    (the spread term needs no correction because ``sum_k (a_k - abar) = 0``).

    Args:
        grad_mean: ``(N, d)`` or None; grad_sums: ``(3, B)``; the rest as in
            :func:`reduce_rows`, ``mean`` being its output.
    Returns:
        ``(K, N, d)`` in ``out.dtype``.
    """
    K, N = out.shape[:2]
    acc = M.dtype
    a = _back_rotated(out, M, sample, P, center)
    y = target.to(acc)
    g = grad_sums.to(acc)[:, sample_index(N, P, sample, out.device)]
    if valid is not None:
        g = g * valid.to(acc)
    ga = (2.0 / K) * (g[0, :, None] * (a - y) + g[1, :, None] * (mean - y) + g[2, :, None] * (a - mean))
    if grad_mean is not None:
        ga = ga + grad_mean.to(acc) / K
    return _by_sample(M, ga, sample, P, transpose=False).to(out.dtype).contiguous()


def segment_sum(v: torch.Tensor, sample: Optional[torch.Tensor], P: int, B: int) -> torch.Tensor:
    """``(..., B, d)``: the rows of ``v`` ``(..., N, d)`` summed per sample (no host sync)."""
    N = v.shape[-2]
    if sample is None and N == B * P:
        return v.reshape(v.shape[:-2] + (B, P, v.shape[-1])).sum(-2)
    out = v.new_zeros(v.shape[:-2] + (B, v.shape[-1]))
    return out.index_add_(v.dim() - 2, sample_index(N, P, sample, v.device), v)


def random_rotations_seeded(seed: torch.Tensor, n: int, offset: int, improper: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rotations ``offset .. offset + n - 1`` of the Philox stream keyed by the int64
    0-dim tensor ``seed`` (read on the device, never synced to the host): ``(n, 3, 3)``.
    ``improper`` draws from O(3) (bit 0 of the fourth Philox word flips ``R`` to ``-R``)."""
    from ..groups import _elements_from_words, _philox_words

    return _elements_from_words(_philox_words(n, seed, offset), "O3" if improper else "SO3").to(dtype)


def wigner_blocks(R: torch.Tensor, lmax: int) -> torch.Tensor:
    """Packed Wigner-D blocks ``D_0 .. D_lmax`` of proper rotations ``R`` ``(N, 3, 3)``:
    ``(N, S)`` in ``R.dtype`` with ``S = sum_l (2l+1)^2``; block ``l`` is row-major at
    column offset ``sum_{l' < l} (2l'+1)^2`` (e3nn basis, see :mod:`fastequiv.wigner`)."""
    from ..wigner import _blocks_flat

    return torch.cat(_blocks_flat(lmax, R), dim=0).t().contiguous()
