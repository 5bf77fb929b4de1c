"""fe.adapt on torchmd-net: TensorNet and the equivariant transformer on batches from
TorchMD-Net's own pipeline (its ``Custom`` dataset, torch_geometric's DataLoader).

Both are equivariant by construction, so they pass ``check_adapter`` on molecules.
Periodic batches are refused, and these tests show why: the model reads only the lower
triangle of its box, so a rotated copy of a periodic structure is not the same structure
to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import check_adapter, require

require("torchmdnet")
ase = require("ase")

CUTOFF = 3.0
# TorchMD-Net's reduced form: a along x, b in the xy plane, every width >= 2 * CUTOFF
REDUCED_BOX = np.array([[7.0, 0.0, 0.0], [1.0, 7.2, 0.0], [0.5, 0.7, 7.5]])


def tiny_model(kind: str = "tensornet", seed: int = 0, derivative: bool = True, **extra):
    """A small TorchMD-Net model in float64, built from the config dict its trainer uses."""
    from torchmdnet.models.model import create_model

    torch.manual_seed(seed)
    return create_model(config(kind, derivative=derivative, **extra))


def config(kind: str, **overrides) -> dict:
    return {**dict(model=kind, precision=64, embedding_dimension=16, num_layers=2, num_rbf=8, rbf_type="expnorm",
                trainable_rbf=False, activation="silu", cutoff_lower=0.0, cutoff_upper=CUTOFF, max_z=10,
                max_num_neighbors=32, equivariance_invariance_group="O(3)", derivative=True, atom_filter=-1,
                prior_model=None, output_model="Scalar", reduce_op="add", attn_activation="silu", num_heads=2,
                distance_influence="both", neighbor_embedding=True), **overrides}


def molecules(count: int = 3, seed: int = 0):
    """Random H/C/O molecules with energy and force labels, as a user's data has them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for n in range(4, 4 + count):
        atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=rng.normal(size=(n, 3)) * 1.3)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)))
        out.append(atoms)
    return out


def custom_batch(atoms_list, folder):
    """The batch TorchMD-Net's trainer sees: the structures written as the npy files its
    ``Custom`` dataset reads (one file per molecule), batched by torch_geometric's DataLoader."""
    from torch_geometric.loader import DataLoader
    from torchmdnet.datasets import Custom

    for i, a in enumerate(atoms_list):
        np.save(folder / f"coords_{i}.npy", a.positions[None])
        np.save(folder / f"embed_{i}.npy", a.numbers)
        np.save(folder / f"energy_{i}.npy", np.array([[a.get_potential_energy()]]))
        np.save(folder / f"forces_{i}.npy", a.get_forces()[None])
    data = Custom(str(folder / "coords_*.npy"), str(folder / "embed_*.npy"), str(folder / "energy_*.npy"),
                  str(folder / "forces_*.npy"))
    return next(iter(DataLoader(data, batch_size=len(data), shuffle=False)))


def periodic_batch(count: int = 2, seed: int = 1):
    """Periodic structures in TorchMD-Net's reduced box, as its WaterBox dataset stores
    them (``box`` ``(1, 3, 3)`` per structure), batched by torch_geometric's DataLoader."""
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader

    rng = np.random.default_rng(seed)
    graphs = []
    for n in range(6, 6 + count):
        frac = rng.uniform(size=(n, 3))
        graphs.append(Data(z=torch.as_tensor(rng.choice([1, 6, 8], n)), pos=torch.as_tensor(frac @ REDUCED_BOX),
                           y=torch.tensor([[float(rng.normal())]], dtype=torch.float64),
                           neg_dy=torch.as_tensor(rng.normal(size=(n, 3))),
                           box=torch.as_tensor(REDUCED_BOX).view(1, 3, 3)))
    return next(iter(DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


@pytest.mark.parametrize("kind", ["tensornet", "equivariant-transformer"])
def test_torchmdnet_in_three_lines(kind, tmp_path):
    net = tiny_model(kind)
    batch = custom_batch(molecules(), tmp_path)
    model = fe.adapt(net)                                                             # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)  # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == {"energy", "forces"}
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-4


def test_periodic_batches_are_refused_because_rotated_boxes_are_no_valid_input():
    net = tiny_model()
    batch = periodic_batch()
    model = fe.adapt(net)
    with pytest.raises(ValueError, match="lower triangle of the box"):
        fe.equivariance_error(model, batch, model.targets(batch), samples=2, seed=0)
    # the reason: the model takes the reduced box, but not a rotated copy of the structure
    R = fe.random_rotations(1, seed=5, dtype=torch.float64)[0]
    box = batch.box
    energy, _ = net(batch.z, batch.pos, batch.batch, box=box)
    turned, _ = net(batch.z, batch.pos @ R.T, batch.batch, box=box @ R.T)
    assert float((turned - energy).detach().abs().max()) > 1e-6
    # a model built with a box of its own is refused when adapted
    with pytest.raises(ValueError, match="box_vecs"):
        fe.adapt(tiny_model(box_vecs=REDUCED_BOX.tolist()))


def test_torchmdnet_twirl_loss_trains_the_parameters(tmp_path):
    net = tiny_model()
    batch = custom_batch(molecules(), tmp_path)
    model = fe.adapt(net)
    net.train()
    loss, d = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_torchmdnet_calculator_is_adapted_and_builds_batches(tmp_path):
    """TMDNETCalculator loads a checkpoint with derivative=False and takes the forces by
    backward itself; it builds float32 positions whatever its dtype (a float64 model
    fails inside it), so the comparison is in float32, one structure per batch (as the
    calculator calls the model), where the same operations give the same bits."""
    from torchmdnet.calculators import TMDNETCalculator

    net = tiny_model()
    # a checkpoint as the trainer writes it (with the hyperparameters the calculator sets)
    cfg = config("tensornet", remove_ref_energy=False, static_shapes=False)
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": cfg, "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}},
               checkpoint)
    calc = TMDNETCalculator(str(checkpoint), dtype=torch.float32)
    model = fe.adapt(calc)
    assert model.per_molecule == ["q"] and not model.forces_inside
    atoms = molecules(2)
    for a in atoms:
        a.info["charge"] = 0
        out = model(model.prepare(model.batch_from_atoms([a])))
        a.calc = calc
        assert abs(float(out["energy"][0].detach()) - a.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out["forces"].detach().numpy(), a.get_forces(), rtol=0, atol=1e-8)
    # one batch of both: the float32 sums run in another order
    both = model(model.prepare(model.batch_from_atoms(atoms)))
    energies = np.array([a.get_potential_energy() for a in atoms])
    np.testing.assert_allclose(both["energy"].detach().numpy(), energies, rtol=1e-5, atol=1e-6)
    # and the float64 route, the calculator's model cast as fastequiv measures it
    calc.model.double()
    out = model(model.prepare(model.batch_from_atoms(atoms)))
    np.testing.assert_allclose(out["energy"].detach().numpy(), energies, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"info has no 'charge'"):
        model.batch_from_atoms(molecules(1))


def test_torchmdnet_charge_is_handed_to_the_model_as_the_trainer_does(tmp_path):
    net = tiny_model()
    batch = custom_batch(molecules(), tmp_path)
    batch.q = torch.tensor([0, 1, -1])
    plain = fe.adapt(net)(fe.adapt(net).prepare(batch))
    charged = fe.adapt(net, charge=True)
    out = charged(charged.prepare(batch))
    energy, _ = net(batch.z, batch.pos, batch.batch, q=batch.q)
    torch.testing.assert_close(out["energy"], energy.reshape(-1), rtol=0, atol=0)
    assert float((out["energy"] - plain["energy"]).detach().abs().max()) > 0  # TensorNet reads q
    check_adapter(charged, batch)


def test_adapt_refuses_what_torchmdnet_cannot_do(tmp_path):
    net = tiny_model()
    with pytest.raises(ValueError, match=r"cannot compute \['stress'\]"):
        fe.adapt(net, stress=True)
    with pytest.raises(ValueError, match=r"options \['cutoff'\]"):
        fe.adapt(net, cutoff=3.0)
    with pytest.raises(ValueError, match=r"charge must be a bool"):
        fe.adapt(net, charge=1)
    batch = custom_batch(molecules(), tmp_path)
    with pytest.raises(ValueError, match=r"no tensor 'q' \(charge=True"):
        fe.adapt(net, charge=True).prepare(batch)
    model = fe.adapt(net, heads=("forces",))
    assert set(model(model.prepare(batch))) == {"forces"}
