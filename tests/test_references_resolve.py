"""The GPU-only tests and the benchmarks never run in CI (no GPU), so a renamed or moved function
would first fail on the GPU machine. Check statically that every ``module.name`` they use, for
modules of fp4_compile, exists."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.joinpath("tests").glob("test_*.py"), *ROOT.joinpath("benchmarks").glob("*.py")])


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to fp4_compile modules: ``import fp4_compile.x as y`` and
    ``from fp4_compile.x import y`` where y is itself a module."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fp4_compile") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fp4_compile"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                try:
                    importlib.import_module(full)
                except ImportError:
                    continue  # a function or class, not a module
                aliases[a.asname or a.name] = full
    return aliases


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fp4_compile_attributes_exist(path):
    tree = ast.parse(path.read_text())
    aliases = _module_aliases(tree)
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    missing = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.value.id not in assigned and isinstance(node.ctx, ast.Load)):
            module = importlib.import_module(aliases[node.value.id])
            if not hasattr(module, node.attr):
                missing.append(f"line {node.lineno}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not missing, missing


def test_no_undefined_names():
    """Names a module, test or benchmark uses but never defines (pyflakes): the GPU-only code paths
    would otherwise first fail on the GPU machine (a constant lost in an edit did, in session 5)."""
    from pyflakes import api, reporter

    class Collect(reporter.Reporter):
        def __init__(self):
            self.messages = []

        def flake(self, message):
            self.messages.append(str(message))

        def syntaxError(self, *args):
            self.messages.append(f"syntax error: {args}")

        def unexpectedError(self, filename, msg):
            self.messages.append(f"{filename}: {msg}")

    found = Collect()
    paths = [ROOT / "fp4_compile", ROOT / "benchmarks", ROOT / "tests"]
    api.checkRecursive([str(p) for p in paths], found)
    bad = [m for m in found.messages if "undefined name" in m or "syntax error" in m or "problem decoding" in m]
    assert not bad, "\n".join(bad)
