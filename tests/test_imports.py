"""The package's imports point one way (issue 13; shared/STYLE.md "Where the house is going").

Each module of pysparse sits in one layer; a module may import modules of its own layer's
*lower* layers only — never a higher layer, and never a sibling in the same layer (quantize and
sparsify are independent conversions). Modules inside one package (pysparse.prune.*,
pysparse.bench.*) may import each other. Every module must be placed: a new module that is
not in LAYERS fails the test, so its place is decided when it is added.

Imports are read from the source (ast), function-level imports included, so a lazy import
cannot hide a cycle.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pysparse")

# Lowest first. Within a layer, the entries are independent of each other.
LAYERS: list[list[str]] = [
    ["pysparse._C", "pysparse.reference", "pysparse.kernels"],
    ["pysparse.formats"],
    ["pysparse.ops", "pysparse._cuda_ops", "pysparse._cuda_bsr", "pysparse.ops_conv", "pysparse.ops_int8conv"],
    ["pysparse.nn"],
    ["pysparse._modules", "pysparse._depgraph", "pysparse._timing", "pysparse._metric"],
    ["pysparse.prune"],
    ["pysparse.compact", "pysparse.quantize", "pysparse.sparsify"],
    ["pysparse.recover"],  # distillation: compress chains it as a step
    ["pysparse.compress", "pysparse.plan", "pysparse.serve"],
    ["pysparse"],  # the package's __init__ (the public API; this entry is the root module alone)
    ["pysparse.cnn_digits"],  # the digits CNN task (data, model, the prune-compact-finetune recipe)
    ["pysparse.bench"],
    ["pysparse.demo"],
    ["pysparse.__main__"],
]
# Ordered pairs allowed inside one layer: (importer, imported).
SAME_LAYER_OK = {("pysparse._cuda_bsr", "pysparse._cuda_ops"), ("pysparse.ops", "pysparse._cuda_ops"),
                 ("pysparse.ops", "pysparse._cuda_bsr"), ("pysparse._depgraph", "pysparse._modules"),
                 ("pysparse.ops_conv", "pysparse.ops"), ("pysparse.ops_conv", "pysparse._cuda_ops"),
                 ("pysparse.ops", "pysparse.ops_int8conv")}


def _unit(mod: str) -> tuple[int, str]:
    """(layer index, entry) of a module: the longest LAYERS entry that is it or a package above it."""
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            under = mod.startswith(entry + ".") and entry != "pysparse"
            if (mod == entry or under) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        raise AssertionError(f"{mod} is in no layer of tests/test_imports.py LAYERS: give it its place")
    return best


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(mod: str, path: str) -> list[tuple[str, int]]:
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = []
    skip_lines: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for type hints only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                skip_lines.add(getattr(sub, "lineno", -1))
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip_lines:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pysparse"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pysparse":
                continue
            # `from . import x` / `from .pkg import x`: x may be a submodule
            names = [f"{target}.{a.name}" for a in node.names]
            out += [(n if n in MODULES or n == "pysparse._C" else target, node.lineno) for n in names]
    return out


MODULES = _modules()


def _violations() -> list[str]:
    bad = []
    for mod, path in sorted(MODULES.items()):
        li, entry = _unit(mod)
        for target, line in _imports(mod, path):
            if target.startswith("pysparse._C"):
                target = "pysparse._C"
            ti, tentry = _unit(target)
            if tentry == entry:
                continue  # inside one package
            if ti > li or (ti == li and (entry, tentry) not in SAME_LAYER_OK):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {mod} (layer {li}) imports {target} (layer {ti})")
    return bad


def test_imports_point_one_way():
    bad = _violations()
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for mod in MODULES:
        _unit(mod)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    # The checker itself can fail: a formats module that imports nn is reported.
    fake = tmp_path / "formats.py"
    fake.write_text("from .nn import Int8Linear\n")
    monkeypatch.setitem(MODULES, "pysparse.formats", str(fake))
    assert any("pysparse.formats" in v and "pysparse.nn" in v for v in _violations())


@pytest.mark.parametrize("mod", ["pysparse.prune", "pysparse.quantize", "pysparse.sparsify", "pysparse.nn"])
def test_imports_alone(mod):
    # Each layer imports by itself in a fresh interpreter (no cycle hidden by import order).
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
