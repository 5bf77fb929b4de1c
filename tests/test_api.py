"""The public API: structures, multi-head outputs, chunking, errors, Twirled, twirl_loss."""

import pytest
import torch
from torch import nn

import fastequiv as fe


class PointMLP(nn.Module):
    """A deliberately non-equivariant per-point MLP on positions and a scalar feature."""

    def __init__(self, hidden=16, dtype=torch.float64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 4)).to(dtype)

    def forward(self, pos, z):
        c = pos - pos.mean(dim=1, keepdim=True)
        h = self.net(torch.cat([c, z[..., None]], dim=-1))
        return {"energy": h[..., 3].sum(-1, keepdim=True), "forces": h[..., :3]}


def batch(B=5, N=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, N, 3, generator=g, dtype=dtype)
    z = torch.randn(B, N, generator=g, dtype=dtype)
    target = {"energy": torch.randn(B, 1, generator=g, dtype=dtype), "forces": torch.randn(B, N, 3, generator=g, dtype=dtype)}
    return {"pos": pos, "z": z}, target


SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"})


def test_multi_head_is_the_weighted_sum_of_heads():
    torch.manual_seed(0)
    model = PointMLP()
    inputs, target = batch()
    w = {"energy": 0.1, "forces": 2.0}
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=4, seed=1, loss_weights=w)
    assert set(d.heads) == {"energy", "forces"}
    for t in ("total", "mean", "equiv"):
        torch.testing.assert_close(getattr(d, t), sum(w[h] * getattr(d.heads[h], t) for h in w))
    assert d.heads["forces"].equiv > 0 and d.heads["energy"].equiv > 0
    # each head equals the decomposition of a model with that head only
    for h, rep in (("energy", "scalar"), ("forces", "vector")):
        spec1 = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output=rep)
        d1 = fe.equivariance_error(lambda **kw: model(**kw)[h], inputs, target[h], spec=spec1, samples=4, seed=1)
        torch.testing.assert_close(d1.total, d.heads[h].total)
        torch.testing.assert_close(d1.equiv, d.heads[h].equiv)
    logged = d.to_dict()
    assert isinstance(logged["pct"], float) and "forces/equiv" in logged


def test_tuple_inputs_and_outputs():
    torch.manual_seed(0)
    model = PointMLP()
    inputs, target = batch()

    def tup(pos, z):
        out = model(pos, z)
        return out["energy"], out["forces"]

    spec = fe.Spec(inputs=("position", "scalar"), output=("scalar", "vector"))
    d = fe.equivariance_error(tup, (inputs["pos"], inputs["z"]), (target["energy"], target["forces"]), spec=spec, samples=3, seed=2)
    d_dict = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=3, seed=2)
    torch.testing.assert_close(d.total, d_dict.total)
    assert set(d.heads) == {"0", "1"}
    with pytest.raises(ValueError, match="loss_weights"):
        fe.equivariance_error(tup, (inputs["pos"], inputs["z"]), (target["energy"], target["forces"]), spec=spec, loss_weights={"a": 1})


def test_model_is_called_once_on_the_stacked_batch_and_chunking_changes_nothing():
    torch.manual_seed(0)
    model = PointMLP()
    calls = []
    model.register_forward_hook(lambda m, args, kwargs_or_out: calls.append(1))
    inputs, target = batch(B=5)
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=4, seed=3)
    assert len(calls) == 1
    dc = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=4, seed=3, chunk_size=6)
    assert len(calls) == 1 + 4  # ceil(20 / 6)
    torch.testing.assert_close(d.total, dc.total)
    torch.testing.assert_close(d.equiv, dc.equiv)


def test_rotated_copies_are_stacked_copy_major():
    seen = {}

    def model(pos, z):
        seen["pos"], seen["z"] = pos, z
        return {"energy": z.sum(-1, keepdim=True), "forces": pos}

    inputs, target = batch(B=3, N=4)
    fe.equivariance_error(model, inputs, target, spec=SPEC, samples=2, seed=9)
    R = fe.random_rotations(6, seed=9, dtype=torch.float64)
    pos = inputs["pos"]
    c = pos.mean(1, keepdim=True)
    for k in range(2):
        for b in range(3):
            expected = (pos[b] - c[b]) @ R[k * 3 + b].T + c[b]
            torch.testing.assert_close(seen["pos"][k * 3 + b], expected)
            torch.testing.assert_close(seen["z"][k * 3 + b], inputs["z"][b])


def test_position_rotates_about_the_centroid():
    inputs, target = batch()
    identity = lambda pos, z: {"energy": z.sum(-1, keepdim=True), "forces": pos}  # noqa: E731
    tgt = {"energy": target["energy"], "forces": inputs["pos"]}
    d = fe.equivariance_error(identity, inputs, tgt, spec=fe.Spec(inputs={"pos": "position", "z": "scalar"},
                                                                   output={"energy": "scalar", "forces": "position"}), samples=3)
    assert d.heads["forces"].total < 1e-24  # back-rotated about the same centroid: exact


@pytest.mark.parametrize("group", ["SO3", "octahedral"])
def test_twirled_model_is_equivariant(group):
    torch.manual_seed(0)
    model = PointMLP()
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"}, group=group)
    inputs, target = batch()
    tw = fe.Twirled(model, spec=spec, samples=None if group != "SO3" else 6, seed=0)
    out = tw(**inputs)
    assert out["forces"].shape == target["forces"].shape and out["energy"].shape == target["energy"].shape
    if group == "octahedral":
        # exhaustive: exactly invariant/equivariant under the cube group
        d = fe.equivariance_error(tw, inputs, target, spec=spec)
        assert d.equiv < 1e-20
        assert fe.equivariance_error(model, inputs, target, spec=spec).equiv > 1e-4
    else:
        # the K-sample twirl averages the error away: less equivariance error than the model
        d_tw = fe.equivariance_error(tw, inputs, target, spec=spec, samples=8, seed=1)
        d_m = fe.equivariance_error(model, inputs, target, spec=spec, samples=8, seed=1)
        assert d_tw.equiv < 0.5 * d_m.equiv
    assert any(p.requires_grad for p in tw.parameters())


def test_twirled_linear_map_is_trace_over_three():
    A = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    for group in ("octahedral", "icosahedral"):
        tw = fe.Twirled(lambda v: v @ A.T, spec=fe.Spec(inputs="vector", output="vector", group=group))
        torch.testing.assert_close(tw(x), torch.trace(A) / 3 * x)


def test_twirl_loss_matches_a_naive_loop_over_copies():
    torch.manual_seed(0)
    model = PointMLP()
    inputs, target = batch(B=4)
    K, lam, seed = 3, 0.7, 5
    loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=K, equiv_weight=lam, seed=seed)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.testing.assert_close(loss.detach(), d.total + lam * d.equiv)
    assert not d.total.requires_grad

    # naive: K separate forwards, back-rotate, unbiased estimators written out
    B = inputs["pos"].shape[0]
    R = fe.random_rotations(K * B, seed=seed, dtype=torch.float64).reshape(K, B, 3, 3)
    pos, z = inputs["pos"], inputs["z"]
    c = pos.mean(1, keepdim=True)
    a_f, a_e = [], []
    for k in range(K):
        out = model((pos - c) @ R[k].mT + c, z)
        a_f.append(out["forces"] @ R[k])  # row vectors: (R^T f)^T = f^T R
        a_e.append(out["energy"])
    total = 0
    for a, y in ((torch.stack(a_e), target["energy"]), (torch.stack(a_f), target["forces"])):
        abar = a.mean(0)
        n = y[0].numel()
        tot = ((a - y) ** 2).reshape(K, B, -1).sum(-1).mean(0) / n
        s = ((a - abar) ** 2).reshape(K, B, -1).sum(-1).mean(0) / n
        total = total + tot.mean() + lam * (K / (K - 1)) * s.mean()
    total.backward()
    torch.testing.assert_close(loss, total)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_twirl_loss_gradcheck_float64():
    W = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, 3, dtype=torch.float64)
    spec = fe.Spec(inputs="position", output="vector")

    def f(x):
        loss, _ = fe.twirl_loss(lambda p: torch.tanh(p @ W.T), x, y, spec=spec, samples=3, equiv_weight=0.5, seed=1)
        return loss

    assert torch.autograd.gradcheck(f, (x,))


def test_default_seed_follows_torch_manual_seed():
    inputs, target = batch()
    model = PointMLP()
    torch.manual_seed(4)
    a = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=2)
    torch.manual_seed(4)
    b = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=2)
    c = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=2)
    assert torch.equal(a.total, b.total) and not torch.equal(b.total, c.total)


def test_low_precision_outputs_accumulate_in_float32():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).to(torch.bfloat16)
    x = torch.randn(8, 3)
    y = torch.randn(8, 3)
    spec = fe.Spec(inputs="vector", output="vector")
    d = fe.equivariance_error(lambda v: lin(v.to(torch.bfloat16)), x, y, spec=spec, samples=4, seed=0)
    assert d.total.dtype == torch.float32 and torch.isfinite(d.total)
    torch.testing.assert_close(d.total, d.mean + d.equiv)


# -- errors ---------------------------------------------------------------------------------


def test_error_target_shape_mismatch_names_the_head():
    inputs, target = batch()
    target["forces"] = target["forces"][:, :3]
    with pytest.raises(ValueError, match=r"target\['forces'\].*shape"):
        fe.equivariance_error(PointMLP(), inputs, target, spec=SPEC, samples=2)


def test_error_vector_rep_needs_last_dim_3():
    inputs, target = batch()
    inputs["pos"] = inputs["pos"][..., :2]
    with pytest.raises(ValueError, match=r"inputs\['pos'\].*last dim 2.*3"):
        fe.equivariance_error(PointMLP(), inputs, target, spec=SPEC, samples=2)


def test_error_irreps_dim_mismatch():
    spec = fe.Spec(inputs="1x0e + 1x1o", output="1x1o")
    with pytest.raises(ValueError, match=r"irreps 1x0e\+1x1o \(dim 4\)"):
        fe.equivariance_error(lambda x: x[..., 1:], torch.randn(2, 5), torch.randn(2, 3), spec=spec, samples=2)
    with pytest.raises(ValueError, match="irreps"):
        fe.Spec(inputs="1x7q", output="vector")


def test_error_model_changes_the_batch_size():
    with pytest.raises(ValueError, match="keep the batch size"):
        fe.equivariance_error(lambda x: x[:1], torch.randn(4, 3), torch.randn(4, 3), spec=fe.Spec(inputs="vector", output="vector"), samples=2)


def test_error_non_finite_outputs():
    with pytest.raises(ValueError, match="non-finite"):
        fe.equivariance_error(lambda x: x / 0, torch.randn(4, 3), torch.randn(4, 3), spec=fe.Spec(inputs="vector", output="vector"), samples=2)


def test_error_inputs_and_spec_disagree():
    inputs, target = batch()
    spec = fe.Spec(inputs={"pos": "position"}, output={"energy": "scalar", "forces": "vector"})
    with pytest.raises(ValueError, match=r"inputs\['z'\].*no rep"):
        fe.equivariance_error(PointMLP(), inputs, target, spec=spec, samples=2)
    with pytest.raises(ValueError, match="dict with keys"):
        fe.equivariance_error(PointMLP(), inputs["pos"], target, spec=SPEC, samples=2)
    inputs["z"] = inputs["z"][:2]
    with pytest.raises(ValueError, match="same batch size"):
        fe.equivariance_error(PointMLP(), inputs, target, spec=SPEC, samples=2)


def test_error_loss_weights_on_a_single_output():
    with pytest.raises(ValueError, match="loss_weights"):
        fe.equivariance_error(lambda v: v, torch.randn(2, 3), torch.randn(2, 3), spec=fe.Spec(inputs="vector", output="vector"),
                              samples=2, loss_weights=2.0)


@pytest.mark.parametrize("kwargs,match", [(dict(samples=0), "samples"), (dict(chunk_size=0), "chunk_size"),
                                          (dict(samples=2, backend="cupy"), "cupy")])
def test_error_bad_arguments(kwargs, match):
    inputs, target = batch()
    with pytest.raises((ValueError, fe.BackendUnavailableError), match=match):
        fe.equivariance_error(PointMLP(), inputs, target, spec=SPEC, **kwargs)


def test_error_empty_batch_and_bad_mask():
    spec = fe.Spec(inputs="vector", output="vector")
    with pytest.raises(ValueError, match="batch size 0"):
        fe.equivariance_error(lambda v: v, torch.randn(0, 3), torch.randn(0, 3), spec=spec, samples=2)
    with pytest.raises(ValueError, match="mask"):
        fe.equivariance_error(lambda v: v, torch.randn(2, 4, 3), torch.randn(2, 4, 3), spec=spec, samples=2,
                              mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        fe.equivariance_error(lambda v: v, torch.randn(2, 4, 3), torch.randn(2, 4, 3), spec=spec, samples=2,
                              mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="equiv_weight"):
        fe.twirl_loss(lambda v: v, torch.randn(2, 3), torch.randn(2, 3), spec=spec, equiv_weight=-1.0)


def test_per_sample_scalar_outputs_of_shape_b():
    """Energies as a (B,) tensor, with an atom mask that does not apply to them."""
    pos = torch.randn(4, 6, 3, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 5] = False
    W = torch.randn(3, dtype=torch.float64)
    model = lambda p, m: ((p - p.mean(1, keepdim=True)) @ W * m).sum(-1)  # noqa: E731
    y = torch.randn(4, dtype=torch.float64)
    spec = fe.Spec(inputs=("position", "scalar"), output="scalar", mask=1)
    d = fe.equivariance_error(model, (pos, mask), y, spec=spec, samples=4, seed=0)
    assert d.per_sample.total.shape == (4,) and d.equiv > 0
    R = fe.random_rotations(16, seed=0, dtype=torch.float64).reshape(4, 4, 3, 3)
    c = (pos * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    preds = torch.stack([model((pos - c) @ R[k].mT + c, mask) for k in range(4)])
    torch.testing.assert_close(d.total, ((preds - y) ** 2).mean())
    tw = fe.Twirled(model, spec=spec, samples=4, seed=0)
    torch.testing.assert_close(tw(pos, mask), preds.mean(0))
