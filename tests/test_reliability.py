"""Nothing silently wrong: masks and padding, rotation gradients, train mode, bad indices,
torch.compile on a first call. Each test here failed before the fix it names."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from torch import nn

import fastequiv as fe
from fastequiv.backends import registry
from fastequiv.reps import as_rep

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in registry.runnable("reduce_rows", "cpu")]


class PointNet(nn.Module):
    """Per-atom MLP of centred coordinates: not equivariant, maps rows independently."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        self.lin1 = nn.Linear(3, 16)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.lin2 = nn.Linear(16, 4)

    def forward(self, pos, mask):
        w = mask[..., None].to(pos.dtype)
        c = (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        rel = torch.where(mask[..., None], pos - c, torch.zeros_like(pos))
        h = self.lin1(rel)
        h = self.norm(h.reshape(-1, 16)).reshape(h.shape)
        h = self.lin2(self.drop(torch.tanh(h)))
        return {"energy": (h[..., 3] * mask).sum(-1, keepdim=True), "forces": h[..., :3]}


SPEC = fe.Spec(inputs={"pos": "position", "mask": "scalar"}, output={"energy": "scalar", "forces": "vector"},
               mask="mask")


def _data(B=5, N=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, N, 3, generator=g, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    target = {"energy": torch.randn(B, 1, generator=g, dtype=dtype), "forces": torch.randn(B, N, 3, generator=g, dtype=dtype)}
    return {"pos": pos, "mask": mask}, target


# 1 ------------------------------------------------------------------------------------------

def test_compile_fullgraph_works_on_the_first_call_in_a_fresh_process():
    """No eager call before: the backend availability checks (which import the extension)
    must not be reached inside the traced region."""
    code = textwrap.dedent("""
        import torch, fastequiv as fe
        spec = fe.Spec(inputs={"pos": "position"}, output="vector")
        linear = torch.nn.Linear(3, 3).double()
        model = lambda pos: linear(pos)
        pos = torch.randn(4, 5, 3, dtype=torch.float64)
        target = torch.randn(4, 5, 3, dtype=torch.float64)

        @torch.compile(fullgraph=True)
        def step(pos, target):
            loss, d = fe.twirl_loss(model, {"pos": pos}, target, spec=spec, samples=2, seed=3, check_finite=False)
            return loss, d.equiv

        loss, equiv = step(pos, target)
        ref, d = fe.twirl_loss(model, {"pos": pos}, target, spec=spec, samples=2, seed=3)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(equiv, d.equiv)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tempfile.gettempdir())  # the installed package, not the checkout
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# 2 and 3 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_sample_masked_out_in_one_head_counts_in_the_others(backend):
    inputs, target = _data()
    inputs["mask"][2] = False  # no valid atom: the forces head has nothing of sample 2
    torch.manual_seed(0)
    model = PointNet().double()
    weights = {"energy": 0.3, "forces": 2.0}
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=1, loss_weights=weights, backend=backend)
    for term in ("total", "mean", "equiv"):
        want = sum(w * getattr(d.heads[h], term) for h, w in weights.items())
        torch.testing.assert_close(getattr(d, term), want, rtol=1e-12, atol=0)
    # each head is the mean over its own valid samples: forces over 4 samples, energy over 5
    assert float(d.heads["forces"].per_sample.total[2]) == 0
    torch.testing.assert_close(d.heads["forces"].total, d.heads["forces"].per_sample.total.sum() / 4)
    torch.testing.assert_close(d.heads["energy"].total, d.heads["energy"].per_sample.total.mean())
    # the training loss is the same weighted sum
    loss, dt = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=8, seed=1, loss_weights=weights,
                             backend=backend)
    torch.testing.assert_close(loss, dt.heads["energy"].total * 0.3 + dt.heads["forces"].total * 2.0)


def test_every_sample_masked_out_raises():
    inputs, target = _data()
    inputs["mask"][:] = False
    model = PointNet().double()
    spec = fe.Spec(inputs={"pos": "position", "mask": "scalar"}, output={"forces": "vector"}, mask="mask")
    call = lambda pos, mask: {"forces": model(pos, mask)["forces"]}  # noqa: E731
    with pytest.raises(ValueError, match="masked out"):
        fe.twirl_loss(call, inputs, {"forces": target["forces"]}, spec=spec, samples=2, check_finite=True)
    # twirl_loss checks nothing by default (no host sync on a training step): the loss is NaN, not a number
    loss, _ = fe.twirl_loss(call, inputs, {"forces": target["forces"]}, spec=spec, samples=2)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="masked out"):
        fe.equivariance_error(model, inputs, target, spec=SPEC)  # forces head empty, energy not: still refused


# 4 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_padding_coordinates_do_not_leak(backend):
    inputs, target = _data(dtype=torch.float32)
    inputs["pos"][1, 4:] = 1e20  # padded atoms, as some loaders fill them
    net = PointNet()

    def model(pos, mask):  # the padded rows' forces carry the padding: their squares overflow float32
        out = net(pos, mask)
        return {"energy": out["energy"], "forces": out["forces"] + pos}

    loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=2, seed=0, backend=backend)
    assert torch.isfinite(loss) and torch.isfinite(d.total)
    clean = dict(inputs, pos=torch.where(inputs["mask"][..., None], inputs["pos"], torch.zeros(())))
    want, _ = fe.twirl_loss(model, clean, target, spec=SPEC, samples=2, seed=0, backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inf_in_masked_out_outputs_does_not_leak(backend):
    inputs, target = _data()
    torch.manual_seed(0)
    model = PointNet().double()

    def poisoned(pos, mask):
        out = model(pos, mask)
        return {"energy": out["energy"], "forces": torch.where(mask[..., None], out["forces"], float("inf"))}

    clean = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=2, backend=backend)
    for check in (False, True):  # check_finite looks only at valid elements
        got = fe.equivariance_error(poisoned, inputs, target, spec=SPEC, seed=2, backend=backend, check_finite=check)
        torch.testing.assert_close(got.total, clean.total)
        torch.testing.assert_close(got.equiv, clean.equiv)
    loss, _ = fe.twirl_loss(poisoned, inputs, target, spec=SPEC, samples=2, seed=2, backend=backend)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # an inf at a valid element is still refused
    inputs["mask"][1, 4:] = True
    with pytest.raises(ValueError, match="non-finite"):
        fe.equivariance_error(lambda pos, mask: poisoned(pos, mask & (torch.arange(6) < 4)), inputs, target,
                              spec=SPEC, seed=2, backend=backend)


# 5 ------------------------------------------------------------------------------------------

REPS = ["vector", "position", "pseudovector", "1x0e + 1x1o + 1x2e"]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"] + ["auto"])
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("graph", [False, True])
def test_gradients_with_respect_to_the_rotations(backend, rep, graph):
    r = as_rep(rep)
    d = r.dim
    g = torch.Generator().manual_seed(0)
    B, P, K = 3, 4, 2
    x = torch.randn(B * P if graph else B, *(() if graph else (P,)), d, generator=g, dtype=torch.float64)
    batch = torch.arange(B).repeat_interleave(P) if graph else None
    out = torch.randn((K,) + tuple(x.shape), generator=g, dtype=torch.float64)
    y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    mask = torch.rand(x.shape[:-1], generator=g) > 0.25
    R0 = fe.random_rotations(K * B, seed=5, group="O3", dtype=torch.float64).reshape(K, B, 3, 3)

    def losses(R, be):
        c = fe.ops.rotate_copies(x, R, r, mask, batch=batch, backend=be)
        s = fe.ops.twirl_reduce(out, R, y, r, mask, batch=batch, backend=be)
        w = torch.linspace(0.5, 1.5, c.numel(), dtype=c.dtype).reshape(c.shape)
        return (c * w).sum() + s.total.sum() + 2 * s.spread.sum() + (s.twirled ** 2).sum()

    grads = {}
    for be in ("torch", backend):
        R = R0.clone().requires_grad_()
        losses(R, be).backward()
        assert R.grad is not None, f"backend {be} dropped the gradient of R"
        grads[be] = R.grad
    torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-10, atol=1e-10)
    if backend == "cpu" and rep == "vector":
        assert torch.autograd.gradcheck(lambda R: losses(R, "cpu"), (R0.clone().requires_grad_(),))


# 6 ------------------------------------------------------------------------------------------

def test_equivariance_error_measures_in_eval_mode_and_restores_each_mode():
    inputs, target = _data()
    torch.manual_seed(0)
    model = PointNet(dropout=0.5, batchnorm=True).double()
    model.train()
    model.lin2.eval()  # a mixed state must come back as it was
    stats = model.norm.running_mean.clone(), model.norm.running_var.clone(), int(model.norm.num_batches_tracked)
    modes = {n: m.training for n, m in model.named_modules()}

    d1 = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=4)
    d2 = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=4)
    torch.testing.assert_close(d1.equiv, d2.equiv, rtol=0, atol=0)  # no dropout noise
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.norm.running_mean, stats[0]) and torch.equal(model.norm.running_var, stats[1])
    assert int(model.norm.num_batches_tracked) == stats[2]
    model.eval()
    d3 = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=4)
    torch.testing.assert_close(d1.equiv, d3.equiv, rtol=0, atol=0)
    # eval_mode=False measures the model as it is (dropout on): a different, noisier value
    model.train()
    d4 = fe.equivariance_error(model, inputs, target, spec=SPEC, seed=4, eval_mode=False)
    assert not torch.equal(d4.equiv, d1.equiv)


# 7 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 2])
def test_batch_indices_outside_the_samples_raise_on_every_backend(backend, bad):
    x = torch.randn(4, 3)
    batch = torch.tensor([0, 0, 1, bad])
    R = fe.random_rotations(4, seed=0).reshape(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"batch.*\[0, 2\)"):
        fe.ops.rotate_copies(x, R, as_rep("vector"), batch=batch, backend=backend)
    with pytest.raises(ValueError, match=r"batch.*\[0, 2\)"):
        fe.ops.twirl_reduce(torch.randn(2, 4, 3), R, x, as_rep("vector"), batch=batch, backend=backend)
    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "num_graphs": "num_graphs"}, output="vector")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fe.equivariance_error(lambda pos, batch, num_graphs: pos, {"pos": x, "batch": batch, "num_graphs": 2}, x,
                              spec=spec, backend=backend)


# bad input the backends must refuse alike ------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_float64_rows_with_float32_matrices_are_refused(backend):
    from fastequiv.backends import registry as reg

    x = torch.randn(6, 3, dtype=torch.float64)
    M = torch.randn(2, 2, 3, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="float64"):
        reg.resolve("rotate_rows", backend, "cpu")[1](x, M, None, 3, None)


def test_a_seed_that_is_not_a_device_tensor_is_a_value_error():
    from fastequiv.ops.random_rotations import random_rotations_seeded

    for seed in (7, torch.tensor(7.0), torch.tensor([7])):
        with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
            random_rotations_seeded(4, seed, "SO3", torch.float32, backend="cpu")
