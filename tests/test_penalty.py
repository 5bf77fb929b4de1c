"""The L_equiv penalty of twirl_loss: the margin (zero value and zero gradient inside it, the
unbiased estimate shifted by a constant above it, on the batch mean), the weight schedules
(a callable of the step, fe.EquivWeight's target share) and their argument checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import fastequiv as fe

DT = torch.float64
SPEC = fe.Spec(inputs={"pos": "position"}, output="vector")


def _setup(seed=0, B=6, N=5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    pos = torch.randn(B, N, 3, generator=g, dtype=DT)
    y = torch.randn(B, N, 3, generator=g, dtype=DT)
    return net, {"pos": pos}, y


def _loss_and_grads(net, inputs, y, **kwargs):
    net.zero_grad()
    loss, d = fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, samples=3, seed=7, **kwargs)
    loss.backward()
    return loss.detach(), d, [p.grad.clone() for p in net.parameters()]


def test_inside_the_margin_the_penalty_and_its_gradient_are_zero():
    net, inputs, y = _setup()
    plain, d, g_plain = _loss_and_grads(net, inputs, y)
    assert d.equiv > 0
    loss, d2, g = _loss_and_grads(net, inputs, y, equiv_weight=3.0, equiv_margin=float(d.equiv) * 1.01)
    assert torch.equal(loss, plain) and torch.equal(d2.equiv, d.equiv)
    for a, b in zip(g, g_plain):
        assert torch.equal(a, b)


def test_above_the_margin_it_is_the_unbiased_penalty_shifted_by_the_margin():
    net, inputs, y = _setup()
    w = 2.5
    unbiased, d, g_unbiased = _loss_and_grads(net, inputs, y, equiv_weight=w)
    torch.testing.assert_close(unbiased, d.total + w * d.equiv)  # margin 0: the unbiased penalty, unchanged
    eps = 0.4 * float(d.equiv)
    loss, _, g = _loss_and_grads(net, inputs, y, equiv_weight=w, equiv_margin=eps)
    torch.testing.assert_close(loss, unbiased - w * eps)
    for a, b in zip(g, g_unbiased):
        torch.testing.assert_close(a, b)


def test_the_margin_is_on_the_batch_mean_not_per_sample():
    """One sample far above the margin and the rest at 0: the penalty is
    w * relu(mean - eps), which is 0 here, while a per-sample margin would not be."""
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(4, 5, 3, generator=g, dtype=DT)
    A = torch.randn(3, 3, generator=g, dtype=DT)
    scale = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)  # only sample 0 is not equivariant

    def model(pos, k):
        c = pos.mean(1, keepdim=True)
        return pos - c + k[:, None, None] * ((pos - c) @ A.T)

    spec = fe.Spec(inputs={"pos": "position", "k": "scalar"}, output="vector")
    y = torch.zeros_like(pos)
    plain, d = fe.twirl_loss(model, {"pos": pos, "k": scale}, y, spec=spec, samples=4, seed=2)
    per = d.per_sample.equiv
    assert per[0] > 0 and (per[1:].abs() < 1e-28).all()
    eps = 1.5 * float(d.equiv)  # above the mean, below sample 0's value
    assert per[0] > eps
    loss, _ = fe.twirl_loss(model, {"pos": pos, "k": scale}, y, spec=spec, samples=4, seed=2, equiv_weight=1.0,
                            equiv_margin=eps)
    assert torch.equal(loss, plain)
    assert torch.relu(per - eps).mean() > 0  # what a per-sample margin would have added


def test_relu_of_the_unbiased_estimate_is_biased_up_near_the_margin():
    """The documented caveat, measured: with the true L_equiv just inside the margin, the
    penalty averaged over many draws of the rotations is positive (Jensen), while the
    estimate itself averages to L_equiv."""
    net, inputs, y = _setup(B=2)
    model = lambda pos: net(pos)  # noqa: E731
    with torch.no_grad():
        exact = fe.equivariance_error(model, inputs, y, spec=SPEC, samples=512, seed=0).equiv
        eps = 1.2 * float(exact)
        pen, est = [], []
        for seed in range(200):
            loss, d = fe.twirl_loss(model, inputs, y, spec=SPEC, samples=2, seed=seed, equiv_weight=1.0,
                                    equiv_margin=eps)
            pen.append(float(loss - d.total))
            est.append(float(d.equiv))
    pen, est = torch.tensor(pen), torch.tensor(est)
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(len(est))  # unbiased estimate
    assert pen.mean() > 5 * pen.std() / math.sqrt(len(pen))  # but relu(estimate - eps) is > 0 on average


def test_a_callable_weight_is_a_schedule_of_the_step():
    net, inputs, y = _setup()
    ramp = lambda step: min(1.0, step / 100)  # noqa: E731
    for step in (0, 50, 200):
        loss, d = fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, seed=3, equiv_weight=ramp, step=step)
        torch.testing.assert_close(loss, d.total + ramp(step) * d.equiv)
    as_tensor = lambda step: torch.tensor(0.5, dtype=DT)  # noqa: E731
    loss, d = fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, seed=3, equiv_weight=as_tensor, step=1)
    torch.testing.assert_close(loss, d.total + 0.5 * d.equiv)
    with pytest.raises(ValueError, match="pass step="):
        fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, equiv_weight=ramp)
    with pytest.raises(ValueError, match=r"equiv_weight\(3\) must return a number >= 0"):
        fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, equiv_weight=lambda s: -1.0, step=3)
    with pytest.raises(ValueError, match="step must be an int"):
        fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, equiv_weight=ramp, step=1.5)


def test_argument_checks_name_the_argument():
    net, inputs, y = _setup()
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="equiv_margin"):
            fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, equiv_weight=1.0, equiv_margin=bad)
    for bad in (-1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="equiv_weight"):
            fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, equiv_weight=bad)
    with pytest.raises(ValueError, match="target"):
        fe.EquivWeight(target=1.5)
    with pytest.raises(ValueError, match="initial"):
        fe.EquivWeight(target=0.1, initial=1e4)


def _decomp(pct: float):
    return SimpleNamespace(equiv=torch.tensor(pct, dtype=DT), total=torch.tensor(1.0, dtype=DT))


def test_equiv_weight_moves_by_its_rule_and_stays_in_range():
    ew = fe.EquivWeight(target=0.1, initial=2.0, rate=0.2, min_weight=0.5, max_weight=4.0)
    ew.update(_decomp(0.2))  # above the target: up by exp(rate * tanh(log 2))
    assert float(ew.weight) == pytest.approx(2.0 * math.exp(0.2 * math.tanh(math.log(2.0))), rel=1e-12)
    w = float(ew.weight)
    ew.update(_decomp(0.05))  # below: down by the mirror factor
    assert float(ew.weight) == pytest.approx(w * math.exp(0.2 * math.tanh(math.log(0.5))), rel=1e-12)
    for _ in range(100):
        ew.update(_decomp(0.9))
    assert float(ew.weight) == 4.0
    for _ in range(100):
        ew.update(_decomp(0.0))
    assert float(ew.weight) == 0.5
    ew.update(SimpleNamespace(equiv=torch.tensor(0.0), total=torch.tensor(0.0)))  # a NaN pct: no change
    assert float(ew.weight) == 0.5
    state = ew.state_dict()
    other = fe.EquivWeight(target=0.1, min_weight=0.5, max_weight=4.0)
    other.load_state_dict(state)
    assert float(other.weight) == 0.5


def test_equiv_weight_finds_the_weight_of_its_target_share():
    """Against a response pct(w) = 0.3 / (1 + w) (more weight, less L_equiv), the weight
    settles where pct = target: w* = 0.3 / target - 1."""
    ew = fe.EquivWeight(target=0.05, initial=1.0, rate=0.1)
    for _ in range(400):
        ew.update(_decomp(0.3 / (1 + float(ew.weight))))
    assert float(ew.weight) == pytest.approx(0.3 / 0.05 - 1, rel=1e-3)


def test_twirl_loss_uses_the_weight_then_updates_it():
    net, inputs, y = _setup()
    ew = fe.EquivWeight(target=1e-6, initial=0.5)
    loss, d = fe.twirl_loss(lambda pos: net(pos), inputs, y, spec=SPEC, seed=1, equiv_weight=ew)
    torch.testing.assert_close(loss, d.total + 0.5 * d.equiv)
    assert float(ew.weight) > 0.5  # pct far above 1e-6: raised for the next batch
    loss.backward()  # the weight is a constant of the graph
    assert not ew.weight.requires_grad
