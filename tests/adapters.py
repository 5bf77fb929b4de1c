"""What the adapter tests share: a hand loop over rotated copies, independent of
fastequiv's stacking and reduction, and a deliberately broken wrapper.

The hand loop rotates the adapter's prepared inputs one copy at a time with einsum
(positions about each graph's centroid, cells ``cell R^T``, per-edge Cartesian vectors
with their edge's graph), calls the adapted model on each copy, back-rotates the heads and
applies the unbiased estimators by hand, graph by graph."""

from __future__ import annotations

import os

import pytest
import torch

import fastequiv as fe
from fastequiv.adapted import Adapted
from fastequiv.graph import Role


def require(package: str):
    """Import ``package``; CI (FASTEQUIV_EXPECT_ADAPTERS=1) fails instead of skipping."""
    if os.environ.get("FASTEQUIV_EXPECT_ADAPTERS") == "1":
        return __import__(package)
    return pytest.importorskip(package, reason=f"{package} is not installed (CI installs it, see .ci/run)")


def structures(periodic: bool, count: int = 3, seed: int = 0, numbers=(1, 6, 8)):
    """Random molecules (or triclinic cells) of 4, 5, ... atoms with labels as an extxyz
    file has them (a SinglePointCalculator with energy, forces and, periodic, stress)."""
    import ase
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for n in range(4, 4 + count):
        pos = rng.normal(size=(n, 3)) * 1.3
        kwargs = dict(numbers=rng.choice(list(numbers), n), positions=pos)
        if periodic:
            cell = np.array([[4.0, 0.0, 0.0], [0.8, 4.2, 0.0], [0.5, 0.7, 4.5]]) + rng.normal(size=(3, 3)) * 0.1
            kwargs.update(positions=pos % 4.0, cell=cell, pbc=True)
        atoms = ase.Atoms(**kwargs)
        stress = rng.normal(size=6) * 0.01 if periodic else None
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)),
                                           **({"stress": stress} if periodic else {}))
        out.append(atoms)
    return out


def rotations(K: int, B: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Rotation ``k * B + b`` of the seed's stream turns copy ``k`` of graph ``b``, as in fastequiv."""
    return fe.random_rotations(K * B, seed=seed, dtype=dtype).reshape(K, B, 3, 3)


def _rotate_inputs(model: Adapted, inputs: dict, R: torch.Tensor) -> dict:
    """One copy of the prepared ``inputs`` rotated by ``R`` ``(B, 3, 3)``, by hand."""
    spec = model.spec
    batch = inputs[spec.graph["batch"]]
    B = R.shape[0]
    first = inputs[spec.graph["index"][0]] if spec.graph.get("index") else None
    edge_graph = None
    if first is not None:
        edge_graph = batch[first[0] if first.dim() == 2 else first]
    out = dict(inputs)
    for name, rep in spec.inputs.items():
        if isinstance(rep, Role):
            continue  # graph structure: the same in every copy of the hand loop
        kind = rep.kind
        x = inputs[name]
        if kind == "position":
            counts = torch.bincount(batch, minlength=B).to(x.dtype)
            c = torch.zeros(B, 3, dtype=x.dtype).index_add(0, batch, x) / counts[:, None]
            out[name] = torch.einsum("nij,nj->ni", R[batch], x - c[batch]) + c[batch]
        elif getattr(rep, "cell", False):
            cells = x.reshape(B, 3, 3)
            out[name] = torch.einsum("bij,brj->bri", R.to(x.dtype), cells).reshape(x.shape)
        elif kind == "vector" and rep.level == "edge":
            out[name] = torch.einsum("eij,ej->ei", R[edge_graph].to(x.dtype), x)
        elif kind == "vector" and rep.level == "node":
            out[name] = torch.einsum("nij,nj->ni", R[batch].to(x.dtype), x)
        elif kind not in (None, "scalar"):
            raise AssertionError(f"the hand loop does not rotate {name}: {rep}")
    return out


def hand_decomposition(model: Adapted, batch, target: dict, K: int, seed: int) -> tuple:
    """``(total, mean, equiv)`` by hand over the same rotations as fastequiv (heads weighted 1)."""
    inputs = model.prepare(batch)
    node_batch = inputs[model.spec.graph["batch"]]
    B = int(node_batch.max()) + 1
    R = rotations(K, B, seed)
    per_copy = []
    for k in range(K):
        with torch.enable_grad():
            out = model(_rotate_inputs(model, inputs, R[k]))
        out = {h: v.detach() for h, v in out.items()}
        row = {}
        for head, value in out.items():
            Rk = R[k].to(value.dtype)
            if head == "forces":
                f = torch.einsum("nji,nj->ni", Rk[node_batch], value)
                row[head] = [f[node_batch == b] for b in range(B)]
            elif head == "stress":
                row[head] = list(torch.einsum("bji,bjk,bkl->bil", Rk, value, Rk))
            else:
                row[head] = list(value.reshape(B, -1))
        per_copy.append(row)
    total = mean = equiv = 0.0
    for head, y in target.items():
        ys = [y[node_batch == b] for b in range(B)] if head == "forces" else list(y.reshape(B, *y.shape[1:]))
        t_h = m_h = e_h = 0.0
        for b in range(B):
            a = torch.stack([per_copy[k][head][b].reshape(ys[b].shape) for k in range(K)])
            n = ys[b].numel()
            abar = a.mean(0)
            spread = ((a - abar) ** 2).sum() / (K * n)
            t_h += ((a - ys[b]) ** 2).sum() / (K * n)
            e_h += spread * K / (K - 1)
            m_h += ((abar - ys[b]) ** 2).sum() / n - spread / (K - 1)
        total, mean, equiv = total + t_h / B, mean + m_h / B, equiv + e_h / B
    return total, mean, equiv


class Broken(Adapted):
    """An adapted model plus an external field along +z: energy ``-a sum_i z_i``, forces
    ``+a e_z`` on every atom (not equivariant: it depends on the absolute orientation)."""

    def __init__(self, adapted: Adapted, strength: float = 0.3):
        super().__init__(adapted, adapted.spec)
        self.family = adapted.family
        self.strength = strength
        self.positions = next(n for n, r in adapted.spec.inputs.items() if getattr(r, "kind", None) == "position")

    def prepare(self, batch):
        return self.model.prepare(batch)

    def targets(self, batch):
        return self.model.targets(batch)

    def forward(self, inputs):
        out = dict(self.model(inputs))
        pos = inputs[self.positions]
        batch = inputs[self.spec.graph["batch"]]
        if "energy" in out:
            field = torch.zeros_like(out["energy"]).index_add(0, batch, -self.strength * pos[:, 2].to(out["energy"].dtype))
            out["energy"] = out["energy"] + field
        if "forces" in out:
            pull = torch.zeros_like(out["forces"])
            pull[:, 2] = self.strength
            out["forces"] = out["forces"] + pull
        return out


def check_adapter(model: Adapted, batch, K: int = 4, seed: int = 11, strength: float = 0.3) -> dict:
    """The checks every adapter passes: an exactly equivariant model gives pct < 1e-20
    (float64); the broken one equals the hand loop to 1e-9 relative; prepare is
    idempotent; the caller's batch is untouched. Returns the two pcts."""
    target = model.targets(batch)
    prepared = model.prepare(batch)
    again = model.prepare(prepared)
    assert set(again) == set(prepared) and all(again[k] is prepared[k] or torch.equal(again[k], prepared[k])
                                               for k in prepared)
    before = {k: v.clone() for k, v in prepared.items() if isinstance(v, torch.Tensor)}
    d = fe.equivariance_error(model, batch, target, samples=K, seed=seed)
    assert float(d.pct) < 1e-20, float(d.pct)
    assert float(d.total) > 0
    broken = Broken(model, strength)
    db = fe.equivariance_error(broken, batch, target, samples=K, seed=seed)
    total, mean, equiv = hand_decomposition(broken, batch, target, K, seed)
    assert float(db.equiv) > 1e-6
    torch.testing.assert_close(db.total, torch.as_tensor(total, dtype=db.total.dtype), rtol=1e-9, atol=0)
    torch.testing.assert_close(db.equiv, torch.as_tensor(equiv, dtype=db.equiv.dtype), rtol=1e-9, atol=0)
    torch.testing.assert_close(db.mean, torch.as_tensor(mean, dtype=db.mean.dtype), rtol=1e-9,
                               atol=1e-12 * float(db.total))
    after = model.prepare(batch)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the batch's {k} changed"
    return {"pct": float(d.pct), "broken_pct": float(db.pct)}
