"""fe.adapt on SchNetPack: real (tiny) PaiNN and SchNet potentials on batches from
SchNetPack's own pipeline (ASEAtomsData, its transforms, AtomsLoader).

Both representations are exactly equivariant by construction (PaiNN's vector features
and SchNet's distances turn with the structure; forces and stress by autograd), so the
exact checks apply.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
import torch.utils.data.dataloader

import fastequiv as fe
from adapters import check_adapter, require

# schnetpack 2.1.1 imports torch.utils.data.dataloader.T_co, a type variable newer torch
# no longer defines (only for annotations): define it before schnetpack is imported
if not hasattr(torch.utils.data.dataloader, "T_co"):
    torch.utils.data.dataloader.T_co = typing.TypeVar("T_co", covariant=True)

spk = require("schnetpack")
ase = require("ase")

CUTOFF = 4.0
UNITS = {"energy": "eV", "forces": "eV/Ang", "stress": "eV/Ang/Ang/Ang"}


def tiny_potential(representation: str = "painn", stress: bool = True, seed: int = 0):
    """A float64 NeuralNetworkPotential: energy, forces and (with ``stress``) stress."""
    torch.manual_seed(seed)
    rbf, cut = spk.nn.GaussianRBF(n_rbf=8, cutoff=CUTOFF), spk.nn.CosineCutoff(CUTOFF)
    if representation == "painn":
        rep = spk.representation.PaiNN(n_atom_basis=8, n_interactions=2, radial_basis=rbf, cutoff_fn=cut)
    else:
        rep = spk.representation.SchNet(n_atom_basis=8, n_interactions=2, radial_basis=rbf, cutoff_fn=cut)
    inputs = ([spk.atomistic.Strain()] if stress else []) + [spk.atomistic.PairwiseDistances()]
    outputs = [spk.atomistic.Atomwise(n_in=8, output_key="energy"), spk.atomistic.Forces(calc_stress=stress)]
    return spk.model.NeuralNetworkPotential(representation=rep, input_modules=inputs, output_modules=outputs).double()


def structures(periodic: bool, count: int = 3, seed: int = 0):
    """Random H/C/O molecules, or triclinic cells, and their labels as SchNetPack stores them."""
    rng = np.random.default_rng(seed)
    atoms_list, labels = [], []
    for n in range(4, 4 + count):
        pos = rng.normal(size=(n, 3)) * 1.3
        kwargs = dict(numbers=rng.choice([1, 6, 8], n), positions=pos)
        if periodic:
            cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
            kwargs.update(positions=pos % 4.0, cell=cell, pbc=True)
        atoms_list.append(ase.Atoms(**kwargs))
        stress = rng.normal(size=(3, 3)) * 0.01
        labels.append({"energy": np.array([rng.normal()]), "forces": rng.normal(size=(n, 3)),
                       "stress": (stress + stress.T)[None] / 2})
    return atoms_list, labels


def spk_batch(atoms_list, labels, tmp_path):
    """The batch SchNetPack's trainer sees: an ASEAtomsData with a neighbour list and
    CastTo64 transforms, collated by AtomsLoader."""
    path = str(tmp_path / f"data{len(list(tmp_path.iterdir()))}.db")
    data = spk.data.ASEAtomsData.create(path, distance_unit="Ang", property_unit_dict=UNITS)
    data.add_systems(labels, atoms_list)
    data.transforms = [spk.transform.ASENeighborList(cutoff=CUTOFF), spk.transform.CastTo64()]
    return next(iter(spk.data.AtomsLoader(data, batch_size=len(atoms_list), shuffle=False)))


@pytest.mark.parametrize("representation, periodic", [("painn", False), ("painn", True), ("schnet", True)])
def test_schnetpack_in_three_lines(representation, periodic, tmp_path):
    potential = tiny_potential(representation)
    batch = spk_batch(*structures(periodic), tmp_path)
    model = fe.adapt(potential, stress=periodic)                                        # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)   # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == ({"energy", "forces", "stress"} if periodic else {"energy", "forces"})
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-4


def test_schnetpack_twirl_loss_trains_the_schnetpack_parameters(tmp_path):
    potential = tiny_potential()
    batch = spk_batch(*structures(True), tmp_path)
    model = fe.adapt(potential, stress=True)
    potential.train()
    loss, _ = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    grads = [p.grad for p in potential.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("periodic", [False, True])
def test_schnetpack_calculator_is_adapted_with_its_units_and_builds_batches(periodic, tmp_path, monkeypatch):
    from ase.stress import voigt_6_to_full_3x3_stress
    from schnetpack.interfaces import SpkCalculator

    # SpkCalculator loads the whole pickled model with torch.load, which torch >= 2.6 only
    # does when told to (weights_only=False): the file here is the test's own
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save(tiny_potential(stress=False), tmp_path / "model.pt")  # the calculator activates the stress itself
    calc = SpkCalculator(str(tmp_path / "model.pt"), neighbor_list=spk.transform.ASENeighborList(cutoff=CUTOFF),
                         energy_unit="kcal/mol", dtype=torch.float64, stress_key="stress" if periodic else None)
    model = fe.adapt(calc, stress=periodic)
    atoms, _ = structures(periodic, 2)
    batch = model.batch_from_atoms(atoms)
    with torch.enable_grad():
        out = {h: v.detach() for h, v in model(model.prepare(batch)).items()}
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        assert abs(float(out["energy"][i]) - a.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out["forces"][batch["_idx_m"] == i].numpy(), a.get_forces(), atol=1e-8, rtol=0)
        if periodic:
            np.testing.assert_allclose(out["stress"][i].numpy(), voigt_6_to_full_3x3_stress(a.get_stress()),
                                       atol=1e-8, rtol=0)
    assert abs(model.scale["energy"] - ase.units.kcal / ase.units.mol) < 1e-12


def test_schnetpack_model_builds_batches_and_takes_its_keys():
    potential = spk.model.NeuralNetworkPotential(
        representation=spk.representation.SchNet(n_atom_basis=8, n_interactions=1,
                                                 radial_basis=spk.nn.GaussianRBF(n_rbf=8, cutoff=CUTOFF),
                                                 cutoff_fn=spk.nn.CosineCutoff(CUTOFF)),
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=8, output_key="U0"),
                        spk.atomistic.Forces(energy_key="U0", force_key="F")]).double()
    model = fe.adapt(potential, energy_key="U0", force_key="F")
    atoms, _ = structures(False)
    batch = model.batch_from_atoms(atoms)
    assert batch["_positions"].dtype == torch.float64
    with torch.enable_grad():
        out = model(model.prepare(batch))
    assert out["energy"].shape == (3,) and out["forces"].shape == (15, 3)
    with pytest.raises(ValueError, match=r"cannot compute \['energy'\]"):
        fe.adapt(potential, force_key="F")  # no "energy" output


def test_schnetpack_adapt_refuses_what_it_does_not_take(tmp_path):
    potential = tiny_potential(stress=False)
    with pytest.raises(ValueError, match=r"options \['cutoff'\] that the schnetpack adapter"):
        fe.adapt(potential, cutoff=3.0)
    with pytest.raises(ValueError, match=r"heads must be"):
        fe.adapt(potential, heads=("dipole",))
    with pytest.raises(ValueError, match=r"energy_key must be a str.*got 3"):
        fe.adapt(potential, energy_key=3)
    with pytest.raises(ValueError, match=r"stress head was asked for.*does not output 'stress'.*Strain"):
        fe.adapt(potential, stress=True)
    with pytest.raises(ValueError, match=r"expected a SchNetPack model.*got PaiNN"):
        fe.adapt(potential.representation)
    model = fe.adapt(tiny_potential(), stress=True)
    atoms, labels = structures(False)
    with pytest.raises(ValueError, match=r"stress=True needs a periodic cell.*graphs \[0, 1, 2\]"):
        model.prepare(spk_batch(atoms, labels, tmp_path))
    with pytest.raises(ValueError, match=r"batch lacks \['_offsets', '_idx_i', '_idx_j'\]"):
        model.prepare({k: v for k, v in spk_batch(atoms, labels, tmp_path).items()
                       if k not in ("_offsets", "_idx_i", "_idx_j")})  # no neighbour list
