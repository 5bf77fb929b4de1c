"""Inputs shared by the per-op tests (tests/test_rotate_copies.py, tests/test_twirl_reduce.py).

* The public ops: rotations, data of a rep, graph batches, and the action of each rep
  written out by hand (:func:`loop_act`), which the ops are checked against.
* The row contract (:mod:`fastequiv.ops.layout`): random rows, matrices and layouts on a
  backend's device, in two styles that the kernel tests use: the functions
  :func:`layout` / :func:`rand` / :func:`mats` / :func:`reduce_inputs`, and :class:`Case`,
  every argument of the four row ops at once. Layouts and cases come from the package's
  generator (:mod:`fastequiv.ops.row_cases`), which ``fastequiv check`` uses too.

Matrices are general, not orthogonal: an orthogonal one would hide a transposition error.
"""

from __future__ import annotations

import torch

import fastequiv as fe
from conftest import acc_of
from fastequiv.ops.layout import sample_index
from fastequiv.ops.row_cases import RowCase, random_layout
from fastequiv.reps import as_rep

# --- the public ops ----------------------------------------------------------------------------


def rotations(K, B, dtype=torch.float64, group="O3", seed=0):
    """``(K, B, 3, 3)`` elements of ``group``."""
    return fe.random_rotations(K * B, seed=seed, group=group, dtype=dtype).reshape(K, B, 3, 3)


def data(rep, shape, dtype, seed=0):
    """Random ``shape + (d,)`` data of ``rep`` (``d = 4`` for reps of any width)."""
    g = torch.Generator().manual_seed(seed)
    d = as_rep(rep).dim or 4
    return torch.randn(shape + (d,), generator=g, dtype=torch.float64).to(dtype)


def graph_batch(sizes, rep, dtype=torch.float64, seed=0):
    """Nodes of graphs of ``sizes`` nodes and their batch index."""
    x = data(rep, (sum(sizes),), dtype, seed=seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, batch


def loop_act(rep, x, R, inverse=False):
    """rho(R) x for one sample, written out per rep: x (*inner, d), R (3, 3)."""
    det = torch.linalg.det(R)
    M = R.T if inverse else R
    if rep == "scalar":
        return x
    if rep == "pseudoscalar":
        return det * x
    if rep == "vector":
        return x @ M.T
    if rep == "pseudovector":
        return det * (x @ M.T)
    if rep == "position":
        c = x.reshape(-1, 3).mean(0)
        return (x - c) @ M.T + c
    D = fe.wigner_D(rep, R)
    return x @ (D if inverse else D.T)


def dim(rep):
    """The width of the data :func:`loop_act` is tested on (irreps: ``1x0e + 2x1o + 1x2e``)."""
    return {"scalar": 2, "pseudoscalar": 1, "vector": 3, "pseudovector": 3, "position": 3}.get(rep, 1 + 6 + 5)


# --- the row contract: functions ---------------------------------------------------------------


#: ``(sample, P, N)`` of a dense or graph batch (the package's generator of row cases)
layout = random_layout


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def mats(K, B, d, dtype, seed=1, device="cpu"):
    """General (not orthogonal) ``(K, B, d, d)`` matrices."""
    return rand(K, B, d, d, dtype=dtype, seed=seed, device=device)


def reduce_inputs(K, B, P, d, dtype, graph, masked, with_center, device, seed=0):
    """``(out, M, target, sample, P, valid, center)`` of ``reduce_rows``; in the graph
    layout sample 1 is empty, and with ``masked`` the last sample is fully masked."""
    acc = acc_of(dtype)
    sample, P, N = layout(B, P, graph, device, empty_sample=1 if graph else None, seed=seed)
    out = rand(K, N, d, dtype=dtype, seed=seed + 1, device=device)
    target = rand(N, d, dtype=dtype, seed=seed + 2, device=device)
    M = mats(K, B, d, acc, seed=seed + 3, device=device)
    center = rand(K, B, d, dtype=acc, seed=seed + 4, device=device) if with_center else None
    valid = None
    if masked:
        s = sample_index(N, P, sample, device)
        g = torch.Generator().manual_seed(seed + 5)
        valid = (torch.rand(N, generator=g) > 0.3).to(device) & (s != B - 1)  # last sample fully masked
    return out, M, target, sample, P, valid, center


# --- the row contract: every argument at once --------------------------------------------------


#: every argument of the row contract at once (fastequiv check draws its cases from it too)
Case = RowCase


#: Case arguments both row ops are checked on (tests/test_rotate_copies.py and
#: tests/test_twirl_reduce.py, besides each file's grid over dtypes, layouts and widths):
#: many copies and one or a few rows per sample; past the CPU kernels' parallel threshold
#: (OpenMP partial sums per thread); and sorted graph batches, as PyG and MACE batches
#: have (runs of rows of one sample, which the CPU kernels take in tiles: runs crossing
#: tile boundaries, an empty sample, a fully masked one).
ROW_CASES = {
    **{f"K{K}-P{P}": dict(K=K, B=3, P=P, d=3, dtype=torch.float64) for K in (1, 2, 3, 8, 24) for P in (1, 7)},
    "many-rows-dense": dict(K=4, B=5, P=4001, d=3, dtype=torch.float32, mask=True),
    "many-rows-graph": dict(K=2, B=7, P=3001, d=3, dtype=torch.float64, layout="graph"),
    **{f"sorted-graph-K{K}-P{P}-{str(dtype)[6:]}-{'center' if center else 'nocenter'}":
       dict(K=K, B=6, P=P, d=3, dtype=dtype, layout="graph_sorted", center=center, mask=True)
       for K, P in ((3, 60), (2, 700)) for dtype in (torch.float32, torch.float64) for center in (True, False)},
}

