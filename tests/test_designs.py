"""Rotation designs (fastequiv.designs) and the measurements built on them
(fastequiv.design_twirl, Twirled(rotations=), TwirledCalculator(rotations=)).

Closed forms used here:

* a design of degree L averages every combination of Wigner-D entries of degree <= L to its
  Haar integral (the ``0e`` entry), and fails one degree above;
* ``f(x) = A x`` (vector in, vector out): ``f_g(x) = R^T A R x`` has degree <= 2 in ``g``,
  ``fbar(x) = (tr A / 3) x`` and, per sample of n points, ``L_equiv = ||A'||_F^2 sum_i |x_i|^2
  / (9 n)`` with ``A' = A - (tr A / 3) I`` (``E_R R^T M R = tr(M) / 3 I``);
* ``s(x) = |x . e|`` (vector in, scalar out) has content at every even degree: ``x . R^T e`` is
  ``|x| t`` with ``t`` uniform on [-1, 1] (Archimedes), so ``fbar = |x| / 2``,
  ``L_equiv = |x|^2 / 12`` and ``L_total = |x|^2 / 3 - y |x| + y^2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastequiv as fe
from fastequiv import designs
from fastequiv.design_twirl import Replicates, design_average, design_error, design_rotations

# sizes of "design:L" on SO(3), L = 1 .. 10 (O(3): twice these)
SIZES = [4, 12, 24, 60, 60, 168, 192, 288, 320, 550]
# float64 design sums of an exact design are ~1e-16 (measured: at most 7.4e-16 up to degree 11);
# one degree above they are O(0.1-1) (measured: at least 0.27)
EXACT, FAILS = 1e-13, 0.05


def _irreps(lmax: int, o3: bool) -> str:
    return " + ".join(f"1x{l}{p}" for l in range(lmax + 1) for p in (("e", "o") if o3 else ("eo"[l % 2],)))


def _design_sum(d: designs.Design, lmax: int, C: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i F(R_i)`` for ``F(g) = tr(C D(g))``, D the block-diagonal Wigner-D matrix."""
    D = fe.wigner_D(_irreps(lmax, d.group == "O3"), d.rotations, backend="torch")
    return torch.einsum("k,ij,kji->", d.weights, C, D)


def _all_designs():
    out = [f"design:{L}" for L in range(1, 11)] + [f"lebedev:{L}" for L in (1, 2, 5, 6, 9, 10)]
    return out + ["octahedral", "icosahedral"]


@pytest.mark.parametrize("group", ["SO3", "O3"])
@pytest.mark.parametrize("name", _all_designs())
def test_design_averages_band_limited_functions_exactly_and_fails_one_degree_above(name, group):
    if name.startswith("lebedev") or name in ("design:10",):
        pytest.importorskip("scipy")
    d = designs.design(name, group)
    L = d.degree
    assert d.rotations.dtype == torch.float64 and d.rotations.shape == (d.size, 3, 3)
    assert abs(float(d.weights.sum()) - 1) < 1e-14
    eye = torch.eye(3, dtype=torch.float64).expand(d.size, 3, 3)
    assert torch.allclose(d.rotations.transpose(1, 2) @ d.rotations, eye, atol=1e-14)
    det = torch.linalg.det(d.rotations)
    assert torch.allclose(det.abs(), torch.ones_like(det), atol=1e-13)
    if group == "SO3":
        assert bool((det > 0).all())
    else:  # half of the weight on each coset
        assert abs(float(d.weights[det < 0].sum()) - 0.5) < 1e-14
    g = torch.Generator().manual_seed(L)
    dim = fe.wigner_D(_irreps(L + 1, group == "O3"), torch.eye(3, dtype=torch.float64)).shape[-1]
    C = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    haar = C[0, 0]  # only the trivial irrep (0e, the first block) survives the Haar integral
    inside = C.clone()
    top = fe.wigner_D(_irreps(L, group == "O3"), torch.eye(3, dtype=torch.float64)).shape[-1]
    inside[top:, :] = 0
    inside[:, top:] = 0
    assert abs(float(_design_sum(d, L + 1, inside) - haar)) < EXACT * float(inside.norm())
    # one degree above: the degree-(L+1) blocks alone are not averaged away (their sum is a
    # random projection of the O(0.1-1) residual: far above float rounding)
    above = C - inside
    assert abs(float(_design_sum(d, L + 1, above))) > 1e-8 * float(above.norm())
    res = designs.residuals(d, L + 1)
    assert max(v for (l, _), v in res.items() if l <= L) < EXACT
    assert max(v for (l, _), v in res.items() if l == L + 1) > FAILS


def test_design_sizes_and_the_fewest_rotations():
    rows = designs.catalogue(10)
    assert [r["design"] for r in rows] == SIZES
    assert [r["lower_bound"] for r in rows] == [1, 10, 10, 35, 35, 84, 84, 165, 165, 286]
    assert [r["lebedev_points"] for r in rows] == [6, 6, 6, 14, 14, 26, 26, 38, 38, 50]
    for r in rows:
        assert r["lower_bound"] <= r["design"] <= r["lebedev_product"]
    for L in range(1, 10):  # no scipy needed below degree 10
        d = designs.design(f"design:{L}")
        assert d.size == SIZES[L - 1] and d.degree >= L
        assert designs.design(f"design:{L}", "O3").size == 2 * d.size
        assert bool((d.weights > 0).all())
    assert designs.design("design:4").name == "icosahedral" and designs.design("design:4").degree == 5
    assert designs.design("design:3").name == "octahedral"
    pytest.importorskip("scipy")
    assert designs.design("lebedev:5").size == 84  # metatomic's grid: Lebedev 14 x 6 in-plane angles
    assert designs.design("design:10").size == 550


def test_sphere_rules_from_the_literature():
    m = designs.sphere_rule(7)
    assert m.name == "McLaren 24" and m.points.shape == (24, 3) and np.allclose(m.weights, 1 / 24)
    p = designs.sphere_rule(9)
    assert p.points.shape == (32, 3) and (p.weights > 0).all()
    for rule in (m, p):
        assert max(designs.sphere_residual(rule, l) for l in range(1, rule.degree + 1)) < EXACT
        assert designs.sphere_residual(rule, rule.degree + 1) > FAILS


@pytest.mark.parametrize("bad, match", [
    ("design:0", "the degree L must be in"), ("design:x", "rotations must be"), ("haar", "rotations must be"),
    ("lebedev:200", "the degree L must be in"), (5, "rotations must be a str"),
])
def test_bad_design_names(bad, match):
    with pytest.raises(ValueError, match=match):
        designs.design(bad)


def test_design_needs_a_continuous_group():
    with pytest.raises(ValueError, match="group must be 'SO3' or 'O3'"):
        designs.design("design:2", "octahedral")
    with pytest.raises(ValueError, match="design on SO3, but the group is O3"):
        designs.design(designs.design("design:2"), "O3")


# --- weighted sums against an independent loop --------------------------------------------------

def _loop_estimates(a, w, y, valid, R):
    """Per sample, by the definitions: T_r, W_r, and the U-statistic form of L_mean."""
    RK, B = a.shape[:2]
    K = RK // R
    out = []
    for b in range(B):
        n = float(valid[b].sum()) * a.shape[-1]
        sel = valid[b]
        T, W, u = [], [], []
        for r in range(R):
            copies = [a[r * K + i, b][sel] for i in range(K)]
            abar = sum(w[i] * copies[i] for i in range(K))
            T.append(sum(float(w[i]) * float(((copies[i] - y[b][sel]) ** 2).sum()) for i in range(K)) / n)
            W.append(sum(float(w[i]) * float(((copies[i] - abar) ** 2).sum()) for i in range(K)) / n)
            u.append(abar - y[b][sel])
        total = sum(T) / R
        if R == 1:
            mean, equiv = float((u[0] ** 2).sum()) / n, W[0]
        else:
            mean = sum(float((u[r] * u[s]).sum()) for r in range(R) for s in range(R) if r != s) / (R * (R - 1) * n)
            equiv = total - mean
        out.append((total, mean, equiv, T, W))
    return out


@pytest.mark.parametrize("R", [1, 2, 4])
def test_weighted_sums_match_a_loop(R):
    g = torch.Generator().manual_seed(R)
    K, B, N = 5, 3, 4
    a = torch.randn(R * K, B, N, 3, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    w = w / w.sum()
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 2:] = False
    a[:, 1, 3] = float("inf")  # a masked-out element never reaches a sum
    rep = Replicates(a, w, y, valid[..., None], None, B, R)
    t = rep.terms()
    for b, (total, mean, equiv, T, W) in enumerate(_loop_estimates(a, w, y, valid, R)):
        assert abs(float(t.total[b]) - total) < 1e-12
        assert abs(float(t.mean[b]) - mean) < 1e-12
        assert abs(float(t.equiv[b]) - equiv) < 1e-12
        assert np.allclose(rep.total[:, b].numpy(), T, atol=1e-12) and np.allclose(rep.within[:, b].numpy(), W,
                                                                                     atol=1e-12)
    if R >= 3:  # leave-one-out values: the same estimator on the other replicates
        jack = rep.jackknife()
        keep = [r for r in range(R) if r != 1]
        idx = torch.tensor([r * K + i for r in keep for i in range(K)])
        loo = _loop_estimates(a[idx], w, y, valid, R - 1)
        for b in range(B):
            assert abs(float(jack.mean[1, b]) - loo[b][1]) < 1e-12
            assert abs(float(jack.equiv[1, b]) - loo[b][2]) < 1e-12


def test_graph_rows_reduce_like_dense_ones():
    """The same sums with the rows of a graph batch (nodes of each sample listed with an
    index, in a shuffled order)."""
    g = torch.Generator().manual_seed(5)
    R, K, B, N = 3, 4, 3, 5
    a = torch.randn(R * K, B, N, 3, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    w = torch.full((K,), 1 / K, dtype=torch.float64)
    dense = Replicates(a, w, y, None, None, B, R).terms()
    perm = torch.randperm(B * N, generator=g)
    index = torch.arange(B).repeat_interleave(N)[perm]
    flat = Replicates(a.reshape(R * K, B * N, 3)[:, perm], w, y.reshape(B * N, 3)[perm], None, index, B, R).terms()
    for x, z in zip(dense, flat):
        assert torch.allclose(x, z, atol=1e-12)


# --- estimators against closed forms -------------------------------------------------------------

def _linear_case(B=6, n=4):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, 3, generator=g, dtype=torch.float64)
    Ap = A - torch.trace(A) / 3 * torch.eye(3, dtype=torch.float64)
    equiv = Ap.norm() ** 2 * (x ** 2).sum((1, 2)) / (9 * n)
    fbar = torch.trace(A) / 3 * x
    mean = ((fbar - y) ** 2).mean((1, 2))
    return (lambda v: v @ A.T), x, y, fbar, mean, equiv


def test_one_replicate_of_a_design_of_the_models_degree_is_exact_per_sample():
    model, x, y, fbar, mean, equiv = _linear_case()
    spec = fe.Spec(inputs="vector", output="vector")
    for name in ("design:2", "design:3", "icosahedral", "design:6"):
        d = design_error(model, x, y, spec=spec, rotations=name, replicates=1, seed=3)
        assert torch.allclose(d.per_sample.equiv, equiv, rtol=1e-12)
        assert torch.allclose(d.per_sample.mean, mean, rtol=1e-12, atol=1e-14)
        assert not d.exact and d.replicates == 1 and d.design.degree >= 2
        assert torch.isnan(d.rotation_stderr.equiv)
    # degree 1 is one short of the model's: the plug-in value is off
    d = design_error(model, x, y, spec=spec, rotations="design:1", replicates=1, seed=3)
    assert not torch.allclose(d.per_sample.equiv, equiv, rtol=1e-3)


def _abs_case(B=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    y = torch.randn(B, generator=g, dtype=torch.float64)
    e = torch.tensor([0.36, 0.48, 0.8], dtype=torch.float64)
    r = x.norm(dim=-1)
    exact = {"total": (r ** 2 / 3 - y * r + y ** 2).mean(), "mean": ((r / 2 - y) ** 2).mean(),
             "equiv": (r ** 2 / 12).mean()}
    return (lambda v: (v @ e).abs()), x, y, exact


@pytest.mark.parametrize("rotations, replicates", [("design:1", 2), ("octahedral", 2), ("design:2", 4)])
def test_randomised_designs_are_unbiased_on_a_model_broken_at_every_degree(rotations, replicates):
    """Means over 300 seeds within 4 standard errors of the closed forms, for a model that
    is not band-limited; and the reported rotation standard error matches the spread over
    seeds (the jackknife may err high, never much low)."""
    model, x, y, exact = _abs_case()
    spec = fe.Spec(inputs="vector", output="scalar")
    runs = [design_error(model, x, y, spec=spec, rotations=rotations, replicates=replicates, seed=s)
            for s in range(300)]
    for name in ("total", "mean", "equiv"):
        vals = torch.stack([getattr(d, name) for d in runs])
        se = float(vals.std()) / math.sqrt(len(vals))
        assert abs(float(vals.mean()) - float(exact[name])) < 4 * se, (name, float(vals.mean()), float(exact[name]))
        if replicates >= 3:
            reported = torch.stack([getattr(d.rotation_stderr, name) for d in runs])
            ratio = float(reported.pow(2).mean().sqrt()) / float(vals.std())
            assert 0.85 < ratio < 1.35, (name, ratio)
    assert all(d.exact and d.samples == replicates * d.design.size for d in runs)


def test_one_replicate_is_biased_where_the_design_is_short_of_the_model():
    """With R = 1 and a design of degree 1 (the half turns about the axes), |x . e| has
    content at degree 2 and up, part of which the design aliases: the within-design spread
    is low on average (the cube's group, degree 3, aliases only part of the degree-4 power,
    under 5% of L_equiv here: too small a bias to see with these seeds)."""
    model, x, y, exact = _abs_case()
    spec = fe.Spec(inputs="vector", output="scalar")
    vals = torch.stack([design_error(model, x, y, spec=spec, rotations="design:1", replicates=1, seed=s).equiv
                        for s in range(200)])
    se = float(vals.std()) / math.sqrt(len(vals))
    assert float(vals.mean()) < float(exact["equiv"]) - 4 * se


def test_label_free_and_heads():
    model, x, y, fbar, mean, equiv = _linear_case()
    spec = fe.Spec(inputs="vector", output="vector")
    lf = design_error(model, x, None, spec=spec, rotations="design:2", replicates=3, seed=1)
    assert isinstance(lf, fe.LabelFree)
    assert torch.allclose(lf.equiv, equiv.mean(), rtol=1e-12)
    assert torch.allclose(lf.norm, (fbar ** 2).mean(), rtol=1e-12)
    assert float(lf.rotation_stderr.equiv) < 1e-12  # the design cancels every degree of A x
    two = fe.Spec(inputs="vector", output={"f": "vector", "s": "scalar"})
    both = lambda v: {"f": v @ torch.eye(3, dtype=v.dtype) * 2, "s": (v[..., 0] ** 2).sum(-1)}  # noqa: E731
    d = design_error(both, x, {"f": y, "s": y[:, 0, 0]}, spec=two, rotations="design:1", replicates=3, seed=2,
                     loss_weights={"f": 1.0, "s": 0.5})
    assert torch.allclose(d.equiv, d.heads["f"].equiv + 0.5 * d.heads["s"].equiv)
    assert float(d.heads["f"].equiv) < 1e-25  # 2 x is equivariant
    assert torch.isfinite(d.rotation_stderr.equiv) and float(d.rotation_stderr.equiv) > 0


def test_a_graph_batch_measures_like_the_dense_one():
    """The same clusters as a graph batch (flat nodes and a batch index: per-node forces,
    per-graph energies) and as a dense batch give the same per-sample values."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    pos = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    y = {"forces": torch.randn(3, 4, 3, generator=g, dtype=torch.float64),
         "energy": torch.randn(3, generator=g, dtype=torch.float64)}

    def dense(pos):
        return {"forces": torch.tanh(pos @ W), "energy": (pos @ W).pow(2).sum((1, 2))}

    def flat(pos, batch):
        e = torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, (pos @ W).pow(2).sum(-1))
        return {"forces": torch.tanh(pos @ W), "energy": e}

    out = {"forces": "vector", "energy": "scalar"}
    a = design_error(dense, {"pos": pos}, y, spec=fe.Spec(inputs={"pos": "position"}, output=out),
                     rotations="design:2", replicates=3, seed=8)
    batch = torch.arange(3).repeat_interleave(4)
    b = design_error(flat, {"pos": pos.reshape(12, 3), "batch": batch},
                     {"forces": y["forces"].reshape(12, 3), "energy": y["energy"]},
                     spec=fe.Spec(inputs={"pos": "position", "batch": "batch"}, output=out),
                     rotations="design:2", replicates=3, seed=8)
    for head in out:
        for x, z in zip(a.heads[head].per_sample, b.heads[head].per_sample):
            assert torch.allclose(x, z, rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.rotation_stderr.equiv, b.rotation_stderr.equiv, rtol=1e-10)


def test_design_rotations_layout():
    d = designs.design("design:2")
    R = design_rotations(d, 3, replicates=2, seed=5, dtype=torch.float64)
    G = fe.random_rotations(6, seed=5, dtype=torch.float64).reshape(2, 3, 3, 3)
    for r in range(2):
        for i in range(d.size):
            for b in range(3):
                assert torch.allclose(R[r * d.size + i, b], G[r, b] @ d.rotations[i], atol=1e-15)


# --- Twirled and TwirledCalculator ---------------------------------------------------------------

def test_twirled_over_a_design_is_exact_for_a_band_limited_model():
    model, x, _, fbar, _, _ = _linear_case()
    spec = fe.Spec(inputs="vector", output="vector")
    tw = fe.Twirled(model, spec=spec, rotations="design:2")
    assert tw.K == 12 and tw.design.degree == 2 and "degree=2" in repr(tw)
    assert torch.allclose(tw(x), fbar, atol=1e-14)
    assert torch.allclose(design_average(model, x, spec, tw.design, turn=True, seed=3), fbar, atol=1e-14)
    # one degree short: not the twirl
    assert not torch.allclose(fe.Twirled(model, spec=spec, rotations="design:1")(x), fbar, atol=1e-3)
    o3 = fe.Twirled(model, spec=fe.Spec(inputs="vector", output="vector", group="O3"), rotations="design:2")
    assert o3.K == 24 and torch.allclose(o3(x), fbar, atol=1e-14)


def test_twirled_design_arguments():
    spec = fe.Spec(inputs="vector", output="vector")
    with pytest.raises(ValueError, match="a design fixes the number of rotations"):
        fe.Twirled(lambda v: v, spec=spec, rotations="design:2", samples=8)
    with pytest.raises(ValueError, match="nothing to draw"):
        fe.Twirled(lambda v: v, spec=spec, rotations="design:2", seed=1)
    with pytest.raises(ValueError, match="finite group"):
        fe.Twirled(lambda v: v, spec=fe.Spec(inputs="vector", output="vector", group="octahedral"),
                   rotations="design:2")


def test_twirled_calculator_over_a_design():
    """Broken's harmonic well ``u^T A u / 2`` has degree 2 in the rotation: a design of degree
    2 twirls it to ``tr(A) / 6 |u|^2`` exactly, one of degree 1 does not; a constant force
    field (degree 1) is cancelled by any design of degree >= 1, and not by Haar draws."""
    pytest.importorskip("ase")
    from ase.calculators.calculator import Calculator, all_changes
    from ase.calculators.emt import EMT
    from ase.cluster import Icosahedron

    import fastequiv.ase as fa

    A = np.diag([0.08, 0.02, -0.03]) + 0.01

    class Broken(Calculator):
        implemented_properties = ["energy", "forces"]

        def __init__(self, well: bool, field: bool):
            super().__init__()
            self.well, self.field = well, field

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            u = self.atoms.positions - self.atoms.positions.mean(0)
            emt = EMT()
            e, f = emt.get_property("energy", self.atoms), emt.get_property("forces", self.atoms)
            if self.well:
                e, f = e + 0.5 * np.einsum("ni,ij,nj->", u, A, u), f - u @ A
            self.results["energy"] = e
            self.results["forces"] = f + (np.array([0.3, -0.1, 0.2]) if self.field else 0.0)

    atoms = Icosahedron("Cu", 2)
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    u = atoms.positions - atoms.positions.mean(0)
    atoms.calc = EMT()
    e0, f0 = atoms.get_potential_energy(), atoms.get_forces()
    c = np.trace(A) / 3
    atoms.calc = fa.TwirledCalculator(Broken(well=True, field=False), rotations="design:2", batched=False)
    assert atoms.calc.samples == 12 and atoms.calc.design.degree == 2
    np.testing.assert_allclose(atoms.get_potential_energy(), e0 + c / 2 * (u ** 2).sum(), rtol=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), f0 - c * u, atol=1e-12)
    atoms.calc = fa.TwirledCalculator(Broken(well=True, field=False), rotations="design:1", batched=False)
    assert np.abs(atoms.get_forces() - (f0 - c * u)).max() > 1e-3  # degree 1 leaves the well's l = 2 part
    atoms.calc = fa.TwirledCalculator(Broken(well=False, field=True), rotations="design:1", group="O3",
                                      batched=False)
    assert atoms.calc.samples == 8
    np.testing.assert_allclose(atoms.get_forces(), f0, atol=1e-12)
    atoms.calc = fa.TwirledCalculator(Broken(well=False, field=True), samples=8, batched=False)
    assert np.abs(atoms.get_forces() - f0).max() > 1e-2
    with pytest.raises(ValueError, match="a design fixes"):
        fa.TwirledCalculator(EMT(), rotations="design:2", samples=4)
