"""Graph batches (PyG layout): flat nodes, a batch index and edge indices.

The decomposition of a graph batch must equal the one computed graph by graph with the
same rotations (rotation number k * B + b for copy k of graph b), and the one of the
same graphs padded into a dense batch with a mask.
"""

import pytest
import torch
from torch import nn

import fastequiv as fe

DT = torch.float64
SIZES = (4, 2, 5)
K = 3
SEED = 5


class EdgeNet(nn.Module):
    """Messages from raw relative vectors through a tanh MLP: translation invariant, not
    rotation equivariant. Per-node forces and a per-graph energy."""

    def __init__(self):
        super().__init__()
        self.msg = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16)).to(DT)
        self.out = nn.Linear(16, 4).to(DT)

    def forward(self, pos, z, batch, edge_index, num_graphs=None, edge_vec=None):
        src, dst = edge_index
        rel = pos[dst] - pos[src] if edge_vec is None else edge_vec
        m = self.msg(torch.cat([rel, z[src, None]], dim=-1))
        o = self.out(torch.zeros(pos.shape[0], 16, dtype=pos.dtype).index_add(0, dst, m))
        B = int(batch.max()) + 1 if num_graphs is None else int(num_graphs)
        energy = torch.zeros(B, 1, dtype=pos.dtype).index_add(0, batch, o[:, 3:])
        return {"forces": o[:, :3], "energy": energy}


def graphs(sizes=SIZES, seed=0):
    """Per-graph data: positions, species, fully connected edges, force and energy targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = ii != jj
        out.append({"pos": torch.randn(n, 3, generator=g, dtype=DT) + 3.0,
                    "z": torch.randn(n, generator=g, dtype=DT),
                    "edge_index": torch.stack([ii[keep], jj[keep]]),
                    "forces": torch.randn(n, 3, generator=g, dtype=DT),
                    "energy": torch.randn(1, 1, generator=g, dtype=DT)})
    return out


def collate(gs):
    offsets = torch.tensor([0] + [g["pos"].shape[0] for g in gs]).cumsum(0)
    inputs = {"pos": torch.cat([g["pos"] for g in gs]), "z": torch.cat([g["z"] for g in gs]),
              "batch": torch.cat([torch.full((g["pos"].shape[0],), b) for b, g in enumerate(gs)]),
              "edge_index": torch.cat([g["edge_index"] + offsets[b] for b, g in enumerate(gs)], dim=1)}
    target = {"forces": torch.cat([g["forces"] for g in gs]), "energy": torch.cat([g["energy"] for g in gs])}
    return inputs, target, offsets


SPEC = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "edge_index": "index"},
               output={"forces": "vector", "energy": "scalar"})


def per_graph_reference(model, gs, R):
    """Each graph alone, by hand: rotate about its centroid, run, back-rotate, form the sums."""
    rows = {"forces": [], "energy": []}
    for b, g in enumerate(gs):
        c = g["pos"].mean(0)
        a = {"forces": [], "energy": []}
        for k in range(K):
            Rk = R[k, b]
            out = model(pos=(g["pos"] - c) @ Rk.T + c, z=g["z"], batch=torch.zeros(len(g["z"]), dtype=torch.int64),
                        edge_index=g["edge_index"])
            a["forces"].append(out["forces"] @ Rk)  # R^T f, row-wise
            a["energy"].append(out["energy"])
        for head in rows:
            ak, y = torch.stack(a[head]), g[head]
            abar = ak.mean(0)
            total = ((ak - y) ** 2).mean(0).mean()
            bias = ((abar - y) ** 2).mean()
            spread = ((ak - abar) ** 2).mean(0).mean()
            rows[head].append(torch.stack([total, bias - spread / (K - 1), spread * K / (K - 1)]))
    return {h: torch.stack(v) for h, v in rows.items()}  # (B, 3): total, mean, equiv


def test_graph_batch_equals_each_graph_alone_with_the_same_rotations():
    torch.manual_seed(0)
    model = EdgeNet()
    gs = graphs()
    inputs, target, _ = collate(gs)
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=K, seed=SEED)
    R = fe.random_rotations(K * len(gs), seed=SEED, dtype=DT).reshape(K, len(gs), 3, 3)
    ref = per_graph_reference(model, gs, R)
    for head in ("forces", "energy"):
        got = torch.stack(list(d.heads[head].per_sample), dim=1)
        torch.testing.assert_close(got, ref[head])
    both = ref["forces"] + ref["energy"]
    torch.testing.assert_close(torch.stack([d.total, d.mean, d.equiv]), both.mean(0))
    assert d.per_sample.total.shape == (len(gs),)
    assert (d.heads["forces"].per_sample.equiv > 0).all()


def test_graph_batch_equals_the_padded_dense_batch():
    torch.manual_seed(0)
    model = EdgeNet()
    gs = graphs()
    inputs, target, offsets = collate(gs)
    n_max = max(SIZES)
    B = len(gs)
    mask = torch.arange(n_max)[None, :] < torch.tensor(SIZES)[:, None]

    def pad(x):
        out = torch.zeros((B, n_max) + tuple(x.shape[1:]), dtype=x.dtype)
        out[mask] = x
        return out

    def dense_model(pos, z, mask):  # the same network on the padded layout
        Bk = pos.shape[0]
        batch = torch.arange(Bk)[:, None].expand(Bk, n_max)[mask]
        flat = torch.nonzero(mask.reshape(-1)).reshape(-1)
        local = torch.full((Bk * n_max,), -1, dtype=torch.int64)
        local[flat] = torch.arange(flat.numel())
        ei = torch.cat([torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")).reshape(2, -1)
                        for n in [SIZES[b % B] for b in range(Bk)]], dim=1)
        starts = torch.repeat_interleave(torch.arange(Bk) * n_max, torch.tensor([SIZES[b % B] ** 2 for b in range(Bk)]))
        ei = ei + starts
        ei = ei[:, ei[0] != ei[1]]
        out = model(pos[mask], z[mask], batch, local[ei])
        return {"forces": pad_k(out["forces"], mask), "energy": out["energy"]}

    def pad_k(x, m):
        out = torch.zeros(m.shape + x.shape[1:], dtype=x.dtype)
        out[m] = x
        return out

    dense_spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "mask": "scalar"},
                         output={"forces": "vector", "energy": "scalar"}, mask="mask")
    dd = fe.equivariance_error(dense_model, {"pos": pad(inputs["pos"]), "z": pad(inputs["z"]), "mask": mask},
                               {"forces": pad(target["forces"]), "energy": target["energy"]}, spec=dense_spec,
                               samples=K, seed=SEED)
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=K, seed=SEED)
    for a, b in ((d, dd), (d.heads["forces"], dd.heads["forces"]), (d.heads["energy"], dd.heads["energy"])):
        for t in ("total", "mean", "equiv"):
            torch.testing.assert_close(getattr(a.per_sample, t), getattr(b.per_sample, t))
            torch.testing.assert_close(getattr(a.stderr, t), getattr(b.stderr, t))


class FakePygBatch:
    """The parts of torch_geometric.data.Batch the library relies on: attributes, a ptr,
    and num_graphs read from _num_graphs (PyG is not installed in CI)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    @property
    def num_graphs(self):
        return self._num_graphs


def test_object_inputs_like_a_pyg_batch_and_the_num_graphs_role():
    torch.manual_seed(0)
    model = EdgeNet()
    gs = graphs()
    inputs, target, offsets = collate(gs)
    seen = []

    def on_batch(data):
        seen.append((data.num_graphs, data.ptr.clone(), data.batch.shape[0]))
        return model(data.pos, data.z, data.batch, data.edge_index, num_graphs=data.num_graphs)

    obj = FakePygBatch(**inputs, ptr=offsets, _num_graphs=len(gs), y=torch.zeros(3))
    with pytest.raises(ValueError, match=r"attributes \['y'\].*unnamed"):  # as a dict key the spec does not name
        fe.equivariance_error(on_batch, obj, target, spec=SPEC, samples=K, seed=SEED)
    keep = fe.Spec(inputs=SPEC.inputs, output=SPEC.output, unnamed="keep")
    # kept, but with a row per graph: the model would get 3 rows next to K * 3 graphs
    with pytest.raises(ValueError, match=r"'y' has 3 rows, the number of graphs.*scalar@graph"):
        fe.equivariance_error(on_batch, obj, target, spec=keep, samples=K, seed=SEED)
    obj.y = torch.tensor(0.5)  # bookkeeping without a batch dim is handed over unchanged
    d_obj = fe.equivariance_error(on_batch, obj, target, spec=keep, samples=K, seed=SEED)
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=K, seed=SEED)
    torch.testing.assert_close(d_obj.per_sample.total, d.per_sample.total)
    N = inputs["pos"].shape[0]
    num_graphs, ptr, rows = seen[0]
    assert num_graphs == K * len(gs) and rows == K * N
    torch.testing.assert_close(ptr, torch.cat([offsets[:-1] + k * N for k in range(K)] + [offsets[-1:] + (K - 1) * N]))
    assert obj.num_graphs == len(gs) and obj.pos.shape[0] == N  # the caller's object is untouched

    spec = fe.Spec(inputs={**SPEC.inputs, "num_graphs": "num_graphs"}, output=SPEC.output)
    d_n = fe.equivariance_error(model, {**inputs, "num_graphs": len(gs)}, target, spec=spec, samples=K, seed=SEED)
    torch.testing.assert_close(d_n.per_sample.total, d.per_sample.total)


def test_edge_and_graph_level_inputs_are_rotated_with_their_graph():
    torch.manual_seed(0)
    model = EdgeNet()
    gs = graphs()
    inputs, target, _ = collate(gs)
    src, dst = inputs["edge_index"]
    vec = inputs["pos"][dst] - inputs["pos"][src]
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "edge_index": "index",
                           "edge_vec": "vector", "field": "vector"}, output=SPEC.output)
    field = torch.randn(len(gs), 3, dtype=DT)

    def with_edges(pos, z, batch, edge_index, edge_vec, field):
        assert field.shape == (K * len(gs), 3)
        return model(pos, z, batch, edge_index, edge_vec=edge_vec)

    d_edges = fe.equivariance_error(with_edges, {**inputs, "edge_vec": vec, "field": field}, target, spec=spec,
                                    samples=K, seed=SEED)
    d = fe.equivariance_error(model, inputs, target, spec=SPEC, samples=K, seed=SEED)
    torch.testing.assert_close(d_edges.per_sample.total, d.per_sample.total)
    torch.testing.assert_close(d_edges.per_sample.equiv, d.per_sample.equiv)


def test_twirl_loss_gradients_and_an_exactly_equivariant_twirled_graph_model():
    torch.manual_seed(0)
    model = EdgeNet()
    gs = graphs()
    inputs, target, _ = collate(gs)
    loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=2, seed=1, equiv_weight=1.0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.testing.assert_close(loss, d.total + d.equiv)

    spec = fe.Spec(inputs=SPEC.inputs, output=SPEC.output, group="octahedral")
    twirled = fe.Twirled(model, spec=spec)
    G = fe.group_elements("octahedral", dtype=DT)
    g = G[7]
    out = twirled(**inputs)
    c = torch.zeros(len(gs), 3, dtype=DT).index_add(0, inputs["batch"], inputs["pos"])
    c = (c / torch.tensor(SIZES, dtype=DT)[:, None])[inputs["batch"]]
    turned = twirled(**{**inputs, "pos": (inputs["pos"] - c) @ g.T + c})
    torch.testing.assert_close(turned["forces"], out["forces"] @ g.T)
    torch.testing.assert_close(turned["energy"], out["energy"])
    assert out["forces"].shape == inputs["pos"].shape and out["energy"].shape == (len(gs), 1)


def test_graph_errors():
    torch.manual_seed(0)
    model = EdgeNet()
    inputs, target, _ = collate(graphs())
    with pytest.raises(ValueError, match="batch"):
        fe.Spec(inputs={"pos": "position", "edge_index": "index"}, output="vector")
    with pytest.raises(ValueError, match="int64"):
        fe.equivariance_error(model, {**inputs, "batch": inputs["batch"].int()}, target, spec=SPEC, samples=2)
    with pytest.raises(ValueError, match="chunk"):
        fe.equivariance_error(model, inputs, target, spec=SPEC, samples=2, chunk_size=4)
    with pytest.raises(ValueError, match="rows"):
        fe.equivariance_error(lambda **kw: {"forces": model(**kw)["forces"][:-1], "energy": model(**kw)["energy"]},
                              inputs, target, spec=SPEC, samples=2)
    with pytest.raises(ValueError, match="rows in dim 0"):
        fe.equivariance_error(model, {**inputs, "z": inputs["z"][:-1]}, target, spec=SPEC, samples=2)
