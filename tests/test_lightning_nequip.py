"""EquivarianceCallback inside a real ``nequip-train`` run (nequip 0.19.1, Lightning through Hydra).

The test writes a tiny periodic dataset as extxyz and a config whose trainer gets the
callback through ``callbacks:`` / ``_target_`` (the lines README.md gives), runs
``nequip-train`` in a subprocess on the CPU, and reads the decomposition back from
CSVLogger's file. NequIP is equivariant by construction (float64 here), so every logged
pct is float noise; the validation values must equal ``fe.equivariance_error`` of the
saved model on nequip's own validation batches, pooled by hand.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastequiv as fe
from adapters import require

require("nequip")
ase = require("ase")
import ase.io  # noqa: E402

TYPES = ["H", "C", "O"]
R_MAX = 4.0
K = 4

# what a NequIP user adds under `trainer: callbacks:` (README.md quotes the same lines)
CALLBACK_YAML = """\
    - _target_: fastequiv.lightning.EquivarianceCallback
      every_n_steps: 2
      max_samples: 2
      samples: 4
      adapt_options: {stress: true}
"""

CONFIG = """\
run: [train]
seed: 0
model_type_names: [H, C, O]

data:
  _target_: nequip.data.datamodule.ASEDataModule
  seed: ${seed}
  train_file_path: train.xyz
  val_file_path: val.xyz
  transforms:
    - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
      model_type_names: ${model_type_names}
    - _target_: nequip.data.transforms.NeighborListTransform
      r_max: %(r_max)s
  train_dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 3, shuffle: true}
  val_dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 2}
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    type_names: ${model_type_names}

trainer:
  _target_: lightning.Trainer
  accelerator: cpu
  max_epochs: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    _target_: lightning.pytorch.loggers.CSVLogger
    save_dir: ${hydra:runtime.output_dir}
    name: csv
  callbacks:
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${hydra:runtime.output_dir}
      save_last: true
%(callback)s
training_module:
  _target_: nequip.train.NequIPLightningModule
  loss:
    _target_: nequip.train.EnergyForceStressLoss
    per_atom_energy: true
    coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
  val_metrics:
    _target_: nequip.train.EnergyForceStressMetrics
    coeffs: {total_energy_mae: 1.0, forces_mae: 1.0, stress_mae: 1.0}
  optimizer: {_target_: torch.optim.Adam, lr: 0.01}
  model:
    _target_: nequip.model.NequIPGNNModel
    seed: ${seed}
    model_dtype: float64
    type_names: ${model_type_names}
    r_max: %(r_max)s
    l_max: 1
    num_layers: 2
    num_features: 4
    radial_mlp_width: 8
    num_bessels: 4
    avg_num_neighbors: ${training_data_stats:num_neighbors_mean}
    per_type_energy_shifts: ${training_data_stats:per_atom_energy_mean}
    per_type_energy_scales: ${training_data_stats:forces_rms}
"""


def periodic_structures(count: int, seed: int) -> list:
    """Triclinic H/C/O cells with energy, force and stress labels, as an extxyz file holds them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = 3 + i % 3
        cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
        atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=rng.uniform(0, 4, size=(n, 3)), cell=cell,
                          pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)),
                                           stress=rng.normal(size=6) * 0.01)
        out.append(atoms)
    return out


def nequip_train(workdir: Path) -> list:
    """Run nequip-train on the config in ``workdir``; the rows of its CSVLogger file."""
    exe = Path(sys.executable).with_name("nequip-train")
    out = workdir / "out"
    res = subprocess.run([str(exe), "-cp", str(workdir), "-cn", "config", f"hydra.run.dir={out}"], cwd=workdir,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    (metrics,) = list(out.rglob("metrics.csv"))
    return list(csv.DictReader(metrics.open()))


def logged(rows: list, prefix: str) -> dict:
    out = {}
    for r in rows:
        vals = {k[len(prefix):]: float(v) for k, v in r.items() if k.startswith(prefix) and v != ""}
        if vals:
            out[int(r["step"])] = vals
    return out


@pytest.fixture
def float64():
    """nequip's data pipeline builds tensors in torch's default dtype, float64 in its runs."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def validation_batches(path: Path) -> list:
    """nequip's validation batches: its ASEDataset with the config's transforms, batched in order."""
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    dataset = ASEDataset(file_path=str(path), transforms=[ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES),
                                                          NeighborListTransform(r_max=R_MAX)])
    return list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=AtomicDataDict.batched_from_list))


def test_nequip_train_logs_the_decomposition(tmp_path, float64):
    from nequip.model import ModelFromCheckpoint
    from nequip.utils.global_state import set_global_state

    ase.io.write(tmp_path / "train.xyz", periodic_structures(9, seed=0), format="extxyz")
    ase.io.write(tmp_path / "val.xyz", periodic_structures(3, seed=1), format="extxyz")
    (tmp_path / "config.yaml").write_text(CONFIG % {"callback": CALLBACK_YAML, "r_max": R_MAX})
    rows = nequip_train(tmp_path)

    keys = {f"{h}{t}" for h in ("", "energy/", "forces/", "stress/")
            for t in ("total", "mean", "equiv", "pct", "total_stderr", "mean_stderr", "equiv_stderr")}
    train, val = logged(rows, "equiv_train/"), logged(rows, "equiv/")
    # 3 steps an epoch, 2 epochs: training steps 1, 3, 5; one validation at each epoch's end
    assert sorted(train) == [1, 3, 5] and len(val) == 2
    for values in [*train.values(), *val.values()]:
        assert set(values) == keys
        assert values["total"] == pytest.approx(values["mean"] + values["equiv"], rel=1e-12)
        for head in ("", "energy/", "forces/", "stress/"):
            assert values[f"{head}total"] > 0 and math.isfinite(values[f"{head}total_stderr"])
            assert abs(values[f"{head}pct"]) < 1e-20  # an equivariant model: float noise only
    # the values at the last epoch's end, recomputed from the saved model on nequip's own batches
    set_global_state()
    model = fe.adapt(ModelFromCheckpoint(str(tmp_path / "out" / "last.ckpt"))["sole_model"], stress=True)
    parts = [fe.equivariance_error(model, b, model.targets(b), samples=K, seed=i)
             for i, b in enumerate(validation_batches(tmp_path / "val.xyz"))]
    last = val[max(val)]
    for head in ("energy", "forces", "stress"):
        per = torch.cat([d.heads[head].per_sample.total for d in parts])
        assert per.numel() == 3
        assert last[f"{head}/total"] == pytest.approx(float(per.mean()), rel=1e-10)
        assert last[f"{head}/total_stderr"] == pytest.approx(float(per.std() / math.sqrt(3)), rel=1e-8)
    assert last["total"] == pytest.approx(sum(last[f"{h}/total"] for h in ("energy", "forces", "stress")), rel=1e-12)
