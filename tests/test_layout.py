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


# ---------------------------------------------------------------------- private names
# A name with a leading underscore belongs to its module: no other library module imports
# it (``from .base import _helper``); a helper another module needs is made public or
# moved. A private module (``cli/_args.py``) belongs to its package: modules inside that
# package may import it, nothing outside may. Tests are exempt: they may reach a module's
# privates for white-box checks of that module.



def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_file(dotted: str):
    """The file (module or package __init__) of ``ddspo_fast.a.b``, or None."""
    base = PKG.parent.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def private_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for each import in ``path`` of another module's private
    name or of a private module outside its package (``name`` is "" for a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = path.relative_to(PKG.parent).with_suffix("").parts
    pkg = own[:-1]  # the package this module is in

    def inside(package: tuple) -> bool:
        return own[:len(package)] == package

    def private_module(parts: tuple) -> bool:
        # a private component is visible only inside the package holding it
        return any(_is_private(p) and not inside(parts[:i]) for i, p in enumerate(parts))

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                parts = tuple(base) + (tuple(node.module.split(".")) if node.module else ())
            else:
                parts = tuple((node.module or "").split("."))
            if parts[0] != "ddspo_fast":
                continue
            if private_module(parts):
                out.append((node.lineno, ".".join(parts), ""))
                continue
            for alias in node.names:
                if not _is_private(alias.name):
                    continue
                sub = parts + (alias.name,)
                if _module_file(".".join(sub)) is not None:  # a submodule: package-private
                    if private_module(sub):
                        out.append((node.lineno, ".".join(parts), alias.name))
                elif parts != own:
                    out.append((node.lineno, ".".join(parts), alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = tuple(alias.name.split("."))
                if parts[0] == "ddspo_fast" and private_module(parts):
                    out.append((node.lineno, alias.name, ""))
    return out


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_another_modules_private_names(path):
    rel = path.relative_to(PKG).as_posix()
    bad = [f"line {ln}: from {mod} import {name}" if name else f"line {ln}: imports {mod}"
           for ln, mod, name in private_imports(path)]
    assert not bad, (f"{rel} imports private names of other modules (make the helper public "
                     f"or move it): {bad}")


def test_the_private_import_rule_catches_each_form(tmp_path, monkeypatch):
    """The rule on made-up modules: what it refuses and what it allows."""
    root = tmp_path / "ddspo_fast"
    for rel in ("__init__.py", "_version.py", "a/__init__.py", "a/_impl.py", "a/mod.py",
                "b/__init__.py", "b/user.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    monkeypatch.setitem(globals(), "PKG", root)
    cases = {
        "from ..a.mod import _helper": True,        # another module's private name
        "from ..a import _impl": True,              # a private module of another package
        "from ..a._impl import thing": True,
        "import ddspo_fast.a._impl": True,
        "from ddspo_fast.a.mod import _helper": True,
        "from ..a.mod import helper": False,
        "from .._version import __version__": False,  # a top-level private module: everyone's
        "from . import user": False,
    }
    user = root / "b" / "user.py"
    for src, refused in cases.items():
        user.write_text(src + "\n")
        assert bool(private_imports(user)) == refused, src
    inner = root / "a" / "mod.py"
    for src in ("from . import _impl", "from ._impl import thing", "from ddspo_fast.a._impl import x"):
        inner.write_text(src + "\n")
        assert not private_imports(inner), src  # inside its package


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
