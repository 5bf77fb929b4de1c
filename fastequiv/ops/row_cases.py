"""Random inputs of the row contract (:mod:`.layout`): what the row kernels are checked on.

The one generator of row-kernel cases, used by ``fastequiv check`` and by the tests
(tests/opdata.py). :class:`RowCase` draws every argument of the four row ops at once;
:func:`random_layout` draws only the layout of a batch. Matrices are general, not
orthogonal: an orthogonal one would hide a transposition error. The edge cases are built
in: a dense batch whose last sample is one row short, a graph batch with an empty sample,
a fully masked sample. Every value has scale ~1 at any width, the scale the bounds of
:mod:`fastequiv.tolerances` are stated for.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layout import sample_index

__all__ = ["RowCase", "random_layout"]

LAYOUTS = ("dense", "graph", "graph_sorted")


def random_layout(B: int, P: int, graph: bool, device, empty_sample: Optional[int] = None, seed: int = 0):
    """``(sample, P, N)``: dense (every sample has ``P`` rows), or a graph batch index with
    uneven samples in shuffled order (one of them, ``empty_sample``, with no rows)."""
    if not graph:
        return None, P, B * P
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2 * P, (B,), generator=g)
    if empty_sample is not None:
        counts[empty_sample] = 0
    sample = torch.repeat_interleave(torch.arange(B), counts)
    sample = sample[torch.randperm(len(sample), generator=g)]
    return sample.to(device), 0, len(sample)


class RowCase:
    """Random inputs of the row contract: ``K`` copies, ``B`` samples, ``N`` rows of ``d``.

    Layouts: ``"dense"`` (``P`` rows a sample, the last sample one row short when
    ``P > 1``); ``"graph"`` (``B * P + 1`` rows in random order, sample 1 empty);
    ``"graph_sorted"`` (the same rows sorted into runs of one sample, as a PyG or MACE
    batch index). With ``mask``, about 70% of the rows are valid and sample 2 has none.

    Attributes: ``x`` ``(N, d)`` and ``out`` ``(K, N, d)`` in ``dtype``; ``target``
    ``(N, d)`` in ``target_dtype``; ``M`` ``(K, B, d, d)``, ``center_x`` ``(B, d)`` (the
    centre of ``rotate_rows``), ``center`` ``(K, B, d)`` (of ``reduce_rows``),
    ``grad_mean`` ``(N, d)`` and ``grad_sums`` ``(3, B)`` in the accumulation dtype
    ``acc``; ``grad_rot`` ``(K, N, d)`` in ``dtype``; ``valid`` ``(N,)`` or None;
    ``sample`` and ``P`` as the ops take them.
    """

    def __init__(self, K: int = 3, B: int = 4, P: int = 5, d: int = 3, dtype: torch.dtype = torch.float32,
                 layout: str = "dense", center: bool = True, mask: bool = False, device="cpu", seed: int = 0,
                 target_dtype: Optional[torch.dtype] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        g = torch.Generator().manual_seed(seed)
        acc = torch.float64 if torch.float64 in (dtype, target_dtype) else torch.float32
        self.K, self.B, self.d, self.acc = K, B, d, acc
        if layout == "dense":
            self.N, self.P, self.sample = B * P - (P > 1), P, None
        else:
            self.N, self.P = B * P + 1, 0
            s = torch.randint(0, B, (self.N,), generator=g)
            s = torch.where(s == 1, 0, s)
            self.sample = (s.sort().values if layout == "graph_sorted" else s).to(device)
        N = self.N
        # scaled so that M x keeps the scale ~1 of x at any width (TOL's bounds are for that scale)
        self.M = (torch.randn(K, B, d, d, generator=g, dtype=torch.float64) / d**0.5).to(acc).to(device)
        self.x = torch.randn(N, d, generator=g).to(dtype).to(device)
        self.out = torch.randn(K, N, d, generator=g).to(dtype).to(device)
        self.target = torch.randn(N, d, generator=g).to(target_dtype or dtype).to(device)
        self.center_x = torch.randn(B, d, generator=g, dtype=torch.float64).to(acc).to(device) if center else None
        self.center = torch.randn(K, B, d, generator=g, dtype=torch.float64).to(acc).to(device) if center else None
        self.valid = None
        if mask:
            v = torch.rand(N, generator=g) > 0.3
            s = sample_index(N, self.P, self.sample, "cpu").cpu()
            v[s == 2] = False
            self.valid = v.to(device)
        self.grad_sums = torch.randn(3, B, generator=g, dtype=torch.float64).to(acc).to(device)
        self.grad_mean = torch.randn(N, d, generator=g, dtype=torch.float64).to(acc).to(device)
        self.grad_rot = torch.randn(K, N, d, generator=g).to(dtype).to(device)
