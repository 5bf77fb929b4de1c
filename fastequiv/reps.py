"""How a tensor transforms under a rotation: the representations a Spec names.

A tensor with a representation has shape ``(B, *inner, d)``: dim 0 is the sample, the
last dim carries the representation (``d`` is 3 for vectors, ``irreps.dim`` for e3nn
irreps, anything for scalars) and ``*inner`` are per-sample dims such as atoms.

========================  =====================================================
rep                       action of ``g = R`` (``R`` may be improper under O(3))
========================  =====================================================
``"scalar"``              ``x -> x``                              (e3nn ``0e``)
``"pseudoscalar"``        ``x -> det(R) x``                       (e3nn ``0o``)
``"vector"``              ``v -> R v``, components ``(x, y, z)``  (e3nn ``1o``)
``"pseudovector"``        ``v -> det(R) R v``                     (e3nn ``1e``)
``"position"``            ``p -> R (p - c) + c``, ``c`` the per-sample centroid
irreps (str / Irreps)     ``x -> D(R) x``, e3nn's basis and parity rules
``"voxels"``              a field on a grid ``(B, ..., C, n, n, n)``, moved by
                          resampling (:class:`fastequiv.voxels.Voxels`)
========================  =====================================================

e3nn's ``1o`` basis is ``(x, y, z)`` (``Irreps("1o").D_from_matrix(R) == R``), so a
``"vector"`` and a ``"1x1o"`` tensor are interchangeable. The centroid of a position
tensor is the mean over ``*inner`` of the valid (unmasked) points of that sample: an
input is rotated about its own centroid, and an output is back-rotated about its own.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Union

import torch

from .groups import orientation
from .wigner import irreps_key, parse_irreps, wigner_D_key

__all__ = ["Rep", "as_rep"]

_NAMED = ("scalar", "pseudoscalar", "vector", "pseudovector", "position")


class Rep:
    """A representation of O(3) on the last dim of a tensor (see module docs)."""

    def __init__(self, kind: str, irreps=None):
        self.kind = kind
        self.irreps = irreps
        if kind == "irreps":
            self.dim: Optional[int] = irreps.dim
            self.key = irreps_key(irreps)  # plain ints, for the kernels and torch.compile
        elif kind in ("vector", "pseudovector", "position"):
            self.dim = 3
        else:
            self.dim = None  # scalars: any last dim

    def __repr__(self) -> str:
        return f"Rep({self.irreps!s})" if self.kind == "irreps" else f"Rep({self.kind!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Rep) and (self.kind, str(self.irreps)) == (other.kind, str(other.irreps))

    def __hash__(self) -> int:
        return hash((self.kind, str(self.irreps)))

    def check(self, x: torch.Tensor, name: str) -> None:
        """Raise a ValueError naming ``name`` unless ``x`` can carry this rep."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor for rep {self}, got {type(x).__name__}")
        if x.dim() < 2 and self.dim is not None:
            raise ValueError(f"{name} must have shape (batch, ..., {self.dim}) for rep {self}, got {tuple(x.shape)}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dim (dim 0), got a 0-dim tensor")
        if self.dim is not None and x.shape[-1] != self.dim:
            what = f"irreps {self.irreps} (dim {self.dim})" if self.kind == "irreps" else f"{self.kind}"
            raise ValueError(f"{name} has last dim {x.shape[-1]} (shape {tuple(x.shape)}), but {what} needs last dim {self.dim}")
        if self.kind != "scalar" and not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor to rotate as {self}, got dtype {x.dtype}")

    def act(self, x: torch.Tensor, R: torch.Tensor, mask: Optional[torch.Tensor] = None, inverse: bool = False) -> torch.Tensor:
        """Apply ``rho(R)`` (or ``rho(R)^-1`` with ``inverse``) sample by sample.

        ``x``: ``(N, *inner, d)``; ``R``: ``(N, 3, 3)``; ``mask``: ``(N, *inner)`` bool,
        broadcastable, used only for the centroid of positions. Computes in
        ``R.dtype`` and returns ``x.dtype``.
        """
        if self.kind == "scalar":
            return x
        n = x.shape[0]
        det = orientation(R) if self.kind in ("pseudoscalar", "pseudovector") else None
        if self.kind == "pseudoscalar":
            return (x.to(R.dtype) * det.reshape((n,) + (1,) * (x.dim() - 1))).to(x.dtype)
        flat = x.to(R.dtype).reshape(n, math.prod(x.shape[1:-1]), x.shape[-1])
        if self.kind == "irreps":
            M = wigner_D_key(self.key, R)
        else:
            M = R if det is None else R * det[:, None, None]
        Mt = M if inverse else M.transpose(-1, -2)  # row vectors: x @ M^T == (M x^T)^T
        if self.kind == "position":
            c = centroid(x.to(R.dtype), mask).reshape(n, 1, 3)
            out = torch.bmm(flat - c, Mt) + c
        else:
            out = torch.bmm(flat, Mt)
        return out.reshape(x.shape).to(x.dtype)


def centroid(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean ``(N, 3)`` of the points ``x`` ``(N, *inner, 3)`` where ``mask`` is set."""
    n = x.shape[0]
    m = math.prod(x.shape[1:-1])
    pts = x.reshape(n, m, 3)
    if mask is None:
        return pts.mean(dim=1) if pts.shape[1] else torch.zeros(n, 3, dtype=x.dtype, device=x.device)
    # the mask is (N, *inner) or already padded to broadcast against x: (N, *inner, 1)
    w = mask.reshape(tuple(mask.shape) + (1,) * (x.dim() - mask.dim()))
    w = w.expand(x.shape)[..., :1].reshape(n, m, 1).to(x.dtype)
    return (pts * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


def as_rep(rep: Union[str, "Rep", object], name: str = "rep") -> Rep:
    """Parse a rep: one of the names above, an e3nn irreps string, or an ``o3.Irreps``."""
    if isinstance(rep, Rep):
        return rep
    if isinstance(rep, str) and rep in _NAMED:
        return Rep(rep)
    if isinstance(rep, str) and rep.strip().startswith("voxels"):
        from .voxels import Voxels  # a grid moves data between elements: its own module

        return Voxels.parse(rep, name)
    o3 = sys.modules.get("e3nn.o3")  # an Irreps object means the caller already imported e3nn
    if isinstance(rep, str) or (o3 is not None and isinstance(rep, o3.Irreps)):
        try:
            irreps = parse_irreps(rep, name)
        except ValueError as err:
            raise ValueError(f"{name}={rep!r} is neither one of {_NAMED} nor a valid e3nn irreps ({err})") from None
        if irreps.dim == 0:
            raise ValueError(f"{name}={rep!r} is an empty irreps")
        return Rep("irreps", irreps)
    raise ValueError(f"{name} must be one of {_NAMED}, an e3nn irreps string or o3.Irreps, got {rep!r}")
