"""Installs beside MLIP codebases, and without the optional extras: e3nn is imported only
where irreps are used, so fastequiv works where e3nn is missing (it is the ``e3nn`` extra)
or cannot import (e3nn 0.4.4 on torch >= 2.6 without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, as
MACE users meet it); irreps then raise an error naming the extra."""

import subprocess
import sys
import tempfile
import textwrap


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
