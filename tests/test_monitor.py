"""EquivarianceMonitor: off steps cost nothing, on steps match equivariance_error on the subset."""

import pytest
import torch
from torch import nn

import fastequiv as fe

SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"})


class PointMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
        self.calls = 0

    def forward(self, pos, z):
        self.calls += 1
        h = self.net(torch.cat([pos - pos.mean(1, keepdim=True), z[..., None]], dim=-1))
        return {"energy": h[..., 3].sum(-1, keepdim=True), "forces": h[..., :3]}


def data(B=16, N=5):
    g = torch.Generator().manual_seed(0)
    inputs = {"pos": torch.randn(B, N, 3, generator=g), "z": torch.randn(B, N, generator=g)}
    target = {"energy": torch.randn(B, 1, generator=g), "forces": torch.randn(B, N, 3, generator=g)}
    return inputs, target


def test_off_steps_return_an_empty_dict_without_calling_the_model():
    torch.manual_seed(0)
    model = PointMLP()
    monitor = fe.EquivarianceMonitor(model, spec=SPEC, every=10)
    inputs, target = data()
    for step in range(1, 10):
        assert monitor(step, inputs, target) == {}
        assert not monitor.due(step)
    assert model.calls == 0
    assert monitor(10, inputs, target)
    assert model.calls == 1


def test_on_steps_match_equivariance_error_on_the_fraction_in_eval_mode():
    torch.manual_seed(0)
    model = PointMLP()
    model.train()
    model.net[0].eval()  # a mixed state that must come back as it was
    monitor = fe.EquivarianceMonitor(model, spec=SPEC, every=5, fraction=0.25, samples=4, seed=11, prefix="eq/")
    inputs, target = data(B=14)
    with torch.enable_grad():
        logs = monitor(20, inputs, target)
    assert model.training and not model.net[0].training and model.net[2].training
    n = 4  # ceil(0.25 * 14)
    model.eval()
    ref = fe.equivariance_error(model, {k: v[:n] for k, v in inputs.items()}, {k: v[:n] for k, v in target.items()},
                                spec=SPEC, samples=4, seed=11 + 20)
    expected = {"total", "mean", "equiv", "pct", "total_stderr", "mean_stderr", "equiv_stderr"}
    keys = {f"eq/{k}" for k in expected} | {f"eq/{h}/{k}" for h in ("energy", "forces") for k in expected}
    assert set(logs) == keys
    for v in logs.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    torch.testing.assert_close(logs["eq/total"], ref.total)
    torch.testing.assert_close(logs["eq/pct"], ref.pct)
    torch.testing.assert_close(logs["eq/forces/equiv"], ref.heads["forces"].equiv)
    torch.testing.assert_close(logs["eq/equiv_stderr"], ref.stderr.equiv)


def test_materialize_gives_floats_and_the_global_rng_is_untouched():
    torch.manual_seed(0)
    model = PointMLP()
    inputs, target = data()
    tensors = fe.EquivarianceMonitor(model, spec=SPEC, every=1, fraction=1.0)(3, inputs, target)
    state = torch.random.get_rng_state()
    floats = fe.EquivarianceMonitor(model, spec=SPEC, every=1, fraction=1.0, materialize=True)(3, inputs, target)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(floats) == set(tensors)
    for k, v in floats.items():
        assert isinstance(v, float)
        assert v == pytest.approx(float(tensors[k]), rel=1e-6, nan_ok=True)


def test_plain_callables_tensor_inputs_and_masks():
    A = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.1, 0.0, 2.0]])
    f = lambda v: v @ A.T  # noqa: E731
    x = torch.randn(10, 6, 3)
    mask = torch.ones(10, 6, dtype=torch.bool)
    mask[0, 3:] = False
    spec = fe.Spec(inputs="vector", output="vector")
    logs = fe.EquivarianceMonitor(f, spec=spec, every=2, fraction=0.5, mask=mask, prefix="")(4, x, f(x))
    ref = fe.equivariance_error(f, x[:5], f(x[:5]), spec=spec, mask=mask[:5], seed=4)
    torch.testing.assert_close(logs["equiv"], ref.equiv)
    torch.testing.assert_close(logs["total"], logs["mean"] + logs["equiv"])


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every"),
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"seed": -1}, "seed"),
    ({"generator": torch.Generator()}, "generator"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fe.EquivarianceMonitor(PointMLP(), spec=SPEC, **kwargs)
    with pytest.raises(ValueError, match="step"):
        fe.EquivarianceMonitor(PointMLP(), spec=SPEC)(-1, *data())
