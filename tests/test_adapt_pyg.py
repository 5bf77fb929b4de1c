"""fe.adapt on torch-geometric: PyG's SchNet (energy, forces by autograd) and a model of
one's own that takes a PyG Batch, on batches from PyG's DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastequiv as fe
from adapters import check_adapter, require

require("torch_geometric")
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402
from torch_geometric.nn import global_add_pool  # noqa: E402
from torch_geometric.nn.models import SchNet  # noqa: E402

DT = torch.float64


def _radius_graph(cutoff):
    """All pairs within ``cutoff`` in one graph (PyG's own needs torch-cluster)."""

    def graph(pos, batch):
        same = batch[:, None] == batch[None, :]
        dist = torch.cdist(pos, pos)
        src, dst = torch.nonzero(same & (dist < cutoff) & ~torch.eye(len(pos), dtype=torch.bool), as_tuple=True)
        return torch.stack([src, dst]), (pos[src] - pos[dst]).norm(dim=-1)

    return graph


def md17_like(count=3, seed=0):
    """Molecules as PyG's MD17 stores them: z, pos, energy, force."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for n in range(4, 4 + count):
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = src != dst
        data.append(Data(z=torch.randint(1, 9, (n,), generator=g), pos=torch.randn(n, 3, generator=g, dtype=DT) * 1.5,
                         energy=torch.randn(1, generator=g, dtype=DT), force=torch.randn(n, 3, generator=g, dtype=DT),
                         x=torch.randn(n, 4, generator=g, dtype=DT), edge_index=torch.stack([src[keep], dst[keep]])))
    return next(iter(DataLoader(data, batch_size=count)))


def test_schnet_in_two_lines():
    torch.manual_seed(0)
    schnet = SchNet(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=12, cutoff=4.0,
                    interaction_graph=_radius_graph(4.0)).double()
    batch = md17_like()
    model = fe.adapt(schnet)
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=1)
    assert float(d.pct) < 1e-20 and set(d.heads) == {"energy", "forces"}
    check_adapter(model, batch)
    schnet.train()
    loss, _ = fe.twirl_loss(model, batch, model.targets(batch), seed=0)
    loss.backward()
    assert all(p.grad is not None for p in schnet.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no periodic cell"):
        fe.adapt(schnet, stress=True)
    with pytest.raises(ValueError, match="no forces label"):
        fe.adapt(schnet, labels={"forces": "grad"}).targets(batch)


class PoolNet(nn.Module):
    """A GNN of one's own on a PyG Batch: raw coordinates enter a linear map (not
    equivariant), energies pooled with size=num_graphs, as PyG models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 + 4, 16)
        self.force = nn.Linear(16, 3)
        self.energy = nn.Linear(16, 1)

    def forward(self, data):
        counts = torch.bincount(data.batch, minlength=data.num_graphs)[data.batch, None]
        centred = data.pos - global_add_pool(data.pos, data.batch, size=data.num_graphs)[data.batch] / counts
        h = torch.tanh(self.embed(torch.cat([centred, data.x], -1)))
        src, dst = data.edge_index
        h = h + torch.zeros_like(h).index_add(0, dst, h[src])
        return {"energy": global_add_pool(self.energy(h), data.batch, size=data.num_graphs)[:, 0],
                "forces": self.force(h)}


def test_a_batch_model_of_ones_own():
    torch.manual_seed(0)
    net = PoolNet().double()
    batch = md17_like(seed=1)
    model = fe.adapt(net, family="pyg", inputs={"x": "scalar", "z": "scalar"},
                     output={"energy": "scalar", "forces": "vector"})
    target = {"energy": batch.energy, "forces": batch.force}
    batch_only = batch.clone()
    del batch_only.energy, batch_only.force  # the labels are no input of the model
    d = fe.equivariance_error(model, batch_only, target, samples=4, seed=2)
    assert float(d.equiv) > 1e-4  # raw coordinates: not equivariant
    # the same as the Spec route on the same Batch
    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index", "ptr": "ptr", "x": "scalar",
                           "z": "scalar"}, output={"energy": "scalar", "forces": "vector"})
    d_spec = fe.equivariance_error(net, batch_only, target, spec=spec, samples=4, seed=2)
    torch.testing.assert_close(d.per_sample.equiv, d_spec.per_sample.equiv)
    # an attribute with no rep is named (the labels, here)
    with pytest.raises(ValueError, match=r"\['energy', 'force'\]|\['force', 'energy'\]"):
        fe.equivariance_error(model, batch, target, samples=4)
    with pytest.raises(ValueError, match="needs output="):
        fe.adapt(net, family="pyg")
    with pytest.raises(ValueError, match="family must be one of"):
        fe.adapt(net, family="keras")
