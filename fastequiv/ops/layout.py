"""How the ops see a tensor: rows, samples, masks and the action of each copy's element.

The fused ops reduce every representation to one primitive, the **row contract**, before
they call a kernel:

* A tensor with a representation is a stack of **rows** ``x`` of shape ``(N, d)``:
  ``N`` points (atoms, nodes, ...) of ``d`` components each; scalars and pseudoscalars are
  rows of one component, so a ``(B, n_atoms, 128)`` invariant feature costs no matrix
  product.
* Row ``r`` belongs to sample ``s(r)``. In the dense layout ``s(r) = r // P`` (pass
  ``sample=None`` and ``P``; the ops pass ``N = B * P`` rows, and the kernels accept a
  short last sample); in the graph layout ``s`` is a batch index vector (pass ``sample``,
  an int64 tensor ``(N,)``, and ``P=0``).
* The group element of copy ``k`` of sample ``b`` acts by a ``d x d`` matrix
  ``M[k, b]`` (``M``: ``(K, B, d, d)``, contiguous, in the accumulation dtype): ``R``
  for vectors, ``det(R) R`` for pseudovectors, ``det(R)`` for pseudoscalars (``d = 1``),
  the block-diagonal Wigner-D matrix for e3nn irreps (:class:`Action` builds each once
  per step).
* Positions rotate about a centre: ``x -> M (x - c) + c`` with ``c`` the per-sample
  centroid (``center``); other reps pass ``center=None``.
* Copies are stacked copy-major: copy ``k`` of row ``r`` is ``out[k, r]``.

Accumulation dtype ("acc"): float64 if any floating input is float64, else float32
(bf16/fp16 inputs are read as such and accumulated in float32). ``M`` and the centres
come in acc; ``x``, ``out`` and ``target`` come in their own dtype.

Reps the rows cannot express (voxel grids, which move data between rows) return ``None``
from :func:`rows_of` and have ops of their own (:mod:`fastequiv.ops.voxels`).
"""

from __future__ import annotations

import warnings

import math
from typing import NamedTuple, Optional

import torch

from ..graph import check_index_values
from ..reps import Rep
from ..wigner import block_cost

ROW_KINDS = ("scalar", "pseudoscalar", "vector", "pseudovector", "position", "irreps", "rank2")


class TwirlSums(NamedTuple):
    """Per-sample results of :func:`fastequiv.ops.twirl_reduce`; every sum is a mean over
    the sample's valid elements.

    twirled: ``(B, *E)`` twirled prediction ``abar = mean_k a_k`` (``(N, *E)`` in the graph
        layout). It was called ``mean``, which :class:`fastequiv.Decomposition` uses for
        L_mean; ``.mean`` still reads it, with a DeprecationWarning.
    total: ``(B,)`` ``(1/K) sum_k ||a_k - y||^2``.
    bias: ``(B,)`` ``||abar - y||^2``.
    spread: ``(B,)`` ``(1/K) sum_k ||a_k - abar||^2``.
    count: ``(B,)`` number of valid elements (0 for a fully masked sample, whose sums are 0).
    """

    twirled: torch.Tensor
    total: torch.Tensor
    bias: torch.Tensor
    spread: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        warnings.warn("TwirlSums.mean is deprecated: the twirled prediction is TwirlSums.twirled (mean is L_mean in "
                      "fastequiv.Decomposition)", DeprecationWarning, stacklevel=2)
        return self.twirled


class Rows(NamedTuple):
    """How one tensor maps onto rows: ``N`` rows of ``d``, ``P`` rows per sample (dense) or
    ``sample`` (graph), and the per-row validity (or None)."""

    N: int
    d: int
    P: int
    sample: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]


def rows_of(shape: torch.Size, rep: Rep, mask: Optional[torch.Tensor], batch: Optional[torch.Tensor]) -> Optional[Rows]:
    """The row view of a tensor of ``shape`` (dim 0: samples, or nodes with ``batch``).

    ``mask`` is already shaped by :func:`mask_for` (broadcastable to
    ``shape``) or None.
    """
    if rep.kind not in ROW_KINDS:
        return None
    d = 1 if rep.kind in ("scalar", "pseudoscalar") else 9 if rep.kind == "rank2" else shape[-1]
    lead = shape[0]
    P = math.prod(shape[1:]) // d if d else 0
    N = lead * P
    sample = None
    if batch is not None:
        sample = batch if P == 1 else batch.repeat_interleave(P)
    valid = None
    if mask is not None:
        m = mask.expand(shape)
        valid = (m if d == 1 else m[..., 0, 0] if rep.kind == "rank2" else m[..., 0]).reshape(N)
    return Rows(N, d, 0 if batch is not None else P, sample, valid)


def centroids(x: torch.Tensor, rows: Rows, B: int) -> torch.Tensor:
    """Per-sample centroid of the valid rows of ``x`` ``(..., N, 3)`` -> ``(..., B, 3)``."""
    w = torch.ones(rows.N, dtype=x.dtype, device=x.device) if rows.valid is None else rows.valid.to(x.dtype)
    # selected, not multiplied: a padded row may hold inf or 1e20, and inf * 0 is NaN
    kept = x if rows.valid is None else torch.where(rows.valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    total = segment_sum(kept, rows.sample, rows.P, B)
    count = segment_sum(w[:, None], rows.sample, rows.P, B)
    return total / count.clamp_min(1)


def sample_index(N: int, P: int, sample: Optional[torch.Tensor], device) -> torch.Tensor:
    """The sample of every row: ``sample`` itself, or ``r // P`` in the dense layout."""
    if sample is not None:
        return sample
    return torch.arange(N, device=device) // max(P, 1)


def by_sample(M: torch.Tensor, v: torch.Tensor, sample: Optional[torch.Tensor], P: int, transpose: bool) -> torch.Tensor:
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


def segment_sum(v: torch.Tensor, sample: Optional[torch.Tensor], P: int, B: int) -> torch.Tensor:
    """``(..., B, d)``: the rows of ``v`` ``(..., N, d)`` summed per sample (no host sync)."""
    N = v.shape[-2]
    if sample is None and N == B * P:
        return v.reshape(v.shape[:-2] + (B, P, v.shape[-1])).sum(-2)
    out = v.new_zeros(v.shape[:-2] + (B, v.shape[-1]))
    return out.index_add_(v.dim() - 2, sample_index(N, P, sample, v.device), v)


def segment_outer(v: torch.Tensor, u: torch.Tensor, sample: Optional[torch.Tensor], P: int, B: int) -> torch.Tensor:
    """``(K, B, d, d)``: ``sum over the rows r of sample b of v[k, r] u[k, r]^T`` for ``v``
    ``(K, N, d)`` and ``u`` ``(K, N, d)`` (or ``(N, d)``, the same for every copy): the
    gradient of a per-sample matrix ``M[k, b]`` acting on the rows."""
    K, N, d = v.shape
    u = u.expand(K, N, d)
    if sample is None and N == B * P:
        return torch.einsum("kbpi,kbpj->kbij", v.reshape(K, B, P, d), u.reshape(K, B, P, d))
    outer = (v[..., :, None] * u[..., None, :]).reshape(K, N, d * d)
    return segment_sum(outer, sample, P, B).reshape(K, B, d, d)


def mask_for(mask: Optional[torch.Tensor], shape: torch.Size, name: str) -> Optional[torch.Tensor]:
    """``mask`` reshaped to broadcast against a tensor of ``shape``, or None.

    A mask ``(B, *inner)`` applies to a tensor whose shape starts with ``(B, *inner)``
    (e.g. per-atom forces ``(B, N, 3)`` under an atom mask ``(B, N)``); a tensor with no
    more dims than the mask is per-sample (e.g. energies ``(B, 1)``) and is not masked.
    Any other shape is a mismatch.
    """
    if mask is None:
        return None
    if tuple(shape[: mask.dim()]) == tuple(mask.shape):
        return mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - mask.dim()))
    if (mask.dim() >= 2 and mask.shape[-1] == 1 and len(shape) == mask.dim() and shape[-1] > 1
            and tuple(shape[:-1]) == tuple(mask.shape[:-1])):
        # a (B, N, 1) mask over (B, N, 3): read by the per-sample rule below it would mask
        # nothing, silently; it is meant per element
        raise ValueError(f"mask has shape {tuple(mask.shape)} for {name} of shape {tuple(shape)}: a mask "
                         f"selects whole elements of the leading dims, so give it as {tuple(mask.shape[:-1])} "
                         "(without the trailing 1)")
    if len(shape) <= mask.dim() and shape[0] == mask.shape[0]:
        return None
    raise ValueError(
        f"mask has shape {tuple(mask.shape)}, which does not match the leading dims of {name} "
        f"{tuple(shape)}: expected {name} of shape {tuple(mask.shape)} + (...)"
    )


def tile(mask: Optional[torch.Tensor], K: int) -> Optional[torch.Tensor]:
    """A per-sample tensor ``(B, ...)`` (a mask, or the scalars of an input) repeated for
    K stacked copies, copy-major: ``(K * B, ...)``; None stays None."""
    if mask is None:
        return None
    return mask.unsqueeze(0).expand((K,) + tuple(mask.shape)).reshape((K * mask.shape[0],) + tuple(mask.shape[1:]))


def per_sample_sum(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` sum of ``t`` ``(B, *E)`` over each sample's valid elements (``mask`` from :func:`mask_for`)."""
    if mask is not None:
        t = torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))  # inf * 0 would be NaN
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(dim=1)


def valid_count(y: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` number of valid elements of each sample of ``y`` ``(B, *E)``."""
    if mask is None:
        return torch.full((y.shape[0],), math.prod(y.shape[1:]), dtype=dtype, device=y.device)
    return per_sample_sum(torch.ones(y.shape, dtype=dtype, device=y.device), mask)


def check_batch(batch: Optional[torch.Tensor], n: int, name: str, B: int, values: bool = True) -> None:
    """Raise a ValueError unless ``batch`` is None or an int64 ``(n,)`` index vector with
    values in ``[0, B)``.

    The values are read on CPU tensors (no device sync, a few microseconds), unless
    ``values`` is False: where the first thing to read them is a kernel of the cpu backend,
    which checks every index it reads and raises the ValueError itself. On a GPU reading
    them would cost a host sync in every op, so there the measuring functions check them
    once per call (:class:`fastequiv.graph.GraphLayout`) and the ops trust them.
    """
    if batch is None:
        return
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.int64 or batch.dim() != 1 or batch.shape[0] != n:
        got = f"{batch.dtype} tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"batch must be an int64 tensor of shape ({n},) (one sample index per row of {name}), got {got}")
    if values and batch.device.type == "cpu":
        check_index_values(batch, B, "batch", f"the B = {B} samples of R (dim 1)")


#: Apply irreps block by block where it pays (:func:`per_irrep`); the benchmarks switch it
#: off to time the dense block-diagonal path against it in the same run.
PER_IRREP = True


def per_irrep(rep: Rep) -> bool:
    """Whether the ops apply ``rep``'s Wigner-D matrices block by block (irreps whose blocks
    cost under half the dense ``dim^2`` a row, e.g. ``32x0e + 16x1o + 8x2e``) rather than
    as one block-diagonal matrix (small irreps such as ``1x0e + 1x1o``)."""
    if rep.kind != "irreps" or not PER_IRREP:
        return False
    blocks, dense = block_cost(rep.key)
    return 2 * blocks <= dense


def group_rows(rows: Rows, columns: torch.Tensor, n: int) -> Rows:
    """The rows of one ``(l, p)`` group: each row of ``rows`` holds ``m = len(columns) / n``
    copies of the irrep, which become ``m`` rows of ``n`` components (row ``r * m + j``)."""
    m = columns.numel() // n
    sample = None if rows.sample is None else rows.sample.repeat_interleave(m)
    valid = None if rows.valid is None else rows.valid.repeat_interleave(m)
    return Rows(rows.N * m, n, rows.P * m, sample, valid)


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any of ``tensors`` is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
