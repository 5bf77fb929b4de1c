"""Rotation designs on a real codebase's model: a tiny float64 MACE (exactly equivariant)
through fe.adapt, plus an external field on the forces (tests/adapters.py ``Broken``).

Closed form: the field ``+a e_z`` on every atom's force gives back-rotated copies
``a R^T e_z`` on top of the model's, whose twisted prediction is of degree 1: the degree-1
design (4 rotations) cancels it exactly, so every turn gives the forces' L_equiv ``a^2 / 3``
(each component of the uniformly distributed ``R^T e_z`` has mean square 1/3) to float
rounding, and the energy (positions turn about the centroid, where the field's energy is
invariant) none.
"""

from __future__ import annotations

import pytest
import torch

import fastequiv as fe
from adapters import Broken, require, structures

require("mace")
require("ase")
from test_adapt_mace import mace_batch, tiny_mace  # noqa: E402

A = 0.3


@pytest.mark.parametrize("periodic", [False, True])
def test_a_design_measures_the_field_on_a_real_mace_exactly(periodic):
    mace = tiny_mace()
    batch = mace_batch(structures(periodic), mace)
    model = Broken(fe.adapt(mace, stress=periodic), strength=A)
    target = model.targets(batch)
    for seed in (0, 1):
        d = fe.equivariance_error(model, batch, target, rotations="design:1", replicates=3, seed=seed)
        torch.testing.assert_close(d.heads["forces"].per_sample.equiv,
                                   torch.full((3,), A ** 2 / 3, dtype=torch.float64), rtol=1e-10, atol=0)
        assert float(d.heads["energy"].equiv) < 1e-20
        assert float(d.rotation_stderr.equiv) < 1e-10 * A ** 2  # every turn gives the same value
        if periodic:
            assert float(d.heads["stress"].equiv) < 1e-20
    # label-free, the same L_equiv
    lf = fe.equivariance_error(model, batch, None, rotations="design:1", seed=2)
    torch.testing.assert_close(lf.heads["forces"].equiv, torch.tensor(A ** 2 / 3, dtype=torch.float64),
                               rtol=1e-10, atol=0)


def test_a_design_loss_trains_a_real_mace():
    mace = tiny_mace()
    batch = mace_batch(structures(True), mace)
    model = fe.adapt(mace, stress=True)
    target = model.targets(batch)
    loss, d = fe.twirl_loss(model, batch, target, rotations="design:1", replicates=2, equiv_weight=1.0, seed=5)
    loss.backward()
    grads = [p.grad for p in mace.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    want = fe.equivariance_error(model, batch, target, rotations="design:1", replicates=2, seed=5)
    torch.testing.assert_close(d.total, want.total, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.detach(), want.total + want.equiv, rtol=1e-12, atol=0)
    assert float(want.equiv) < 1e-20 * float(want.total)  # MACE is equivariant in float64
