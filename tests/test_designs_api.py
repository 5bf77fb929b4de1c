"""Rotation designs through the public measuring functions: ``equivariance_error``,
``twirl_loss`` and ``EquivarianceMonitor`` with ``rotations=`` and ``replicates=``.

Closed forms (see tests/test_designs.py):

* ``f(x) = A x``: ``fbar(x) = (tr A / 3) x``, per sample ``L_equiv = ||A'||_F^2 sum_i |x_i|^2 / (9 n)``
  and ``L_mean = mean ||fbar - y||^2``. Its twisted prediction has degree 2 in the rotation, its
  squared error degree 4: over the icosahedral design (degree 5) every per-sample estimate is
  exact for any turn, so the loss and its gradient are the closed form's.
* ``f(x) = c |x . e|`` has content at every even degree; with ``r = |x|``:
  ``L_total = c^2 r^2 / 3 - c y r + y^2`` and ``L_equiv = c^2 r^2 / 12`` (``x . R^T e = r t``, ``t``
  uniform on [-1, 1]). The design estimates are unbiased for every ``c`` and the rotations do not
  depend on ``c``, so their gradient is an unbiased estimate of the closed form's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastequiv as fe
from fastequiv.design_twirl import DesignDecomposition, DesignLabelFree, design_error

VEC = fe.Spec(inputs="vector", output="vector")


class Linear(nn.Module):
    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, v):
        return v @ self.A.T


class Abs(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.register_buffer("e", torch.tensor([0.36, 0.48, 0.8], dtype=torch.float64))

    def forward(self, v):
        return self.c * (v @ self.e).abs()


def _linear_data(B=5, n=4):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, 3, generator=g, dtype=torch.float64)
    return A, x, y


def _linear_closed_form(A, x, y):
    """``(L_total, L_mean, L_equiv)`` batch means, differentiable in ``A``."""
    n = x.shape[1]
    Ap = A - torch.trace(A) / 3 * torch.eye(3, dtype=A.dtype)
    equiv = (Ap ** 2).sum() * (x ** 2).sum((1, 2)) / (9 * n)
    mean = ((torch.trace(A) / 3 * x - y) ** 2).mean((1, 2))
    return (mean + equiv).mean(), mean.mean(), equiv.mean()


def test_equivariance_error_with_a_design_is_design_error():
    A, x, y = _linear_data()
    model = Linear(A)
    for target in (y, None):
        d = fe.equivariance_error(model, x, target, spec=VEC, rotations="design:1", replicates=3, seed=5)
        want = design_error(model, x, target, spec=VEC, rotations="design:1", replicates=3, seed=5)
        assert isinstance(d, DesignLabelFree if target is None else DesignDecomposition)
        assert d.replicates == 3 and d.design.degree == 1 and d.samples == 12
        for name, v in d.to_dict().items():
            assert v == want.to_dict()[name] or (math.isnan(v) and math.isnan(want.to_dict()[name])), name
    # the default is two replicates (unbiased); rotation_stderr needs three
    d = fe.equivariance_error(model, x, y, spec=VEC, rotations="design:2", seed=1)
    assert d.replicates == 2 and d.exact and d.samples == 24 and math.isnan(float(d.rotation_stderr.equiv))


def test_a_design_over_the_models_degree_measures_the_closed_form_exactly():
    A, x, y = _linear_data()
    total, mean, equiv = _linear_closed_form(A, x, y)
    for rotations, replicates in (("icosahedral", 1), ("icosahedral", 2), ("design:4", 3)):
        d = fe.equivariance_error(Linear(A), x, y, spec=VEC, rotations=rotations, replicates=replicates, seed=2)
        for got, want in ((d.total, total), (d.mean, mean), (d.equiv, equiv)):
            assert torch.allclose(got, want, rtol=1e-12), (rotations, replicates, float(got), float(want))
        if replicates >= 3:  # nothing is left to the rotations: every turn gives the same values
            assert float(d.rotation_stderr.equiv) < 1e-12 * float(equiv)


def test_twirl_loss_over_a_design_is_the_closed_form_and_its_gradient():
    """Loss ``L_total + w L_equiv`` and its gradient with respect to ``A``, against autograd
    through the closed form (an independent computation)."""
    A, x, y = _linear_data()
    w = 0.7
    for replicates in (1, 2):
        model = Linear(A)
        loss, d = fe.twirl_loss(model, x, y, spec=VEC, rotations="icosahedral", replicates=replicates,
                                equiv_weight=w, seed=4)
        loss.backward()
        A_ref = A.clone().requires_grad_(True)
        total, _, equiv = _linear_closed_form(A_ref, x, y)
        (total + w * equiv).backward()
        assert torch.allclose(loss.detach(), total.detach() + w * equiv.detach(), rtol=1e-12)
        assert torch.allclose(model.A.grad, A_ref.grad, rtol=1e-10, atol=1e-13)
        assert not d.total.requires_grad and isinstance(d, DesignDecomposition)
        assert d.exact == (replicates >= 2)


def test_twirl_loss_gradient_over_a_design_is_unbiased_for_a_model_broken_at_every_degree():
    """Mean over 200 seeds of ``d loss / d c`` within 4 standard errors of the closed form's
    derivative, with the degree-1 design and 2 replicates (the penalty's gradient included)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    spec = fe.Spec(inputs="vector", output="scalar")
    c, w = 0.8, 2.0
    r = x.norm(dim=-1)
    exact = (2 * c * r ** 2 / 3 - y * r + w * c * r ** 2 / 6).mean()
    grads = []
    for seed in range(200):
        model = Abs(c)
        loss, _ = fe.twirl_loss(model, x, y, spec=spec, rotations="design:1", replicates=2, equiv_weight=w, seed=seed)
        loss.backward()
        grads.append(model.c.grad.clone())
    grads = torch.stack(grads)
    se = float(grads.std()) / math.sqrt(len(grads))
    assert se > 0
    assert abs(float(grads.mean()) - float(exact)) < 4 * se, (float(grads.mean()), float(exact), se)


def test_twirl_loss_logs_what_equivariance_error_measures():
    A, x, y = _linear_data()
    model = Linear(A)
    _, d = fe.twirl_loss(model, x, y, spec=VEC, rotations="design:2", replicates=3, seed=8)
    want = fe.equivariance_error(model, x, y, spec=VEC, rotations="design:2", replicates=3, seed=8)
    for name in ("total", "mean", "equiv"):
        torch.testing.assert_close(getattr(d, name), getattr(want, name), rtol=1e-14, atol=0)
        torch.testing.assert_close(getattr(d.rotation_stderr, name), getattr(want.rotation_stderr, name),
                                   rtol=1e-12, atol=1e-300)


def test_monitor_over_a_design():
    A, x, y = _linear_data(B=8)
    model = Linear(A)
    mon = fe.EquivarianceMonitor(model, spec=VEC, every=5, fraction=0.5, rotations="design:1", replicates=3, seed=3)
    assert mon(3, x, y) == {}
    logged = mon(10, x, y)
    want = fe.equivariance_error(model, x[:4], y[:4], spec=VEC, rotations="design:1", replicates=3, seed=13)
    assert float(logged["equiv/equiv"]) == float(want.equiv)
    assert float(logged["equiv/equiv_rotation_stderr"]) == float(want.rotation_stderr.equiv) > 0
    two = fe.EquivarianceMonitor(model, spec=VEC, every=1, rotations="design:1")
    assert not any("rotation_stderr" in k for k in two(0, x, y))  # NaN with 2 replicates: not logged


@pytest.mark.parametrize("kwargs, match", [
    (dict(replicates=2), "replicates=2 without rotations="),
    (dict(rotations="design:1", samples=4), "a design fixes the number of rotations"),
    (dict(rotations="design:1", replicates=0), "replicates must be a positive int"),
    (dict(rotations="design:1", replicates=True), "replicates must be a positive int"),
    (dict(rotations="design:1", loss=lambda a, b: (a - b) ** 2), "takes loss='mse'"),
    (dict(rotations="design:0"), r"rotations=.design:0.: the degree L must be in \[1, 131\]"),
])
def test_bad_design_arguments(kwargs, match):
    A, x, y = _linear_data()
    with pytest.raises(ValueError, match=match):
        fe.equivariance_error(Linear(A), x, y, spec=VEC, **kwargs)
    with pytest.raises(ValueError, match=match):
        fe.twirl_loss(Linear(A), x, y, spec=VEC, **kwargs)


def test_a_design_needs_a_continuous_group():
    A, x, y = _linear_data()
    spec = fe.Spec(inputs="vector", output="vector", group="octahedral")
    with pytest.raises(ValueError, match="finite group"):
        fe.equivariance_error(Linear(A), x, y, spec=spec, rotations="design:2")
    with pytest.raises(ValueError, match="finite group"):
        fe.EquivarianceMonitor(Linear(A), spec=spec, rotations="design:2")


def test_frame_averaging_falls_back_on_a_design():
    """Degenerate spectra (a ring, a line, a regular octahedron) get the design's average:
    for a model of degree 2 in the rotation, the closed-form twirl to float rounding; the
    other samples keep their frames (the same as without a design)."""
    from test_frames import _shapes

    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    e = torch.randn(3, generator=g, dtype=torch.float64)
    spec = fe.Spec(inputs={"pos": "position"}, output={"energy": "scalar", "forces": "vector"})

    def model(pos):
        u = pos - pos.mean(1, keepdim=True)
        return {"energy": ((u @ b) ** 2).sum(1), "forces": u @ A.T + e}

    pos = torch.stack(list(_shapes().values()))  # ring, line, octahedron degenerate; planar, generic not
    fa = fe.FrameAveraged(model, spec=spec, rotations="design:2")
    assert fa.design.degree == 2 and "degree=2" in repr(fa)
    out = fa(pos=pos)
    u = pos - pos.mean(1, keepdim=True)
    torch.testing.assert_close(out["forces"][:3], (torch.trace(A) / 3 * u)[:3], atol=1e-12, rtol=0)
    torch.testing.assert_close(out["energy"][:3], ((u ** 2).sum((1, 2)) * (b @ b) / 3)[:3], atol=1e-12, rtol=0)
    framed = fe.FrameAveraged(model, spec=spec, degenerate="frames")(pos=pos)
    for name in ("energy", "forces"):
        torch.testing.assert_close(out[name][3:], framed[name][3:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="a design fixes the number of rotations"):
        fe.FrameAveraged(model, spec=spec, rotations="design:2", samples=8)


def test_pooled_batches_of_a_design_keep_their_rotation_stderr():
    """estimators.pool of a design's batches: the values of their samples together, and the
    rotations' standard errors added in quadrature, each weighted by its valid samples; a
    mix with an i.i.d. batch pools as a plain Decomposition."""
    A, x, y = _linear_data(B=8)
    model = Linear(A)
    parts = [fe.equivariance_error(model, x[s], y[s], spec=VEC, rotations="design:1", replicates=3, seed=i)
             for i, s in enumerate((slice(0, 3), slice(3, 8)))]
    pooled = fe.estimators.pool(parts)
    assert isinstance(pooled, DesignDecomposition) and pooled.replicates == 3 and pooled.design.size == 4
    torch.testing.assert_close(pooled.per_sample.equiv, torch.cat([p.per_sample.equiv for p in parts]))
    for name in ("total", "mean", "equiv"):
        want = math.sqrt(sum((n * float(getattr(p.rotation_stderr, name))) ** 2 for n, p in zip((3, 5), parts))) / 8
        assert math.isclose(float(getattr(pooled.rotation_stderr, name)), want, rel_tol=1e-12) and want > 0
    iid = fe.equivariance_error(model, x[:3], y[:3], spec=VEC, samples=12, seed=0)
    assert type(fe.estimators.pool([iid, parts[1]])) is fe.Decomposition
