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


def test_errors():
    spec = fe.Spec(inputs="vector", output="vector")
    with pytest.raises(ValueError, match="spec"):
        fe.lie_derivative(lambda v: v, torch.zeros(2, 3), spec="vector")
    with pytest.raises(ValueError, match="rows"):
        fe.lie_derivative(lambda v: v[:1], torch.zeros(2, 3), spec=spec)
