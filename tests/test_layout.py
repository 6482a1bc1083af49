"""The import rules of docs/design.md, checked on the source: each layer imports only the
layers below it, so the loss can be used without the trainer and the trainer without the
CLI. A new import that breaks a rule fails here, naming the module and the import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ddspo_fast"

# layer -> the ddspo_fast layers it may import (besides itself, _version, fsio, safeload, devices).
ALLOWED = {
    "loss": set(),
    "fsio": set(),
    "safeload": set(),
    "devices": set(),
    "models": set(),
    "data": {"models"},
    "train": {"loss", "models", "data"},
    "evaluation": {"models", "data", "train"},
    "evaluate": {"evaluation"},
    "testing": {"models", "data"},
    "bench": {"loss", "models", "data", "train", "testing"},
    "plan": {"loss", "models", "data", "train", "testing", "bench"},
    "demo": {"loss", "models", "data", "train", "testing", "evaluation", "evaluate"},
    "cli": {"loss", "models", "data", "train", "testing", "evaluation", "evaluate", "bench", "plan", "demo"},
}
ALWAYS = {"_version", "fsio", "safeload", "devices"}


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


# ---------------------------------------------------------------------- no unpickling
# Only this module may call torch.load, each call naming weights_only; nothing in the
# library unpickles otherwise (docs/design.md section 7).
SAFE_LOADER = "safeload.py"
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                   "marshal"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "?"
    return None


def unpickling_calls(source: str, *, audited: bool = False) -> list[str]:
    """Where ``source`` may unpickle a file: torch.load (anywhere but the audited module,
    and there without an explicit weights_only), pickle-family loaders, numpy.load with
    allow_pickle=True."""
    bad = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in _PICKLE_MODULES:
                    bad.append(f"line {node.lineno}: imports {m}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch") \
                    and any(a.name == "load" for a in node.names):
                bad.append(f"line {node.lineno}: imports load from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if not isinstance(f, ast.Attribute):
            continue
        owner = f.value
        owner_name = owner.id if isinstance(owner, ast.Name) else (
            owner.attr if isinstance(owner, ast.Attribute) else "")
        if f.attr == "load" and owner_name in ("torch", "serialization"):
            wo = _kw(node, "weights_only")
            if not audited:
                bad.append(f"line {node.lineno}: torch.load outside ddspo_fast/{SAFE_LOADER}")
            elif wo is None:
                bad.append(f"line {node.lineno}: torch.load without an explicit weights_only")
        elif f.attr in ("load", "loads", "Unpickler") and owner_name in _PICKLE_MODULES:
            bad.append(f"line {node.lineno}: {owner_name}.{f.attr}")
        elif f.attr == "load" and owner_name in ("np", "numpy") \
                and _kw(node, "allow_pickle") not in (None, False):
            bad.append(f"line {node.lineno}: numpy.load with allow_pickle")
    return bad


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_nothing_unpickles_outside_the_audited_loader(path):
    audited = path.relative_to(PKG).as_posix() == SAFE_LOADER
    bad = unpickling_calls(path.read_text(encoding="utf-8"), audited=audited)
    assert not bad, f"{path.relative_to(PKG)} may unpickle a file (use ddspo_fast.safeload): {bad}"


def test_the_unpickling_rule_catches_each_form():
    forms = ["import torch\ntorch.load(f)", "import torch\ntorch.load(f, weights_only=True)",
             "import pickle\npickle.loads(b)", "from pickle import load",
             "import numpy as np\nnp.load(f, allow_pickle=True)",
             "import torch\ntorch.serialization.load(f)", "from torch import load",
             "import dill"]
    for src in forms:
        assert unpickling_calls(src), src
    assert unpickling_calls("import torch\ntorch.load(f)", audited=True)
    assert not unpickling_calls("import torch\ntorch.load(f, weights_only=True)", audited=True)
    assert not unpickling_calls("import numpy as np\nnp.load(f)\njson.load(g)")
