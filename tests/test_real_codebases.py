"""fastequiv on real third-party models and batches: torch-geometric's Batch and SchNet,
mace-torch's MACE (molecules, and a triclinic cell with stress). No stand-ins: each test
uses the real package, and every non-zero value is checked against a hand loop over the
same rotations, one model call per rotated copy."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastequiv as fe

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.nn import global_add_pool  # noqa: E402
from torch_geometric.nn.models import SchNet  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DT = torch.float64
K, SEED = 4, 11


def _rotations(B):
    """Rotation ``k * B + b`` of the seed's stream turns copy ``k`` of graph ``b``, as in fastequiv."""
    return fe.random_rotations(K * B, seed=SEED, dtype=DT).reshape(K, B, 3, 3)


def _hand_decomposition(per_copy, targets, B):
    """L_total, L_mean, L_equiv by hand from back-rotated predictions ``per_copy[k][head]``
    (lists over graphs of tensors) with the unbiased estimators; heads weighted 1."""
    total = mean = equiv = 0.0
    for head, target in targets.items():
        t_h = m_h = e_h = 0.0
        for b in range(B):
            a = torch.stack([per_copy[k][head][b] for k in range(K)])  # (K, ...)
            y = target[b]
            abar = a.mean(0)
            n = y.numel()
            tot = ((a - y) ** 2).sum() / (K * n)
            spread = ((a - abar) ** 2).sum() / (K * n)
            t_h += tot
            e_h += spread * K / (K - 1)
            m_h += ((abar - y) ** 2).sum() / n - spread / (K - 1)
        total, mean, equiv = total + t_h / B, mean + m_h / B, equiv + e_h / B
    return total, mean, equiv


# --- torch-geometric -------------------------------------------------------------------------

class PoolNet(nn.Module):
    """A small message-passing GNN that is not equivariant (raw coordinates enter a linear
    map) and pools node energies with ``size=data.num_graphs``, as PyG models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 + 4, 16)
        self.msg = nn.Linear(16, 16)
        self.force = nn.Linear(16, 3)
        self.energy = nn.Linear(16, 1)

    def forward(self, data):
        centred = data.pos - global_add_pool(data.pos, data.batch, size=data.num_graphs)[data.batch] / \
            torch.bincount(data.batch, minlength=data.num_graphs)[data.batch, None]
        h = torch.tanh(self.embed(torch.cat([centred, data.x], -1)))
        src, dst = data.edge_index
        h = h + torch.zeros_like(h).index_add(0, dst, torch.tanh(self.msg(h))[src])
        return {"energy": global_add_pool(self.energy(h), data.batch, size=data.num_graphs)[:, 0],
                "forces": self.force(h)}


def _pyg_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n in (4, 6, 5):
        pos = torch.randn(n, 3, generator=g, dtype=DT)
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = src != dst
        graphs.append(Data(pos=pos, x=torch.randn(n, 4, generator=g, dtype=DT),
                           edge_index=torch.stack([src[keep], dst[keep]])))
    batch = Batch.from_data_list(graphs)
    target = {"energy": torch.randn(len(graphs), generator=g, dtype=DT),
              "forces": torch.randn(batch.num_nodes, 3, generator=g, dtype=DT)}
    return batch, target


PYG_SPEC = fe.Spec(inputs={"pos": "position", "x": "scalar", "batch": "batch", "edge_index": "index"},
                   output={"energy": "scalar", "forces": "vector"})


def test_pyg_batch_with_num_graphs_pooling_matches_a_hand_loop():
    torch.manual_seed(0)
    model = PoolNet().double()
    batch, target = _pyg_batch()
    B = batch.num_graphs
    start = time.perf_counter()
    d = fe.equivariance_error(model, batch, target, spec=PYG_SPEC, samples=K, seed=SEED)
    fast = time.perf_counter() - start
    assert batch.num_graphs == B and batch.pos.shape[0] == batch.num_nodes  # the caller's batch is untouched

    R = _rotations(B)
    start = time.perf_counter()
    per_copy = []
    with torch.no_grad():
        for k in range(K):
            copy = batch.clone()
            Rn = R[k][batch.batch]
            c = global_add_pool(batch.pos, batch.batch)[batch.batch] / torch.bincount(batch.batch)[batch.batch, None]
            copy.pos = torch.einsum("nij,nj->ni", Rn, batch.pos - c) + c
            out = model(copy)
            forces = torch.einsum("nji,nj->ni", Rn, out["forces"])  # R^T f
            per_copy.append({"energy": list(out["energy"]),
                             "forces": [forces[batch.batch == b] for b in range(B)]})
    hand = time.perf_counter() - start
    targets = {"energy": list(target["energy"]), "forces": [target["forces"][batch.batch == b] for b in range(B)]}
    total, mean, equiv = _hand_decomposition(per_copy, targets, B)
    assert float(d.equiv) > 1e-4  # the model is not equivariant
    torch.testing.assert_close(d.total, total, rtol=1e-10, atol=0)
    torch.testing.assert_close(d.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.equiv, equiv, rtol=1e-10, atol=0)
    print(f"PyG pooling GNN: pct {float(d.pct):.4f}; fastequiv {fast * 1e3:.1f} ms, hand loop {hand * 1e3:.1f} ms")


def test_pyg_batch_refuses_attributes_the_spec_does_not_name():
    batch, target = _pyg_batch()
    batch.y = torch.zeros(batch.num_graphs)
    with pytest.raises(ValueError, match=r"\['y'\].*unnamed"):
        fe.equivariance_error(PoolNet().double(), batch, target, spec=PYG_SPEC, samples=K)


def _radius_graph(cutoff):
    """All pairs of atoms of one graph within ``cutoff``: the interaction graph SchNet uses,
    in plain torch (PyG's own needs pyg-lib or torch-cluster)."""

    def graph(pos, batch):
        same = batch[:, None] == batch[None, :]
        dist = torch.cdist(pos, pos)
        src, dst = torch.nonzero(same & (dist < cutoff) & ~torch.eye(len(pos), dtype=torch.bool), as_tuple=True)
        return torch.stack([src, dst]), (pos[src] - pos[dst]).norm(dim=-1)

    return graph


class SchNetForces(nn.Module):
    """PyG's SchNet energy and its forces by autograd, as interatomic potentials do."""

    def __init__(self):
        super().__init__()
        self.schnet = SchNet(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=12, cutoff=4.0,
                             interaction_graph=_radius_graph(4.0))

    def forward(self, z, pos, batch):
        pos = pos.requires_grad_(True)
        energy = self.schnet(z, pos, batch)[:, 0]
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
        return {"energy": energy, "forces": -grad}


def test_pyg_schnet_with_autograd_forces_is_equivariant_to_float_noise():
    torch.manual_seed(0)
    model = SchNetForces().double()
    batch, target = _pyg_batch(seed=1)
    inputs = {"z": torch.randint(1, 9, (batch.num_nodes,)), "pos": batch.pos, "batch": batch.batch}
    spec = fe.Spec(inputs={"z": "scalar", "pos": "position", "batch": "batch"},
                   output={"energy": "scalar", "forces": "vector"}, model_grad=True)
    grads_before = [p.grad for p in model.parameters()]
    d = fe.equivariance_error(model, inputs, target, spec=spec, samples=K, seed=SEED)
    assert float(d.pct) < 1e-20, float(d.pct)
    assert float(d.total) > 0.1
    assert all(p.grad is None for p in model.parameters()) and grads_before == [None] * len(grads_before)
    # without the flag, a clear error that names it (not torch's "does not require grad")
    plain = fe.Spec(inputs=spec.inputs, output=spec.output)
    with pytest.raises(ValueError, match="model_grad=True"):
        fe.equivariance_error(model, inputs, target, spec=plain, samples=K, seed=SEED)
    # training: the same model in fe.twirl_loss gives parameter gradients
    model.train()
    loss, _ = fe.twirl_loss(model, inputs, target, spec=spec, samples=2, seed=SEED)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_per_edge_inputs_are_never_guessed_on_a_tie():
    """A periodic batch with as many edges as atoms: its shifts must be declared per edge."""
    pos = torch.randn(6, 3, dtype=DT)
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 0, 4, 5, 3]])
    shifts = torch.randn(6, 3, dtype=DT)

    def model(pos, batch, edge_index, shifts):
        vec = pos[edge_index[1]] - pos[edge_index[0]] + shifts
        return torch.zeros_like(pos).index_add(0, edge_index[0], vec * vec.norm(dim=-1, keepdim=True))

    inputs = {"pos": pos, "batch": batch, "edge_index": edge_index, "shifts": shifts}
    roles = {"pos": "position", "batch": "batch", "edge_index": "index"}
    guessed = fe.Spec(inputs={**roles, "shifts": "vector"}, output="vector")
    with pytest.raises(ValueError, match=r"'vector@node' or 'vector@edge'"):
        fe.equivariance_error(model, inputs, pos, spec=guessed, samples=K)
    declared = fe.Spec(inputs={**roles, "shifts": "vector@edge"}, output="vector")
    d = fe.equivariance_error(model, inputs, pos, spec=declared, samples=K, seed=SEED)
    assert float(d.equiv) < 1e-25  # the model is exactly equivariant once the shifts turn with their edges


# --- mace-torch -------------------------------------------------------------------------------

def _mace_example():
    if os.environ.get("FASTEQUIV_EXPECT_MACE") == "1":  # CI installs mace-torch: never skip there
        import mace  # noqa: F401
    pytest.importorskip("mace", reason="mace-torch is not installed (CI installs it, see .ci/run)")
    pytest.importorskip("ase")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import mace_equivariance as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    return ex


def test_mace_spec_route_and_none_heads():
    """The Spec route on MACE's batch (fe.adapt declares the same): the model's keys only;
    a head the model did not compute is named."""
    ex = _mace_example()
    model = ex.tiny_mace()
    batch = ex.mace_batch(ex.structures(False, 2))
    y = ex.targets(batch)
    d = fe.equivariance_error(model, ex.model_inputs(batch), {k: y[k] for k in ("energy", "forces")},
                              spec=ex.MACE_SPEC, samples=K, seed=SEED)
    d_adapted = fe.equivariance_error(fe.adapt(model), batch, {k: y[k] for k in ("energy", "forces")},
                                      samples=K, seed=SEED)
    assert float(d.pct) < 1e-20
    torch.testing.assert_close(d.per_sample.total, d_adapted.per_sample.total)
    # a head the model did not compute (MACE returns stress None unless asked)
    with pytest.raises(ValueError, match=r"'stress'.*None.*compute_stress"):
        fe.equivariance_error(model, ex.model_inputs(batch), y, spec=ex.MACE_STRESS_SPEC, samples=K)


def test_a_model_holding_torchscript_is_not_differentiated_forward():
    """Forward-mode AD through TorchScript graphs its profiling executor has optimized gave
    wrong tangents: a float64 MACE whose e3nn code is scripted, built a second time (the
    graphs already profiled by the first), had Lie derivatives of 2e-5 (energy) and 5e-2
    (forces) by forward mode, where it is equivariant to rounding. The default method takes
    the reverse-mode passes for a model with TorchScript modules: the exact values."""
    import e3nn

    from fastequiv.lie import holds_torchscript

    ex = _mace_example()
    before = e3nn.get_optimization_defaults()
    fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])
    torch.jit.set_fusion_strategy(fusion)
    try:
        e3nn.set_optimization_defaults(**{**before, "jit_mode": "script", "jit_script_fx": False})
        for _ in range(2):
            torch.manual_seed(0)
            mace = ex.tiny_mace()
            model = fe.adapt(mace)
            batch = ex.mace_batch(ex.structures(False, 3))
            assert holds_torchscript(model)
            lie = fe.lie_derivative(model, batch)
            for k in ("energy", "forces"):
                assert float(lie[k].abs().max()) < 1e-12, (k, float(lie[k].abs().max()))
    finally:
        e3nn.set_optimization_defaults(**before)
        torch.jit.set_fusion_strategy(fusion)
    assert not holds_torchscript(torch.nn.Linear(3, 3)) and not holds_torchscript(lambda x: x)


@pytest.mark.parametrize("periodic", [False, True])
def test_mace_lie_derivative_by_central_differences_matches_the_closed_form(periodic):
    """MACE's forces come from autograd through SiLU, whose backward torch cannot
    differentiate forward: the default method says so and names method='central', which
    gives 0 for MACE and the closed form of BrokenMACE's field (energy -a sum z, forces
    +a e_z): L_i forces = -a X_i e_z on every atom, L_i energy = -a sum_n (X_i (x_n - c))_z
    (zero: turning about the centroid leaves sum z in place)."""
    from fastequiv.lie import so3_generators

    ex = _mace_example()
    torch.manual_seed(0)
    mace = ex.tiny_mace()
    batch = ex.mace_batch(ex.structures(periodic, 3))
    model = fe.adapt(mace, stress=periodic)

    try:
        exact = fe.lie_derivative(model, batch)
    except NotImplementedError as err:  # until torch differentiates silu_backward forward
        assert "method='central'" in str(err)
        exact = None
    with torch.no_grad():
        lie = fe.lie_derivative(model, batch, method="central")
        broken = fe.lie_derivative(ex.BrokenMACE(mace, 0.3, stress=periodic), batch, method="central")
    heads = ("energy", "forces", "stress") if periodic else ("energy", "forces")
    assert set(lie) >= set(heads)
    for k in heads:
        assert lie[k].abs().max() < 1e-8, (k, float(lie[k].abs().max()))
        if exact is not None:
            torch.testing.assert_close(lie[k], exact[k].detach(), rtol=0, atol=1e-8)
    data = batch.to_dict()
    X = so3_generators(DT)
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=DT)
    torch.testing.assert_close(broken["forces"], (-0.3 * X @ ez)[:, None].expand_as(broken["forces"]),
                               rtol=0, atol=1e-8)
    pos, b = data["positions"], data["batch"]
    B = batch.num_graphs
    centre = torch.zeros(B, 3, dtype=DT).index_add(0, b, pos) / torch.bincount(b)[:, None]
    rel = pos - centre[b]
    energy = torch.stack([torch.zeros(B, dtype=DT).index_add(0, b, -0.3 * (rel @ X[i].T)[:, 2]) for i in range(3)])
    torch.testing.assert_close(broken["energy"].reshape(3, B), energy, rtol=0, atol=1e-8)  # 0: the centroid stays


def test_the_mace_example_runs():
    ex = _mace_example()
    assert ex.main(["--structures", "2", "--samples", "2"]) == 0
