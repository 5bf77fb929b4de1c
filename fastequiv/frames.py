"""FrameAveraged: a model made invariant/equivariant by averaging over the PCA frames of its input.

Frame averaging (Puny et al., ICLR 2022) replaces the Haar average of :class:`fastequiv.Twirled`
by an average over a small set of group elements that moves with the input. Here the set
comes from the principal axes of each sample's positions: with ``c`` the centroid of the
valid points and ``C = mean_i (p_i - c)(p_i - c)^T = V diag(l) V^T`` (eigenvalues
ascending), the frames are the rotations ``R_S = S V^T`` for the sign matrices
``S = diag(+-1, +-1, +-1)``: the 4 with ``det R_S = +1`` for SO(3), all 8 for O(3). Each
``R_S`` turns the sample's principal axes onto the coordinate axes. The prediction is the
average of the twisted predictions over the frames::

    f_FA(x) = (1/|F|) sum_{R in F(x)} rho_out(R)^-1 f(rho_in(R) x)

Why it is exact. Rotating the sample, ``x' = Q x`` (about its centroid), gives
``C' = Q C Q^T`` and eigenvectors ``Q V`` up to the sign of each column; the set of
frames ``{S V^T}`` does not depend on those signs, so ``F(Q x) = F(x) Q^-1`` and
``rho_in(R Q^-1) Q x = rho_in(R) x``: the model sees the same K inputs, and the
back-rotation gives ``f_FA(Q x) = rho_out(Q) f_FA(x)``. This holds to float rounding
(eigenvectors are accurate to about ``eps / gap``, the machine epsilon over the relative
eigengap) for every model, equivariant or not, whenever the three eigenvalues are distinct.
All K frames of all samples go through the model in one call, stacked copy-major like
every other function of the package (:mod:`fastequiv.stacking`).

Degenerate spectra. When two eigenvalues coincide (relative gap ``(l_{i+1} - l_i) / l_3``
at most ``tol``) the eigenvectors in their plane are arbitrary, so the frames are not
equivariant: symmetric tops (a regular polygon such as benzene's ring, NH3, CH3Cl),
linear molecules (``l_1 = l_2 = 0``), spherical tops (a regular tetrahedron, an
octahedron, a single atom: all three equal). A planar molecule whose in-plane moments
differ is not degenerate (``l_1 = 0 < l_2 < l_3``): its frames are exact. ``degenerate=``
says what such a sample gets:

* ``"twirl"`` (default): the Haar average of :class:`fastequiv.Twirled` with ``samples``
  i.i.d. rotations (default 16; fixed by ``seed=``, fresh at each call otherwise), in a
  second model call over the batch that is made only when the batch holds a degenerate
  sample (deciding it reads one flag from the device). Guaranteed: an unbiased estimate
  of the twirled model ``fbar(x)`` (which is exactly equivariant), equivariant in
  distribution with fresh draws; not exactly equivariant for one draw (its error falls
  as ``1 / sqrt(samples)``). With ``rotations=`` (a design, :mod:`fastequiv.designs`) the
  fallback is the design's weighted average instead: deterministic, and exactly ``fbar(x)``
  (so exactly equivariant) wherever the model's twisted prediction has no content above
  the design's degree.
* ``"frames"``: the PCA frames as they come, whatever basis the eigensolver picked in the
  degenerate plane: no second call, no host read. Exact for a linear molecule (every
  position on one line, the other inputs invariant) and outputs of degree at most 1
  (scalars, vectors, pseudovectors: the frames pair up into rotations by pi about the
  axis, which average the in-plane part of a vector to zero); otherwise as equivariant as
  the model itself is under rotations within the degenerate plane.
* ``"raise"``: a ValueError naming the samples (one host read).

Near a degenerate input the frames turn quickly as the input moves, so a frame-averaged
model is not continuous there (no finite frame can be: Dym et al., 2024); a force field
built on it can show jumps along a trajectory through such a configuration.

Training: ``frames="one"`` draws one frame per sample (uniformly among the 4 or 8) and
makes one model call over ``B`` rows; its output is equivariant in distribution (the
drawn frame moves with the input), which makes it a data augmentation that canonicalises
as it goes. Degenerate samples then get one Haar rotation (``"twirl"``), their frame
(``"frames"``), or raise. Gradients flow to the model's parameters and, through the
eigenvectors, to the positions (forces of a frame-averaged energy are the derivative of
the averaged function).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from . import groups
from .adapted import Adapted, own_spec
from .ops.action import Action
from .ops.layout import centroids, mask_for, rows_of, segment_outer, segment_sum
from .ops.random_rotations import random_rotations_seeded, seed_tensor
from .reps import Rep
from .spec import Spec
from .stacking import Inputs, Stacked, call_model, plan, read_inputs, split_heads, stack, stack_copies
from .design_twirl import design_for, stack_design, weighted_heads
from .twirl import averaged_heads, wrapped_inputs

__all__ = ["FrameAveraged", "Frames", "principal_frames", "frame_signs"]

_FRAMES = ("all", "one")
_DEGENERATE = ("twirl", "frames", "raise")


def frame_signs(group: str, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``(K, 3)``: the diagonals of the sign matrices ``S`` of the frames: the 4 with
    ``det S = +1`` for ``"SO3"``, then (``"O3"``) the 4 with ``det S = -1``."""
    proper = [[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    rows = proper + [[-s for s in row] for row in proper] if group == "O3" else proper
    return torch.tensor(rows, dtype=dtype, device=device)


class Frames(NamedTuple):
    """The PCA frames of a batch: ``R`` ``(K, B, 3, 3)``, frame ``k`` of sample ``b``;
    ``eigenvalues`` ``(B, 3)`` ascending (of the covariance, float64); ``degenerate``
    ``(B,)`` bool, the samples whose spectrum has a relative gap at most ``tol``."""

    R: torch.Tensor
    eigenvalues: torch.Tensor
    degenerate: torch.Tensor


def principal_frames(pos: torch.Tensor, group: str = "SO3", *, mask: Optional[torch.Tensor] = None,
                     batch: Optional[torch.Tensor] = None, num_graphs: Optional[int] = None,
                     tol: float = 1e-4) -> Frames:
    """The frames ``S V^T`` of each sample's positions (see module docs).

    Args:
        pos: ``(B, *inner, 3)`` positions of a dense batch, or ``(N, *inner, 3)`` nodes of a
            graph batch with ``batch``.
        group: ``"SO3"`` (4 frames) or ``"O3"`` (8).
        mask: bool ``(B, *inner)`` (``(N, *inner)``) of the valid points; the centroid and
            the covariance are over these only (as :func:`fastequiv.ops.rotate_copies`
            turns positions about the centroid of the valid points).
        batch, num_graphs: the graph of each node, and the number of graphs B.
        tol: a sample is degenerate when a gap between consecutive eigenvalues is at most
            ``tol`` times the largest one (or all are 0).
    Returns:
        :class:`Frames`; ``R`` in the accumulation dtype of ``pos`` (float64 for float64,
        else float32), computed in float64; differentiable with respect to ``pos``.
    """
    if group not in ("SO3", "O3"):
        raise ValueError(f"group must be 'SO3' or 'O3' for PCA frames, got {group!r} (a finite group is averaged "
                         "exactly by fe.Twirled)")
    if not isinstance(pos, torch.Tensor) or pos.dim() < 2 or pos.shape[-1] != 3 or not pos.is_floating_point():
        raise ValueError(f"pos must be a floating tensor of shape (B, ..., 3), got "
                         f"{tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a float in [0, 1), got {tol!r}")
    B = pos.shape[0] if batch is None else num_graphs
    if B is None:
        raise ValueError("num_graphs is required with batch= (the number of graphs)")
    rows = rows_of(pos.shape, Rep("position"), mask_for(mask, pos.shape, "pos"), batch)
    x = pos.reshape(rows.N, 3).to(torch.float64)
    c = centroids(x, rows, B)
    sample = rows.sample if rows.sample is not None else torch.arange(rows.N, device=x.device) // max(rows.P, 1)
    d = x - c[sample]
    if rows.valid is not None:  # a padded point may hold anything: selected out, not multiplied
        d = torch.where(rows.valid[:, None], d, torch.zeros((), dtype=d.dtype, device=d.device))
    weight = torch.ones(rows.N, 1, dtype=x.dtype, device=x.device) if rows.valid is None else \
        rows.valid[:, None].to(x.dtype)
    count = segment_sum(weight, rows.sample, rows.P, B)[:, 0]
    C = segment_outer(d[None], d, rows.sample, rows.P, B)[0] / count.clamp_min(1)[:, None, None]
    eigenvalues, V = torch.linalg.eigh(C)
    # proper V (its last column flipped where det V = -1): then S V^T is proper iff det S = +1
    det = groups.orientation(V.detach())
    V = torch.cat([V[..., :2], V[..., 2:] * det[:, None, None]], dim=-1)
    S = frame_signs(group, x.dtype, x.device)
    R = S[:, None, :, None] * V.transpose(-1, -2)[None]  # (K, B, 3, 3): row i of V^T times s_i
    scale = eigenvalues[:, 2]
    gaps = eigenvalues[:, 1:] - eigenvalues[:, :-1]
    degenerate = (gaps <= tol * scale[:, None]).any(-1) | (scale <= 0)
    acc = torch.float64 if pos.dtype == torch.float64 else torch.float32
    return Frames(R.to(acc), eigenvalues, degenerate)


class FrameAveraged(nn.Module):
    """``model`` averaged over the PCA frames of its input: exactly invariant/equivariant
    for inputs with a non-degenerate spectrum (see module docs).

    Call it like the wrapped model (or, for a model adapted with :func:`fastequiv.adapt`,
    with the codebase's batch). Dense and graph batches work as in
    :func:`fastequiv.equivariance_error`; the frames are built per sample (per graph).

    Args:
        model: the model (an ``nn.Module`` is registered as a submodule).
        spec: a :class:`fastequiv.Spec` with group ``"SO3"`` (4 frames) or ``"O3"`` (8);
            leave it out for an adapted model, which carries its own.
        frames: ``"all"`` (the average over every frame: one model call over ``K * B``
            rows, K = 4 or 8) or ``"one"`` (one random frame per sample, for training).
        positions: the name of the input the frames are built from; default the spec's
            only ``"position"`` input.
        tol: the relative eigengap at or below which a sample is degenerate.
        degenerate: ``"twirl"``, ``"frames"`` or ``"raise"``: what a degenerate sample gets.
        samples: K of the ``"twirl"`` fallback (default 16, as :class:`fastequiv.Twirled`).
        rotations: a rotation design for the ``"twirl"`` fallback of ``frames="all"``
            instead of ``samples`` i.i.d. draws (``"design:L"``, ... as in
            :class:`fastequiv.Twirled`); ``frames="one"`` still gives a degenerate sample
            one Haar rotation.
        seed: the Philox stream of the fallback's rotations and of ``frames="one"``'s
            draws; default fresh draws at every call.
        chunk_size, backend, check_finite: as in :func:`fastequiv.equivariance_error`.
    """

    def __init__(self, model: Callable, *, spec: Optional[Spec] = None, frames: str = "all",
                 positions: Optional[str] = None, tol: float = 1e-4, degenerate: str = "twirl",
                 samples: Optional[int] = None, rotations=None, seed: Optional[int] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto", check_finite: bool = True):
        super().__init__()
        spec = own_spec(model, spec)
        if spec.group not in ("SO3", "O3"):
            raise ValueError(f"spec.group must be 'SO3' or 'O3' for frame averaging, got {spec.group!r} (a finite "
                             "group is averaged exactly, over all its elements, by fe.Twirled)")
        if frames not in _FRAMES:
            raise ValueError(f"frames must be one of {_FRAMES}, got {frames!r}")
        if degenerate not in _DEGENERATE:
            raise ValueError(f"degenerate must be one of {_DEGENERATE}, got {degenerate!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
            raise ValueError(f"tol must be a float in [0, 1), got {tol!r}")
        self.design = None if rotations is None else design_for(rotations, spec, samples=samples)
        self.fallback_K = self.design.size if self.design is not None else plan(spec, samples, 16)[0]
        if seed is not None:
            groups.resolve_seed(seed)
        self.model, self.spec, self.frames, self.tol, self.degenerate = model, spec, frames, tol, degenerate
        self.positions = _position_input(spec, positions)
        self.seed, self.chunk_size, self.backend, self.check_finite = seed, chunk_size, backend, check_finite

    def prepare(self, inputs):
        """The wrapped model's inputs: an adapted model's codebase batch is prepared by it."""
        return self.model.prepare(inputs) if isinstance(self.model, Adapted) else inputs

    def forward(self, *args, **kwargs):
        inputs = wrapped_inputs(self.model, self.spec, args, kwargs, "FrameAveraged")
        batch = read_inputs(inputs, self.spec, None, self.chunk_size)
        fr = self.frames_of(batch)
        if self.degenerate == "raise":
            _raise_on_degenerate(fr)
        if self.frames == "one":
            R = self._one_frame(fr, batch)
            return self.spec.build_output(averaged_heads(self._stacked(batch, R), self.backend))
        means = averaged_heads(self._stacked(batch, fr.R), self.backend)
        if self.degenerate == "twirl" and bool(fr.degenerate.any()):  # one host read
            if self.design is not None:
                st = stack_design(self.model, inputs, self.spec, self.design, turn=False, chunk_size=self.chunk_size,
                                  backend=self.backend, check_finite=self.check_finite)
                twirled = weighted_heads(st, self.design.weights, self.backend)
            else:
                st = stack(self.model, inputs, self.spec, self.fallback_K, False, seed=self.seed,
                           chunk_size=self.chunk_size, backend=self.backend, check_finite=self.check_finite)
                twirled = averaged_heads(st, self.backend)
            means = [_select(fr.degenerate, head, t, m) for head, t, m in zip(st.heads, twirled, means)]
        return self.spec.build_output(means)

    def frames_of(self, batch: Inputs) -> Frames:
        """The :class:`Frames` of a batch read by :func:`fastequiv.stacking.read_inputs`."""
        value = next(value for name, value, _ in batch.leaves if name == self.positions)
        layout = batch.layout
        return principal_frames(value, self.spec.group, mask=batch.mask, tol=self.tol,
                                batch=None if layout is None else layout.batch,
                                num_graphs=None if layout is None else layout.B)

    def _one_frame(self, fr: Frames, batch: Inputs) -> torch.Tensor:
        """``(1, B, 3, 3)``: one frame per sample, uniformly drawn; a Haar rotation for a
        degenerate sample with ``degenerate="twirl"``."""
        K, B = fr.R.shape[:2]
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=batch.device).manual_seed(self.seed)
        pick = torch.randint(0, K, (B,), generator=gen, device=batch.device)
        R = fr.R[pick, torch.arange(B, device=batch.device)]
        if self.degenerate == "twirl":
            key = seed_tensor(self.seed, None, batch.device)
            haar = random_rotations_seeded(B, key, self.spec.group, R.dtype, backend=self.backend)
            R = torch.where(fr.degenerate[:, None, None], haar, R)
        return R[None]

    def _stacked(self, batch: Inputs, R: torch.Tensor) -> Stacked:
        """Steps 3 to 5 of :mod:`fastequiv.stacking` with the frames as the copies' elements."""
        action = Action(R, self.backend)
        K = R.shape[0]
        names, values = stack_copies(batch, action, self.backend)
        out = call_model(self.model, self.spec, batch, names, values, K, self.chunk_size)
        heads = split_heads(out, self.spec, batch, K, self.check_finite)
        return Stacked(action, heads, batch, K, False)

    def extra_repr(self) -> str:
        fallback = "" if self.design is None else f", design={self.design.name!r}, degree={self.design.degree}"
        return (f"group={self.spec.group!r}, frames={self.frames!r}, positions={self.positions!r}, "
                f"degenerate={self.degenerate!r}, tol={self.tol}{fallback}")


def _position_input(spec: Spec, name: Optional[str]) -> str:
    """The input the frames are built from: ``name`` (checked), or the only position input."""
    struct = spec.inputs if isinstance(spec.inputs, dict) else \
        {str(i): r for i, r in enumerate(spec.inputs)} if isinstance(spec.inputs, tuple) else {"input": spec.inputs}
    found = [k for k, r in struct.items() if isinstance(r, Rep) and r.kind == "position"]
    if name is not None:
        if name not in found:
            raise ValueError(f"positions={name!r} must name an input with rep \"position\"; the spec's are {found}")
        return name
    if len(found) != 1:
        raise ValueError(f"FrameAveraged builds its frames from the positions: the spec has {len(found)} inputs with "
                         f"rep \"position\" ({found}); pass positions= to name one" if found else
                         "FrameAveraged builds its frames from the positions, but the spec has no input with rep "
                         "\"position\" (declare the coordinates as \"position\")")
    return found[0]


def _raise_on_degenerate(fr: Frames) -> None:
    if bool(fr.degenerate.any()):
        which = torch.nonzero(fr.degenerate).flatten().tolist()
        raise ValueError(f"samples {which[:10]}{' ...' if len(which) > 10 else ''} have a degenerate PCA spectrum "
                         f"(eigenvalues {fr.eigenvalues[which[0]].tolist()} for sample {which[0]}): their frames are "
                         "not equivariant; pass degenerate='twirl' or 'frames' to average them anyway")


def _select(degenerate: torch.Tensor, head, twirled: torch.Tensor, framed: torch.Tensor) -> torch.Tensor:
    """Per row of a head: the twirled value where the row's sample is degenerate."""
    rows = degenerate if head.batch is None else degenerate[head.batch]
    return torch.where(rows.reshape((-1,) + (1,) * (framed.dim() - 1)), twirled.to(framed.dtype), framed)
