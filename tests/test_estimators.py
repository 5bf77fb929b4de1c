"""The decomposition against closed forms no implementation can fake.

For f(x) = A x with vector input and output, the Haar twirl is fbar(x) = (tr A / 3) x
(Schur: the group average of R^T A R commutes with every rotation), so per sample, in
mse_loss normalisation (mean over the 3 components),

    L_mean  = ||(tr A / 3) x - y||^2 / 3
    L_equiv = (||A||_F^2 / 3 - (tr A / 3)^2) ||x||^2 / 3

The same holds exactly for the cube and icosahedron groups, which act irreducibly on
R^3, so their exhaustive twirls must give these values with no sampling error.
"""

import math

import pytest
import torch

import fastequiv as fe

torch.set_default_dtype(torch.float32)


def linear_problem(B=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 3, generator=g, dtype=dtype)
    x = torch.randn(B, 3, generator=g, dtype=dtype)
    y = torch.randn(B, 3, generator=g, dtype=dtype)
    tr = torch.trace(A) / 3
    mean = ((tr * x - y) ** 2).mean(-1)
    equiv = ((A**2).sum() / 3 - tr**2) * (x**2).sum(-1) / 3
    return (lambda v: v @ A.T), x, y, mean, equiv


VEC = fe.Spec(inputs="vector", output="vector")


@pytest.mark.parametrize("group", ["octahedral", "icosahedral"])
def test_exhaustive_finite_twirl_is_exact(group):
    model, x, y, mean, equiv = linear_problem()
    d = fe.equivariance_error(model, x, y, spec=fe.Spec(inputs="vector", output="vector", group=group))
    assert d.exhaustive and d.exact and d.samples == fe.groups.group_order(group)
    torch.testing.assert_close(d.per_sample.mean, mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(d.per_sample.equiv, equiv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(d.mean, mean.mean())
    torch.testing.assert_close(d.equiv, equiv.mean())
    torch.testing.assert_close(d.pct, equiv.mean() / (mean.mean() + equiv.mean()))


@pytest.mark.parametrize("K", [2, 3, 8])
def test_identity_holds_on_every_draw(K):
    model, x, y, _, _ = linear_problem()
    for seed in range(5):
        d = fe.equivariance_error(model, x, y, spec=VEC, samples=K, seed=seed)
        torch.testing.assert_close(d.per_sample.total, d.per_sample.mean + d.per_sample.equiv, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(d.total, d.mean + d.equiv, atol=1e-12, rtol=1e-12)
        # L_total_hat is the plain augmented loss over the K rotated copies
        R = fe.random_rotations(K * x.shape[0], seed=seed, dtype=torch.float64).reshape(K, -1, 3, 3)
        pred = model(torch.einsum("kbij,bj->kbi", R, x))
        back = torch.einsum("kbji,kbj->kbi", R, pred)
        torch.testing.assert_close(d.total, ((back - y) ** 2).mean(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("K", [2, 5])
def test_estimators_are_unbiased(K):
    """Averaged over many independent draws, the estimates converge to the closed form.

    The plug-in spread (1/K) sum ||a_k - abar||^2 is biased by a factor (K-1)/K; the
    tolerance is far tighter than that bias, so a biased estimator fails here.
    """
    model, x, y, mean, equiv = linear_problem(B=8, seed=1)
    draws = 300
    est = torch.stack(
        [torch.stack([d.mean, d.equiv]) for d in (fe.equivariance_error(model, x, y, spec=VEC, samples=K, seed=s) for s in range(draws))]
    )
    avg, err = est.mean(0), est.std(0) / math.sqrt(draws)
    truth = torch.stack([mean.mean(), equiv.mean()])
    assert ((avg - truth).abs() < 4 * err).all(), (avg, truth, err)
    # power: the plug-in bias (equiv / K) is many standard errors wide
    assert truth[1] / K > 8 * err[1]


def test_equivariant_linear_map_has_zero_equiv():
    # f(x) = c x + (skew part is not equivariant, a scalar multiple of I is)
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64)
    d = fe.equivariance_error(lambda v: 2.5 * v, x, y, spec=VEC, samples=4, seed=0)
    assert d.per_sample.equiv.abs().max() < 1e-24
    torch.testing.assert_close(d.mean, ((2.5 * x - y) ** 2).mean())


def test_k1_is_refused_not_zero():
    model, x, y, _, _ = linear_problem()
    with pytest.raises(ValueError, match="samples=1"):
        fe.equivariance_error(model, x, y, spec=VEC, samples=1)
    with pytest.raises(ValueError, match="samples=1"):
        fe.twirl_loss(model, x, y, spec=VEC, samples=1)


def test_stderr_is_the_standard_error_of_the_per_sample_values():
    model, x, y, _, _ = linear_problem(B=32)
    d = fe.equivariance_error(model, x, y, spec=VEC, samples=4, seed=3)
    for name in ("total", "mean", "equiv"):
        v = getattr(d.per_sample, name)
        torch.testing.assert_close(getattr(d.stderr, name), v.std() / math.sqrt(len(v)))


def test_general_convex_loss_reports_the_jensen_gap_as_not_exact():
    model, x, y, _, _ = linear_problem()
    l1 = lambda p, t: (p - t).abs()  # noqa: E731
    d = fe.equivariance_error(model, x, y, spec=VEC, samples=6, seed=2, loss=l1)
    assert not d.exact
    R = fe.random_rotations(6 * 16, seed=2, dtype=torch.float64).reshape(6, 16, 3, 3)
    a = torch.einsum("kbji,kbj->kbi", R, model(torch.einsum("kbij,bj->kbi", R, x)))
    total = (a - y).abs().mean()
    plug = (a.mean(0) - y).abs().mean()
    torch.testing.assert_close(d.total, total)
    torch.testing.assert_close(d.mean, plug)
    torch.testing.assert_close(d.equiv, total - plug)
    assert d.equiv > 0  # Jensen gap of a convex loss is >= 0
    # MSE passed as a callable gives the plug-in (biased) value, the built-in the unbiased one
    sq = fe.equivariance_error(model, x, y, spec=VEC, samples=6, seed=2, loss=lambda p, t: (p - t) ** 2)
    mse = fe.equivariance_error(model, x, y, spec=VEC, samples=6, seed=2)
    torch.testing.assert_close(sq.equiv * 6 / 5, mse.equiv)
    # exhaustive finite twirls make the plug-in exact
    dx = fe.equivariance_error(model, x, y, spec=fe.Spec(inputs="vector", output="vector", group="octahedral"), loss=l1)
    assert dx.exact and dx.exhaustive


def test_loss_must_be_elementwise():
    model, x, y, _, _ = linear_problem()
    with pytest.raises(ValueError, match="elementwise"):
        fe.equivariance_error(model, x, y, spec=VEC, samples=2, loss=torch.nn.functional.l1_loss)
    with pytest.raises(ValueError, match="loss"):
        fe.equivariance_error(model, x, y, spec=VEC, samples=2, loss="huber")


def test_mask_removes_padded_atoms_and_centroids():
    torch.manual_seed(0)
    B, N = 4, 6
    pos = torch.randn(B, N, 3, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    W = torch.randn(3, 3, dtype=torch.float64)

    def model(p, m):  # per-atom, about the masked centroid
        c = (p * m[..., None]).sum(1, keepdim=True) / m.sum(1, keepdim=True)[..., None]
        return (p - c) @ W.T

    target = torch.randn(B, N, 3, dtype=torch.float64)
    spec = fe.Spec(inputs=("position", "scalar"), output="vector", mask=1)
    d = fe.equivariance_error(model, (pos, mask), target, spec=spec, samples=3, seed=4)
    # garbage in padded atoms changes nothing
    pos2, target2 = pos.clone(), target.clone()
    pos2[~mask] = 1e3
    target2[~mask] = -7.0
    d2 = fe.equivariance_error(model, (pos2, mask), target2, spec=spec, samples=3, seed=4)
    torch.testing.assert_close(d.per_sample.total, d2.per_sample.total)
    torch.testing.assert_close(d.per_sample.equiv, d2.per_sample.equiv)
    # and each sample equals the unpadded computation on its own
    for b in range(B):
        n = int(mask[b].sum())
        R = fe.random_rotations(3 * B, seed=4, dtype=torch.float64).reshape(3, B, 3, 3)[:, b]
        p = pos[b : b + 1, :n]
        c = p.mean(1, keepdim=True)
        preds = torch.stack([model((p - c) @ R[k].T + c, mask[b : b + 1, :n]) for k in range(3)])
        a = preds @ R[:, None]  # back-rotate row vectors: (R^T v)^T = v^T R
        total = ((a - target[b : b + 1, :n]) ** 2).mean()
        torch.testing.assert_close(d.per_sample.total[b], total)


def test_fully_masked_sample_is_left_out_of_the_batch_mean():
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    y = torch.randn(3, 5, 3, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    model = lambda v: v * 2 + v.roll(1, dims=-1)  # noqa: E731
    d = fe.equivariance_error(model, x, y, spec=VEC, samples=2, seed=0, mask=mask)
    d01 = fe.equivariance_error(model, x[:2], y[:2], spec=VEC, samples=2, seed=0)
    torch.testing.assert_close(d.per_sample.total[2], torch.tensor(0.0, dtype=torch.float64))
    # the first two samples saw other rotations (row index k * B + b), so compare the batch mean structure
    torch.testing.assert_close(d.total, d.per_sample.total[:2].mean())
    assert torch.isfinite(d01.total)


def test_exhaustive_icosahedral_twirl_on_l2_irreps_is_exact():
    """The icosahedral group acts irreducibly on l=2 (its 5-dim irrep), so by Schur the
    twirl of a linear map A on 2e features is (tr A / 5) x and, per sample,
    L_equiv = (||A||_F^2 / 5 - (tr A / 5)^2) ||x||^2 / 5, exactly, through Wigner-D."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 5, generator=g, dtype=torch.float64)
    spec = fe.Spec(inputs="1x2e", output="1x2e", group="icosahedral")
    d = fe.equivariance_error(lambda v: v @ A.T, x, y, spec=spec)
    tr = torch.trace(A) / 5
    torch.testing.assert_close(d.per_sample.mean, ((tr * x - y) ** 2).mean(-1), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(d.per_sample.equiv, ((A**2).sum() / 5 - tr**2) * (x**2).sum(-1) / 5, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fe.Twirled(lambda v: v @ A.T, spec=spec)(x), tr * x)
    # Haar SO(3) draws estimate the same values without bias
    ests = torch.stack([fe.equivariance_error(lambda v: v @ A.T, x, y, spec=fe.Spec(inputs="1x2e", output="1x2e"),
                                              samples=4, seed=s).equiv for s in range(200)])
    assert (ests.mean() - d.equiv).abs() < 4 * ests.std() / 200**0.5
