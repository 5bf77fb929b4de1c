"""Training-dynamics diagnostics: how the gradients and curvature of L_mean and L_equiv compare.

::

    g = fe.diagnostics.gradient_alignment(model, inputs, target, spec=spec, samples=8, seed=0)
    g.cos["all"], g.cos["encoder.layers.0"]     # cos(grad L_mean, grad L_equiv), overall and per module
    h = fe.diagnostics.hessian_spectrum(model, inputs, target, spec=spec, term="equiv", k=8, seed=0)
    h.eigenvalues, h.condition(rtol=1e-3)       # top-k curvature (Lanczos on Hessian-vector products)
    e = fe.diagnostics.equivariance_per_element(model, inputs, target, spec=spec, samples=8, seed=0)
    e.heads["forces"]                           # L_equiv per atom and component: where symmetry breaks

Every function here pushes the K rotated copies of the batch through the model once
(:func:`fastequiv.stacking.stack`: the same spec, masks, graph batches, groups, rotations
and seeds as :func:`fastequiv.equivariance_error`) and differentiates the estimators of
:mod:`fastequiv.estimators` with ``torch.autograd.grad``: exact values for an exhaustive
finite-group twirl, the unbiased i.i.d. estimators otherwise (``L_mean_hat = bias -
spread / (K - 1)``, ``L_equiv_hat = K / (K - 1) spread``). Their gradients are unbiased
for the gradients of L_mean and L_equiv, since the rotations do not depend on the
parameters. Nothing is left in any ``.grad``; the model is evaluated in eval mode
(dropout off, BatchNorm on its running statistics) and every submodule's own mode is
restored afterwards.

Condition numbers. The Hessian of a network's loss is indefinite away from a minimum and
rank-deficient everywhere (many directions leave the loss unchanged), so its plain
condition number ``lambda_max / lambda_min`` is infinite or meaningless.
:meth:`Spectrum.condition` reports ``max |lambda| / min |lambda|`` over the computed
eigenvalues whose ``|lambda|`` exceeds ``rtol * max |lambda|``: the conditioning of the
Hessian restricted to its ``k`` computed directions, with the near-null ones left out. It
depends on ``k``, ``which`` and ``rtol``, so only values computed with the same three are
comparable; comparing L_mean with L_equiv at the same settings is what it is for. The
paper behind fastequiv (Shen, Nowara, Maser and Cho, "Training Dynamics of Learning
3D-Rotational Equivariance", TMLR 2025) compares the Hessian condition numbers of L_mean
and L_equiv of the same model and reports L_equiv's as far lower in force-field
prediction (about 1000x); its estimator of a condition number need not be this one, so
read :meth:`Spectrum.condition` as a ratio between the terms, not as the paper's figure.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import stacking
from .estimators import Decomposition, combine, decompose
from .linalg import WHICH, Spectrum, lanczos
from .ops import twirl_reduce
from .ops.layout import mask_for
from .adapted import bind
from .spec import Spec

__all__ = ["Alignment", "Spectrum", "PerElement", "gradient_alignment", "hessian_spectrum", "lanczos",
           "equivariance_per_element", "log_dynamics", "stacked_terms", "select_params", "twice_differentiable",
           "TERMS"]

TERMS = ("total", "mean", "equiv")
ROOT = "<root>"  # the key of parameters the model itself owns (not a submodule)
ALL = "all"


# --- the pieces every diagnostic shares -----------------------------------------------------------

@dataclass
class Params:
    """The parameters a diagnostic differentiates: their names, tensors and owning modules."""

    names: list
    tensors: list
    owners: list  # the key each parameter is reported under (its module's name, or ROOT)

    def groups(self) -> dict:
        """``{"all": [0..n), module: [indices]}`` in order of first appearance."""
        out = {ALL: list(range(len(self.tensors)))}
        for i, owner in enumerate(self.owners):
            out.setdefault(owner, []).append(i)
        return out

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)


def select_params(model, params=None) -> Params:
    """The parameters to differentiate: every parameter of ``model`` that requires grad, or
    the subset ``params`` names (an iterable of parameters, or of names of parameters or
    of modules, whose parameters are then all taken)."""
    named = list(model.named_parameters()) if isinstance(model, nn.Module) else []
    by_id = {id(p): n for n, p in named}
    if params is None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"params=None needs an nn.Module model to find its parameters; got a "
                             f"{type(model).__name__}: pass params=[tensors that require grad]")
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter that requires grad: there is nothing to differentiate")
    else:
        items = [params] if isinstance(params, (str, torch.Tensor)) else list(params)
        if not items:
            raise ValueError("params is empty: pass None (every parameter) or parameters or names")
        chosen, seen = [], set()
        for i, item in enumerate(items):
            if isinstance(item, str):
                hits = [(n, p) for n, p in named if n == item or n.startswith(item + ".")]
                if not hits:
                    some = ", ".join(repr(n) for n, _ in named[:6]) or "none"
                    raise ValueError(f"params[{i}]={item!r} names no parameter of the model "
                                     f"(its parameters are named like {some})")
            elif isinstance(item, torch.Tensor):
                if not item.requires_grad:
                    raise ValueError(f"params[{i}] (shape {tuple(item.shape)}) does not require grad")
                hits = [(by_id.get(id(item), f"params[{i}]"), item)]
            else:
                raise ValueError(f"params must hold parameters or names, got {type(item).__name__} at params[{i}]")
            for n, p in hits:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    chosen.append((n, p))
        if not chosen:
            raise ValueError(f"params={params!r} names only parameters that do not require grad")
    known = set(by_id.values())  # a tensor from outside the model is its own group
    owners = [(n.rpartition(".")[0] if n in known else n) or ROOT for n, _ in chosen]
    return Params([n for n, _ in chosen], [p for _, p in chosen], owners)


def evaluating(model, enabled: bool = True):
    """:func:`fastequiv.stacking.eval_mode` when ``enabled``, else nothing."""
    return stacking.eval_mode(model) if enabled else contextlib.nullcontext()


def _plan(spec: Spec, samples) -> tuple[int, bool]:
    K, exhaustive = stacking.plan(spec, samples, 8)
    if K < 2 and not exhaustive:
        raise ValueError(f"samples={K} cannot estimate L_equiv: it needs samples >= 2 i.i.d. rotations "
                         "(or an exhaustive twirl over a finite group)")
    return K, exhaustive


def _heads_and_targets(st: stacking.Stacked, spec: Spec, target) -> list:
    pairs = []
    for head, (_, y, _) in zip(st.heads, spec.output_leaves(target, "target")):
        if y.shape != head.value.shape[1:]:
            where = "target" if head.name == "output" else f"target[{head.name!r}]"
            raise ValueError(f"{where} has shape {tuple(y.shape)}, but the model's output for it has shape "
                             f"{tuple(head.value.shape[1:])} (batch {st.B})")
        pairs.append((head, y))
    return pairs


def stacked_terms(model, inputs, target, *, spec: Optional[Spec] = None, samples=None, mask=None, loss_weights=None, seed=None,
                  generator=None, chunk_size=None, backend: str = "auto", reduce_backend: Optional[str] = None,
                  check_finite: bool = True) -> Decomposition:
    """The MSE decomposition of ``model`` on ``inputs``, differentiable (grad mode permitting).

    The same stacked copies and estimators as :func:`fastequiv.equivariance_error` with
    ``loss="mse"``; ``reduce_backend`` (default ``backend``) runs the reductions: pass
    ``"torch"`` to differentiate twice (the compiled reductions have a first derivative only).
    """
    spec, inputs = bind(model, inputs, spec)
    K, exhaustive = _plan(spec, samples)
    weights = spec.head_weights(loss_weights)
    st = stacking.stack(model, inputs, spec, K, exhaustive, mask=mask, seed=seed, generator=generator,
                        chunk_size=chunk_size, backend=backend, check_finite=check_finite)
    heads, head_valid = {}, {}
    for head, y in _heads_and_targets(st, spec, target):
        s = twirl_reduce(head.value, st.action, y, head.rep, head.mask, batch=head.batch,
                         backend=reduce_backend or backend)
        heads[head.name] = decompose(s.total, s.bias, s.spread, s.count, samples=K, exhaustive=exhaustive)
        head_valid[head.name] = s.count > 0
    if len(heads) == 1 and not isinstance(spec.output, (dict, tuple)):
        return next(iter(heads.values()))
    return combine(heads, weights, head_valid)


def twice_differentiable():
    """Run ``scaled_dot_product_attention`` on its math kernel inside the block: the fused
    (flash, memory-efficient) kernels have no second derivative, and a Hessian-vector
    product differentiates the backward pass."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _check_term(term) -> str:
    if term not in TERMS:
        raise ValueError(f"term must be one of {TERMS}, got {term!r}")
    return term


def _grads(loss: torch.Tensor, tensors: list, *, create_graph: bool, retain_graph: bool) -> list:
    """``d loss / d tensors``, zeros (without a graph) where a tensor does not reach the loss."""
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in tensors]
    gs = torch.autograd.grad(loss, tensors, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


# --- gradient alignment -------------------------------------------------------------------------

@dataclass(frozen=True)
class Alignment:
    """How the gradients of L_mean and L_equiv relate, overall (key ``"all"``) and per module.

    Every dict has one key per module that owns differentiated parameters directly (its
    dotted name, ``"<root>"`` for the model's own) and ``"all"``; values are 0-dim
    tensors (no host sync; :meth:`to_dict` gives floats).

    Attributes:
        cos: ``<g_mean, g_equiv> / (|g_mean| |g_equiv|)``; NaN where either gradient is 0.
        dot: ``<g_mean, g_equiv>``.
        norm_mean, norm_equiv, norm_total: gradient norms of L_mean, L_equiv and
            L_total (``g_total = g_mean + g_equiv``).
        mean, equiv: the values of the two estimators on this batch.
        samples, exhaustive: K, and whether the twirl was exhaustive (exact).
        names: the differentiated parameters, in the order of the gradients.
        grads_mean, grads_equiv: the gradients themselves (a list like ``names``, detached)
            with ``return_grads=True``, else None.
    """

    cos: dict
    dot: dict
    norm_mean: dict
    norm_equiv: dict
    norm_total: dict
    mean: torch.Tensor
    equiv: torch.Tensor
    samples: int
    exhaustive: bool
    names: tuple = ()
    grads_mean: Optional[list] = None
    grads_equiv: Optional[list] = None

    def to_dict(self, prefix: str = "") -> dict:
        """Plain floats for a logger, ``{prefix + "cos/all": ..., "norm_mean/all": ...}`` (one host sync)."""
        out = {f"{prefix}mean": float(self.mean), f"{prefix}equiv": float(self.equiv)}
        for name in ("cos", "dot", "norm_mean", "norm_equiv", "norm_total"):
            for key, v in getattr(self, name).items():
                out[f"{prefix}{name}/{key}"] = float(v)
        return out


def _alignment(gm: list, ge: list, params: Params) -> tuple:
    stats = {k: {} for k in ("cos", "dot", "norm_mean", "norm_equiv", "norm_total")}
    for key, idx in params.groups().items():
        acc = torch.float64 if any(gm[i].dtype == torch.float64 for i in idx) else torch.float32
        mm = sum((gm[i].to(acc) * gm[i].to(acc)).sum() for i in idx)
        ee = sum((ge[i].to(acc) * ge[i].to(acc)).sum() for i in idx)
        me = sum((gm[i].to(acc) * ge[i].to(acc)).sum() for i in idx)
        nm, ne = mm.sqrt(), ee.sqrt()
        denom = nm * ne
        stats["cos"][key] = torch.where(denom > 0, me / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                        torch.full_like(denom, math.nan))
        stats["dot"][key] = me
        stats["norm_mean"][key] = nm
        stats["norm_equiv"][key] = ne
        stats["norm_total"][key] = (mm + ee + 2 * me).clamp_min(0).sqrt()
    return stats


def gradient_alignment(model: Callable, inputs: Any, target: Any, *, spec: Optional[Spec] = None, samples: Optional[int] = None,
                       params=None, mask=None, loss_weights=None, seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None,
                       backend: str = "auto", check_finite: bool = True, eval_mode: bool = True,
                       return_grads: bool = False) -> Alignment:
    """Cosine and norms of ``grad L_mean`` and ``grad L_equiv`` with respect to the parameters.

    One forward over the K stacked copies, then two backward passes (one per term), with
    ``torch.autograd.grad``: no ``.grad`` is touched.

    Args:
        model, inputs, target, spec, mask, loss_weights, seed, generator, chunk_size,
            backend, check_finite: as in :func:`fastequiv.equivariance_error` (MSE only).
        samples: K, default 8 i.i.d. Haar draws for SO(3)/O(3), every element for a finite group.
        params: None (every parameter that requires grad), or an iterable of parameters,
            or of names of parameters or modules (a name takes every parameter under it).
        eval_mode: evaluate ``model`` in eval mode (then restore every submodule's mode).
        return_grads: keep the two gradients in the result (``grads_mean``, ``grads_equiv``).
    Returns:
        an :class:`Alignment`.
    """
    chosen = select_params(model, params)
    with evaluating(model, eval_mode), torch.enable_grad():
        d = stacked_terms(model, inputs, target, spec=spec, samples=samples, mask=mask, loss_weights=loss_weights,
                          seed=seed, generator=generator, chunk_size=chunk_size, backend=backend,
                          check_finite=check_finite)
        gm = _grads(d.mean, chosen.tensors, create_graph=False, retain_graph=True)
        ge = _grads(d.equiv, chosen.tensors, create_graph=False, retain_graph=False)
    stats = _alignment(gm, ge, chosen)
    return Alignment(**stats, mean=d.mean.detach(), equiv=d.equiv.detach(), samples=d.samples,
                     exhaustive=d.exhaustive, names=tuple(chosen.names), grads_mean=gm if return_grads else None,
                     grads_equiv=ge if return_grads else None)


# --- Hessian spectrum -----------------------------------------------------------------------------

def _flatten(ts: list, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in ts])


def _split(v: torch.Tensor, like: list) -> list:
    out, start = [], 0
    for t in like:
        out.append(v[start:start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _hvp(grads: list, tensors: list, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` by one backward pass through the graph of ``grads`` (double backward)."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        parts = _split(v, tensors)
        out = [torch.zeros_like(t) for t in tensors]
        if live:
            hv = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live],
                                     grad_outputs=[parts[i] for i in live], retain_graph=True, allow_unused=True)
            for i, h in zip(live, hv):
                if h is not None:
                    out[i] = h
        return _flatten(out, dtype)

    return matvec


def _basis_dtype(tensors: list) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _spectrum(grads: list, chosen: Params, term: str, k: int, which: str, max_iter, tol, lanczos_seed,
              eigenvectors: bool) -> Spectrum:
    dtype = _basis_dtype(chosen.tensors)
    s = lanczos(_hvp(grads, chosen.tensors, dtype), chosen.numel, k, which=which, max_iter=max_iter, tol=tol,
                seed=lanczos_seed, device=chosen.tensors[0].device, dtype=dtype, eigenvectors=eigenvectors)
    return Spectrum(s.eigenvalues, s.eigenvectors, s.residuals, s.iterations, s.converged, term, which,
                    tuple(chosen.names))


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def hessian_spectrum(model: Callable, inputs: Any, target: Any, *, spec: Optional[Spec] = None, term: str = "total", k: int = 8,
                     which: str = "largest", samples: Optional[int] = None, params=None, mask=None,
                     loss_weights=None, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     chunk_size: Optional[int] = None, backend: str = "auto", check_finite: bool = True,
                     eval_mode: bool = True, max_iter: Optional[int] = None, tol: float = 1e-4,
                     lanczos_seed: int = 0, eigenvectors: bool = False) -> Spectrum:
    """The ``k`` extreme eigenvalues of the Hessian of L_total, L_mean or L_equiv.

    One forward over the K stacked copies and one backward that keeps its graph
    (``create_graph=True``); then Lanczos (:func:`lanczos`), each step one Hessian-vector
    product by double backward through that graph. The rotations are drawn once, so
    every product is of the same function. The reductions run on the ``"torch"``
    backend (the compiled ones have no second derivative); ``backend`` still rotates the
    inputs. The model must be twice differentiable; its forward runs with
    ``scaled_dot_product_attention`` on the math kernel (:func:`twice_differentiable`).

    Args:
        term: ``"total"``, ``"mean"`` or ``"equiv"``.
        k: how many eigenvalues.
        which: ``"largest"`` (algebraic, descending), ``"smallest"`` (ascending) or
            ``"magnitude"`` (largest ``|lambda|``).
        max_iter, tol, lanczos_seed: Lanczos' budget of Hessian-vector products, relative
            tolerance on the residuals, and the seed of its start vectors.
        eigenvectors: also return the Ritz vectors (``(k, n)``).
        the rest: as in :func:`gradient_alignment`.
    Returns:
        a :class:`Spectrum`.
    """
    _check_term(term)
    _check_k(k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    chosen = select_params(model, params)
    if k > chosen.numel:
        raise ValueError(f"k={k} exceeds the {chosen.numel} parameters differentiated")
    with evaluating(model, eval_mode), torch.enable_grad(), twice_differentiable():
        d = stacked_terms(model, inputs, target, spec=spec, samples=samples, mask=mask, loss_weights=loss_weights,
                          seed=seed, generator=generator, chunk_size=chunk_size, backend=backend,
                          reduce_backend="torch", check_finite=check_finite)
        grads = _grads(getattr(d, term), chosen.tensors, create_graph=True, retain_graph=True)
        return _spectrum(grads, chosen, term, k, which, max_iter, tol, lanczos_seed, eigenvectors)


# --- per-element attribution ----------------------------------------------------------------------

@dataclass(frozen=True)
class PerElement:
    """L_equiv element by element: where the model breaks the symmetry.

    ``heads[name]`` has the shape of that head's target (``(B, *E)``; ``(N, *E)`` for
    per-node outputs of a graph batch) and holds, for each element (atom and component),
    its spread over the K copies, ``(1/K) sum_k (a_k - abar)^2``, times ``K / (K - 1)``
    for i.i.d. draws (the unbiased estimator); padded elements are 0. Divided by the
    sample's ``count`` and summed over the sample it gives the per-sample L_equiv, whose
    batch mean (``loss_weights``-weighted over heads) is ``fe.equivariance_error(...).equiv``.

    Attributes:
        heads: per-element values, per head.
        count: ``(B,)`` valid elements per sample, per head (the MSE normalisation).
        batch: the sample of each row per head (``(N,)`` for per-node heads), else None.
        weights: the ``loss_weights`` of the heads.
        samples, exhaustive: K, and whether the twirl was exhaustive.
    """

    heads: dict
    count: dict
    batch: dict
    weights: dict
    samples: int
    exhaustive: bool

    def head_per_sample(self, name: str) -> torch.Tensor:
        """``(B,)`` L_equiv of head ``name`` per sample: its elements summed over the
        sample and divided by the sample's count (0 where the head has no valid element)."""
        v = self.heads[name]
        flat = v.reshape(v.shape[0], -1).sum(1)
        idx, count = self.batch[name], self.count[name]
        if idx is not None:
            flat = torch.zeros(count.shape[0], dtype=flat.dtype, device=flat.device).index_add(0, idx, flat)
        return flat / count.clamp_min(1)

    @property
    def valid(self) -> torch.Tensor:
        """``(B,)`` samples with a valid element in some head."""
        return torch.stack([c > 0 for c in self.count.values()]).any(0)

    def per_sample(self) -> torch.Tensor:
        """``(B,)`` per-sample values whose mean over :attr:`valid` is :attr:`equiv`:
        ``sum_h w_h (n / n_h) v_h[b]`` (``n``, ``n_h``: the valid samples in some head and in
        head ``h``), as ``Decomposition.per_sample.equiv`` of a multi-head output."""
        if len(self.heads) == 1 and list(self.heads) == ["output"]:
            return self.head_per_sample("output")
        n = self.valid.sum()
        total = 0
        for name in self.heads:
            v = self.count[name] > 0
            total = total + self.weights[name] * self.head_per_sample(name) * (n / v.sum())
        return total

    @property
    def equiv(self) -> torch.Tensor:
        """The batch's L_equiv: ``sum_h w_h`` (head ``h``'s mean over its valid samples)."""
        total = 0
        for name in self.heads:
            v = self.count[name] > 0
            total = total + self.weights[name] * self.head_per_sample(name)[v].mean()
        return total


def equivariance_per_element(model: Callable, inputs: Any, target: Any, *, spec: Optional[Spec] = None,
                             samples: Optional[int] = None, mask=None, loss_weights=None,
                             seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                             chunk_size: Optional[int] = None, backend: str = "auto", check_finite: bool = True,
                             eval_mode: bool = True) -> PerElement:
    """L_equiv per output element (atom and component), no grad (see :class:`PerElement`).

    The same stacked copies and rotations as :func:`fastequiv.equivariance_error` with the
    same arguments; each copy's back-rotated prediction ``a_k`` comes from the public
    :func:`fastequiv.ops.twirl_reduce` on that copy alone (positions back-rotate about
    their copy's centroid, as in the full reduction).
    """
    spec, inputs = bind(model, inputs, spec)
    K, exhaustive = _plan(spec, samples)
    weights = spec.head_weights(loss_weights)
    with evaluating(model, eval_mode), torch.no_grad():
        st = stacking.stack(model, inputs, spec, K, exhaustive, mask=mask, seed=seed, generator=generator,
                            chunk_size=chunk_size, backend=backend, check_finite=check_finite)
        heads, count, batch = {}, {}, {}
        factor = 1.0 if exhaustive else K / (K - 1)
        for head, y in _heads_and_targets(st, spec, target):
            out, R = head.value, st.action.R
            s = twirl_reduce(out, st.action, y, head.rep, head.mask, batch=head.batch, backend=backend)
            a = torch.stack([twirl_reduce(out[k:k + 1], R[k:k + 1], y, head.rep, head.mask, batch=head.batch,
                                          backend=backend).twirled for k in range(K)])
            spread = ((a - s.twirled) ** 2).mean(0) * factor
            m = mask_for(head.mask, y.shape, "target")
            if m is not None:  # selected away: padded outputs may hold anything
                spread = torch.where(m, spread, torch.zeros((), dtype=spread.dtype, device=spread.device))
            heads[head.name], count[head.name], batch[head.name] = spread, s.count, head.batch
    return PerElement(heads, count, batch, weights, K, exhaustive)


# --- one call for a training log ------------------------------------------------------------------

def log_dynamics(model: Callable, inputs: Any, target: Any, *, spec: Optional[Spec] = None,
                 samples: Optional[int] = None, k: int = 1, params=None, mask=None, loss_weights=None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto", check_finite: bool = True,
                 eval_mode: bool = True, max_iter: Optional[int] = None, tol: float = 1e-3,
                 lanczos_seed: int = 0) -> dict:
    """The training-dynamics numbers worth logging every few hundred steps, as floats.

    One forward over the K stacked copies and one backward per term that keeps its graph,
    then Lanczos on the Hessians of L_mean and L_equiv (``max_iter`` products each):

    ``{"mean", "equiv", "cos", "norm_mean", "norm_equiv", "top_eig_mean", "top_eig_equiv"}``:
    the two estimators, the cosine and norms of their gradients (over every parameter, or
    ``params``), and the largest Hessian eigenvalue of each term (with ``k > 1``, also
    ``"eig_mean"`` and ``"eig_equiv"``: the ``k`` largest, descending, as lists, and
    ``"cond_mean"``/``"cond_equiv"``: :meth:`Spectrum.condition` of those).
    ``seed``, ``generator``, ``chunk_size``, ``backend``, ``check_finite``: as in
    :func:`fastequiv.equivariance_error` (``seed=None`` draws fresh rotations; pass an int
    to log the same rotations every time).
    """
    _check_k(k)
    chosen = select_params(model, params)
    with evaluating(model, eval_mode), torch.enable_grad(), twice_differentiable():
        d = stacked_terms(model, inputs, target, spec=spec, samples=samples, mask=mask, loss_weights=loss_weights,
                          seed=seed, generator=generator, chunk_size=chunk_size, backend=backend,
                          reduce_backend="torch", check_finite=check_finite)
        gm = _grads(d.mean, chosen.tensors, create_graph=True, retain_graph=True)
        ge = _grads(d.equiv, chosen.tensors, create_graph=True, retain_graph=True)
        stats = _alignment([g.detach() for g in gm], [g.detach() for g in ge], chosen)
        sm = _spectrum(gm, chosen, "mean", k, "largest", max_iter, tol, lanczos_seed, False)
        se = _spectrum(ge, chosen, "equiv", k, "largest", max_iter, tol, lanczos_seed, False)
    out = {"mean": float(d.mean.detach()), "equiv": float(d.equiv.detach()), "cos": float(stats["cos"][ALL]),
           "norm_mean": float(stats["norm_mean"][ALL]), "norm_equiv": float(stats["norm_equiv"][ALL]),
           "top_eig_mean": float(sm.eigenvalues[0]), "top_eig_equiv": float(se.eigenvalues[0]),
           "iterations": sm.iterations + se.iterations}
    if k > 1:
        out.update(eig_mean=sm.eigenvalues.tolist(), eig_equiv=se.eigenvalues.tolist(),
                   cond_mean=float(sm.condition()), cond_equiv=float(se.condition()))
    return out
