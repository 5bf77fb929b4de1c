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
``"rank2"``               ``S -> R S R^T`` on the last two dims ``(..., 3, 3)``
                          (stress, virials, polarisability; symmetric or not)
``"voigt"``               a symmetric rank-2 tensor in Voigt notation, last dim 6,
                          ASE's order ``(xx, yy, zz, yz, xz, xy)``; another order is
                          named, e.g. ``"voigt(xx, yy, zz, xy, yz, zx)"`` (SevenNet's).
                          It transforms as the 3 x 3 tensor it stands for and is
                          reduced as that tensor (the mean over its 9 entries, which
                          is rotation-invariant; 6 Voigt entries would not be)
``"cell"``                a periodic cell whose rows are lattice vectors:
                          ``cell -> cell R^T``; per graph, ``(B, 3, 3)`` or MACE's
                          flattened ``(3 B, 3)``
irreps (str / Irreps)     ``x -> D(R) x``, e3nn's basis and parity rules
``"voxels"``              a field on a grid ``(B, ..., C, n, n, n)``, moved by
                          resampling (:class:`fastequiv.voxels.Voxels`)
========================  =====================================================

Graph batches: a rep may say where its rows live, ``"vector@edge"`` (per-edge shift or
edge vectors), ``"scalar@graph"``, ``"scalar@node"``; without it the row count decides,
and only where it is unambiguous (see :mod:`fastequiv.graph`).

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

import re

from .grid import grid_shape, is_cube_element, resample
from .groups import orientation
from .wigner import irreps_key, parse_irreps, wigner_D_matrix

__all__ = ["Rep", "Voigt", "Voxels", "as_rep", "centroid", "describe"]

_NAMED = ("scalar", "pseudoscalar", "vector", "pseudovector", "position", "rank2", "cell")
LEVELS = ("node", "edge", "graph")


def describe(x) -> str:
    """How an error message names a value: dtype and shape of a tensor, else its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class Rep:
    """A representation of O(3) on the last dim of a tensor (see module docs)."""

    def __init__(self, kind: str, irreps=None, level: Optional[str] = None, cell: bool = False):
        if level is not None and level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS} or None, got {level!r}")
        self.kind = kind
        self.irreps = irreps
        self.level = level  # where the rows live in a graph batch (None: by row count)
        self.cell = cell  # a periodic cell: vectors, per graph, 3 rows per graph when flattened
        if kind == "irreps":
            self.dim: Optional[int] = irreps.dim
            self.key = irreps_key(irreps)  # plain ints, for the kernels and torch.compile
        elif kind in ("vector", "pseudovector", "position"):
            self.dim = 3
        elif kind == "rank2":
            self.dim = 9  # as rows: the 3 x 3 entries, row-major
        else:
            self.dim = None  # scalars: any last dim

    @property
    def name(self) -> str:
        """How a spec names this rep, without its level: ``"vector"``, ``"cell"``, ``"1x0e+1x1o"``."""
        return str(self.irreps) if self.kind == "irreps" else "cell" if self.cell else self.kind

    def __repr__(self) -> str:
        at = f"@{self.level}" if self.level and not self.cell else ""
        return f"Rep({self.name + at!r})"

    def _id(self):
        return self.kind, str(self.irreps), self.level, self.cell

    def __eq__(self, other) -> bool:
        return isinstance(other, Rep) and self._id() == other._id()

    def __hash__(self) -> int:
        return hash(self._id())

    def at(self, level: str) -> "Rep":
        """This rep with its rows declared to live at ``level`` of a graph batch."""
        return Rep(self.kind, self.irreps, level, self.cell)

    def check(self, x: torch.Tensor, name: str) -> None:
        """Raise a ValueError naming ``name`` unless ``x`` can carry this rep."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor for rep {self}, got {type(x).__name__}")
        if x.dim() < 2 and self.dim is not None:
            raise ValueError(f"{name} must have shape (batch, ..., {self.dim}) for rep {self}, got {tuple(x.shape)}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dim (dim 0), got a 0-dim tensor")
        if self.kind == "rank2":
            if x.dim() < 3 or tuple(x.shape[-2:]) != (3, 3):
                raise ValueError(f"{name} must have shape (batch, ..., 3, 3) for rep rank2 (S -> R S R^T), "
                                 f"got {tuple(x.shape)}")
        elif self.cell and not ((x.dim() == 3 and tuple(x.shape[1:]) == (3, 3))
                                or (x.dim() == 2 and x.shape[1] == 3 and x.shape[0] % 3 == 0)):
            raise ValueError(f"{name} must be a periodic cell of shape (B, 3, 3) (rows: lattice vectors) or the "
                             f"flattened (3 B, 3), got {tuple(x.shape)}")
        elif self.dim is not None and x.shape[-1] != self.dim:
            what = f"irreps {self.irreps} (dim {self.dim})" if self.kind == "irreps" else f"{self.kind}"
            raise ValueError(f"{name} has last dim {x.shape[-1]} (shape {tuple(x.shape)}), but {what} needs last dim {self.dim}")
        if self.kind != "scalar" and not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor to rotate as {self}, got dtype {x.dtype}")

    def matrix(self, R: torch.Tensor) -> torch.Tensor:
        """``(..., d, d)``: how ``R`` ``(..., 3, 3)`` acts on one row of this rep, in pure torch
        (``d = 1`` for scalars and pseudoscalars, the block-diagonal Wigner-D matrix for
        irreps). The op layer computes the same with the caller's backend."""
        if self.kind == "scalar":
            return torch.ones(R.shape[:-2] + (1, 1), dtype=R.dtype, device=R.device)
        if self.kind == "pseudoscalar":
            return orientation(R)[..., None, None]
        if self.kind in ("vector", "position"):
            return R
        if self.kind == "pseudovector":
            return R * orientation(R)[..., None, None]
        if self.kind == "irreps":
            return wigner_D_matrix(self.key, R)
        if self.kind == "rank2":
            # vec(R S R^T) = (R kron R) vec(S), row-major
            return torch.einsum("...ik,...jl->...ijkl", R, R).reshape(R.shape[:-2] + (9, 9))
        raise ValueError(f"rep {self} has no matrix: it is not a rep of rows")

    def act(self, x: torch.Tensor, R: torch.Tensor, mask: Optional[torch.Tensor] = None, inverse: bool = False,
            M: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply ``rho(R)`` (or ``rho(R)^-1`` with ``inverse``) sample by sample.

        ``x``: ``(N, *inner, d)``; ``R``: ``(N, 3, 3)``; ``mask``: ``(N, *inner)`` bool,
        broadcastable, used only for the centroid of positions; ``M``: the action
        matrices ``(N, d, d)`` if already computed (else :meth:`matrix`). Computes in
        ``R.dtype`` and returns ``x.dtype``.
        """
        if self.kind == "scalar":
            return x
        n = x.shape[0]
        if M is None:
            M = self.matrix(R)
        if self.kind == "pseudoscalar":
            return (x.to(R.dtype) * M.reshape((n,) + (1,) * (x.dim() - 1))).to(x.dtype)
        d = 9 if self.kind == "rank2" else x.shape[-1]
        flat = x.to(R.dtype).reshape(n, -1, d)
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
    w = w.expand(x.shape)[..., :1].reshape(n, m, 1)
    kept = torch.where(w, pts, torch.zeros((), dtype=x.dtype, device=x.device))  # padding may hold inf
    return kept.sum(dim=1) / w.to(x.dtype).sum(dim=1).clamp_min(1)


def as_rep(rep: Union[str, "Rep", object], name: str = "rep") -> Rep:
    """Parse a rep: one of the names above, an e3nn irreps string, or an ``o3.Irreps``;
    a string may end in ``@node``, ``@edge`` or ``@graph`` (where its rows live in a graph
    batch)."""
    if isinstance(rep, Rep):
        return rep
    if isinstance(rep, str) and "@" in rep:
        base, _, level = rep.rpartition("@")
        level = level.strip()
        if level not in LEVELS:
            raise ValueError(f"{name}={rep!r}: the part after '@' must be one of {LEVELS}, got {level!r}")
        parsed = as_rep(base.strip(), name)
        if parsed.kind == "voxels":
            raise ValueError(f"{name}={rep!r}: a voxel grid has no graph level")
        if parsed.cell and level != "graph":
            raise ValueError(f"{name}={rep!r}: a periodic cell belongs to its graph ('cell' or 'cell@graph')")
        return parsed.at(level)
    if rep == "cell":
        return Rep("vector", level="graph", cell=True)
    if isinstance(rep, str) and rep.strip().startswith("voigt"):
        return Voigt.parse(rep, name)
    if isinstance(rep, str) and rep in _NAMED:
        return Rep(rep)
    if isinstance(rep, str) and rep.strip().startswith("voxels"):
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


class Voigt(Rep):
    """A symmetric 3 x 3 tensor as its six Voigt components (stress in ASE, Orb, SevenNet).

    Args:
        order: the six components in order, each two of ``x, y, z`` (``"zx"`` and
            ``"xz"`` are the same entry); default ASE's ``("xx", "yy", "zz", "yz", "xz", "xy")``.

    A Voigt tensor is rotated as the matrix it stands for (``S -> R S R^T``) and reduced
    as that matrix: a head declared ``"voigt"`` is compared with its target over the 9
    entries of the 3 x 3 tensor, whose squared error is rotation-invariant (the 6 Voigt
    entries weigh the off-diagonal ones half as much, which is not). Targets of such a
    head may be given in Voigt form or as ``(..., 3, 3)``.
    """

    ASE = ("xx", "yy", "zz", "yz", "xz", "xy")

    def __init__(self, order=ASE, level: Optional[str] = None):
        order = tuple(order)
        pairs = [tuple(sorted("xyz".index(c) for c in comp)) if len(comp) == 2 and set(comp) <= set("xyz") else None
                 for comp in order]
        if len(order) != 6 or None in pairs or len(set(pairs)) != 6:
            raise ValueError(f"a Voigt order names the six distinct entries of a symmetric 3 x 3 tensor, each two of "
                             f"x, y, z (e.g. {Voigt.ASE}), got {order!r}")
        super().__init__("voigt", level=level)
        self.dim = 6
        self.order = order
        self.rows = [i for i, _ in pairs]
        self.cols = [j for _, j in pairs]

    @property
    def name(self) -> str:
        return "voigt" if self.order == Voigt.ASE else f"voigt({', '.join(self.order)})"

    def _id(self):
        return self.kind, self.order, self.level, False

    def at(self, level: str) -> "Voigt":
        return Voigt(self.order, level)

    @property
    def rank2(self) -> Rep:
        """The rep of the 3 x 3 tensor this stands for."""
        return Rep("rank2", level=self.level)

    @classmethod
    def parse(cls, text: str, name: str = "rep") -> "Voigt":
        """``"voigt"`` (ASE's order) or ``"voigt(xx, yy, zz, xy, yz, zx)"``."""
        m = re.fullmatch(r"\s*voigt\s*(?:\((.*)\))?\s*", text)
        if m is None:
            raise ValueError(f"{name}={text!r} is not a Voigt rep: expected 'voigt' or 'voigt(xx, yy, zz, yz, xz, xy)'")
        if m.group(1) is None:
            return cls()
        try:
            return cls([c.strip() for c in re.split(r"[,\s]+", m.group(1).strip())])
        except ValueError as err:
            raise ValueError(f"{name}={text!r}: {err}") from None

    def check(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor for rep {self}, got {type(x).__name__}")
        if not ((x.dim() >= 2 and x.shape[-1] == 6) or (x.dim() >= 3 and tuple(x.shape[-2:]) == (3, 3))):
            raise ValueError(f"{name} must have shape (batch, ..., 6) (Voigt, order {self.order}) or "
                             f"(batch, ..., 3, 3) for rep {self}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor to rotate as {self}, got dtype {x.dtype}")

    def to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 3, 3)`` from the Voigt ``(..., 6)`` (a ``(..., 3, 3)`` tensor is returned as is)."""
        if x.shape[-1] != 6:
            return x
        S = x.new_zeros(x.shape[:-1] + (3, 3))
        S[..., self.rows, self.cols] = x
        S[..., self.cols, self.rows] = x
        return S

    def from_matrix(self, S: torch.Tensor) -> torch.Tensor:
        """The Voigt ``(..., 6)`` of the symmetric part of ``S`` ``(..., 3, 3)``."""
        return 0.5 * (S[..., self.rows, self.cols] + S[..., self.cols, self.rows])

    def matrix(self, R: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"rep {self} is rotated as the 3 x 3 tensor it stands for (Voigt.to_matrix, rank2)")


class Voxels(Rep):
    """A field on a cubic grid ``(B, ..., C, n, n, n)``: scalar channels, then vector channels.

    Args:
        scalars: number of scalar channels (``None``: every channel before the vectors).
        vectors: number of vector channels, each three consecutive channels ``(x, y, z)``.

    See the module docs for the axis, centre and component conventions. The string
    ``"voxels"`` in a :class:`~fastequiv.Spec` is ``Voxels()``, and the string
    ``"voxels(scalars=4, vectors=2)"`` is ``Voxels(scalars=4, vectors=2)``.
    """

    def __init__(self, scalars: Optional[int] = None, vectors: int = 0):
        if scalars is not None and (isinstance(scalars, bool) or not isinstance(scalars, int) or scalars < 0):
            raise ValueError(f"scalars must be a non-negative int or None, got {scalars!r}")
        if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 0:
            raise ValueError(f"vectors must be a non-negative int, got {vectors!r}")
        if scalars == 0 and vectors == 0:
            raise ValueError("a voxel rep needs at least one channel: got scalars=0, vectors=0")
        super().__init__("voxels")
        self.scalars, self.vectors = scalars, vectors

    def __repr__(self) -> str:
        if self.scalars is None and self.vectors == 0:
            return "Rep('voxels')"
        parts = ([f"scalars={self.scalars}"] if self.scalars is not None else []) + \
            ([f"vectors={self.vectors}"] if self.vectors else [])
        return f"Voxels({', '.join(parts)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Voxels) and (self.scalars, self.vectors) == (other.scalars, other.vectors)

    def __hash__(self) -> int:
        return hash(("voxels", self.scalars, self.vectors))

    @classmethod
    def parse(cls, text: str, name: str = "rep") -> "Voxels":
        """``"voxels"`` or ``"voxels(scalars=S, vectors=V)"`` (either keyword may be left out)."""
        m = re.fullmatch(r"\s*voxels\s*(?:\((.*)\))?\s*", text)
        if m is None:
            raise ValueError(f"{name}={text!r} is not a voxel rep: expected 'voxels' or 'voxels(scalars=S, vectors=V)'")
        kwargs = {}
        for item in filter(None, (s.strip() for s in (m.group(1) or "").split(","))):
            km = re.fullmatch(r"(scalars|vectors)\s*=\s*(\d+)", item)
            if km is None or km.group(1) in kwargs:
                raise ValueError(f"{name}={text!r}: cannot read {item!r}; expected 'scalars=S' and/or 'vectors=V'")
            kwargs[km.group(1)] = int(km.group(2))
        return cls(**kwargs)

    def n_scalars(self, C: int) -> int:
        """The number of scalar channels in a grid of ``C`` channels (checked by :meth:`check`)."""
        return C - 3 * self.vectors

    def check(self, x: torch.Tensor, name: str) -> None:
        """Raise a ValueError naming ``name`` unless ``x`` is ``(B, ..., C, n, n, n)`` for this rep."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor for rep {self}, got {type(x).__name__}")
        if x.dim() < 5:
            raise ValueError(f"{name} must have shape (batch, ..., channels, n, n, n) for rep {self}, got {tuple(x.shape)}")
        D, H, W = x.shape[-3:]
        if not D == H == W:
            raise ValueError(f"{name} has grid {(D, H, W)} (shape {tuple(x.shape)}), but rep {self} needs a cubic "
                             "grid D == H == W (a rotation of the cube must map the grid onto itself)")
        C = x.shape[-4]
        want = None if self.scalars is None else self.scalars + 3 * self.vectors
        if (want is not None and C != want) or C < 3 * self.vectors:
            expected = f"{want}" if want is not None else f">= {3 * self.vectors}"
            raise ValueError(f"{name} has {C} channels (dim -4 of shape {tuple(x.shape)}), but rep {self} needs "
                             f"{expected} channels ({self.vectors} vectors of 3 channels each)")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor to resample as {self}, got dtype {x.dtype}")

    def act(self, x: torch.Tensor, R: torch.Tensor, mask: Optional[torch.Tensor] = None, inverse: bool = False,
            M: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rho(R) x`` (``rho(R)^-1 x`` with ``inverse``) sample by sample: ``x``
        ``(N, ..., C, n, n, n)``, ``R`` ``(N, 3, 3)``. ``mask`` is not used (a grid has no
        centroid). Computes in ``R.dtype`` (float64 if ``x`` is), returns ``x.dtype``."""
        lead, C, n = grid_shape(x.shape)
        acc = torch.float64 if torch.float64 in (x.dtype, R.dtype) else torch.float32
        M = R.to(acc)
        M = (M.transpose(-1, -2) if inverse else M).contiguous()
        vec = self.vector_starts(lead, C, x.device)
        out = resample(x.reshape(x.shape[0], lead * C, n, n, n), M, vec, is_cube_element(R))
        return out.reshape(x.shape)

    # -- layout ---------------------------------------------------------------------------

    def vector_starts(self, lead: int, C: int, device) -> torch.Tensor:
        """First channel of every vector in the ``lead * C`` flattened channels: int32 ``(G,)``."""
        if not self.vectors or not lead:  # scalar grids (the common case): one empty tensor
            return torch.empty(0, dtype=torch.int32, device=device)
        first = self.n_scalars(C) + 3 * torch.arange(self.vectors, device=device, dtype=torch.int32)
        return (first[None, :] + C * torch.arange(lead, device=device, dtype=torch.int32)[:, None]).reshape(-1)
