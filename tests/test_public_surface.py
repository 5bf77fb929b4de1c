"""The public functions agree with each other: the shared arguments' names and defaults
are those of the README's convention table, and a training step does not sync."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import fastequiv as fe
from fastequiv import diagnostics

README = Path(__file__).resolve().parents[1] / "README.md"


def _table() -> dict:
    """``{argument: default}`` from the table after the README's conventions marker."""
    text = README.read_text()
    start = text.index("<!-- conventions:")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`", cells[0])
        if m:
            rows[m.group(1)] = eval(cells[-1].strip("`"))  # the defaults are Python literals
    return rows


def _public():
    import fastequiv.ase as fa

    return {
        "equivariance_error": fe.equivariance_error,
        "design_error": fe.design_error,
        "twirl_loss": fe.twirl_loss,
        "Twirled": fe.Twirled.__init__,
        "FrameAveraged": fe.FrameAveraged.__init__,
        "EquivarianceMonitor": fe.EquivarianceMonitor.__init__,
        "lie_derivative": fe.lie_derivative,
        "lie_loss": fe.lie_loss,
        "gradient_alignment": diagnostics.gradient_alignment,
        "hessian_spectrum": diagnostics.hessian_spectrum,
        "equivariance_per_element": diagnostics.equivariance_per_element,
        "log_dynamics": diagnostics.log_dynamics,
        "ase.equivariance_error": fa.equivariance_error,
        "ase.TwirledCalculator": fa.TwirledCalculator.__init__,
    }


# the differences the README states, each with its reason there
DIFFERENT = {
    ("EquivarianceMonitor", "seed"): 0,
    ("ase.TwirledCalculator", "seed"): 0,
    ("twirl_loss", "check_finite"): False,
    ("EquivarianceMonitor", "check_finite"): False,
}
# functions without an argument of the table, as the README says
ABSENT = {"lie_derivative": {"samples", "seed", "generator", "chunk_size", "check_finite"},
          "lie_loss": {"samples", "seed", "generator", "chunk_size", "check_finite"},
          "FrameAveraged": {"generator"},
          "ase.equivariance_error": {"spec", "check_finite"},
          "ase.TwirledCalculator": {"spec", "generator", "chunk_size", "check_finite"},
          "EquivarianceMonitor": {"generator"}, "Twirled": {"generator"},
          "design_error": {"samples"}}


def test_the_table_is_read():
    table = _table()
    assert set(table) == {"spec", "samples", "seed", "generator", "chunk_size", "backend", "check_finite"}
    assert table["backend"] == "auto" and table["check_finite"] is True


@pytest.mark.parametrize("name", sorted(_public()))
def test_shared_arguments_have_the_tables_names_and_defaults(name):
    table = _table()
    params = inspect.signature(_public()[name]).parameters
    text = README.read_text()
    for arg, default in table.items():
        if arg in ABSENT.get(name, set()):
            assert arg not in params, f"{name} takes {arg}: drop it from ABSENT"
            continue
        assert arg in params, f"{name} has no {arg}= (the README's table says every public function does)"
        p = params[arg]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {arg} must be keyword-only"
        want = DIFFERENT.get((name, arg), default)
        assert p.default == want and type(p.default) is type(want), (name, arg, p.default, want)
        if (name, arg) in DIFFERENT:  # a documented difference
            assert f"{name.split('.')[-1]}" in text


def test_a_dense_twirl_loss_step_reads_nothing_from_the_device(monkeypatch):
    """No .item(), .tolist(), bool() or float() of a tensor along twirl_loss's path with the
    defaults: each would be a host sync on a GPU. The "cpu" backend reads its seed tensor
    with int() (host memory: no sync, and the GPU backends read it on the device), so the
    Python path is checked with the torch reference ops, which read nothing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    spec = fe.Spec(inputs={"pos": "position"}, output={"forces": "vector"})
    x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    model = lambda pos: {"forces": net(pos)}  # noqa: E731
    fe.twirl_loss(model, {"pos": x}, {"forces": y}, spec=spec, seed=1)  # warm: lazy tables, imports

    def sync(*args, **kwargs):
        raise AssertionError("a host sync on the twirl_loss path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss, d = fe.twirl_loss(model, {"pos": x}, {"forces": y}, spec=spec, backend="torch")
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)
    # with check_finite=True it does read: the test would see it
    for name in ("tolist",):
        monkeypatch.setattr(torch.Tensor, name, sync)
    with pytest.raises(AssertionError, match="host sync"):
        fe.twirl_loss(model, {"pos": x}, {"forces": y}, spec=spec, check_finite=True, backend="torch")


def test_the_design_arguments_have_one_name_and_default_everywhere():
    """``rotations=`` (None: i.i.d. draws) and ``replicates=`` (None: 2 with a design) where
    a function takes them; ``design_error`` always measures over a design."""
    import fastequiv.ase as fa
    from fastequiv.audit import audit

    takes = {"equivariance_error": fe.equivariance_error, "twirl_loss": fe.twirl_loss,
             "EquivarianceMonitor": fe.EquivarianceMonitor.__init__, "audit": audit,
             "Twirled": fe.Twirled.__init__, "FrameAveraged": fe.FrameAveraged.__init__,
             "ase.TwirledCalculator": fa.TwirledCalculator.__init__, "ase.equivariance_error": fa.equivariance_error}
    turned = {"equivariance_error", "twirl_loss", "EquivarianceMonitor", "audit", "ase.equivariance_error"}
    for name, fn in takes.items():
        params = inspect.signature(fn).parameters
        assert params["rotations"].default is None and params["rotations"].kind is inspect.Parameter.KEYWORD_ONLY, name
        if name in turned:
            assert params["replicates"].default is None, name
        else:  # averages over the design itself: nothing is turned, nothing replicated
            assert "replicates" not in params, name
    params = inspect.signature(fe.design_error).parameters
    assert params["rotations"].default == "design:3" and params["replicates"].default == 2
