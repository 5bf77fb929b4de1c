"""The package's architecture: imports only go down the layers, with no cycle.

Every import in ``fastequiv/`` and ``kernels/`` (shipped as ``fastequiv.kernels``) is read
with ``ast``, the ones inside functions included, and checked against the layer table
below (the layers of the design notes, bottom first). A module may import its own layer
or a lower one; a cycle among the modules of one layer fails too. No private name (a
leading underscore) is imported from another fastequiv module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (layer, module prefixes), bottom first; a module belongs to the first entry whose
# prefix matches its dotted name (a package's __init__ is the package's own name)
LAYERS = [
    ("math", ["fastequiv.groups", "fastequiv.wigner", "fastequiv.estimators", "fastequiv.grid",
              "fastequiv.tolerances", "fastequiv.linalg", "fastequiv.designs"]),
    ("reps", ["fastequiv.reps", "fastequiv.graph", "fastequiv.spec"]),
    ("backends", ["fastequiv.kernels", "fastequiv.backends"]),
    ("ops", ["fastequiv.ops"]),
    ("stacking", ["fastequiv.stacking", "fastequiv.adapted"]),
    ("api", ["fastequiv.twirl", "fastequiv.monitor", "fastequiv.lie", "fastequiv.distributed",
             "fastequiv.voxels", "fastequiv.diagnostics", "fastequiv.frames", "fastequiv.penalty",
             "fastequiv.design_twirl", "fastequiv.design_planned"]),
    # where users work: each codebase's adapter, ASE, training integrations (lazy imports of theirs)
    ("integrations", ["fastequiv.adapters", "fastequiv.ase", "fastequiv.ase_batched", "fastequiv.lightning"]),
    ("package", ["fastequiv"]),  # fastequiv/__init__.py gathers the public API
    ("top", ["fastequiv.__main__", "fastequiv.demo", "fastequiv.bench", "fastequiv.check", "fastequiv.audit"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "fastequiv", "fastequiv"), (ROOT / "kernels", "fastequiv.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix] + parts)] = path
    return mods


MODULES = _modules()


def _layer(module: str) -> int:
    best, rank = None, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best)):
                best, rank = p, i
    assert rank is not None, f"{module} is in no layer of the table"
    return rank


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every fastequiv import in ``path``."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastequiv":
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastequiv":
                continue
            names = [a.name for a in node.names]
            # "from pkg import mod" imports the module pkg.mod
            for name in names:
                sub = f"{target}.{name}"
                found.append((sub, [], node.lineno) if sub in MODULES else (target, [name], node.lineno))
    return found


def _resolve(target: str) -> str:
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def _edges():
    for module, path in sorted(MODULES.items()):
        for target, names, line in _imports(module, path):
            yield module, _resolve(target), names, f"{path.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down():
    wrong = [f"{where}: {src} ({LAYERS[_layer(src)][0]}) imports {dst} ({LAYERS[_layer(dst)][0]})"
             for src, dst, _, where in _edges() if src != dst and _layer(dst) > _layer(src)]
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for src, dst, _, _ in _edges():
        if src != dst and not src.startswith(dst + "."):  # a submodule may read its package
            graph[src].add(dst)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_crosses_modules():
    wrong = {f"{where}: {src} imports {dst}.{name}" for src, dst, names, where in _edges()
             for name in names if name.startswith("_") and dst != src}
    wrong |= {f"{where}: {src} imports the private module {dst}" for src, dst, _, where in _edges()
              if dst != src and any(part.startswith("_") and part not in ("__main__", "_C") for part in dst.split("."))}
    assert not wrong, "private names imported across modules:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The walk above finds what it must: a function-level import counts, relative imports
    resolve, and the layer table orders the API above the ops."""
    assert _layer("fastequiv.twirl") > _layer("fastequiv.ops.twirl_reduce") > _layer("fastequiv.backends.native")
    assert _layer("fastequiv.wigner") < _layer("fastequiv.reps")
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..twirl import twirl_loss\n    from . import layout\n")
    found = _imports("fastequiv.ops.m", src)
    assert ("fastequiv.twirl", ["twirl_loss"], 2) in found
    assert ("fastequiv.ops.layout", [], 3) in found
