"""Rotation designs on the hot path of a planned call (:mod:`fastequiv.design_twirl` holds
the estimators and their reference steps).

On the ``"cpu"`` backend a measuring call with a design is planned as an i.i.d. one with
``R * K`` copies (:class:`fastequiv.stacking.CallPlan`, the same rotations ``G_{b,r} R_i``,
turn ``r`` of sample ``b`` rotation ``r B + b`` of the seed stream): the inputs are stacked
by its kernels, each replicate's block is one weighted ``reduce_rows`` kernel call, and the
estimators, the jackknife and the combination of heads run in one more
(:func:`fastequiv.ops.decomposition.decompose_design`), a few torch ops a call in all.
The steps of :mod:`fastequiv.design_twirl` stay the reference: per-sample values, batch
values, ``rotation_stderr`` and gradients agree with theirs to rounding
(tests/test_design_fixed_cost.py).
"""

from __future__ import annotations

import torch

from . import groups
from .backends import native
from .designs import Design
from .estimators import Decomposition, DesignDecomposition, DesignLabelFree, LabelFree, Scale, Terms, fields_of
from .ops.action import Action
from .ops.decomposition import DesignDecomposed, decompose_design
from .stacking import CallPlan, Stacked, call_model, read_inputs, split_heads

__all__ = ["decompose_planned"]


def _design_constants(p: CallPlan, design: Design, dtype: torch.dtype) -> tuple:
    """``(rotations (1, K, 1, 3, 3) float64, weights (K,) in dtype)`` of ``design``, made
    once per plan (the plan holds the design, so its id stays its own)."""
    key = ("design", id(design), dtype)
    if key not in p.constants:
        p.constants[key] = (design, design.rotations.to(torch.float64).reshape(1, design.size, 1, 3, 3).contiguous(),
                            design.weights.to(dtype).contiguous())
    return p.constants[key][1:]


def _turned(p: CallPlan, design: Design, R: int, seed, generator) -> torch.Tensor:
    """:func:`design_rotations` on a planned call: ``(R K, B, 3, 3)`` in the plan's dtype,
    the turns drawn in place, the same numbers."""
    key = groups.resolve_seed(seed, generator)
    rotations, _ = _design_constants(p, design, p.acc)
    G = torch.empty(R, 1, p.B, 3, 3, dtype=torch.float64)
    native.raw().random_rotations_raw_cpu(G.data_ptr(), native.CODES[torch.float64], R * p.B, key, 0, False)
    return (G @ rotations).reshape(R * design.size, p.B, 3, 3).to(p.acc)


def decompose_planned(p: CallPlan, model, inputs, target, design: Design, R: int, mask, weights: dict, seed,
                       generator, check_finite: bool) -> tuple:
    """:func:`design_decompose` on the hot path of a planned call: ``(None, (d, head_valid))``,
    the same values to rounding; or ``(stacked, None)`` when the heads are not planned (a
    position or Voigt output, ...), for the steps to go on from the model's outputs."""
    spec, K = p.spec, design.size
    values = p.leaf_values(inputs)
    batch = p.inputs_of(values, p.mask_of(inputs, mask))
    try:
        action = Action(_turned(p, design, R, seed, generator), p.backend)
        out = call_model(model, spec, batch, p.names, p.copies(values, action, batch.mask), R * K, None)
        grad = torch.is_grad_enabled()
        rows = p.head_rows(out, target, action, batch, grad, replicates=R)
        if rows is None:
            return Stacked(action, split_heads(out, spec, batch, R * K, check_finite), batch, R * K, False), None
        names = spec.output_names()
        combined = isinstance(spec.output, (dict, tuple))
        _, w = _design_constants(p, design, rows[0].M.dtype)
        r = decompose_design(rows, p.B, K, R, w, [weights[n] for n in names], combine=combined,
                             labelled=target is not None, grad=grad and any(h.out.requires_grad for h in rows))
        if check_finite:
            flags = [(r.flags >> (2 * h)) & 3 for h in range(len(names))]
            if not all(f & 2 for f in flags):  # the outputs' check, as the steps run it (or a target's NaN)
                split_heads(out, spec, batch, R * K, check_finite=True)
            empty = [n for n, f in zip(names, flags) if not f & 1]
            if empty:
                raise ValueError(f"every element of output head(s) {empty} is masked out: there is nothing to "
                                 "decompose")
    except ValueError:
        # the plan reads a batch's values only where a kernel checks them for free: where one
        # refused an index, the steps' checks name the input and its range
        read_inputs(inputs, spec, mask, None)
        raise
    return None, _from_kernel(r, names if combined else [], weights, design, R, target is not None)


def _from_kernel(r: DesignDecomposed, heads: list, weights: dict, design: Design, R: int, labelled: bool) -> tuple:
    """``(decomposition, head_valid)`` of :func:`assemble` from the kernel's values (slot 0
    the top level, then each of ``heads``, none for a single output)."""
    samples, exact = R * design.size, R >= 2

    def slot(s: int, parts: dict, head_weights: dict, total, equiv) -> Decomposition:
        v = r.scalars[7 * s: 7 * s + 7]
        return Decomposition(total=total, mean=v[1], equiv=equiv, pct=v[3], per_sample=Terms(*r.per_sample[3 * s: 3 * s + 3]),
                             stderr=Terms(v[4], v[5], v[6]), samples=samples, exact=exact, exhaustive=False,
                             heads=parts, weights=head_weights, valid=r.valid[s])

    parts = {h: slot(s, {}, {}, r.scalars[7 * s], r.scalars[7 * s + 2]) for s, h in enumerate(heads, start=1)}
    d = slot(0, parts, dict(weights) if heads else {}, r.total, r.equiv)
    valid_of = {"": r.valid[0], **dict(zip(heads, r.valid[1:]))}
    if labelled:
        return DesignDecomposition(**fields_of(d), rotation_stderr=Terms(*r.rotation), design=design, replicates=R), valid_of

    def free(s: int, x: Decomposition, lf_heads: dict) -> dict:
        return dict(equiv=x.equiv, norm=x.mean, rel=r.rel[2 * s],
                    per_sample=Scale(x.per_sample.equiv, x.per_sample.mean, r.per_rel[s]),
                    stderr=Scale(x.stderr.equiv, x.stderr.mean, r.rel[2 * s + 1]), samples=samples, exact=exact,
                    exhaustive=False, heads=lf_heads, weights=x.weights)

    lf_heads = {h: LabelFree(**free(s, parts[h], {})) for s, h in enumerate(heads, start=1)}
    return DesignLabelFree(**free(0, d, lf_heads), rotation_stderr=Scale(*r.rotation), design=design,
                           replicates=R), valid_of
