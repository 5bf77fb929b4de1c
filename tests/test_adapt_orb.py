"""fe.adapt on orb-models: small Orb regressors on batches from Orb's own pipeline (an
ASE database read by ``AseSqliteDataset``, collated by ``batch_graphs``).

Orb's models are not equivariant by construction: the GNS feeds the Cartesian components
of its edges' unit vectors (or their spherical harmonics, lmax 3 in orb-v3) to plain MLPs,
and a direct model's force and stress heads are MLPs of the node features. For those the
tests check that the pct is clearly non-zero and equals the hand loop to 1e-9. The exact
checks (pct < 1e-20) run on the equivariant variant built from the same classes: a
conservative model whose edge embedding is ``SphericalHarmonics(lmax=0)`` (a constant),
so its energy sees only distances and atom types, and its forces and stress, taken by
autograd, are exactly equivariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import check_adapter, hand_decomposition, require

require("orb_models")
ase = require("ase")

RADIUS = 6.0  # the GNS cutoff envelope: no edge is cut off with weight left


def system_config():
    from orb_models.forcefield.atomic_system import SystemConfig

    return SystemConfig(radius=RADIUS, max_num_neighbors=120)  # every neighbour within RADIUS


def orb_v3(kind: str, seed: int = 0):
    """The orb-v3 architecture (``pretrained``, no weights) with tiny widths, in float64."""
    from orb_models.forcefield import pretrained

    torch.manual_seed(seed)
    build = {"direct": pretrained.orb_v3_direct_architecture,
             "conservative": pretrained.orb_v3_conservative_architecture}[kind]
    return build(latent_dim=8, base_mlp_hidden_dim=16, head_mlp_hidden_dim=8, num_message_passing_steps=2,
                 system_config=system_config(), device="cpu").double()


def invariant_orb(seed: int = 0, has_stress: bool = True):
    """A conservative Orb model whose edges are embedded by distance only (lmax 0)."""
    from orb_models.forcefield.angular import SphericalHarmonics
    from orb_models.forcefield.conservative_regressor import ConservativeForcefieldRegressor
    from orb_models.forcefield.forcefield_heads import EnergyHead
    from orb_models.forcefield.gns import MoleculeGNS
    from orb_models.forcefield.rbf import BesselBasis

    torch.manual_seed(seed)
    gns = MoleculeGNS(latent_dim=8, num_message_passing_steps=2, num_mlp_layers=1, mlp_hidden_dim=16,
                      rbf_transform=BesselBasis(r_max=6.0, num_bases=8),
                      angular_transform=SphericalHarmonics(lmax=0, normalize=True, normalization="component"),
                      outer_product_with_cutoff=True, use_embedding=True,
                      interaction_params={"distance_cutoff": True, "attention_gate": "sigmoid"},
                      node_feature_names=["feat"], edge_feature_names=["feat"], activation="silu", mlp_norm="rms_norm")
    energy = EnergyHead(latent_dim=8, num_mlp_layers=1, mlp_hidden_dim=8, predict_atom_avg=True, activation="silu")
    return ConservativeForcefieldRegressor(heads={"energy": energy}, model=gns, ensure_grad_loss_weights=False,
                                           pair_repulsion=True, system_config=system_config(),
                                           has_stress=has_stress).double()


def structures(periodic: bool, count: int = 3, seed: int = 0):
    """Random H/C/O molecules, or triclinic cells, with labels as an ASE database has them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for n in range(4, 4 + count):
        atoms = None
        while atoms is None or closest(atoms) < 0.9:  # no pair inside the ZBL repulsion's wall
            kwargs = dict(numbers=rng.choice([1, 6, 8], n), positions=rng.normal(size=(n, 3)) * 1.3)
            if periodic:
                cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
                kwargs.update(positions=rng.uniform(size=(n, 3)) @ cell, cell=cell, pbc=True)
            atoms = ase.Atoms(**kwargs)
        stress = {"stress": rng.normal(size=6) * 0.01} if periodic else {}
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)), **stress)
        out.append(atoms)
    return out


def closest(atoms) -> float:
    d = atoms.get_all_distances(mic=bool(atoms.pbc.all()))
    return float(d[np.triu_indices(len(atoms), 1)].min())


def orb_batch(atoms_list, folder):
    """The batch Orb's training sees: an ASE database read by ``AseSqliteDataset`` with a
    PropertyConfig for the labels, collated by ``batch_graphs``."""
    import ase.db
    from orb_models.dataset.ase_sqlite_dataset import AseSqliteDataset
    from orb_models.forcefield.base import batch_graphs
    from orb_models.forcefield.property_definitions import PropertyConfig

    path = folder / "structures.db"
    with ase.db.connect(str(path)) as db:
        for a in atoms_list:
            db.write(a)
    periodic = all(a.pbc.all() for a in atoms_list)
    labels = PropertyConfig(node_names=["forces"], graph_names=["energy"] + (["stress"] if periodic else []))
    data = AseSqliteDataset("structures", path, system_config(), target_config=labels, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False, collate_fn=batch_graphs)
    return next(iter(loader))


@pytest.mark.parametrize("periodic", [False, True])
def test_orb_in_three_lines(periodic, tmp_path):
    orb = invariant_orb()
    batch = orb_batch(structures(periodic), tmp_path)
    model = fe.adapt(orb, stress=periodic)                                            # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)  # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == ({"energy", "forces", "stress"} if periodic else {"energy", "forces"})
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-6  # the field's 0.3 eV/A against the tiny model's large forces


@pytest.mark.parametrize("kind", ["direct", "conservative"])
@pytest.mark.parametrize("periodic", [False, True])
def test_orb_v3_is_not_equivariant_and_equals_the_hand_loop(kind, periodic, tmp_path):
    orb = orb_v3(kind)
    batch = orb_batch(structures(periodic), tmp_path)
    model = fe.adapt(orb, stress=periodic)
    target = model.targets(batch)
    d = fe.equivariance_error(model, batch, target, samples=4, seed=11)
    total, mean, equiv = hand_decomposition(model, batch, target, K=4, seed=11)
    # clearly non-zero: the equivariant variant gives ~1e-30 on the same batches (the
    # energy labels, far from a random model's reference energies, dominate the total)
    assert float(d.pct) > 1e-10 and float(d.equiv) > 1e-7
    torch.testing.assert_close(d.total, torch.as_tensor(total, dtype=d.total.dtype), rtol=1e-9, atol=0)
    torch.testing.assert_close(d.equiv, torch.as_tensor(equiv, dtype=d.equiv.dtype), rtol=1e-9, atol=0)
    torch.testing.assert_close(d.mean, torch.as_tensor(mean, dtype=d.mean.dtype), rtol=1e-9,
                               atol=1e-12 * float(d.total))


def test_orb_twirl_loss_trains_the_parameters(tmp_path):
    orb = invariant_orb()
    batch = orb_batch(structures(True), tmp_path)
    model = fe.adapt(orb, stress=True)
    orb.train()
    loss, d = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    # every parameter but the GNS's decoder (its denoising output, which no forcefield head reads)
    grads = [p.grad for n, p in orb.named_parameters() if p.requires_grad and "_decoder" not in n]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.fixture
def float64_default():
    """Orb's calculator builds graphs in the default dtype (set_torch_precision sets it)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


@pytest.mark.parametrize("kind", ["conservative", "direct"])
def test_orb_calculator_is_adapted_and_builds_batches(kind, float64_default):
    from ase.calculators.fd import calculate_numerical_stress
    from orb_models.forcefield.calculator import ORBCalculator

    calc = ORBCalculator(orb_v3(kind), device="cpu")
    model = fe.adapt(calc, stress=True)
    atoms = structures(True, 2)
    batch = model.batch_from_atoms(atoms)
    with torch.enable_grad():
        out = model(model.prepare(batch))
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        rows = model.prepare(batch)["batch"] == i
        assert abs(float(out["energy"][i].detach()) - a.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out["forces"][rows].detach().numpy(), a.get_forces(), rtol=0, atol=1e-8)
        stress = out["stress"][i].detach().numpy()
        np.testing.assert_allclose(stress.flat[[0, 4, 8, 5, 2, 1]], a.get_stress(), rtol=0, atol=1e-8)
        if kind == "conservative":  # ASE's sign: (1/V) dE/d strain, as ASE's finite differences take it
            np.testing.assert_allclose(stress, stress.T, rtol=0, atol=0)
            numerical = calculate_numerical_stress(a, eps=1e-5, voigt=False)
            np.testing.assert_allclose(stress, numerical, rtol=1e-5, atol=1e-7)


def test_adapt_refuses_what_orb_cannot_do(tmp_path):
    direct = orb_v3("direct")
    with pytest.raises(ValueError, match="predicts forces directly"):
        fe.adapt(direct, conservative=True)
    with pytest.raises(ValueError, match=r"options \['cutoff'\]"):
        fe.adapt(direct, cutoff=3.0)
    with pytest.raises(ValueError, match=r"cannot compute \['stress'\]"):
        fe.adapt(invariant_orb(has_stress=False), stress=True)
    molecules = orb_batch(structures(False), tmp_path)
    with pytest.raises(ValueError, match="zero volume"):
        fe.adapt(direct, stress=True).prepare(molecules)
    with pytest.raises(ValueError, match="must be an Orb AtomGraphs"):
        fe.adapt(direct).prepare({"positions": torch.zeros(2, 3)})
    orb = invariant_orb()
    orb.model.node_feature_names = ["feat", "spin_density"]
    with pytest.raises(ValueError, match=r"extra features \[\"node_features\['spin_density'\]\"\]"):
        fe.adapt(orb)
    # a conservative model's direct heads, as ORBCalculator(conservative=False) reads them:
    # orb-v3's conservative architecture has none besides the energy
    with pytest.raises(ValueError, match=r"cannot compute \['forces'\]"):
        fe.adapt(orb_v3("conservative"), conservative=False)
    assert fe.adapt(orb_v3("conservative"), conservative=False, heads=("energy",)).heads == ("energy",)


def test_orb_calculator_batched_ase_route_equals_the_serial_one(float64_default):
    """fastequiv.ase batches the structures through this adapter; calling the calculator
    on each rotated copy (the serial route) must give the same decomposition."""
    from fastequiv import ase as fe_ase
    from orb_models.forcefield.calculator import ORBCalculator

    calc = ORBCalculator(orb_v3("conservative"), device="cpu")
    atoms = structures(True)
    target = [{"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()} for a in atoms]
    routes = [fe_ase.equivariance_error(calc, atoms, target=target, samples=4, seed=1, batched=batched)
              for batched in (True, False)]
    for term in ("total", "mean", "equiv"):
        torch.testing.assert_close(getattr(routes[0], term), getattr(routes[1], term), rtol=1e-9, atol=0)
    assert float(routes[0].pct) > 1e-10
