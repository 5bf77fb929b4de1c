"""Action: the group element of every copy, and the matrices it acts by, built once a step.

A step rotates several inputs and back-rotates several output heads with the same
rotations ``R`` ``(K, B, 3, 3)``. :class:`Action` holds ``R`` and the backend the step
runs on, and builds the ``(K, B, d, d)`` matrix of each rep (in each accumulation dtype)
the first time an op asks for it: the Wigner-D matrices of an irreps are computed once
per step, not once per input leaf and output head. The public ops take either a tensor
``R`` or an :class:`Action`.
"""

from __future__ import annotations

from typing import Union

import torch

from ..reps import Rep
from ..wigner import irreps_groups, key_lmax, packed_block
from .wigner_d import packed_blocks_of, wigner_D_key


class Action:
    """The rotations ``R`` ``(K, B, 3, 3)`` of one step and their matrices per rep."""

    def __init__(self, R: torch.Tensor, backend: str = "auto"):
        if not isinstance(R, torch.Tensor) or R.dim() != 4 or tuple(R.shape[2:]) != (3, 3):
            got = f"shape {tuple(R.shape)}" if isinstance(R, torch.Tensor) else type(R).__name__
            raise ValueError(f"R must be a tensor of shape (K, B, 3, 3), got {got}")
        self.R = R
        self.backend = backend
        self._matrices: dict = {}
        self._cast: dict = {}

    @property
    def shape(self) -> torch.Size:
        return self.R.shape

    def rotations(self, dtype: torch.dtype) -> torch.Tensor:
        """``R`` in ``dtype`` (cast once)."""
        if self.R.dtype == dtype:
            return self.R
        if dtype not in self._cast:
            self._cast[dtype] = self.R.to(dtype)
        return self._cast[dtype]

    def irrep_blocks(self, rep: Rep, dtype: torch.dtype) -> list:
        """``[(l, p, columns, M), ...]``: for each ``(l, p)`` group of the irreps of ``rep``
        (:func:`fastequiv.wigner.irreps_groups`) the ``(K, B, 2l+1, 2l+1)`` matrix its
        copies act by. The packed Wigner-D blocks are computed once per step and dtype;
        the dense block-diagonal matrix is never formed."""
        key = ("blocks", rep.key, dtype)
        if key not in self._matrices:
            R = self.rotations(dtype)
            K, B = R.shape[:2]
            lmax = key_lmax(rep.key)
            pk = ("packed", lmax, dtype)
            if pk not in self._matrices:
                backend = "torch" if R.requires_grad else self.backend
                self._matrices[pk] = packed_blocks_of(R.reshape(K * B, 3, 3), lmax, backend)
            packed, sign = self._matrices[pk]
            groups = []
            for l, p, columns in irreps_groups(rep.key, R.device):
                n = 2 * l + 1
                M = packed_block(packed, sign, l, p).reshape(K, B, n, n)
                groups.append((l, p, columns, M.contiguous()))
            self._matrices[key] = groups
        return self._matrices[key]

    def matrices(self, rep: Rep, dtype: torch.dtype) -> torch.Tensor:
        """``M`` ``(K, B, d, d)`` in ``dtype``: how each copy's element acts on one row of ``rep``."""
        key = (rep.kind, getattr(rep, "key", None), dtype)
        if key not in self._matrices:
            self._matrices[key] = action_matrices(rep, self.rotations(dtype), self.backend)
        return self._matrices[key]


def action_matrices(rep: Rep, R: torch.Tensor, backend: str) -> torch.Tensor:
    """``M`` ``(K, B, d, d)``: how each copy's group element acts on one row of ``rep``:
    :meth:`Rep.matrix`, with the irreps' Wigner-D blocks computed on ``backend``."""
    if rep.kind == "irreps":
        # the Wigner-D kernels have no gradient with respect to R: where R needs one, its
        # (small, K x B) matrices come from the differentiable reference
        return wigner_D_key(rep.key, R, "torch" if R.requires_grad else backend).contiguous()
    return rep.matrix(R).contiguous()


def as_action(R: Union[torch.Tensor, Action], backend: str) -> Action:
    """``R`` itself if an :class:`Action`, else a fresh one on ``backend``."""
    return R if isinstance(R, Action) else Action(R, backend)
