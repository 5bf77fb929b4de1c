"""fe.diagnostics against closed forms and against the losses written out by hand.

The closed form: f(x) = A x on vectors (``Linear(3, 3, bias=False)``, weight A), target
C x, the exhaustive octahedral twirl. The octahedral group has no invariant in the l = 1
and l = 2 parts of 3x3 matrices, so its twirls of A and of x x^T are those of Haar SO(3):
``(1/24) sum_g R^T A R = (tr A / 3) I`` and ``(1/24) sum_g R x x^T R^T = (|x|^2 / 3) I``.
With the MSE normalisation (a mean over the 3 components of a sample, then over the batch)
and ``m = E |x|^2``, ``u = tr A / 3``, ``A0 = A - u I``:

    L_equiv = E (1/3) (1/24) sum_g |R^T A0 R x|^2 = |A0|_F^2 m / 9
    L_mean  = E (1/3) |(u I - C) x|^2
    grad L_equiv = (2 m / 9) A0                         traceless
    grad L_mean  = (2 / 9) E (u |x|^2 - x^T C x) I      along I, so cos = 0
    Hess L_equiv = (2 m / 9) P_traceless                eigenvalue 2m/9 eight times, then 0
    Hess L_mean  = (2 m / 9) P_I                        eigenvalue 2m/9 once, then eight 0s
    Hess L_total = (2 m / 9) Id
"""

import math

import pytest
import torch
from torch import nn

import fastequiv as fe
from fastequiv import diagnostics

DT = torch.float64
OCT = fe.Spec(inputs="vector", output="vector", group="octahedral")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_problem(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 3, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 3, generator=g, dtype=DT))
    C = torch.randn(3, 3, generator=g, dtype=DT)
    x = torch.randn(B, 3, generator=g, dtype=DT)
    return model, x, x @ C.T, C


def closed_form(A, C, x):
    m = (x ** 2).sum(1).mean()
    u = torch.trace(A) / 3
    A0 = A - u * torch.eye(3, dtype=DT)
    return dict(
        m=m, A0=A0,
        equiv=(A0 ** 2).sum() * m / 9,
        mean=((u * x - x @ C.T) ** 2).sum(1).mean() / 3,
        grad_equiv=2 * m / 9 * A0,
        grad_mean=2 / 9 * (u * (x ** 2).sum(1) - ((x @ C.T) * x).sum(1)).mean() * torch.eye(3, dtype=DT),
        eig=2 * m / 9,
    )


# --- the closed form ------------------------------------------------------------------------------

def test_the_octahedral_twirls_the_closed_form_rests_on():
    G = fe.group_elements("octahedral", dtype=DT)
    x = torch.randn(3, dtype=DT)
    A = torch.randn(3, 3, dtype=DT)
    eye = torch.eye(3, dtype=DT)
    torch.testing.assert_close(torch.einsum("gij,j,k,glk->il", G, x, x, G) / 24, x.dot(x) / 3 * eye)
    torch.testing.assert_close(torch.einsum("gji,jk,gkl->il", G, A, G) / 24, torch.trace(A) / 3 * eye)


def test_linear_losses_match_equivariance_error():
    model, x, y, C = linear_problem()
    cf = closed_form(model.weight.detach(), C, x)
    d = fe.equivariance_error(model, x, y, spec=OCT)
    torch.testing.assert_close(d.equiv, cf["equiv"])
    torch.testing.assert_close(d.mean, cf["mean"])


def test_linear_gradient_alignment_closed_form():
    model, x, y, C = linear_problem()
    cf = closed_form(model.weight.detach(), C, x)
    g = diagnostics.gradient_alignment(model, x, y, spec=OCT, return_grads=True)
    assert set(g.cos) == {"all", "<root>"}
    assert abs(float(g.cos["all"])) < 1e-12
    torch.testing.assert_close(g.norm_equiv["all"], 2 * cf["m"] / 9 * cf["A0"].norm())
    torch.testing.assert_close(g.norm_mean["all"], cf["grad_mean"].norm())
    torch.testing.assert_close(g.norm_total["all"], (cf["grad_mean"] + cf["grad_equiv"]).norm())
    torch.testing.assert_close(g.grads_equiv[0], cf["grad_equiv"])
    torch.testing.assert_close(g.grads_mean[0], cf["grad_mean"])
    torch.testing.assert_close(g.mean, cf["mean"])
    torch.testing.assert_close(g.equiv, cf["equiv"])
    assert g.exhaustive and g.samples == 24 and g.names == ("weight",)


def test_linear_hessian_spectra_closed_form():
    model, x, y, C = linear_problem()
    lam = float(closed_form(model.weight.detach(), C, x)["eig"])
    eq = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="equiv", k=9, tol=1e-10)
    torch.testing.assert_close(eq.eigenvalues[:8], torch.full((8,), lam, dtype=DT))
    assert abs(float(eq.eigenvalues[8])) < 1e-12 and eq.converged
    mean = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="mean", k=9, tol=1e-10)
    torch.testing.assert_close(mean.eigenvalues[0], torch.tensor(lam, dtype=DT))
    assert mean.eigenvalues[1:].abs().max() < 1e-12
    total = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="total", k=9, tol=1e-10)
    torch.testing.assert_close(total.eigenvalues, torch.full((9,), lam, dtype=DT))
    # the conditioning along the computed directions, near-null ones left out
    assert float(total.condition()) == pytest.approx(1.0) and float(eq.condition()) == pytest.approx(1.0)
    assert math.isinf(float(eq.condition(rtol=None))) or float(eq.condition(rtol=None)) > 1e10
    small = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="mean", k=3, which="smallest", tol=1e-10)
    assert small.eigenvalues.abs().max() < 1e-12


def test_linear_hessian_eigenvectors_are_traceless_and_identity():
    model, x, y, _ = linear_problem()
    eq = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="equiv", k=8, tol=1e-10, eigenvectors=True)
    mean = diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="mean", k=1, tol=1e-10, eigenvectors=True)
    traces = eq.eigenvectors.reshape(8, 3, 3).diagonal(dim1=1, dim2=2).sum(-1)
    assert traces.abs().max() < 1e-10
    torch.testing.assert_close(mean.eigenvectors[0].reshape(3, 3).abs(), torch.eye(3, dtype=DT) / math.sqrt(3))


def test_log_dynamics_closed_form():
    model, x, y, C = linear_problem()
    cf = closed_form(model.weight.detach(), C, x)
    out = diagnostics.log_dynamics(model, x, y, spec=OCT, k=1, tol=1e-10)
    assert abs(out["cos"]) < 1e-12
    assert out["top_eig_mean"] == pytest.approx(float(cf["eig"]), rel=1e-10)
    assert out["top_eig_equiv"] == pytest.approx(float(cf["eig"]), rel=1e-10)
    assert out["equiv"] == pytest.approx(float(cf["equiv"]), rel=1e-12)
    assert model.weight.grad is None


def test_iid_gradients_average_to_the_exhaustive_ones():
    """Haar SO(3) with K=2 draws: the unbiased estimators' gradients, averaged over seeds,
    are the exhaustive octahedral ones (every quantity is of degree <= 2 in each R)."""
    model, x, y, C = linear_problem(B=4)
    cf = closed_form(model.weight.detach(), C, x)
    spec = fe.Spec(inputs="vector", output="vector")
    ge, gm = [], []
    for seed in range(400):
        g = diagnostics.gradient_alignment(model, x, y, spec=spec, samples=2, seed=seed, return_grads=True)
        ge.append(g.grads_equiv[0])
        gm.append(g.grads_mean[0])
    for draws, exact in ((torch.stack(ge), cf["grad_equiv"]), (torch.stack(gm), cf["grad_mean"])):
        err = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - exact).abs() <= 5 * err + 1e-12).all(), (draws.mean(0), exact, err)


# --- Lanczos against dense Hessians ---------------------------------------------------------------

def test_lanczos_on_a_matrix():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))
    lam = torch.cat([torch.tensor([9.0, 7.0, 7.0, 5.0, -8.0], dtype=DT), torch.linspace(-1, 1, 195, dtype=DT)])
    H = Q @ torch.diag(lam) @ Q.T
    s = diagnostics.lanczos(lambda v: H @ v, 200, 2, max_iter=80, tol=1e-8, eigenvectors=True)
    assert s.converged and s.iterations < 80
    torch.testing.assert_close(s.eigenvalues, torch.tensor([9.0, 7.0], dtype=DT))
    for val, vec, res in zip(s.eigenvalues, s.eigenvectors, s.residuals):
        assert float((H @ vec - val * vec).norm()) <= 10 * float(res) + 1e-10
    mag = diagnostics.lanczos(lambda v: H @ v, 200, 2, which="magnitude", max_iter=80, tol=1e-8)
    torch.testing.assert_close(mag.eigenvalues, torch.tensor([9.0, -8.0], dtype=DT))
    # a repeated eigenvalue shows once from one start vector, every time once the space closes
    full = diagnostics.lanczos(lambda v: H @ v, 200, 5, max_iter=200, tol=1e-300)
    torch.testing.assert_close(full.eigenvalues, torch.tensor([9.0, 7.0, 7.0, 5.0, 1.0], dtype=DT))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x):
        return self.net(x)


def _flat_loss(model, term, x, y, R, exhaustive):
    """L_term of the parameter vector ``theta``, the estimators written out by hand."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    K = R.shape[0]

    def loss(theta):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[start:start + s.numel()].reshape(s)
            start += s.numel()
        a = torch.stack([torch.einsum("bji,bj->bi", R[k], torch.func.functional_call(
            model, params, (torch.einsum("bij,bj->bi", R[k], x),))) for k in range(K)])
        abar = a.mean(0)
        spread = ((a - abar) ** 2).sum(-1).mean(0) / 3
        bias = ((abar - y) ** 2).sum(-1) / 3
        equiv = spread if exhaustive else spread * K / (K - 1)
        mean = bias if exhaustive else bias - spread / (K - 1)
        return {"equiv": equiv, "mean": mean, "total": equiv + mean}[term].mean()

    return loss


@pytest.mark.parametrize("term", ["equiv", "mean", "total"])
@pytest.mark.parametrize("group", ["octahedral", "SO3"])
def test_lanczos_matches_a_dense_hessian(term, group):
    torch.manual_seed(1)
    model = MLP()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)
    spec = fe.Spec(inputs="vector", output="vector", group=group)
    if group == "octahedral":
        R, samples, exhaustive = fe.group_elements("octahedral", dtype=DT)[:, None].expand(24, 6, 3, 3), None, True
    else:
        R, samples, exhaustive = fe.random_rotations(4 * 6, seed=9, dtype=DT).reshape(4, 6, 3, 3), 4, False
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(_flat_loss(model, term, x, y, R, exhaustive), theta)
    lam = torch.linalg.eigvalsh(H)
    kw = dict(spec=spec, term=term, samples=samples, seed=9, tol=1e-10)
    top = diagnostics.hessian_spectrum(model, x, y, k=4, **kw)
    torch.testing.assert_close(top.eigenvalues, lam.flip(0)[:4], rtol=1e-7, atol=1e-10)
    low = diagnostics.hessian_spectrum(model, x, y, k=3, which="smallest", **kw)
    torch.testing.assert_close(low.eigenvalues, lam[:3], rtol=1e-7, atol=1e-10)
    assert top.names == tuple(n for n, _ in model.named_parameters())


# --- graph batches --------------------------------------------------------------------------------

class EdgeNet(nn.Module):
    """Messages from raw relative vectors: translation invariant, not rotation equivariant;
    per-node forces and a per-graph energy (as in test_graph.py, smaller)."""

    def __init__(self):
        super().__init__()
        self.msg = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
        self.out = nn.Linear(4, 4).to(DT)

    def forward(self, pos, z, batch, edge_index):
        src, dst = edge_index
        m = self.msg(torch.cat([pos[dst] - pos[src], z[src, None]], dim=-1))
        o = self.out(torch.zeros(pos.shape[0], 4, dtype=pos.dtype).index_add(0, dst, m))
        B = int(batch.max()) + 1
        return {"forces": o[:, :3], "energy": torch.zeros(B, 1, dtype=pos.dtype).index_add(0, batch, o[:, 3:])}


GRAPH_SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "edge_index": "index"},
                     output={"forces": "vector", "energy": "scalar"}, group="octahedral")


def graph_batch(sizes=(3, 2, 4)):
    g = torch.Generator().manual_seed(0)
    gs = []
    for n in sizes:
        ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = ii != jj
        gs.append(dict(pos=torch.randn(n, 3, generator=g, dtype=DT) + 2.0, z=torch.randn(n, generator=g, dtype=DT),
                       edge_index=torch.stack([ii[keep], jj[keep]]), forces=torch.randn(n, 3, generator=g, dtype=DT),
                       energy=torch.randn(1, 1, generator=g, dtype=DT)))
    off = torch.tensor([0] + list(sizes)).cumsum(0)
    inputs = dict(pos=torch.cat([x["pos"] for x in gs]), z=torch.cat([x["z"] for x in gs]),
                  batch=torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)]),
                  edge_index=torch.cat([x["edge_index"] + off[b] for b, x in enumerate(gs)], dim=1))
    target = dict(forces=torch.cat([x["forces"] for x in gs]), energy=torch.cat([x["energy"] for x in gs]))
    return gs, inputs, target


def graph_terms_by_hand(model, gs, params=None, weights=(1.0, 1.0)):
    """L_mean and L_equiv graph by graph, every octahedral rotation about the centroid."""
    G = fe.group_elements("octahedral", dtype=DT)
    call = model if params is None else (lambda **kw: torch.func.functional_call(model, params, (), kw))
    means, equivs = [], []
    for x in gs:
        c = x["pos"].mean(0)
        batch = torch.zeros(len(x["z"]), dtype=torch.int64)
        f, e = [], []
        for R in G:
            out = call(pos=(x["pos"] - c) @ R.T + c, z=x["z"], batch=batch, edge_index=x["edge_index"])
            f.append(out["forces"] @ R)
            e.append(out["energy"])
        mean = equiv = 0
        for a, y, w in ((torch.stack(f), x["forces"], weights[0]), (torch.stack(e), x["energy"], weights[1])):
            abar = a.mean(0)
            mean = mean + w * ((abar - y) ** 2).mean()
            equiv = equiv + w * ((a - abar) ** 2).mean()
        means.append(mean)
        equivs.append(equiv)
    return torch.stack(means).mean(), torch.stack(equivs).mean()


def test_graph_gradient_alignment_matches_the_loop_by_hand():
    torch.manual_seed(0)
    model = EdgeNet()
    gs, inputs, target = graph_batch()
    g = diagnostics.gradient_alignment(model, inputs, target, spec=GRAPH_SPEC, loss_weights={"forces": 1.0,
                                                                                            "energy": 0.5})
    mean, equiv = graph_terms_by_hand(model, gs, weights=(1.0, 0.5))
    torch.testing.assert_close(g.mean, mean.detach())
    torch.testing.assert_close(g.equiv, equiv.detach())
    params = dict(model.named_parameters())
    gm = torch.autograd.grad(mean, list(params.values()), retain_graph=True)
    ge = torch.autograd.grad(equiv, list(params.values()))
    assert set(g.cos) == {"all", "msg.0", "msg.2", "out"}
    for key in g.cos:
        idx = [i for i, n in enumerate(params) if key == "all" or n.rpartition(".")[0] == key]
        a = torch.cat([gm[i].reshape(-1) for i in idx])
        b = torch.cat([ge[i].reshape(-1) for i in idx])
        torch.testing.assert_close(g.norm_mean[key], a.norm())
        torch.testing.assert_close(g.norm_equiv[key], b.norm())
        torch.testing.assert_close(g.cos[key], a.dot(b) / (a.norm() * b.norm()))
    assert all(p.grad is None for p in model.parameters())


def test_graph_hessian_matches_the_dense_one():
    torch.manual_seed(0)
    model = EdgeNet()
    gs, inputs, target = graph_batch(sizes=(3, 2))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def equiv(theta):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[start:start + s.numel()].reshape(s)
            start += s.numel()
        return graph_terms_by_hand(model, gs, params)[1]

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lam = torch.linalg.eigvalsh(torch.autograd.functional.hessian(equiv, theta)).flip(0)
    s = diagnostics.hessian_spectrum(model, inputs, target, spec=GRAPH_SPEC, term="equiv", k=3, tol=1e-10)
    torch.testing.assert_close(s.eigenvalues, lam[:3], rtol=1e-7, atol=1e-10)


# --- per-element attribution ----------------------------------------------------------------------

def test_per_element_linear_closed_form():
    model, x, y, C = linear_problem()
    e = diagnostics.equivariance_per_element(model, x, y, spec=OCT)
    A0 = closed_form(model.weight.detach(), C, x)["A0"]
    torch.testing.assert_close(e.heads["output"].sum(1) / 3, (A0 ** 2).sum() * (x ** 2).sum(1) / 9)
    torch.testing.assert_close(e.equiv, fe.equivariance_error(model, x, y, spec=OCT).equiv)


class OneAtomBreaks(nn.Module):
    """Equivariant (centred positions) except atom 0's force, which adds a fixed vector."""

    def forward(self, pos, mask):
        w = mask[..., None].to(pos.dtype)
        out = pos - (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        kick = torch.zeros_like(out)
        kick[:, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=pos.dtype)
        return (out + kick) * w


def test_per_element_finds_the_atom_that_breaks_symmetry_and_sums_to_equivariance_error():
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(5, 4, 3, generator=g, dtype=DT)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 3] = mask[4, 2:] = False
    target = torch.randn(5, 4, 3, generator=g, dtype=DT)
    spec = fe.Spec(inputs={"pos": "position", "mask": "scalar"}, output="vector", mask="mask")
    inputs = {"pos": pos, "mask": mask}
    e = diagnostics.equivariance_per_element(OneAtomBreaks(), inputs, target, spec=spec, samples=4, seed=3)
    per_atom = e.heads["output"].sum(-1)
    assert per_atom[:, 1:].abs().max() < 1e-12 and (per_atom[:, 0] > 0).all()
    d = fe.equivariance_error(OneAtomBreaks(), inputs, target, spec=spec, samples=4, seed=3)
    torch.testing.assert_close(e.per_sample(), d.per_sample.equiv)
    torch.testing.assert_close(e.equiv, d.equiv)


def test_per_element_graph_sums_to_equivariance_error():
    torch.manual_seed(0)
    model = EdgeNet()
    _, inputs, target = graph_batch()
    spec = fe.Spec(inputs=GRAPH_SPEC.inputs, output=GRAPH_SPEC.output)
    w = {"forces": 1.0, "energy": 0.25}
    e = diagnostics.equivariance_per_element(model, inputs, target, spec=spec, samples=3, seed=1, loss_weights=w)
    d = fe.equivariance_error(model, inputs, target, spec=spec, samples=3, seed=1, loss_weights=w)
    assert e.heads["forces"].shape == target["forces"].shape and e.heads["energy"].shape == (3, 1)
    torch.testing.assert_close(e.per_sample(), d.per_sample.equiv)
    torch.testing.assert_close(e.equiv, d.equiv)


# --- modules, modes, .grad, errors ----------------------------------------------------------------

class Drop(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh()).to(DT)
        self.head = nn.Linear(8, 3).to(DT)

    def forward(self, x):
        return self.head(self.body(x))


def test_modes_restored_no_grad_left_and_dropout_off():
    torch.manual_seed(0)
    model = Drop().train()
    model.body[2].eval()  # a submodule in its own mode stays there
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 3, dtype=DT)
    spec = fe.Spec(inputs="vector", output="vector")
    a = diagnostics.gradient_alignment(model, x, y, spec=spec, seed=0)
    b = diagnostics.gradient_alignment(model, x, y, spec=spec, seed=0)
    torch.testing.assert_close(a.cos["all"], b.cos["all"])  # dropout off: deterministic
    diagnostics.hessian_spectrum(model, x, y, spec=spec, term="mean", k=2, seed=0, max_iter=10)
    diagnostics.equivariance_per_element(model, x, y, spec=spec, seed=0)
    diagnostics.log_dynamics(model, x, y, spec=spec, max_iter=5)
    assert model.training and model.body.training and model.body[1].training and not model.body[2].training
    assert all(p.grad is None for p in model.parameters())


def test_per_module_keys_and_params_subsets():
    torch.manual_seed(0)
    model = Drop()
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 3, dtype=DT)
    spec = fe.Spec(inputs="vector", output="vector")
    g = diagnostics.gradient_alignment(model, x, y, spec=spec, seed=0)
    assert set(g.cos) == {"all", "body.0", "head"}
    parts = torch.stack([g.norm_equiv["body.0"], g.norm_equiv["head"]])
    torch.testing.assert_close(g.norm_equiv["all"], parts.norm())
    torch.testing.assert_close(g.dot["all"], g.dot["body.0"] + g.dot["head"])
    h = diagnostics.gradient_alignment(model, x, y, spec=spec, seed=0, params=["head"])
    assert set(h.cos) == {"all", "head"} and h.names == ("head.weight", "head.bias")
    torch.testing.assert_close(h.cos["all"], g.cos["head"])
    t = diagnostics.gradient_alignment(model, x, y, spec=spec, seed=0, params=[model.head.weight])
    assert set(t.cos) == {"all", "head"} and t.names == ("head.weight",)
    s = diagnostics.hessian_spectrum(model, x, y, spec=spec, seed=0, params="head", k=2, tol=1e-10)
    assert s.names == ("head.weight", "head.bias") and s.eigenvalues.shape == (2,)


def test_bad_arguments_name_themselves():
    model, x, y, _ = linear_problem()
    with pytest.raises(ValueError, match="term"):
        diagnostics.hessian_spectrum(model, x, y, spec=OCT, term="foo")
    with pytest.raises(ValueError, match="k must"):
        diagnostics.hessian_spectrum(model, x, y, spec=OCT, k=0)
    with pytest.raises(ValueError, match="k=10 exceeds"):
        diagnostics.hessian_spectrum(model, x, y, spec=OCT, k=10)
    with pytest.raises(ValueError, match="which"):
        diagnostics.hessian_spectrum(model, x, y, spec=OCT, which="middle")
    with pytest.raises(ValueError, match=r"params\[0\]='encoder' names no parameter"):
        diagnostics.gradient_alignment(model, x, y, spec=OCT, params=["encoder"])
    with pytest.raises(ValueError, match="params is empty"):
        diagnostics.gradient_alignment(model, x, y, spec=OCT, params=[])
    with pytest.raises(ValueError, match="samples=1"):
        diagnostics.gradient_alignment(model, x, y, spec=fe.Spec(inputs="vector", output="vector"), samples=1)
    with pytest.raises(ValueError, match="target has shape"):
        diagnostics.equivariance_per_element(model, x, y[:8], spec=OCT)
    with pytest.raises(ValueError, match="max_iter"):
        diagnostics.hessian_spectrum(model, x, y, spec=OCT, k=4, max_iter=2)
    assert model.training  # errors leave the mode alone too
