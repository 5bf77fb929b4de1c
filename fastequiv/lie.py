"""The Lie derivative: the infinitesimal equivariance error, by forward-mode AD.

For a generator ``X`` of so(3) the Lie derivative of a model ``f`` at ``x`` is the
derivative of its twisted prediction along the one-parameter group ``exp(t X)``::

    (L_X f)(x) = d/dt|_{t=0} rho_out(exp(tX))^-1 f(rho_in(exp(tX)) x)
               = J_f(x) [drho_in(X) x] - drho_out(X) f(x)

with the generators ``X_i v = e_i x v`` (``(X_i)_jk = -eps_ijk``), so ``exp(t X_i)`` is
the right-handed rotation by angle ``t`` about axis ``i`` (x, y, z). ``L_X f = 0`` for
every ``X`` iff ``f`` is equivariant to first order at ``x``. Sign convention: for
``f(x) = A x`` with vector input and output, ``L_X f(x) = [A, X] x = (A X - X A) x``.

Relation to L_equiv. Fix ``x`` and view the twisted prediction as a function on the
group, ``phi(g) = f_g(x)``. Its derivative along ``X_i`` at ``g`` has the norm of
``(L_i f)(g x)``, and L_equiv is its variance over Haar ``g``. The Poincare inequality on
SO(3) (the Laplacian ``-sum_i X_i^2`` has eigenvalue ``l (l + 1)`` on spin ``l``, so its
smallest non-zero one is 2) gives, with ``n`` the valid elements of a sample as in the
MSE normalisation::

    L_equiv(x) <= 1/2 * E_{g ~ Haar} (1/n) sum_i ||(L_i f)(g x)||^2

with equality iff ``g -> f_g(x)`` has no component of spin ``l >= 2`` (e.g. ``f = A x``
with antisymmetric ``A``). For a model ``f_eq + eps h`` with ``f_eq`` equivariant both
sides are ``eps^2`` times a quadratic form in ``h``. Averaged over a rotation-invariant
data distribution (what augmentation trains on) the ``E_g`` drops out, so the batch mean
of ``1/(2n) sum_i ||L_i f(x)||^2`` is a cheap upper estimate of the mean L_equiv.

:func:`lie_derivative` returns the three ``L_i f(x)`` themselves; it costs one forward
pass (with forward-mode AD) over the 3 stacked copies ``x, x, x``, no rotation sampling.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.func import jvp

from .ops.layout import mask_for
from .ops.wigner_d import wigner_D_key
from .reps import Rep, centroid
from .spec import Spec, describe

__all__ = ["lie_derivative", "so3_generators"]


def so3_generators(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``(3, 3, 3)``: ``X_i`` with ``X_i v = e_i x v`` (``exp(t X_i)`` rotates by ``t`` about axis ``i``)."""
    X = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        X[i, k, j], X[i, j, k] = 1.0, -1.0
    return X


def _infinitesimal(rep: Rep, x: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``drho(X_i) x`` for the three generators: ``(3, *x.shape)`` in ``X.dtype``.

    Near the identity ``det = +1``, so pseudo-reps act like their proper counterparts.
    """
    xa = x.to(X.dtype)
    if rep.kind in ("scalar", "pseudoscalar"):
        return torch.zeros((3,) + tuple(x.shape), dtype=X.dtype, device=x.device)
    if rep.kind in ("vector", "pseudovector"):
        return torch.einsum("gij,...j->g...i", X, xa)
    if rep.kind == "position":
        c = centroid(xa, mask).reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (3,))
        return torch.einsum("gij,...j->g...i", X, xa - c)
    if rep.kind == "irreps":
        # drho(X) = d/dt D(exp(tX)) at 0, by forward AD through the reference Wigner-D
        eye = torch.eye(3, dtype=X.dtype, device=X.device).expand(3, 3, 3).contiguous()
        _, dD = jvp(lambda R: wigner_D_key(rep.key, R, backend="torch"), (eye,), (X,))
        return torch.einsum("gij,...j->g...i", dD, xa)
    raise ValueError(f"lie_derivative supports scalar, vector, position and irreps reps, got {rep}")


def lie_derivative(model: Callable, inputs: Any, *, spec: Spec, mask: Optional[torch.Tensor] = None):
    """The Lie derivatives ``L_i f(x)`` along the three generators of so(3) (see module docs).

    Args:
        model: called like in :func:`fastequiv.equivariance_error`; it must map rows
            independently and support forward-mode AD (``torch.func.jvp``).
        inputs: a tensor, tuple or dict mirroring ``spec.inputs`` (dense layout).
        spec: a :class:`fastequiv.Spec`; its group is ignored (the generators are those of SO(3)).
        mask: optional bool ``(B, *inner)`` of valid elements, unless the spec names one:
            positions turn about the centroid of their valid points, and the derivatives of
            invalid output elements are set to 0.
    Returns:
        the model's output structure (a tensor, tuple or dict) with every leaf of shape
        ``(3, B, *E)``: entry ``i`` is ``L_{X_i} f(x)`` for the x, y, z generators, in the
        accumulation dtype (float64 for float64 outputs, else float32).
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"spec must be a fastequiv.Spec, got {type(spec).__name__}")
    if getattr(spec, "graph", None):
        raise ValueError("lie_derivative supports the dense layout only; the spec names graph inputs")
    leaves = spec.input_leaves(inputs)
    tensors = [v for _, v, r in leaves if r is not None]
    if not tensors:
        raise ValueError("inputs have no tensor the spec gives a rep")
    B = tensors[0].shape[0]
    if any(v.shape[0] != B for v in tensors):
        raise ValueError(f"every input needs the same batch size in dim 0, got {[tuple(v.shape) for v in tensors]}")
    spec_mask = spec.mask_of(inputs)
    if spec_mask is not None and mask is not None:
        raise ValueError("pass mask= or name a mask input in the Spec, not both")
    mask = spec_mask if spec_mask is not None else mask
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape[:1] != (B,)):
        raise ValueError(f"mask must be a bool tensor of shape (B={B}, ...), got {describe(mask)}")
    floats = [v for v in tensors if v.is_floating_point()]
    acc = torch.float64 if any(v.dtype == torch.float64 for v in floats) else torch.float32
    device = tensors[0].device
    X = so3_generators(acc, device)

    def stack3(v):
        return torch.cat([v, v, v], dim=0)  # a copy: forward AD needs distinct memory

    names, fixed, moving, tangents = [], {}, [], []
    for name, value, rep in leaves:
        names.append(name)
        if rep is None or rep.kind in ("scalar", "pseudoscalar") or not value.is_floating_point():
            fixed[name] = stack3(value) if isinstance(value, torch.Tensor) else value
            continue
        m = mask_for(mask, value.shape, name) if mask is not None else None
        t = _infinitesimal(rep, value, X, m)
        moving.append(name)
        tangents.append(t.reshape((3 * B,) + tuple(value.shape[1:])).to(value.dtype))
    primals = tuple(stack3(v) for n, v, r in leaves if n in moving)

    def call(*moved):
        values = dict(fixed, **dict(zip(moving, moved)))
        args, kwargs = spec.build_inputs(names, [values[n] for n in names])
        return tuple(v for _, v, _ in spec.output_leaves(model(*args, **kwargs)))

    if primals:
        out, dout = jvp(call, primals, tuple(tangents))
    else:  # only invariant inputs: the model's part is zero
        out = call()
        dout = tuple(torch.zeros_like(o) for o in out)

    results = []
    for (name, o, rep), do in zip(spec.output_leaves(spec.build_output(list(out))), dout):
        if o.shape[0] != 3 * B:
            raise ValueError(f"model output {name!r} has {o.shape[0]} rows in dim 0 but the model was called on "
                             f"{3 * B} rows (3 generators x batch {B}); the model must keep the batch size")
        o = o.reshape((3, B) + tuple(o.shape[1:]))
        do = do.reshape(o.shape).to(acc)
        m = mask_for(mask, o.shape[1:], f"output {name!r}") if mask is not None else None
        own = _infinitesimal(rep, o[0], X, m)  # drho_out(X_i) f(x), f(x) from copy 0
        lie = do - own
        if m is not None:
            lie = lie * m
        results.append(lie)
    return spec.build_output(results)
