"""The decomposition across ranks (gloo, 2 CPU processes) and under bf16 autocast.

The global values must equal those of one process on the union of the shards. An
exhaustive twirl (the 24 rotations of the cube) makes every rank's rotations the same as
the union's, so the comparison is exact, standard errors included.
"""

import faulthandler
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastequiv as fe

SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"},
               group="octahedral")
# a rotation design (on SO(3)) turns each rank's samples by that rank's own Haar rotations
DESIGN_SPEC = fe.Spec(inputs=SPEC.inputs, output=SPEC.output)
SHARDS = (3, 5)  # uneven on purpose: every sample weighs the same, not every rank


class PointMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    def forward(self, pos, z):
        h = self.net(torch.cat([pos - pos.mean(1, keepdim=True), z[..., None]], dim=-1))
        return {"energy": h[..., 3].sum(-1, keepdim=True), "forces": h[..., :3]}


def _data():
    g = torch.Generator().manual_seed(0)
    B, N = sum(SHARDS), 6
    inputs = {"pos": torch.randn(B, N, 3, generator=g, dtype=torch.float64),
              "z": torch.randn(B, N, generator=g, dtype=torch.float64)}
    target = {"energy": torch.randn(B, 1, generator=g, dtype=torch.float64),
              "forces": torch.randn(B, N, 3, generator=g, dtype=torch.float64)}
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    mask[4] = False  # a sample with no valid atom: it must not count on any rank
    return inputs, target, mask


def _model():
    torch.manual_seed(0)
    return PointMLP()


def _shard(x, rank):
    if isinstance(x, dict):
        return {k: _shard(v, rank) for k, v in x.items()}
    start = sum(SHARDS[:rank])
    return x[start:start + SHARDS[rank]]


def _values(d):
    out = {k: getattr(d, k) for k in ("total", "mean", "equiv", "pct")}
    out.update({f"{k}_stderr": getattr(d.stderr, k) for k in ("total", "mean", "equiv")})
    for name, h in d.heads.items():
        out.update({f"{name}/{k}": v for k, v in _values(h).items()})
    return {k: v.detach().clone() for k, v in out.items()}


# A hang must end as a report, never as a stalled test run: the rendezvous has a timeout, a
# rank that stops moving prints its stack and exits, and the parent gives up at DEADLINE.
CONNECT_TIMEOUT, RANK_TIMEOUT, DEADLINE = 60, 150, 180


def _worker(rank, world, path):
    faulthandler.dump_traceback_later(RANK_TIMEOUT, exit=True)
    stage = Path(path) / f"rank{rank}.stage"
    stage.write_text("connecting")
    # no TCP store (a file), and gloo's pairs on the loopback interface: by default gloo
    # connects through whatever address the hostname resolves to, which a sandbox may not route
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=CONNECT_TIMEOUT))
        dist.barrier()
    except Exception as e:  # torch's rendezvous, before any fastequiv code runs
        stage.write_text(f"not connected: {type(e).__name__}: {e}")
        return
    stage.write_text("connected")
    try:
        inputs, target, mask = _data()
        inputs, target, mask = _shard(inputs, rank), _shard(target, rank), _shard(mask, rank)
        model = _model()
        d = fe.equivariance_error(model, inputs, target, spec=SPEC, mask=mask, sync=True)
        local = fe.equivariance_error(model, inputs, target, spec=SPEC, mask=mask)
        ddp = nn.parallel.DistributedDataParallel(model)
        loss, dt = fe.twirl_loss(ddp, inputs, target, spec=SPEC, mask=mask, sync=True)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
        design = dict(rotations="design:1", replicates=3, seed=rank + 1, mask=mask, spec=DESIGN_SPEC)
        dd = fe.equivariance_error(model, inputs, target, sync=True, **design)
        dl = fe.equivariance_error(model, inputs, target, **design)
        torch.save({"eval": _values(d), "local": _values(local), "train": _values(dt), "loss": loss.detach(),
                    "grads": grads, "design": dd, "design_local": dl}, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _stages(path, world):
    files = [Path(path) / f"rank{r}.stage" for r in range(world)]
    return [f.read_text() if f.exists() else "not started" for f in files]


def _run_ranks(world, path):
    """Run `_worker` on `world` processes. Skip only where the machine could not start and
    connect them (the deadline passed before they connected, or torch's own rendezvous
    failed); fail where a rank died before its rendezvous or anything went wrong after it."""
    ctx = mp.start_processes(_worker, args=(world, str(path)), nprocs=world, join=False, start_method="spawn")
    deadline, error, timed_out = time.monotonic() + DEADLINE, None, False
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                error, timed_out = f"the ranks were still running after {DEADLINE} s", True
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        error = e.msg  # an exception, or an exit (a rank's watchdog exits a stuck rank)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    stages = _stages(path, world)
    if all(s == "connected" for s in stages):
        if error is not None:
            pytest.fail(f"a rank failed after the process group connected: {error}")
        return
    if "not started" in stages and not timed_out:
        pytest.fail(f"a rank died before it reached the rendezvous: {error}")
    refused = [s for s in stages if s.startswith("not connected")]
    why = refused[0] if refused else f"{error} (each rank: {', '.join(stages)})"
    pytest.skip(f"gloo could not start and connect {world} local processes here: {why}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_two_ranks_report_the_decomposition_of_the_union(tmp_path):
    _run_ranks(2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    inputs, target, mask = _data()
    model = _model()
    union = _values(fe.equivariance_error(model, inputs, target, spec=SPEC, mask=mask))
    for r in ranks:
        for key in ("eval", "train"):
            assert set(r[key]) == set(union)
            for name, v in union.items():
                torch.testing.assert_close(r[key][name], v, rtol=1e-12, atol=1e-14, msg=f"{key} {name}")
    # each rank's loss is its own shard's, and DDP averaged the gradients of those losses
    for rank, r in enumerate(ranks):
        shard = _values(fe.equivariance_error(model, _shard(inputs, rank), _shard(target, rank), spec=SPEC,
                                              mask=_shard(mask, rank)))
        torch.testing.assert_close(r["loss"], shard["total"])
        torch.testing.assert_close(r["local"]["total"], shard["total"])
    grads = []
    for rank in range(2):
        model.zero_grad()
        loss, _ = fe.twirl_loss(model, _shard(inputs, rank), _shard(target, rank), spec=SPEC, mask=_shard(mask, rank))
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(ranks[0]["grads"], (grads[0] + grads[1]) / 2)
    torch.testing.assert_close(ranks[1]["grads"], ranks[0]["grads"])

    # a design's values are those of the two ranks' samples pooled; the rotations' standard
    # errors add in quadrature, each weighted by its rank's number of valid samples
    locals_ = [r["design_local"] for r in ranks]
    pooled = _values(fe.estimators.pool(locals_))
    n = [float(d.valid.sum()) for d in locals_]
    for r in ranks:
        got = r["design"]
        assert got.replicates == 3 and got.design.size == 4
        for name, v in pooled.items():
            torch.testing.assert_close(_values(got)[name], v, rtol=1e-12, atol=1e-14, msg=f"design {name}")
        for name in ("total", "mean", "equiv"):
            se = [float(getattr(d.rotation_stderr, name)) for d in locals_]
            want = math.sqrt(sum((nk * s) ** 2 for nk, s in zip(n, se))) / sum(n)
            assert math.isclose(float(getattr(got.rotation_stderr, name)), want, rel_tol=1e-12), name


def test_sync_is_a_no_op_outside_torch_distributed():
    inputs, target, mask = _data()
    model = _model()
    a = fe.equivariance_error(model, inputs, target, spec=SPEC, mask=mask)
    b = fe.equivariance_error(model, inputs, target, spec=SPEC, mask=mask, sync=True)
    torch.testing.assert_close(_values(a), _values(b))
    with pytest.raises(ValueError, match="sync"):
        fe.equivariance_error(model, inputs, target, spec=SPEC, sync="yes")
    with pytest.raises(ValueError, match="Decomposition"):
        fe.distributed.all_reduce({"total": 1.0})


class Mixed(nn.Module):
    """Linear layers (bf16 under autocast) and a nonlinearity that breaks the symmetry."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 3))

    def forward(self, pos):
        return self.net(pos - pos.mean(1, keepdim=True))


def test_bf16_autocast_accumulates_in_float32():
    torch.manual_seed(0)
    model = Mixed()
    pos = torch.randn(6, 5, 3)
    target = torch.randn(6, 5, 3)
    spec = fe.Spec(inputs="position", output="vector")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(pos).dtype == torch.bfloat16
        loss, d = fe.twirl_loss(model, pos, target, spec=spec, samples=4, seed=3, equiv_weight=0.5)
        e = fe.equivariance_error(model, pos, target, spec=spec, samples=4, seed=3)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for dd in (d, e):
        for t in (dd.total, dd.mean, dd.equiv, dd.pct, *dd.per_sample, *dd.stderr):
            assert t.dtype == torch.float32
        torch.testing.assert_close(dd.total, dd.mean + dd.equiv)  # the identity, to fp32 rounding
    assert loss.dtype == torch.float32
    torch.testing.assert_close(e.total, d.total)

    # the sums are those of the bf16 outputs, accumulated in fp32: same as upcasting first
    def upcast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    ref = fe.equivariance_error(upcast, pos, target, spec=spec, samples=4, seed=3)
    torch.testing.assert_close(e.total, ref.total)
    torch.testing.assert_close(e.equiv, ref.equiv)
    # and close to the float32 model, to bf16 precision
    full = fe.equivariance_error(model, pos, target, spec=spec, samples=4, seed=3)
    torch.testing.assert_close(e.total, full.total, rtol=3e-2, atol=1e-2)
