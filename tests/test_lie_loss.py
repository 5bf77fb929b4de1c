"""lie_loss: the squared norm of the Lie derivative as a training penalty. It equals the
squared norms of lie_derivative, matches central differences of the twisted model written
out here, has the gradient of finite differences in the parameters (direct and autograd
forces, dense and graph batches), and is zero for an exactly equivariant model."""

from __future__ import annotations

import pytest
import torch

import fastequiv as fe
from fastequiv.lie import so3_generators

DT = torch.float64
SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar", "mask": "scalar"},
               output={"energy": "scalar", "forces": "vector"}, mask="mask")
GRAD_SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"},
                    model_grad=True)


class Direct(torch.nn.Module):
    """Energy and direct (non-conservative) forces from raw coordinates: not equivariant."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).double()

    def forward(self, pos, z, mask=None):
        h = self.net(torch.cat([pos, z[..., None]], -1))
        if mask is not None:
            h = h * mask[..., None]
        return {"energy": h[..., :1].sum(-2), "forces": h[..., 1:]}


class Conservative(torch.nn.Module):
    """Forces = -dE/dpos inside forward, with the graph built (as MACE does in training)."""

    def __init__(self, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).double()

    def forward(self, pos, z):
        if not pos.requires_grad:
            pos = pos.requires_grad_(True)
        e = self.net(torch.cat([pos, z[..., None]], -1)).sum(-2)
        (g,) = torch.autograd.grad(e.sum(), pos, create_graph=True)
        return {"energy": e, "forces": -g}


def _batch(seed=0, B=3, N=5):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, N, 3, generator=g, dtype=DT)
    z = torch.randn(B, N, generator=g, dtype=DT)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3:] = False
    return {"pos": pos, "z": z, "mask": mask}


def _by_hand(lie: dict, mask: torch.Tensor, weights: dict) -> torch.Tensor:
    """Sum over heads of weight * mean over samples of (1/n) sum_i ||L_i f||^2."""
    e = lie["energy"].pow(2).sum(0).mean(-1).mean()  # one element per sample
    m = mask[..., None].expand(lie["forces"].shape[1:])
    f = (lie["forces"].pow(2).sum(0) * m).sum((1, 2)) / m.sum((1, 2))
    return weights["energy"] * e + weights["forces"] * f.mean()


def test_equals_the_squared_norms_of_lie_derivative():
    model, inputs = Direct(), _batch()
    weights = {"energy": 0.3, "forces": 2.0}
    got = fe.lie_loss(model, inputs, spec=SPEC, loss_weights=weights)
    with torch.no_grad():
        lie = fe.lie_derivative(model, inputs, spec=SPEC)
    torch.testing.assert_close(got, _by_hand(lie, inputs["mask"], weights), rtol=1e-13, atol=0)
    assert got.requires_grad and got.dim() == 0


def _turn(pos, R):
    c = pos.mean(-2, keepdim=True)
    return (pos - c) @ R.T + c


def test_matches_central_differences_of_the_twisted_model():
    """(f_{exp(hX)} - f_{exp(-hX)}) / 2h written out with matrix_exp, for both kinds of forces."""
    h = 1e-5
    for model, spec in ((Direct(), fe.Spec(inputs={"pos": "position", "z": "scalar"},
                                           output={"energy": "scalar", "forces": "vector"})),
                        (Conservative(), GRAD_SPEC)):
        inputs = {k: v for k, v in _batch(1).items() if k != "mask"}
        want = 0
        for X in so3_generators(DT):
            diff = []
            for sign in (1, -1):
                R = torch.linalg.matrix_exp(sign * h * X)
                out = model(_turn(inputs["pos"], R).detach(), inputs["z"])
                diff.append({"energy": out["energy"], "forces": out["forces"] @ R})  # R^T f, as rows
            d_e = (diff[0]["energy"] - diff[1]["energy"]) / (2 * h)
            d_f = (diff[0]["forces"] - diff[1]["forces"]) / (2 * h)
            want = want + d_e.pow(2).mean() + d_f.pow(2).sum(-1).mean(-1).mean() / 3
        for method in ("reverse", "jvp", "central"):
            got = fe.lie_loss(model, inputs, spec=spec, method=method)
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("method", ["reverse", "jvp"])
@pytest.mark.parametrize("kind", ["direct", "conservative", "graph"])
def test_its_gradient_matches_finite_differences_in_the_parameters(kind, method):
    if kind == "direct":
        model, spec, inputs = Direct(2), SPEC, _batch(2)
    elif kind == "conservative":
        model, spec = Conservative(3), GRAD_SPEC
        inputs = {k: v for k, v in _batch(3).items() if k != "mask"}
    else:
        model = Direct(4)
        spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch"},
                       output={"forces": "vector"})
        g = torch.Generator().manual_seed(4)
        batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
        inputs = {"pos": torch.randn(9, 3, generator=g, dtype=DT), "z": torch.randn(9, generator=g, dtype=DT),
                  "batch": batch}
        direct = model
        model = lambda pos, z, batch: {"forces": direct(pos, z)["forces"]}  # noqa: E731
        params = list(direct.parameters())
    if kind != "graph":
        params = list(model.parameters())
    loss = fe.lie_loss(model, inputs, spec=spec, method=method)
    grads = [torch.zeros_like(p) if g is None else g  # a last bias does not move a derivative
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    h = 1e-6
    for p, gp in zip(params, grads):
        flat = p.data.view(-1)
        for j in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[j].item()
            vals = []
            for v in (old + h, old - h):
                flat[j] = v
                with torch.enable_grad():
                    vals.append(fe.lie_loss(model, inputs, spec=spec, method=method).item())
            flat[j] = old
            fd = (vals[0] - vals[1]) / (2 * h)
            assert abs(gp.view(-1)[j].item() - fd) < 1e-6 * max(1.0, abs(fd)), (kind, j, gp.view(-1)[j].item(), fd)


def test_zero_for_an_exactly_equivariant_model():
    class Springs(torch.nn.Module):
        """Pair forces along the bonds with a learned radial profile: equivariant by construction."""

        def __init__(self):
            super().__init__()
            self.radial = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

        def forward(self, pos, z):
            rel = pos[:, :, None] - pos[:, None, :]
            r = (rel.pow(2).sum(-1, keepdim=True) + 1e-9).sqrt()
            phi = self.radial(r) * (z[:, :, None, None] * z[:, None, :, None])
            return {"forces": (phi * rel).sum(2), "energy": phi.sum((1, 2))}

    model = Springs()
    inputs = {k: v for k, v in _batch(5).items() if k != "mask"}
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"})
    loss = fe.lie_loss(model, inputs, spec=spec)
    assert loss < 1e-26
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(g.abs().max() for g in grads) < 1e-12
    # the non-equivariant model of the same size is far from it
    assert fe.lie_loss(Direct(), {**inputs, "mask": torch.ones(3, 5, dtype=torch.bool)}, spec=SPEC) > 1e-3


def test_an_attention_model_trains_against_it():
    """scaled_dot_product_attention: the default (double backward) differentiates the
    penalty, and agrees with forward mode and central differences on its value."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.embed = torch.nn.Linear(3, 8).double()
            self.qkv = torch.nn.Linear(8, 24).double()
            self.out = torch.nn.Linear(8, 3).double()

        def forward(self, pos):
            q, k, v = self.qkv(torch.tanh(self.embed(pos))).chunk(3, -1)
            return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    model = Attention()
    inputs = {"pos": _batch(9)["pos"]}
    spec = fe.Spec(inputs={"pos": "position"}, output="vector")
    loss = fe.lie_loss(model, inputs, spec=spec)
    loss.backward()
    assert model.embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for method in ("jvp", "central"):
            other = fe.lie_loss(model, inputs, spec=spec, method=method)
            torch.testing.assert_close(other, loss.detach(), rtol=1e-8, atol=0)


def test_training_against_it_lowers_it():
    model, inputs = Direct(6), _batch(6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = fe.lie_loss(model, inputs, spec=SPEC)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(fe.lie_loss(model, inputs, spec=SPEC)) < 0.5 * first


def test_arguments_are_checked():
    model, inputs = Direct(), _batch()
    with pytest.raises(ValueError, match="method"):
        fe.lie_loss(model, inputs, spec=SPEC, method="forward")
    with pytest.raises(ValueError, match="delta"):
        fe.lie_loss(model, inputs, spec=SPEC, delta=1e-3)
    with pytest.raises(ValueError, match="loss_weights"):
        fe.lie_loss(model, inputs, spec=SPEC, loss_weights={"energy": 1.0})


def test_lie_derivative_by_two_reverse_passes_equals_forward_mode():
    model, inputs = Direct(7), _batch(7)
    with torch.no_grad():
        jvp = fe.lie_derivative(model, inputs, spec=SPEC)
        rev = fe.lie_derivative(model, inputs, spec=SPEC, method="reverse")
    for name in ("energy", "forces"):
        torch.testing.assert_close(rev[name], jvp[name], rtol=1e-12, atol=1e-14)
        assert not rev[name].requires_grad


def test_mace_autograd_forces_by_two_reverse_passes_match_the_closed_form():
    """MACE's forces come from autograd through SiLU, whose backward torch cannot
    differentiate forward; lie_loss's default (double backward) can. BrokenMACE adds the
    field energy -a sum z (forces +a e_z): L_i forces = -a X_i e_z on every atom, so the
    penalty is a^2 (|e_x x e_z|^2 + |e_y x e_z|^2) / 3 = 2 a^2 / 3 per force element, and
    the energy's derivative is 0."""
    import os
    import sys
    from pathlib import Path

    if os.environ.get("FASTEQUIV_EXPECT_MACE") != "1":
        pytest.importorskip("mace", reason="mace-torch is not installed (CI installs it, see .ci/run)")
    pytest.importorskip("ase")
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples)
    try:
        import mace_equivariance as ex
    finally:
        sys.path.remove(examples)
    torch.manual_seed(0)
    mace = ex.tiny_mace()
    batch = ex.mace_batch(ex.structures(False, 3))
    a = 0.3
    loss = fe.lie_loss(ex.BrokenMACE(mace, a, stress=False), batch)
    torch.testing.assert_close(loss.detach(), torch.tensor(2 * a ** 2 / 3, dtype=DT), rtol=1e-9, atol=0)
    assert float(fe.lie_loss(fe.adapt(mace, stress=False), batch).detach()) < 1e-20  # MACE: equivariant
