"""fe.adapt on nequip: a real NequIP model on batches from nequip's own data pipeline.

NequIP models are equivariant by construction (e3nn tensor products, forces and stress
by autograd), so the exact model gives pct < 1e-20 in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import e3nn
import fastequiv as fe
from adapters import check_adapter, require, structures

require("nequip")
ase = require("ase")

TYPES = ["H", "C", "O"]
R_MAX = 4.0


@pytest.fixture(autouse=True)
def default_dtype():
    """nequip runs with float64 as torch's default dtype (its global state sets it for
    good, and its data pipeline builds tensors in it): so does each test here, and the
    other test files get theirs back, and TorchScript's fusion strategy too."""
    before = torch.get_default_dtype()
    fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])  # returns the one in force
    torch.jit.set_fusion_strategy(fusion)
    e3nn_defaults = e3nn.get_optimization_defaults()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
    # nequip's global state also changes TorchScript's fusion strategy and e3nn's code
    # generation (eager instead of TorchScript) for good; other tests' models (MACE's
    # e3nn code) would then run other code: put both back
    torch.jit.set_fusion_strategy(fusion)
    e3nn.set_optimization_defaults(**e3nn_defaults)


def tiny_nequip(seed: int = 0):
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()  # nequip's model builders require it
    return NequIPGNNModel(seed=seed, model_dtype="float64", type_names=TYPES, r_max=R_MAX, num_layers=2, l_max=1,
                          num_features=4, radial_mlp_width=8, num_bessels=4, avg_num_neighbors=4.0,
                          per_type_energy_scales=1.0, per_type_energy_shifts=0.0)


def nequip_batch(atoms_list, tmp_path):
    """The batch nequip's trainer sees: an extxyz file read by its ASEDataset with its
    transforms, batched by a DataLoader with its collate function."""
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    path = tmp_path / "data.xyz"
    ase.io.write(path, atoms_list, format="extxyz")
    transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES), NeighborListTransform(r_max=R_MAX)]
    dataset = ASEDataset(file_path=str(path), transforms=transforms)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), collate_fn=AtomicDataDict.batched_from_list)
    return next(iter(loader))


@pytest.mark.parametrize("periodic", [False, True])
def test_nequip_in_three_lines(periodic, tmp_path):
    nequip = tiny_nequip()
    batch = nequip_batch(structures(periodic), tmp_path)
    model = fe.adapt(nequip, stress=periodic)                              # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)   # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == ({"energy", "forces", "stress"} if periodic else {"energy", "forces"})
    if periodic:
        assert batch["edge_cell_shift"].abs().sum() > 0  # edges cross the cell's faces
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-4


def test_nequip_twirl_loss_trains_the_nequip_parameters(tmp_path):
    nequip = tiny_nequip()
    batch = nequip_batch(structures(True), tmp_path)
    model = fe.adapt(nequip, stress=True)
    nequip.train()
    loss, _ = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    grads = [p.grad for p in nequip.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("periodic", [False, True])
def test_nequip_calculator_is_adapted_with_its_units_and_builds_batches(periodic):
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms

    nequip = tiny_nequip().eval()
    transforms = basic_transforms(nequip.metadata, R_MAX, TYPES, {t: t for t in TYPES})
    calc = NequIPCalculator(nequip, device="cpu", energy_units_to_eV=2.0, length_units_to_A=0.5,
                            transforms=transforms)
    model = fe.adapt(calc, stress=periodic)
    atoms = structures(periodic, 2)
    batch = model.batch_from_atoms(atoms)
    with torch.enable_grad():
        out = {k: v.detach() for k, v in model(model.prepare(batch)).items()}
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        assert abs(float(out["energy"][i]) - a.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out["forces"][batch["batch"] == i].numpy(), a.get_forces(), rtol=0, atol=1e-8)
        if periodic:
            np.testing.assert_allclose(out["stress"][i].numpy(), a.get_stress(voigt=False), rtol=0, atol=1e-8)


def test_nequip_batch_from_atoms_of_the_model_matches_the_dataset_pipeline(tmp_path):
    nequip = tiny_nequip()
    model = fe.adapt(nequip, stress=True)
    theirs = model.prepare(nequip_batch(structures(True, 2), tmp_path))
    torch.set_default_dtype(torch.float32)  # batch_from_atoms builds nequip's float64 data whatever the default
    atoms = ase.io.read(tmp_path / "data.xyz", index=":")  # as the dataset read them (extxyz rounds positions)
    ours = model.prepare(model.batch_from_atoms(atoms))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_nequip_molecule_without_a_cell_and_unbatched_frames(tmp_path):
    """nequip's from_dict gives a molecule no cell (rMD17-style npz data): the adapter adds
    a zero cell, with which the model's energy and forces are its own."""
    from nequip.data import AtomicDataDict, from_dict
    from nequip.data.transforms import NeighborListTransform

    nequip = tiny_nequip().eval()
    a = structures(False, 1)[0]
    frame = from_dict({"pos": a.positions, "atom_types": np.array([TYPES.index(s) for s in a.get_chemical_symbols()]),
                       "total_energy": np.array([1.0]), "forces": np.zeros((len(a), 3))})
    frame = NeighborListTransform(r_max=R_MAX)(frame)
    assert "cell" not in frame and "batch" not in frame
    model = fe.adapt(nequip)
    own = nequip(AtomicDataDict.with_batch_(dict(frame)))
    with torch.enable_grad():
        out = model(model.prepare(frame))
    torch.testing.assert_close(out["energy"], own["total_energy"].reshape(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["forces"], own["forces"], rtol=0, atol=1e-12)
    check_adapter(model, frame)


def test_adapt_refuses_what_it_does_not_know_and_options_it_does_not_take(tmp_path):
    nequip = tiny_nequip()
    with pytest.raises(ValueError, match=r"options \['r_max'\]"):
        fe.adapt(nequip, r_max=3.0)
    with pytest.raises(ValueError, match=r"heads must be"):
        fe.adapt(nequip, heads=("dipole",))
    with pytest.raises(ValueError, match=r"expected a nequip GraphModel.*got ConvNetLayer"):
        fe.adapt(next(m for m in nequip.modules() if type(m).__name__ == "ConvNetLayer"))
    model = fe.adapt(nequip, stress=True)
    molecules = nequip_batch(structures(False), tmp_path)
    with pytest.raises(ValueError, match=r"stress=True needs a periodic cell.*graphs \[0, 1, 2\]"):
        model.prepare(molecules)
    with pytest.raises(ValueError, match=r"holds \['edge_vectors'\].*does not stack"):
        fe.adapt(nequip).prepare({**molecules, "edge_vectors": torch.zeros(molecules["edge_index"].shape[1], 3)})
    with pytest.raises(ValueError, match=r"AtomicDataDict.*got list"):
        model.prepare([molecules])
    assert fe.adapt(model) is model
