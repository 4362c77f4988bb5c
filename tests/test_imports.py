"""Every ``pagedkv`` import written in the tests and experiments resolves, including the ones inside GPU-only test
functions, which a CPU run never executes: stop 26 found two such imports left stale by the package's
restructuring (``pagedkv.engine.sampler``, ``pagedkv.kv_cache``) when the GPU suite failed on them. Likewise every
attribute a test or experiment reads from a pagedkv module it imported (``decode.paged_attention``)."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))


def _pagedkv_imports(path: Path):
    """(line, module, name or None) of every absolute ``pagedkv`` import in ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pagedkv":
            yield from ((node.lineno, node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "pagedkv")


def _resolves(module: str, name: str | None) -> str | None:
    """None when ``from module import name`` (or ``import module``) would work, else why not."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return _ours(exc) and f"{module}: {exc}"
    if name is None or name == "*" or hasattr(mod, name):
        return None
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError as exc:
        return _ours(exc) and f"{module} has no {name!r}"
    return None


def _ours(exc: ImportError) -> bool:
    """The failure is pagedkv's (a stale path), not an optional third-party package missing here."""
    return not isinstance(exc, ModuleNotFoundError) or (exc.name or "pagedkv").split(".")[0] == "pagedkv"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_pagedkv_import_resolves(path):
    stale = [f"line {line}: {why}" for line, module, name in _pagedkv_imports(path)
             if (why := _resolves(module, name))]
    assert not stale, f"{path.name}: " + "; ".join(stale)


def _module_aliases(tree) -> dict:
    """Names bound to pagedkv modules in a file (``from pagedkv.kernels import decode``, ``import pagedkv``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pagedkv":
            for alias in node.names:
                try:
                    obj = getattr(importlib.import_module(node.module), alias.name, None)
                    obj = obj if obj is not None else importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    continue  # an optional package missing here (the import test above judges the path)
                if isinstance(obj, type(importlib)):
                    aliases[alias.asname or alias.name] = obj
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pagedkv":
                    name = alias.asname or alias.name.split(".")[0]
                    aliases[name] = importlib.import_module(alias.name if alias.asname else name)
    return aliases


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_pagedkv_module_attribute_read_exists(path):
    """``decode.paged_attention``-style reads of a pagedkv module's attribute name something the module has (a
    rename leaves GPU-only tests calling a function that is gone; a CPU run never executes them). Writes
    (monkeypatch targets) are not reads."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = _module_aliases(tree)
    stale = [f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
             and node.value.id in aliases and not hasattr(aliases[node.value.id], node.attr)]
    assert not stale, f"{path.name}: " + "; ".join(stale)
