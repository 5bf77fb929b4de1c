"""lie_derivative: closed forms, finite differences, and its bound on L_equiv."""

import pytest
import torch
from torch import nn

import fastequiv as fe
from fastequiv.lie import so3_generators

DT = torch.float64


def rotation(axis: int, t: float) -> torch.Tensor:
    return torch.linalg.matrix_exp(t * so3_generators(DT)[axis])


def test_generators_rotate_right_handed():
    X = so3_generators(DT)
    e = torch.eye(3, dtype=DT)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(X[i] @ e[j], torch.linalg.cross(e[i], e[j]))
    torch.testing.assert_close(rotation(2, torch.pi / 2) @ e[0], e[1])


@pytest.mark.parametrize("shape", [(5, 3), (4, 7, 3)])
def test_linear_map_gives_the_commutator(shape):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=DT)
    x = torch.randn(*shape, generator=g, dtype=DT)
    lie = fe.lie_derivative(lambda v: v @ A.T, x, spec=fe.Spec(inputs="vector", output="vector"))
    assert lie.shape == (3,) + shape and lie.dtype == DT
    for i, X in enumerate(so3_generators(DT)):
        torch.testing.assert_close(lie[i], x @ (A @ X - X @ A).T)


def test_equivariant_models_have_zero_lie_derivative():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(4, 6, 3, generator=g, dtype=DT)
    z = torch.randn(4, 6, generator=g, dtype=DT)

    def springs(pos, z):  # forces of pairwise springs: equivariant by physics
        rel = pos[:, :, None] - pos[:, None, :]
        return {"forces": -(rel * (z[:, :, None, None] + z[:, None, :, None])).sum(2),
                "energy": (rel ** 2).sum((1, 2, 3))[:, None]}

    spec = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"forces": "vector", "energy": "scalar"})
    lie = fe.lie_derivative(springs, {"pos": pos, "z": z}, spec=spec)
    assert lie["forces"].shape == (3, 4, 6, 3) and lie["energy"].shape == (3, 4, 1)
    assert lie["forces"].abs().max() < 1e-12 and lie["energy"].abs().max() < 1e-12


def twisted(f, x, R, rep_in, rep_out):
    """rho_out(R)^-1 f(rho_in(R) x) for one R, with the library's own actions."""
    Rb = R.expand(x.shape[0], 3, 3)
    return rep_out.act(f(rep_in.act(x, Rb)), Rb, inverse=True)


@pytest.mark.parametrize("rep_in, rep_out", [("position", "vector"), ("1x0e + 1x1o + 1x2e", "1x1o + 1x2e"),
                                             ("vector", "position"), ("pseudovector", "1x1e")])
def test_matches_central_differences_of_the_twisted_model(rep_in, rep_out):
    spec = fe.Spec(inputs=rep_in, output=rep_out)
    din = spec.inputs.dim or 3
    dout = spec.output.dim
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(din, 16), nn.Tanh(), nn.Linear(16, dout)).double()
    x = torch.randn(3, 5, din, dtype=DT)
    lie = fe.lie_derivative(net, x, spec=spec)
    h = 1e-5
    for i in range(3):
        fd = (twisted(net, x, rotation(i, h), spec.inputs, spec.output)
              - twisted(net, x, rotation(i, -h), spec.inputs, spec.output)) / (2 * h)
        torch.testing.assert_close(lie[i], fd, rtol=1e-6, atol=1e-8)


def test_mask_moves_the_centroid_and_zeroes_padding():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    pos = torch.randn(2, 5, 3, dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    spec = fe.Spec(inputs={"pos": "position", "mask": "scalar"}, output="vector", mask="mask")

    def model(pos, mask):
        w = mask[..., None].to(pos.dtype)
        return net(pos - (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True))

    lie = fe.lie_derivative(model, {"pos": pos, "mask": mask}, spec=spec)
    assert (lie[:, 0, 3:] == 0).all()
    # the valid atoms of sample 0 do not see the padding at all
    alone = fe.lie_derivative(net, pos[:1, :3] - pos[:1, :3].mean(1, keepdim=True),
                              spec=fe.Spec(inputs="position", output="vector"))
    torch.testing.assert_close(lie[:, :1, :3], alone)


def test_bound_on_l_equiv_is_tight_for_spin_one_and_holds_otherwise():
    """L_equiv(x) <= 1/2 E_g (1/n) sum_i |L_i f(g x)|^2, equality for f = A x, A antisymmetric.

    The icosahedral group averages polynomials of degree <= 5 in R like Haar measure, and
    both sides are of degree 4 here, so its 60 elements give exact Haar values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=DT)
    G = fe.group_elements("icosahedral", dtype=DT)
    spec_ico = fe.Spec(inputs="vector", output="vector", group="icosahedral")
    spec = fe.Spec(inputs="vector", output="vector")
    M = torch.randn(3, 3, generator=g, dtype=DT)
    for A, tight in ((M - M.T, True), (M, False)):
        f = lambda v, A=A: v @ A.T  # noqa: E731
        d = fe.equivariance_error(f, x, torch.zeros_like(x), spec=spec_ico)  # exact, exhaustive
        gx = torch.einsum("gij,bj->gbi", G, x).reshape(-1, 3)
        lie = fe.lie_derivative(f, gx, spec=spec).reshape(3, 60, 4, 3)
        bound = 0.5 * (lie ** 2).sum(dim=(0, 3)).mean(0) / 3  # n = 3 elements per sample
        if tight:
            torch.testing.assert_close(d.per_sample.equiv, bound)
        else:
            assert (d.per_sample.equiv < bound - 1e-9).all()


class AutogradForces(nn.Module):
    """An energy that is not rotation invariant and its forces by autograd (``-dE/dpos``),
    as interatomic potentials compute them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    def forward(self, pos):
        pos = pos.requires_grad_(True)
        energy = self.net(pos - pos.mean(1, keepdim=True)).sum((1, 2))
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
        return {"energy": energy[:, None], "forces": -grad}


def _twisted_forces(model, pos, R):
    """(energy, forces) of the model on pos turned by R about each centroid, forces turned back."""
    c = pos.mean(1, keepdim=True)
    with torch.enable_grad():
        out = model((pos - c) @ R.T + c)
    return out["energy"].detach(), out["forces"].detach() @ R


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_autograd_forces_forward_over_reverse_match_central_differences(grad_enabled):
    torch.manual_seed(0)
    model = AutogradForces().eval()
    pos = torch.randn(3, 5, 3, dtype=DT)
    spec = fe.Spec(inputs={"pos": "position"}, output={"energy": "scalar", "forces": "vector"}, model_grad=True)
    with torch.set_grad_enabled(grad_enabled):
        lie = fe.lie_derivative(model, {"pos": pos}, spec=spec)
        central = fe.lie_derivative(model, {"pos": pos}, spec=spec, method="central")
    # measured without gradients: nothing holds a graph; with them, the energy keeps its graph
    # to the parameters (the forces too only if the model builds one: create_graph in training)
    assert lie["energy"].requires_grad == grad_enabled and (grad_enabled or not lie["forces"].requires_grad)
    h = 1e-5
    for i in range(3):
        (ep, fp), (em, fm) = _twisted_forces(model, pos, rotation(i, h)), _twisted_forces(model, pos, rotation(i, -h))
        torch.testing.assert_close(lie["forces"][i].detach(), (fp - fm) / (2 * h), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(lie["energy"][i].detach(), (ep - em) / (2 * h), rtol=1e-6, atol=1e-8)
    assert lie["forces"].abs().max() > 1e-2  # a dropped tangent would read as equivariant
    for k in ("energy", "forces"):
        torch.testing.assert_close(central[k].detach(), lie[k].detach(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rep_in, rep_out", [("position", "vector"), ("1x0e + 1x1o + 1x2e", "1x1o + 1x2e")])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 3e-4)], ids=["float64", "float32"])
def test_central_differences_match_forward_mode(rep_in, rep_out, dtype, tol):
    spec = fe.Spec(inputs=rep_in, output=rep_out)
    din = spec.inputs.dim or 3
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(din, 16), nn.Tanh(), nn.Linear(16, spec.output.dim)).to(dtype)
    x = torch.randn(3, 5, din, dtype=dtype)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    exact = fe.lie_derivative(net, x, spec=spec, mask=mask)
    central = fe.lie_derivative(net, x, spec=spec, mask=mask, method="central")
    assert central.dtype == exact.dtype and central.shape == exact.shape
    assert exact.abs().max() > 0.1
    torch.testing.assert_close(central, exact, rtol=tol, atol=tol)
    assert (central[:, 1, 3:] == 0).all()


def test_errors():
    spec = fe.Spec(inputs="vector", output="vector")
    with pytest.raises(ValueError, match="spec"):
        fe.lie_derivative(lambda v: v, torch.zeros(2, 3), spec="vector")
    with pytest.raises(ValueError, match="rows"):
        fe.lie_derivative(lambda v: v[:1], torch.zeros(2, 3), spec=spec)
    with pytest.raises(ValueError, match="method"):
        fe.lie_derivative(lambda v: v, torch.zeros(2, 3), spec=spec, method="fd")
    for delta, method in ((1e-3, "jvp"), (0.0, "central"), (2.0, "central"), (True, "central")):
        with pytest.raises(ValueError, match="delta"):
            fe.lie_derivative(lambda v: v, torch.zeros(2, 3), spec=spec, method=method, delta=delta)
    # the old name still works for a release, with a warning
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="delta"):
        old = fe.lie_derivative(lambda v: 2 * v, x, spec=spec, method="central", step=1e-4)
    torch.testing.assert_close(old, fe.lie_derivative(lambda v: 2 * v, x, spec=spec, method="central", delta=1e-4))
