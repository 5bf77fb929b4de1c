"""The batched ASE route (one model call for K copies of many structures) against the
serial route (one calculator call per copy), on a real MACE calculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import require

require("mace")
ase = require("ase")
import fastequiv.ase as fa  # noqa: E402
from test_adapt_mace import structures, tiny_mace  # noqa: E402


@pytest.fixture(scope="module")
def calc():
    from mace.calculators import MACECalculator

    return MACECalculator(models=tiny_mace(), device="cpu", default_dtype="float64")


@pytest.mark.parametrize("periodic", [False, True])
def test_batched_route_equals_the_serial_route(calc, periodic):
    atoms = structures(periodic, 4, seed=2)
    kw = dict(samples=3, seed=5)
    batched = fa.equivariance_error(calc, atoms, **kw)
    serial = fa.equivariance_error(calc, atoms, batched=False, **kw)
    assert set(batched.heads) == set(serial.heads) == ({"energy", "forces", "stress"} if periodic else
                                                       {"energy", "forces"})
    for name in ("total", "mean", "equiv"):
        torch.testing.assert_close(getattr(batched, name), getattr(serial, name), rtol=1e-9, atol=1e-12)
        for h in batched.heads:
            torch.testing.assert_close(getattr(batched.heads[h].per_sample, name),
                                       getattr(serial.heads[h].per_sample, name), rtol=1e-8, atol=1e-12)
    assert float(batched.pct) < 1e-20
    # chunks: every structure once, each chunk its own rotations; MACE's L_equiv stays float noise
    chunked = fa.equivariance_error(calc, atoms, chunk_size=3, **kw)
    assert chunked.per_sample.total.shape == (4,) and float(chunked.pct) < 1e-20
    torch.testing.assert_close(chunked.heads["forces"].per_sample.total[:3],
                               fa.equivariance_error(calc, atoms[:3], **kw).heads["forces"].per_sample.total)


def test_batched_route_is_refused_where_it_cannot_apply(calc):
    mixed = structures(False, 2) + structures(True, 2)
    with pytest.raises(ValueError, match="mixes periodic and non-periodic"):
        fa.equivariance_error(calc, mixed, batched=True, samples=2)
    d = fa.equivariance_error(calc, mixed, samples=2, seed=1)  # the stress only where periodic: serial
    assert set(d.heads) == {"energy", "forces", "stress"}
    from ase.calculators.emt import EMT

    with pytest.raises(ValueError, match="does not recognise the calculator EMT"):
        fa.equivariance_error(EMT(), structures(False, 1), batched=True)


def test_twirled_calculator_batched_equals_serial(calc):
    atoms = structures(True, 1, seed=4)[0]
    values = {}
    for batched in (True, False):
        a = atoms.copy()
        a.calc = fa.TwirledCalculator(calc, samples=5, seed=2, batched=batched)
        values[batched] = (a.get_potential_energy(), a.get_forces(), a.get_stress())
    for x, y in zip(values[True], values[False]):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-10)


def test_targets_is_the_deprecated_name_of_target(calc):
    atoms = structures(False, 2)
    with pytest.warns(DeprecationWarning, match="target="):
        old = fa.equivariance_error(calc, atoms, targets=[{"energy": 0.0, "forces": np.zeros((len(a), 3))}
                                                          for a in atoms], samples=2, seed=0)
    new = fa.equivariance_error(calc, atoms, [{"energy": 0.0, "forces": np.zeros((len(a), 3))} for a in atoms],
                                samples=2, seed=0)
    torch.testing.assert_close(old.total, new.total)
