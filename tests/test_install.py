"""Installs beside MLIP codebases, and without the optional extras: e3nn is imported only
where irreps are used, so fastequiv works where e3nn is missing (it is the ``e3nn`` extra)
or cannot import (e3nn 0.4.4 on torch >= 2.6 without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, as
MACE users meet it); irreps then raise an error naming the extra. And a source checkout
that shadows the installed package says so when imported."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_everything_but_irreps_works_when_e3nn_cannot_import():
    code = textwrap.dedent("""
        import sys
        for missing in ("e3nn", "matplotlib", "tqdm"):  # the optional extras: [e3nn], [demo]
            sys.modules[missing] = None  # "import e3nn" now raises ImportError, as a missing or broken one does
        import torch, fastequiv as fe
        assert "e3nn" not in [m for m in sys.modules if m.startswith("e3nn") and sys.modules[m] is not None]
        x = torch.randn(4, 5, 3, dtype=torch.float64)
        spec = fe.Spec(inputs="position", output={"f": "vector", "s": "rank2", "e": "scalar"})
        def model(p):
            q = p - p.mean(1, keepdim=True)  # positions turn about their centroid
            return {"f": q, "s": q[:, :3, :, None] * q[:, :3, None, :], "e": (q ** 2).sum((1, 2))[:, None]}
        target = model(x)
        d = fe.equivariance_error(model, x, target, spec=spec, samples=4, seed=0)
        assert float(d.equiv) < 1e-20, float(d.equiv)
        fe.random_rotations(10, seed=1)
        try:
            fe.Spec(inputs="1x1o", output="1x1o")
        except ImportError as err:
            print("irreps need e3nn:", err)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())  # the installed package, not the checkout
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    assert "irreps need e3nn" in res.stdout and 'pip install "fastequiv[e3nn]"' in res.stdout


_REPORT = textwrap.dedent("""
    import json, warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        import fastequiv
        info = fastequiv.build_info()
    print(json.dumps({"file": fastequiv.__file__, "info": info,
                      "warnings": [[w.category.__name__, str(w.message)] for w in seen]}))
""")


def _report(cwd, **env):
    res = subprocess.run([sys.executable, "-c", _REPORT], capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_source_checkout_without_the_extension_says_so(tmp_path):
    """``python -c "import fastequiv"`` in a source checkout imports the uncompiled tree: one
    warning says so and what to do, and build_info reports every compiled backend (Triton's
    too: its kernels are not in the tree) unavailable with the reason."""
    src = tmp_path / "checkout"
    shutil.copytree(ROOT / "fastequiv", src / "fastequiv", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = _report(src, TRITON_INTERPRET="1")
    assert Path(out["file"]).resolve().is_relative_to(src.resolve())  # the copy, not the installed package
    warned = [msg for cat, msg in out["warnings"] if "source checkout" in msg]
    assert len(warned) == 1 and [cat for cat, msg in out["warnings"] if msg in warned] == ["UserWarning"]
    assert "fastequiv._C" in warned[0] and "pip install" in warned[0] and "another directory" in warned[0]
    info = out["info"]
    assert not info["extension"] and "source checkout" in info["extension_error"]
    assert info["backends"] == ["torch"]
    assert "fastequiv._C" in info["unavailable"]["cpu"]
    if importlib.util.find_spec("triton") is not None:  # else the reason is that triton is missing
        assert "fastequiv.kernels" in info["unavailable"]["triton"], info["unavailable"]["triton"]


def test_the_installed_package_does_not_warn(tmp_path):
    out = _report(tmp_path, TRITON_INTERPRET="1")
    assert not Path(out["file"]).resolve().is_relative_to(ROOT / "fastequiv")
    assert not [msg for _, msg in out["warnings"] if "source checkout" in msg]
    assert out["info"]["extension"], out["info"]["extension_error"]
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in out["info"]["backends"], out["info"]["unavailable"].get("triton")
