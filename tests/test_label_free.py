"""target=None: L_equiv and its size relative to the twirled prediction, without labels,
checked against closed forms and against the labelled decomposition."""

from __future__ import annotations

import math

import pytest
import torch

import fastequiv as fe

DT = torch.float64


def _linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 3, generator=g, dtype=DT)
    x = torch.randn(5, 7, 3, generator=g, dtype=DT)
    return A, x


def test_linear_model_closed_form_under_the_exhaustive_octahedral_twirl():
    """f(x) = A x: fbar = (tr A / 3) x (the octahedral group acts irreducibly on R^3), so
    per sample L_equiv = |A0|_F^2 m / 9 and ||fbar||^2 = (tr A / 3)^2 m / 3, m the mean of
    |x_p|^2 over the sample's points, A0 the traceless part of A."""
    A, x = _linear()
    spec = fe.Spec(inputs="vector", output="vector", group="octahedral")
    d = fe.equivariance_error(lambda v: v @ A.T, x, spec=spec)
    assert isinstance(d, fe.LabelFree) and d.exhaustive
    A0 = A - torch.eye(3, dtype=DT) * torch.trace(A) / 3
    m = (x ** 2).sum(-1).mean(-1)
    equiv = (A0 ** 2).sum() * m / 9
    norm = (torch.trace(A) / 3) ** 2 * m / 3
    torch.testing.assert_close(d.per_sample.equiv, equiv)
    torch.testing.assert_close(d.per_sample.norm, norm)
    torch.testing.assert_close(d.per_sample.rel, equiv / norm)
    torch.testing.assert_close(d.rel, equiv.mean() / norm.mean())
    # the ratio estimator's standard error, computed independently from the per-sample
    # values of i.i.d. draws (where equiv / norm varies from sample to sample)
    d = fe.equivariance_error(lambda v: v @ A.T, x, spec=fe.Spec(inputs="vector", output="vector"), samples=3,
                              seed=1)
    e, n = d.per_sample.equiv.tolist(), d.per_sample.norm.tolist()
    r = sum(e) / sum(n)
    resid = [a - r * b for a, b in zip(e, n)]
    se = math.sqrt(sum(v * v for v in resid) / (5 * 4)) / (sum(n) / 5)
    assert se > 0 and abs(float(d.stderr.rel) - se) < 1e-12 * se


def test_label_free_equals_the_labelled_equiv_and_refuses_what_needs_a_target():
    A, x = _linear(1)
    spec = fe.Spec(inputs={"pos": "vector"}, output={"forces": "vector", "energy": "scalar"})

    def model(pos):
        return {"forces": pos @ A.T, "energy": pos[..., 2].sum(-1)}

    free = fe.equivariance_error(model, {"pos": x}, spec=spec, samples=6, seed=4)
    y = {"forces": torch.randn_like(x), "energy": torch.randn(5, dtype=DT)}
    labelled = fe.equivariance_error(model, {"pos": x}, y, spec=spec, samples=6, seed=4)
    torch.testing.assert_close(free.equiv, labelled.equiv)
    for h in ("forces", "energy"):
        torch.testing.assert_close(free.heads[h].per_sample.equiv, labelled.heads[h].per_sample.equiv)
    for name in ("total", "mean", "pct"):
        with pytest.raises(ValueError, match="needs a target"):
            getattr(free, name)
    assert set(free.to_dict()) >= {"equiv", "norm", "rel", "rel_stderr", "forces/rel", "energy/equiv"}
    with pytest.raises(ValueError, match="twirl_loss needs a target"):
        fe.twirl_loss(model, {"pos": x}, None, spec=spec)
    with pytest.raises(ValueError, match="sync=True needs a target"):
        fe.equivariance_error(model, {"pos": x}, spec=spec, sync=True)


def test_the_monitor_logs_without_labels():
    A, x = _linear(2)
    spec = fe.Spec(inputs="vector", output="vector")
    monitor = fe.EquivarianceMonitor(lambda v: v @ A.T, spec=spec, every=1, fraction=1.0, materialize=True)
    logs = monitor(0, x)
    assert set(logs) == {"equiv/equiv", "equiv/norm", "equiv/rel", "equiv/equiv_stderr", "equiv/norm_stderr",
                         "equiv/rel_stderr"}
    assert logs["equiv/rel"] > 0


def test_an_equivariant_model_without_labels_is_float_noise():
    A, x = _linear(3)
    iso = torch.trace(A) / 3 * torch.eye(3, dtype=DT)  # an isotropic map is equivariant
    d = fe.equivariance_error(lambda v: v @ iso.T, x, spec=fe.Spec(inputs="vector", output="vector"), samples=4,
                              seed=0)
    assert float(d.rel) < 1e-28 and float(d.norm) > 0.01
