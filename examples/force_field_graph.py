"""A force field on graph batches: energy and forces heads, trained with fe.twirl_loss.

A plain message-passing network (messages from raw relative vectors, so nothing in it is
rotation equivariant) predicts a per-graph energy and per-atom forces of small clusters
under a smooth pair potential. Batches use the PyG layout: flat node tensors, a batch
index and a radius-graph edge index; the spec names them by role, and fastequiv stacks
the K rotated copies of every graph into one model call.

Every training step logs the decomposition L_total = L_mean + L_equiv per head (for
free, from the K=2 copies of the loss); an EquivarianceMonitor measures a held-out graph
batch with K=8 every --log-every steps.

    python examples/force_field_graph.py --steps 400
"""

import argparse

import torch
from torch import nn

import fastequiv as fe

SPEC = fe.Spec(
    inputs={"pos": "position", "species": "scalar", "batch": "batch", "edge_index": "index",
            "num_graphs": "num_graphs"},
    output={"energy": "scalar", "forces": "vector"},
)
CUTOFF = 2.5


def pair_energy(r, si, sj):
    """A smooth pair potential: a soft repulsive core and an attractive well, species-scaled."""
    depth = 1.0 + 0.5 * (si + sj).to(r.dtype)
    return depth * (torch.exp(-2.0 * r ** 2) - 0.6 * torch.exp(-0.5 * r ** 2))


def clusters(graphs, generator, atoms=(4, 9)):
    """A PyG-style batch of random clusters, its radius graph, and exact energies and forces."""
    sizes = torch.randint(atoms[0], atoms[1], (graphs,), generator=generator)
    batch = torch.repeat_interleave(torch.arange(graphs), sizes)
    N = int(sizes.sum())
    pos = torch.randn(N, 3, generator=generator, dtype=torch.float64) * 0.6 * sizes[batch, None].double() ** (1 / 3)
    species = torch.randint(0, 2, (N,), generator=generator)
    same = batch[:, None] == batch[None, :]
    dist = torch.cdist(pos, pos)
    src, dst = torch.nonzero(same & (dist < CUTOFF) & ~torch.eye(N, dtype=torch.bool), as_tuple=True)
    pos.requires_grad_(True)
    r = (pos[src] - pos[dst]).norm(dim=-1)
    e_pair = 0.5 * pair_energy(r, species[src], species[dst]) * 0.5 * (1 + torch.cos(torch.pi * r / CUTOFF))
    energy = torch.zeros(graphs, dtype=torch.float64).index_add(0, batch[src], e_pair)
    (grad,) = torch.autograd.grad(energy.sum(), pos)
    inputs = {"pos": pos.detach().float(), "species": species, "batch": batch, "edge_index": torch.stack([src, dst]),
              "num_graphs": graphs}
    target = {"energy": energy.detach().float()[:, None], "forces": (-grad).float()}
    return inputs, target


class GraphNet(nn.Module):
    """Message passing on raw relative vectors; a per-graph energy and per-atom force head."""

    def __init__(self, width=48, layers=3, species=2):
        super().__init__()
        self.embed = nn.Embedding(species, width)
        self.edges = nn.ModuleList(nn.Sequential(nn.Linear(3 + width, width), nn.SiLU(), nn.Linear(width, width))
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.energy = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.forces = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 3))

    def forward(self, pos, species, batch, edge_index, num_graphs):
        src, dst = edge_index
        rel = pos[src] - pos[dst]
        h = self.embed(species)
        for edge, norm in zip(self.edges, self.norms):
            m = edge(torch.cat([rel, h[src]], dim=-1))
            h = h + norm(torch.zeros_like(h).index_add(0, dst, m))
        energy = torch.zeros(num_graphs, 1, dtype=h.dtype, device=h.device).index_add(0, batch, self.energy(h))
        return {"energy": energy, "forces": self.forces(h)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--graphs", type=int, default=32, help="graphs per training batch")
    p.add_argument("--samples", type=int, default=2, help="K, rotated copies per graph in the loss")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = GraphNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    weights = {"energy": 0.1, "forces": 1.0}
    held_inputs, held_target = clusters(64, torch.Generator().manual_seed(1000 + args.seed))
    monitor = fe.EquivarianceMonitor(model, spec=SPEC, every=args.log_every, samples=8, loss_weights=weights,
                                     materialize=True, prefix="")
    first = None
    for step in range(args.steps + 1):
        logs = monitor(step, held_inputs, held_target)
        if logs:
            first = logs if first is None else first
            print(f"step {step:5d}  held-out L_total {logs['total']:.4f}  L_equiv {logs['equiv']:.5f}  "
                  f"pct {100 * logs['pct']:5.2f}%  (forces {100 * logs['forces/pct']:5.2f}%, "
                  f"energy {100 * logs['energy/pct']:5.2f}%)")
        if step == args.steps:
            break
        inputs, target = clusters(args.graphs, gen)
        loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=args.samples, loss_weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = monitor.values(fe.equivariance_error(model, held_inputs, held_target, spec=SPEC, samples=8, seed=0,
                                                loss_weights=weights))
    last = {k: float(v) for k, v in last.items()}
    print(f"RESULT first_total={first['total']:.6g} last_total={last['total']:.6g} last_mean={last['mean']:.6g} "
          f"last_equiv={last['equiv']:.6g} last_pct={last['pct']:.6g} forces_pct={last['forces/pct']:.6g} "
          f"energy_pct={last['energy/pct']:.6g}")


if __name__ == "__main__":
    main()
