"""The library's layers, read from its imports: core < data < mechanisms < experiments.

* core imports only core;
* data (readers of the project's data files) imports core and data;
* mechanisms import core and mechanisms, never data or an experiment;
* experiments import core, data and mechanisms, and never another experiment module.

Every import counts, also those inside functions, and both ``from lmbook.x import y`` and
``import lmbook.x``.
"""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib" / "lmbook"
LAYERS = ["core", "data", "mechanisms", "experiments"]
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "mechanisms": {"core", "mechanisms"},
    "experiments": {"core", "data", "mechanisms"},
}


def lmbook_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every lmbook module ``path`` imports, relative imports resolved."""
    package = ["lmbook", *path.relative_to(LIB).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "lmbook" or n.startswith("lmbook.")]
    return out


def violations(path: Path) -> list[str]:
    rel = path.relative_to(LIB)
    if len(rel.parts) < 2:  # lmbook/__init__.py
        return []
    layer = rel.parts[0]
    bad = []
    for line, name in lmbook_imports(path):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            continue  # the top-level package (PROJECT_ROOT, ParameterError re-exported from core)
        target = parts[1]
        if layer == target == "experiments":
            bad.append(f"{rel}:{line} imports {name}: an experiment never imports another experiment")
        elif target not in ALLOWED[layer]:
            bad.append(f"{rel}:{line} imports {name}: the {layer} layer may import only {sorted(ALLOWED[layer])}")
    return bad


def test_every_module_sits_in_a_layer():
    loose = [p.name for p in LIB.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"
    assert sorted(p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(LIB)))
def test_imports_respect_the_layers(path):
    assert not violations(path), "\n".join(violations(path))


def test_the_check_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself fails on each kind of forbidden import (so a green run means something)."""
    fake = tmp_path / "lmbook"
    for layer in LAYERS:
        (fake / layer).mkdir(parents=True)
    cases = {
        "experiments/a.py": "from lmbook.experiments.b import x\n",
        "mechanisms/m.py": "def f():\n    from lmbook.experiments.a import y\n",
        "data/d.py": "import lmbook.mechanisms.readout\n",
        "core/c.py": "from lmbook.data import facts\n",
        "experiments/ok.py": "from lmbook.mechanisms.readout import lens_on_states\nfrom lmbook.core import tokens\n",
    }
    for rel, src in cases.items():
        (fake / rel).write_text(src)
    monkeypatch.setattr(__import__(__name__), "LIB", fake)
    found = {rel: violations(fake / rel) for rel in cases}
    assert all(found[rel] for rel in cases if rel != "experiments/ok.py"), found
    assert found["experiments/ok.py"] == []
