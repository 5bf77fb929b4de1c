"""fastequiv.lightning.EquivarianceCallback in real Lightning runs, read back from the loggers' files.

Every logged value is checked against an independent computation: ``fe.equivariance_error``
on the same slice of the same batch, with the same seed and the parameters the model had at
that step (recorded by a callback that runs first), and for validation the per-sample
values of each validation batch pooled by hand. Values are read from CSVLogger's
``metrics.csv`` and from TensorBoard's event files through tensorboard's own reader.
"""

from __future__ import annotations

import copy
import csv
import math
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

import fastequiv as fe
from fastequiv.estimators import pool
from fastequiv.lightning import EquivarianceCallback, find_model
from fastequiv.monitor import first_samples

SPEC = fe.Spec(inputs={"pos": "position"}, output="vector")
SEED, K, CUT = 5, 4, 3


class Net(nn.Module):
    """Not equivariant (a linear map of centred positions), with BatchNorm and dropout:
    their statistics and random draws are what the callback must not touch."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop, self.b = nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, pos):
        B, N, _ = pos.shape
        h = self.a(pos - pos.mean(1, keepdim=True)).reshape(B * N, 16)
        return self.b(self.drop(torch.tanh(self.bn(h)))).reshape(B, N, 3)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net().double()
        self.modes = []  # (net, bn) training flags seen by each training step

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        self.modes.append((self.net.training, self.net.bn.training))
        loss = ((self.net(inputs["pos"]) - y) ** 2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, y = batch
        self.log("val_loss", ((self.net(inputs["pos"]) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
    y = pos @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    return [({"pos": pos[i]}, y[i]) for i in range(n)]


def loaders():
    train = torch.utils.data.DataLoader(data(24, 0), batch_size=8, shuffle=True)  # 3 steps an epoch
    val = torch.utils.data.DataLoader(data(13, 1), batch_size=8)  # batches of 8 and 5: unequal on purpose
    return train, val


class Recorder(L.Callback):
    """The model's parameters and the batch at each training step's start, and at each
    validation's start (runs before the callback under test)."""

    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[trainer.global_step] = (copy.deepcopy(pl_module.net.state_dict()), batch)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, copy.deepcopy(pl_module.net.state_dict())))


def net_with(state) -> Net:
    net = Net().double()
    net.load_state_dict(state)
    return net


def trainer(tmp_path, callbacks, loggers=None, **kw) -> L.Trainer:
    kw = {"max_steps": 6, "val_check_interval": 3, "log_every_n_steps": 1, **kw}
    return L.Trainer(logger=loggers if loggers is not None else CSVLogger(tmp_path / "csv"), callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     accelerator="cpu", **kw)


def csv_rows(path: Path) -> list:
    (f,) = list(path.rglob("metrics.csv"))
    return list(csv.DictReader(f.open()))


def tensorboard_scalars(path: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(path.rglob("events.out.tfevents*")).parent))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def by_step(rows: list, prefix: str) -> dict:
    """``{step: {key: value}}`` of the rows holding keys that start with ``prefix``."""
    out = {}
    for r in rows:
        vals = {k: float(v) for k, v in r.items() if k.startswith(prefix) and v != ""}
        if vals:
            out[int(r["step"])] = vals
    return out


def pooled_by_hand(parts: list, prefix: str) -> dict:
    """The validation set's values from each batch's per-sample values, written out: means
    over all samples, pct the ratio of means, standard errors of the pooled means."""
    out = {}
    cat = {t: torch.cat([getattr(d.per_sample, t) for d in parts]) for t in ("total", "mean", "equiv")}
    for t, v in cat.items():
        out[f"{prefix}{t}"] = float(v.mean())
        out[f"{prefix}{t}_stderr"] = float(v.std() / math.sqrt(v.numel()))
    out[f"{prefix}pct"] = out[f"{prefix}equiv"] / out[f"{prefix}total"]
    return out


def test_logged_values_equal_equivariance_error_on_the_same_slice(tmp_path):
    recorder = Recorder()
    callback = EquivarianceCallback(model="net", spec=SPEC, every_n_steps=2, max_samples=CUT, samples=K, seed=SEED)
    L.seed_everything(0)
    train, val = loaders()
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer(tmp_path, [recorder, callback], loggers).fit(Module(), train, val)
    rows, board = csv_rows(tmp_path / "csv"), tensorboard_scalars(tmp_path / "tb")

    # training steps s with (s + 1) % 2 == 0, measured on the batch's first CUT samples
    logged = by_step(rows, "equiv_train/")
    assert sorted(logged) == [1, 3, 5]
    for step, values in logged.items():
        state, (inputs, y) = recorder.train[step]
        want = fe.equivariance_error(net_with(state), {"pos": inputs["pos"][:CUT]}, y[:CUT], spec=SPEC, samples=K,
                                     seed=SEED + step).to_dict("equiv_train/")
        assert set(values) == set(want)
        for key, v in want.items():
            assert values[key] == pytest.approx(v, rel=1e-12), key          # CSV: the floats as computed
            assert board[key][step] == pytest.approx(v, rel=2e-7), key      # TensorBoard keeps float32
        assert values["equiv_train/total"] == pytest.approx(values["equiv_train/mean"] + values["equiv_train/equiv"],
                                                            rel=1e-12)

    # validation after steps 3 and 6: every batch, batch i with stream SEED + i, pooled by sample
    logged = by_step(rows, "equiv/")
    assert len(logged) == len(recorder.val) == 2
    for (step, values), (_, state) in zip(sorted(logged.items()), recorder.val):
        net = net_with(state)
        parts = [fe.equivariance_error(net, inputs, y, spec=SPEC, samples=K, seed=SEED + i)
                 for i, (inputs, y) in enumerate(val)]
        want = pooled_by_hand(parts, "equiv/")
        assert set(values) == set(want)
        for key, v in want.items():
            assert values[key] == pytest.approx(v, rel=1e-12), key
            assert board[key][step] == pytest.approx(v, rel=1e-6), key
        assert 0 < values["equiv/pct"] < 1


def test_a_rotation_design_is_passed_on_and_its_rotation_stderr_logged(tmp_path):
    recorder = Recorder()
    callback = EquivarianceCallback(model="net", spec=SPEC, every_n_steps=2, max_samples=CUT, seed=SEED,
                                    rotations="design:1", replicates=3, validation=False)
    L.seed_everything(0)
    train, val = loaders()
    trainer(tmp_path, [recorder, callback], max_steps=2).fit(Module(), train, val)
    (step, values), = by_step(csv_rows(tmp_path / "csv"), "equiv_train/").items()
    state, (inputs, y) = recorder.train[step]
    want = fe.equivariance_error(net_with(state), {"pos": inputs["pos"][:CUT]}, y[:CUT], spec=SPEC,
                                 rotations="design:1", replicates=3, seed=SEED + step).to_dict("equiv_train/")
    assert set(values) == set(want) and "equiv_train/equiv_rotation_stderr" in values
    for key, v in want.items():
        assert values[key] == pytest.approx(v, rel=1e-12), key


def test_training_is_unchanged_by_the_callback(tmp_path):
    """Parameters, optimiser state, modes, BatchNorm statistics and every random state after
    the run are identical with and without the callback (measuring every step, validation too)."""

    def run(callbacks, where):
        L.seed_everything(0)
        train, val = loaders()
        module = Module()
        t = trainer(where, callbacks)
        t.fit(module, train, val)
        return module, t, (torch.get_rng_state(), random.getstate(), np.random.get_state())

    plain, t_plain, rng_plain = run([], tmp_path / "a")
    callback = EquivarianceCallback(model="net", spec=SPEC, every_n_steps=1, fraction=0.5, samples=K)
    measured, t_measured, rng_measured = run([callback], tmp_path / "b")
    assert len(by_step(csv_rows(tmp_path / "b"), "equiv_train/")) == 6  # it did measure every step

    for (name, a), b in zip(plain.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm's running statistics
    opt_a, opt_b = t_plain.optimizers[0].state_dict(), t_measured.optimizers[0].state_dict()
    for i, s in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in s.items())
    assert plain.modes == measured.modes and all(m == (True, True) for m in measured.modes)
    assert plain.net.training == measured.net.training
    assert torch.equal(rng_plain[0], rng_measured[0])
    assert rng_plain[1] == rng_measured[1]
    assert all(np.array_equal(a, b) for a, b in zip(rng_plain[2], rng_measured[2]) if isinstance(a, np.ndarray))


def test_keys_are_those_of_to_dict_and_of_the_monitor(tmp_path):
    two = fe.Spec(inputs={"pos": "position"}, output={"energy": "scalar", "forces": "vector"})

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net().double()

        def forward(self, pos):
            f = self.net(pos)
            return {"energy": f.sum((1, 2)), "forces": f}

    class Heads(Module):
        def __init__(self):
            super().__init__()
            self.model = TwoHeads()

    callback = EquivarianceCallback(model="model", spec=two, samples=K, every_n_steps=2,
                                    unpack_batch=lambda b: (b[0], {"energy": b[1].sum((1, 2)), "forces": b[1]}))
    L.seed_everything(0)
    train, val = loaders()
    trainer(tmp_path, [callback], max_steps=2, val_check_interval=2).fit(Heads(), train, val)
    rows = csv_rows(tmp_path / "csv")
    inputs, y = next(iter(val))
    target = {"energy": y.sum((1, 2)), "forces": y}
    d = fe.equivariance_error(TwoHeads().double(), inputs, target, spec=two, samples=K, seed=0)
    monitor = fe.EquivarianceMonitor(TwoHeads().double(), spec=two, every=1, prefix="equiv_train/")
    assert set(next(iter(by_step(rows, "equiv/").values()))) == set(d.to_dict("equiv/"))
    assert set(next(iter(by_step(rows, "equiv_train/").values()))) == set(monitor(0, inputs, target))
    assert "equiv/forces/pct" in d.to_dict("equiv/") and "equiv/energy/total_stderr" in d.to_dict("equiv/")


def test_the_plain_loop_recipe_writes_the_callbacks_keys_to_tensorboard(tmp_path):
    """README's recipe for loops without callbacks: the monitor on training batches and the
    pooled held-out decomposition, written with SummaryWriter, read back by tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    net, (train, val) = Net().double(), loaders()
    monitor = fe.EquivarianceMonitor(net, spec=SPEC, every=2, prefix="equiv_train/", materialize=True, samples=K)
    writer = SummaryWriter(tmp_path)
    for step, (inputs, target) in enumerate(train):
        if logs := monitor(step, inputs, target):
            for key, value in logs.items():
                writer.add_scalar(key, value, step)
    held_out = pool([fe.equivariance_error(net, x, y, spec=SPEC, samples=K, seed=i) for i, (x, y) in enumerate(val)])
    for key, value in held_out.to_dict("equiv/").items():
        writer.add_scalar(key, value, 3)
    writer.close()
    board = tensorboard_scalars(tmp_path)
    assert {k for k in board if k.startswith("equiv_train/")} == set(held_out.to_dict("equiv_train/"))
    assert board["equiv/total"][3] == pytest.approx(float(held_out.total), rel=2e-7)
    assert sorted(board["equiv_train/pct"]) == [0, 2]


class AdaptedNet(fe.Adapted):
    """A model adapted by hand: it reads its own batches, {"pos", "forces"} dicts."""

    def __init__(self):
        super().__init__(Net().double(), fe.Spec(inputs={"pos": "position"}, output={"forces": "vector"},
                                                  call="dict"))

    def prepare(self, batch):
        return {"pos": batch["pos"]}

    def forward(self, inputs):
        return {"forces": self.model(inputs["pos"])}

    def targets(self, batch):
        return {"forces": batch["forces"]}


def test_an_adapted_model_is_found_and_reads_its_own_batches(tmp_path):
    class Holder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.loss_fn = nn.MSELoss()
            self.model = AdaptedNet()

        def training_step(self, batch, batch_idx):
            loss, _ = fe.twirl_loss(self.model, batch, self.model.targets(batch), seed=batch_idx)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    batches = [{"pos": torch.randn(8, 5, 3, generator=g, dtype=torch.float64),
                "forces": torch.randn(8, 5, 3, generator=g, dtype=torch.float64)} for _ in range(2)]
    module = Holder()
    assert find_model(module)[0] is module.model
    callback = EquivarianceCallback(every_n_steps=1, max_samples=2, samples=K, validation=False)
    states = []

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states.append(copy.deepcopy(pl_module.model.model.state_dict()))

    trainer(tmp_path, [Snap(), callback], max_steps=2, limit_val_batches=0).fit(
        module, torch.utils.data.DataLoader(batches, batch_size=None))
    logged = by_step(csv_rows(tmp_path / "csv"), "equiv_train/")
    for step, batch in enumerate(batches):
        model = AdaptedNet()
        model.model.load_state_dict(states[step])
        cut = {k: v[:2] for k, v in batch.items()}
        want = fe.equivariance_error(model, cut, model.targets(cut), samples=K, seed=step)
        assert logged[step]["equiv_train/forces/equiv"] == pytest.approx(float(want.heads["forces"].equiv), rel=1e-12)


def test_find_model_says_what_to_pass():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

    with pytest.raises(ValueError, match="spec=fe.Spec"):
        find_model(Plain())
    assert find_model(Plain(), spec=SPEC)[0].__class__ is Plain
    with pytest.raises(ValueError, match="model='nope' names no attribute"):
        find_model(Plain(), "nope", SPEC)

    class Two(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = AdaptedNet(), nn.ModuleDict({"only": AdaptedNet()})

    with pytest.raises(ValueError, match=r"several models .*\['a', 'b.only'\].*model="):
        find_model(Two())
    two = Two()
    assert find_model(two, "b.only")[0] is two.b.only


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_steps=-1), "every_n_steps must be an int >= 0"),
    (dict(fraction=0.5, max_samples=2), "fraction or max_samples, not both"),
    (dict(fraction=0.0), r"fraction must be a number in \(0, 1\]"),
    (dict(max_samples=0), "max_samples must be an int >= 1"),
    (dict(val_max_batches=0), "val_max_batches must be an int >= 1"),
    (dict(seed=-1), "seed must be an int"),
    (dict(prefix="x/", train_prefix="x/"), "prefix and train_prefix must be two different"),
    (dict(spec="vector"), "spec must be a fastequiv.Spec"),
    (dict(mask=torch.ones(1)), "mask= is not a callback option"),
    (dict(unpack_batch=3), "unpack_batch must be a function"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EquivarianceCallback(**kwargs)


def test_a_batch_that_is_not_a_pair_names_unpack_batch(tmp_path):
    callback = EquivarianceCallback(model="net", spec=SPEC, every_n_steps=1, validation=False)

    class DictBatches(Module):
        def training_step(self, batch, batch_idx):
            return ((self.net(batch["pos"]) - batch["y"]) ** 2).mean()

    batches = [{"pos": torch.randn(4, 5, 3, dtype=torch.float64), "y": torch.randn(4, 5, 3, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="unpack_batch=lambda batch"):
        trainer(tmp_path, [callback], max_steps=1, limit_val_batches=0).fit(
            DictBatches(), torch.utils.data.DataLoader(batches, batch_size=None))


class SaveAtValidation(L.Callback):
    """Rank 0's parameters at each validation's start, saved to ``path`` (DDP runs in spawned processes)."""

    def __init__(self, path):
        self.path = str(path)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.global_rank == 0:
            torch.save(pl_module.net.state_dict(), self.path)


def test_two_ranks_log_the_decomposition_of_the_whole_validation_set(tmp_path):
    """DDP on 2 CPU processes (gloo): each rank decomposes its half of the validation set;
    the logged values are those of the whole set in one process. The 24 rotations of the
    cube twirl every sample alike wherever it sits, so the comparison is exact."""
    spec = fe.Spec(inputs={"pos": "position"}, output="vector", group="octahedral")
    callback = EquivarianceCallback(model="net", spec=spec, every_n_steps=1, max_samples=2)
    val_set = data(12, 1)  # 6 a rank in 2 batches of 3; no padding by the sampler
    t = trainer(tmp_path, [SaveAtValidation(tmp_path / "state.pt"), callback], max_steps=2, val_check_interval=2,
                strategy="ddp_spawn", devices=2, num_sanity_val_steps=0)
    L.seed_everything(0)
    t.fit(Module(), torch.utils.data.DataLoader(data(24, 0), batch_size=4),
          torch.utils.data.DataLoader(val_set, batch_size=3))
    rows = csv_rows(tmp_path / "csv")
    (values,) = by_step(rows, "equiv/").values()
    net = net_with(torch.load(tmp_path / "state.pt"))
    inputs = {"pos": torch.stack([x["pos"] for x, _ in val_set])}
    want = fe.equivariance_error(net, inputs, torch.stack([y for _, y in val_set]), spec=spec).to_dict("equiv/")
    for key, v in want.items():
        assert values[key] == pytest.approx(v, rel=1e-12), key
    assert len(by_step(rows, "equiv_train/")) == 2


# --- the pieces: pooling and graph slices -------------------------------------------------------

class PointMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    def forward(self, pos, z):
        h = self.net(torch.cat([pos - pos.mean(1, keepdim=True), z[..., None]], dim=-1))
        return {"energy": h[..., 3].sum(-1), "forces": h[..., :3]}


def test_pool_equals_one_decomposition_of_the_union():
    """With the 24 rotations of the cube every batch is twirled by the same elements, so
    pooling two batches' decompositions must give the union's, masks and heads included."""
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output={"energy": "scalar", "forces": "vector"},
                   group="octahedral")
    g = torch.Generator().manual_seed(3)
    B, N = 7, 5
    inputs = {"pos": torch.randn(B, N, 3, generator=g, dtype=torch.float64),
              "z": torch.randn(B, N, generator=g, dtype=torch.float64)}
    target = {"energy": torch.randn(B, generator=g, dtype=torch.float64),
              "forces": torch.randn(B, N, 3, generator=g, dtype=torch.float64)}
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3:] = False
    mask[5] = False  # no valid atom: counts in the energy head only
    model, weights = PointMLP(), {"energy": 0.5, "forces": 2.0}
    cut = lambda x, s: {k: v[s] for k, v in x.items()}  # noqa: E731
    run = lambda s: fe.equivariance_error(model, cut(inputs, s), cut(target, s), spec=spec, mask=mask[s],  # noqa: E731
                                          loss_weights=weights)
    union, pooled = run(slice(None)), pool([run(slice(0, 3)), run(slice(3, None))])
    for a, b in ((union, pooled), *((union.heads[h], pooled.heads[h]) for h in union.heads)):
        for name in ("total", "mean", "equiv", "pct"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.stack(b.stderr), torch.stack(a.stderr), rtol=1e-12, atol=0)
        assert torch.equal(a.valid, b.valid)
    assert pooled.heads["forces"].valid.tolist() == [True] * 5 + [False, True]
    with pytest.raises(ValueError, match="parts must share heads"):
        pool([union, union.heads["forces"]])


def graph(sizes, seed):
    """Graphs of ``sizes`` atoms, all pairs within a graph as edges, a per-graph charge
    and per-edge vectors, batched PyG style with labels."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64)
    batch = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    start = np.cumsum([0] + list(sizes))
    edges = [(start[b] + i, start[b] + j) for b, n in enumerate(sizes) for i in range(n) for j in range(n) if i != j]
    edge_index = torch.tensor(edges).T.contiguous()
    return ({"pos": pos, "batch": batch, "edge_index": edge_index,
             "charge": torch.randn(len(sizes), generator=g, dtype=torch.float64),
             "bond": torch.randn(edge_index.shape[1], 3, generator=g, dtype=torch.float64)},
            {"energy": torch.randn(len(sizes), generator=g, dtype=torch.float64),
             "forces": torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64)})


GRAPH_SPEC = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index", "charge": "scalar@graph",
                             "bond": "vector@edge"},
                     output={"energy": "scalar", "forces": "vector"}, group="octahedral")


def message_passing(pos, batch, edge_index, charge, bond):
    """A graph model that reads every input (not equivariant: a fixed direction enters)."""
    src, dst = edge_index
    msg = torch.tanh(pos[src] - pos[dst] + bond + torch.tensor([0.3, 0.0, 0.0], dtype=pos.dtype))
    forces = torch.zeros_like(pos).index_add(0, dst, msg) * charge[batch, None]
    energy = torch.zeros_like(charge).index_add(0, batch, (forces * pos).sum(-1))
    return {"energy": energy, "forces": forces}


def test_first_samples_of_a_graph_batch_are_that_batch_built_alone():
    sizes = [3, 4, 2, 5]
    inputs, target = graph(sizes, seed=0)
    head, head_target = first_samples(inputs, target, GRAPH_SPEC, 2)
    alone, alone_target = graph(sizes[:2], seed=0)
    # the same graphs built alone: positions and per-node labels are the first nodes; per-graph and
    # per-edge values are cut from the full batch (the generator drew them for all graphs)
    assert torch.equal(head["edge_index"], alone["edge_index"]) and torch.equal(head["batch"], alone["batch"])
    assert torch.equal(head["pos"], inputs["pos"][:7]) and torch.equal(head_target["forces"], target["forces"][:7])
    assert torch.equal(head["charge"], inputs["charge"][:2]) and torch.equal(head_target["energy"], target["energy"][:2])
    assert torch.equal(head["bond"], inputs["bond"][: 3 * 2 + 4 * 3])
    d = fe.equivariance_error(message_passing, head, head_target, spec=GRAPH_SPEC)
    alone = {**alone, "pos": head["pos"], "charge": head["charge"], "bond": head["bond"]}
    want = fe.equivariance_error(message_passing, alone, head_target, spec=GRAPH_SPEC)
    full = fe.equivariance_error(message_passing, inputs, target, spec=GRAPH_SPEC)
    torch.testing.assert_close(d.per_sample.total, full.per_sample.total[:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(d.equiv, want.equiv, rtol=1e-12, atol=0)
    assert float(d.equiv) > 0


def test_first_samples_renumbers_unsorted_graph_batches():
    inputs, target = graph([3, 2, 4], seed=1)
    order = torch.tensor([3, 0, 5, 1, 6, 2, 4, 7, 8])  # nodes of graphs 0 and 1 interleaved
    inv = torch.argsort(order)
    shuffled = {**inputs, "pos": inputs["pos"][order], "batch": inputs["batch"][order],
                "edge_index": inv[inputs["edge_index"]]}
    shuffled_target = {**target, "forces": target["forces"][order]}
    head, head_target = first_samples(shuffled, shuffled_target, GRAPH_SPEC, 2)
    want, _ = first_samples(inputs, target, GRAPH_SPEC, 2)
    a = fe.equivariance_error(message_passing, head, head_target, spec=GRAPH_SPEC)
    b = fe.equivariance_error(message_passing, want, first_samples(inputs, target, GRAPH_SPEC, 2)[1], spec=GRAPH_SPEC)
    torch.testing.assert_close(a.per_sample.total, b.per_sample.total, rtol=1e-12, atol=0)


# --- imports ----------------------------------------------------------------------------------

def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_fastequiv_does_not_import_lightning():
    out = run_python("import sys, fastequiv; print(sorted(m for m in sys.modules if 'lightning' in m))")
    assert out.strip() == "[]"


def test_pytorch_lightning_alone_is_enough():
    """Where only the older package name is installed (lightning hidden from the import system)."""
    out = run_python(
        "import sys; sys.modules['lightning'] = None\n"
        "import pytorch_lightning as pl, torch, fastequiv as fe\n"
        "from fastequiv.lightning import EquivarianceCallback\n"
        "assert issubclass(EquivarianceCallback, pl.Callback)\n"
        "print('ok')")
    assert out.strip() == "ok"
