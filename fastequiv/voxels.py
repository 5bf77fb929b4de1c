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

Backends: ``"torch"`` (the reference, :mod:`fastequiv.grid`: one index gather per cube
element, one batched ``F.grid_sample`` call otherwise), ``"triton"`` (``kernels/voxels.py``:
K rotated copies written in one pass, and the back-resampling of the outputs fused with
the twirl reduction) and, for the copies only, ``"cpu"`` (the cube-group copies as strided
copies in C++, ``csrc/voxels_cpu.cpp``; off the cube group it runs the reference's
``grid_sample``). ``"auto"`` uses Triton on CUDA tensors and, for the copies, the C++
kernel on CPU tensors. The kernels have no backward of their own: gradients are those of
the torch reference, recomputed in the backward pass (:mod:`fastequiv.ops.voxels`).

This module is the public face of voxel grids: the rep :class:`Voxels` (defined with the
other reps in :mod:`fastequiv.reps`), the ops :func:`rotate`, :func:`rotate_copies` and
:func:`twirl_reduce` (:mod:`fastequiv.ops.voxels`) and :func:`interpolation_floor`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops.voxels import as_voxels, rotate, rotate_copies, twirl_reduce
from .reps import Voxels
from .spec import Spec
from .twirl import equivariance_error

__all__ = ["Voxels", "rotate", "rotate_copies", "twirl_reduce", "interpolation_floor"]


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
    rep = as_voxels(rep)
    spec = Spec(inputs=rep, output=rep, group=group)
    return equivariance_error(lambda v: v, x, x, spec=spec, samples=samples, seed=seed, generator=generator,
                              mask=mask, chunk_size=chunk_size, backend=backend)
