"""Equivariant-by-construction e3nn networks have L_equiv at float noise level."""

import pytest
import torch
from torch import nn

import fastequiv as fe

o3 = pytest.importorskip("e3nn.o3")


class E3Net(nn.Module):
    """Per-atom outputs ``1x1o + 1x2e`` from relative positions and a ``1x1o`` feature."""

    def __init__(self):
        super().__init__()
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)  # 1x0e + 1x1o + 1x2e
        self.lin_sh = o3.Linear(self.irreps_sh, "1x1o + 1x2e")
        self.lin_v = o3.Linear("1x1o", "1x1o + 1x2e")

    def forward(self, pos, vec):
        rel = pos[:, :, None] - pos[:, None, :]
        # unnormalised harmonics are polynomials: equivariant and finite at rel = 0
        sh = o3.spherical_harmonics(self.irreps_sh, rel, normalize=False)
        w = torch.exp(-(rel**2).sum(-1, keepdim=True))
        return self.lin_sh((w * sh).sum(2)) + self.lin_v(vec)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    B, N = 4, 5
    pos = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    vec = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    target = torch.randn(B, N, 8, generator=g, dtype=torch.float64)
    return (pos, vec), target


@pytest.mark.parametrize("group", ["SO3", "O3", "octahedral"])
def test_e3nn_network_has_no_equivariance_error(data, group):
    torch.manual_seed(0)
    net = E3Net().double()
    inputs, target = data
    spec = fe.Spec(inputs=("position", "1x1o"), output="1x1o + 1x2e", group=group)
    d = fe.equivariance_error(net, inputs, target, spec=spec, samples=8, seed=1)
    assert d.total > 1e-2
    assert d.equiv.abs() < 1e-20 and d.pct.abs() < 1e-20
    # the same network seen through a "vector" spec for its l=1 part
    d_vec = fe.equivariance_error(lambda p, v: net(p, v)[..., :3], inputs, target[..., :3],
                                  spec=fe.Spec(inputs=("position", "vector"), output="vector", group=group), samples=8, seed=1)
    assert d_vec.equiv.abs() < 1e-20


def test_wrong_parity_shows_up_only_under_o3(data):
    torch.manual_seed(0)
    net = E3Net().double()
    inputs, target = data
    wrong = "1x1e + 1x2e"  # the l=1 output is polar (1o), not axial
    so3 = fe.equivariance_error(net, inputs, target, spec=fe.Spec(inputs=("position", "1x1o"), output=wrong), samples=8, seed=1)
    o3_ = fe.equivariance_error(net, inputs, target, spec=fe.Spec(inputs=("position", "1x1o"), output=wrong, group="O3"), samples=8, seed=1)
    assert so3.equiv.abs() < 1e-20
    assert o3_.equiv > 1e-3


def test_float32_network_is_at_float_noise(data):
    torch.manual_seed(0)
    net = E3Net()
    (pos, vec), target = data
    spec = fe.Spec(inputs=("position", "1x1o"), output="1x1o + 1x2e")
    d = fe.equivariance_error(net, (pos.float(), vec.float()), target.float(), spec=spec, samples=8, seed=1)
    assert d.pct < 1e-9 and d.total > 1e-2


def test_non_equivariant_mlp_has_clear_equivariance_error(data):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 8)).double()
    inputs, target = data
    spec = fe.Spec(inputs=("position", "1x1o"), output="1x1o + 1x2e")
    d = fe.equivariance_error(lambda p, v: mlp(torch.cat([p, v], -1)), inputs, target, spec=spec, samples=8, seed=1)
    assert d.equiv > 1e-3 and 0 < d.pct < 1
