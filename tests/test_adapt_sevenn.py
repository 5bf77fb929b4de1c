"""fe.adapt on SevenNet: a real (tiny) SevenNet model on batches from SevenNet's own pipeline.

SevenNet's models are exactly equivariant by construction (e3nn tensor products on edge
vectors; forces and stress by autograd), so the exact checks apply. SevenNet computes in
float32 only: its one-hot embedding casts to float32 (``OnehotEmbedding``: ``.float()``)
and its pipeline builds float32 tensors (``sevenn.util.dtype_correct``). The float64
model here keeps the one-hot in the model's dtype with a forward hook; the adapter casts
the pipeline's float32 batch to the model's dtype.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import check_adapter, require, structures

require("sevenn")
ase = require("ase")

SPECIES = [1, 6, 8]
CUTOFF = 4.0


def tiny_sevenn(seed: int = 0, modalities=None):
    """A float64 SevenNet model, two small convolutions (multi-fidelity with ``modalities``)."""
    import sevenn._keys as KEY
    from sevenn._const import DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.nn.node_embedding import OnehotEmbedding

    config = copy.deepcopy(DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
    config.update({
        KEY.CUTOFF: CUTOFF, KEY.NODE_FEATURE_MULTIPLICITY: 4, KEY.NUM_CONVOLUTION: 2, KEY.LMAX: 1,
        KEY.CONVOLUTION_WEIGHT_NN_HIDDEN_NEURONS: [8], KEY.CONV_DENOMINATOR: 4.0, KEY.SHIFT: -0.3, KEY.SCALE: 1.3,
        KEY.TYPE_MAP: {z: i for i, z in enumerate(SPECIES)}, KEY.NUM_SPECIES: len(SPECIES),
        KEY.CHEMICAL_SPECIES: ["H", "C", "O"],
    })
    if modalities:
        config.update({KEY.USE_MODALITY: True, KEY.NUM_MODALITIES: len(modalities),
                       KEY.MODAL_MAP: {m: i for i, m in enumerate(modalities)}, KEY.USE_MODAL_NODE_EMBEDDING: True,
                       KEY.USE_MODAL_WISE_SHIFT: False, KEY.USE_MODAL_WISE_SCALE: False})
    torch.manual_seed(seed)
    model = build_E3_equivariant_model(config).double()

    def one_hot_in_model_dtype(module, args, data):
        for key in (module.key_output, module.key_additional_output):
            if key is not None:
                data[key] = data[key].double()
        return data

    for module in model.modules():
        if isinstance(module, OnehotEmbedding):
            module.register_forward_hook(one_hot_in_model_dtype)
    return model


def sevenn_batch(atoms_list, modalities=None):
    """The batch SevenNet's trainer sees: graph_build (labels from each structure's
    calculator), torch_geometric's DataLoader."""
    from sevenn.train.dataload import graph_build
    from torch_geometric.loader import DataLoader

    graphs = graph_build(atoms_list, CUTOFF, y_from_calc=True)
    for graph, modal in zip(graphs, modalities or ()):
        graph["data_modality"] = modal
    return next(iter(DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


@pytest.mark.parametrize("periodic", [False, True])
def test_sevenn_in_three_lines(periodic):
    sevenn = tiny_sevenn()
    batch = sevenn_batch(structures(periodic))
    model = fe.adapt(sevenn, stress=periodic)                                           # the user's lines: 1
    d = fe.equivariance_error(model, batch, model.targets(batch), samples=4, seed=3)   # 2
    assert float(d.pct) < 1e-20
    assert set(d.heads) == ({"energy", "forces", "stress"} if periodic else {"energy", "forces"})
    pcts = check_adapter(model, batch)
    assert pcts["broken_pct"] > 1e-4


def test_sevenn_labels_are_read_in_ases_convention():
    atoms = structures(True)
    batch = sevenn_batch(atoms)
    target = fe.adapt(tiny_sevenn(), stress=True).targets(batch)
    from ase.stress import voigt_6_to_full_3x3_stress

    want = np.stack([voigt_6_to_full_3x3_stress(a.get_stress()) for a in atoms])
    np.testing.assert_allclose(target["stress"].numpy(), want, rtol=1e-6, atol=1e-8)  # float32 labels
    np.testing.assert_allclose(target["energy"].numpy(), [a.get_potential_energy() for a in atoms], rtol=1e-6)


def test_sevenn_multi_fidelity_model_reads_each_graphs_fidelity():
    sevenn = tiny_sevenn(modalities=["pbe", "scan"])
    batch = sevenn_batch(structures(True), modalities=["scan", "pbe", "scan"])
    model = fe.adapt(sevenn, stress=True)
    prepared = model.prepare(batch)
    assert prepared["modal_index"].tolist() == [1, 0, 1]
    with torch.enable_grad():
        mixed = model(prepared)["energy"].detach()
        prepared["modal_index"] = torch.zeros(3, dtype=torch.int64)
        all_pbe = model(prepared)["energy"].detach()
    assert mixed[1] == all_pbe[1] and (mixed[0] != all_pbe[0])  # the fidelity reaches the model, graph by graph
    check_adapter(model, batch)
    no_fidelity = sevenn_batch(structures(True))
    with pytest.raises(ValueError, match="multi-fidelity.*'data_modality'"):
        model.prepare(no_fidelity)


def test_sevenn_twirl_loss_trains_the_sevenn_parameters():
    sevenn = tiny_sevenn()
    batch = sevenn_batch(structures(True))
    model = fe.adapt(sevenn, stress=True)
    sevenn.train()
    loss, _ = fe.twirl_loss(model, batch, model.targets(batch), samples=2, seed=0)
    loss.backward()
    grads = [p.grad for p in sevenn.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("periodic", [False, True])
def test_sevenn_calculator_is_adapted_and_builds_batches(periodic, monkeypatch):
    import sevenn.util
    from ase.stress import voigt_6_to_full_3x3_stress
    from sevenn.calculator import SevenNetCalculator

    # the calculator builds float32 data (dtype_correct); this float64 model needs float64
    to_float32 = sevenn.util.dtype_correct
    monkeypatch.setattr(sevenn.util, "dtype_correct", lambda v, float_dtype=torch.float64, **kw:
                        to_float32(v, float_dtype=float_dtype, **kw))
    calc = SevenNetCalculator(model=tiny_sevenn(), file_type="model_instance", device="cpu")
    model = fe.adapt(calc, stress=periodic)
    atoms = structures(periodic, 2)
    batch = model.batch_from_atoms(atoms)
    with torch.enable_grad():
        out = {h: v.detach() for h, v in model(model.prepare(batch)).items()}
    assert not calc.model.is_batch_data  # the calculator's model is left in its single-graph mode
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = calc
        assert abs(float(out["energy"][i]) - a.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out["forces"][batch.batch == i].numpy(), a.get_forces(), atol=1e-8, rtol=0)
        if periodic:
            np.testing.assert_allclose(out["stress"][i].numpy(), voigt_6_to_full_3x3_stress(a.get_stress()),
                                       atol=1e-8, rtol=0)


def test_sevenn_adapt_refuses_what_it_does_not_take():
    sevenn = tiny_sevenn()
    with pytest.raises(ValueError, match=r"options \['cutoff'\] that the sevenn adapter"):
        fe.adapt(sevenn, cutoff=3.0)
    with pytest.raises(ValueError, match=r"heads must be"):
        fe.adapt(sevenn, heads=("dipole",))
    with pytest.raises(ValueError, match=r"expected a SevenNet model.*got OnehotEmbedding"):
        fe.adapt(next(m for m in sevenn.modules() if type(m).__name__ == "OnehotEmbedding"))
    model = fe.adapt(sevenn, stress=True)
    with pytest.raises(ValueError, match=r"stress=True needs a periodic cell.*graphs \[0, 1, 2\]"):
        model.prepare(sevenn_batch(structures(False)))
