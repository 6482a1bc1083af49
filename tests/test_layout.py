"""The import rules of docs/design.md, checked on the source: each layer imports only the
layers below it, so the loss can be used without the trainer and the trainer without the
CLI. A new import that breaks a rule fails here, naming the module and the import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ddspo_fast"

# layer -> the ddspo_fast layers it may import (besides itself, _version and fsio).
ALLOWED = {
    "loss": set(),
    "fsio": set(),
    "models": set(),
    "data": {"models"},
    "train": {"loss", "models", "data"},
    "evaluate": {"models", "data", "train"},
    "testing": {"models", "data"},
    "bench": {"loss", "models", "data", "train", "testing"},
    "plan": {"loss", "models", "data", "train", "testing", "bench"},
    "demo": {"loss", "models", "data", "train", "testing", "evaluate"},
    "cli": {"loss", "models", "data", "train", "testing", "evaluate", "bench", "plan", "demo"},
}
ALWAYS = {"_version", "fsio"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_layers(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg_parts = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ddspo_fast" and len(parts) > 1:
                yield node.lineno, parts[1]


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if _layer(p) in ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_imports_only_lower_layers(path):
    layer = _layer(path)
    bad = [f"line {ln}: imports ddspo_fast.{target}"
           for ln, target in _imported_layers(path)
           if target != layer and target not in ALWAYS and target in ALLOWED
           and target not in ALLOWED[layer]]
    assert not bad, f"{path.relative_to(PKG)} (layer {layer!r}) breaks docs/design.md's rules: {bad}"


def test_every_subpackage_has_a_layer():
    """A new top-level module or subpackage must be placed in the rules above."""
    tops = {p.name.removesuffix(".py") for p in PKG.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
            and p.name not in ("__init__.py", "__main__.py", "_version.py")}
    assert tops <= set(ALLOWED), f"place these in tests/test_layout.py and docs/design.md: {tops - set(ALLOWED)}"
