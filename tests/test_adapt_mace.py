"""fe.adapt on mace-torch: a real MACE model on batches from MACE's own loader."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import check_adapter, require, structures

require("mace")
ase = require("ase")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from mace_equivariance import tiny_mace  # noqa: E402  (the example's tiny MACE: float64, random weights)


def mace_batch(atoms_list, model):
    """The batch MACE's trainer sees: configs read from Atoms, AtomicData, MACE's DataLoader."""
    from mace import data, tools
    from mace.tools import torch_geometric

    z_table = tools.AtomicNumberTable([1, 6, 8])
    keyspec = data.KeySpecification(info_keys={"energy": "energy", "stress": "stress"}, arrays_keys={"forces": "forces"})
    for a in atoms_list:  # MACE reads labels from info/arrays, as extxyz files store them
        a.info["energy"] = a.get_potential_energy()
        a.arrays["forces"] = a.get_forces()
        if a.pbc.all():
            a.info["stress"] = a.get_stress()
    configs = [data.config_from_atoms(a, key_specification=keyspec) for a in atoms_list]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        graphs = [data.AtomicData.from_config(c, z_table=z_table, cutoff=4.0) for c in configs]
    finally:
        torch.set_default_dtype(default)
    return next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


@pytest.mark.parametrize("periodic", [False, True])
def test_mace_in_three_lines(periodic):
    mace = tiny_mace()
    batch = mace_batch(structures(periodic), mace)
    model = fe.adapt(mace, stress=periodic)                                # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)   # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == ({"energy", "forces", "stress"} if periodic else {"energy", "forces"})
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-4


def test_mace_twirl_loss_trains_the_mace_parameters():
    mace = tiny_mace()
    batch = mace_batch(structures(True), mace)
    model = fe.adapt(mace, stress=True)
    mace.train()
    loss, d = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    grads = [p.grad for p in mace.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_mace_calculator_is_adapted_with_its_units_and_builds_batches():
    from mace.calculators import MACECalculator

    mace = tiny_mace()
    calc = MACECalculator(models=mace, device="cpu", default_dtype="float64", energy_units_to_eV=2.0)
    model = fe.adapt(calc)
    atoms = structures(False, 2)
    batch = model.batch_from_atoms(atoms)
    with torch.enable_grad():
        out = model(model.prepare(batch))
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        assert abs(float(out["energy"][i].detach()) - a.get_potential_energy()) < 1e-9
        sel = batch["batch"] == i
        np.testing.assert_allclose(out["forces"][sel].detach().numpy(), a.get_forces(), atol=1e-9)


def test_adapt_refuses_what_it_does_not_know_and_options_it_does_not_take():
    with pytest.raises(ValueError, match=r"does not recognise.*mace.*Spec"):
        fe.adapt(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"options \['cutoff'\]"):
        fe.adapt(tiny_mace(), cutoff=3.0)
    with pytest.raises(ValueError, match=r"heads must be"):
        fe.adapt(tiny_mace(), heads=("dipole",))
    model = fe.adapt(tiny_mace())
    assert fe.adapt(model) is model
    with pytest.raises(ValueError, match="carries its own spec"):
        fe.equivariance_error(model, None, None, spec=fe.Spec(inputs="vector", output="vector"))
