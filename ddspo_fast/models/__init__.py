"""Model-family adapters: one module and one class per family.

    from ddspo_fast.models import get_family, detect_family, load_adapter
    cls = get_family("sdxl")                 # the adapter class
    fam = detect_family("/models/sdxl")      # "sdxl", from model_index.json
    adapter = load_adapter("/models/sdxl", components=("denoiser", "text"))

``FAMILIES`` is the one registry of families: the config's choices, the precompute CLI,
the tiny models of ``testing`` and every other family list derive from it, when they are
asked (``family_names()``), so a family registered later counts. A family defined
elsewhere joins with ``register_family(cls)``, or from outside the process:

* ``DDSPO_FAST_FAMILIES="mypkg.families,other.module:MyAdapter"``: each comma-separated
  entry is a module to import (its import calls ``register_family``) or ``module:attr``
  naming an adapter class, a list of them, or a function that registers them;
* an installed package's entry point in the group ``ddspo_fast.families`` (same forms).

Both are read when the registry is first asked (and again if the variable changes).
"""

from __future__ import annotations

import importlib
import os
import types
from typing import Any, Mapping, Optional, Sequence

import torch

from .base import FamilyAdapter, read_model_index
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .qwen_image import QwenImageAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .sd15 import SD15Adapter
from .sdxl import SDXLAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {}

PLUGIN_ENV = "DDSPO_FAST_FAMILIES"
ENTRY_POINT_GROUP = "ddspo_fast.families"

__all__ = ["FAMILIES", "FamilyAdapter", "get_family", "detect_family", "family_of_pipeline",
           "load_adapter", "register_family", "family_names", "load_family_plugins", "SD15Adapter", "SDXLAdapter",
           "SD3Adapter", "SanaAdapter", "FluxAdapter", "QwenImageAdapter",
           "Flux2Adapter"]


def register_family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Add an adapter class to ``FAMILIES`` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, FamilyAdapter)) or not cls.name:
        raise ValueError(f"family: expected a named FamilyAdapter subclass, got {cls!r}")
    if FAMILIES.get(cls.name, cls) is not cls:
        raise ValueError(f"family: {cls.name!r} is already registered "
                         f"({FAMILIES[cls.name].__name__})")
    FAMILIES[cls.name] = cls
    return cls


for _cls in (SD15Adapter, SDXLAdapter, SD3Adapter, SanaAdapter, FluxAdapter, QwenImageAdapter,
             Flux2Adapter):
    register_family(_cls)


_LOADED: set[str] = set()  # plugin entries already imported (each once per process)


def _register_from(obj, where: str) -> None:
    """Register what a plugin entry names: an adapter class, a list of them, or a
    function that registers its families itself (a module needs nothing: importing it
    registered them)."""
    if isinstance(obj, type):
        register_family(obj)
    elif isinstance(obj, (list, tuple)):
        for cls in obj:
            _register_from(cls, where)
    elif callable(obj):
        obj()
    elif not isinstance(obj, types.ModuleType):
        raise ValueError(f"{where}: expected a FamilyAdapter subclass, a list of them, a "
                         f"function or a module, got {obj!r}")


def _load_entry(spec: str, where: str) -> None:
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot load the family plugin {spec!r} "
                         f"({type(e).__name__}: {e})") from e
    _register_from(obj, where)


def load_family_plugins() -> None:
    """Import the families named by ``DDSPO_FAST_FAMILIES`` and the ``ddspo_fast.families``
    entry points (each entry once per process). Every registry query calls this."""
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGIN_ENV, "").split(","))):
        if spec not in _LOADED:
            _LOADED.add(spec)
            try:
                _load_entry(spec, PLUGIN_ENV)
            except BaseException:
                _LOADED.discard(spec)  # say so again next time, not silently pass
                raise
    if "entry-points" not in _LOADED:
        from importlib.metadata import entry_points

        _LOADED.add("entry-points")
        try:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                where = f"entry point {ep.name!r} ({ENTRY_POINT_GROUP})"
                try:
                    obj = ep.load()
                except (ImportError, AttributeError) as e:
                    raise ValueError(f"{where}: cannot load {ep.value!r} "
                                     f"({type(e).__name__}: {e})") from e
                _register_from(obj, where)
        except BaseException:
            _LOADED.discard("entry-points")
            raise


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order (plugins included)."""
    load_family_plugins()
    return tuple(FAMILIES)


def get_family(name: str) -> type[FamilyAdapter]:
    """The adapter class of family ``name`` (one of ``FAMILIES``)."""
    load_family_plugins()
    if name not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def detect_family(model: str) -> str:
    """Family of a diffusers pipeline dir (or cached hub id) from model_index.json."""
    cls_name = read_model_index(str(model)).get("_class_name", "")
    load_family_plugins()
    for name, cls in FAMILIES.items():
        if cls_name in cls.pipeline_classes:
            return name
    raise ValueError(f"model: cannot tell the family of {model} (pipeline class {cls_name!r}); "
                     f"pass family= one of {sorted(FAMILIES)}")


def family_of_pipeline(pipe) -> Optional[str]:
    """Family of a loaded diffusers pipeline object, or None if no adapter handles it."""
    load_family_plugins()
    for name, cls in FAMILIES.items():
        if type(pipe).__name__ in cls.pipeline_classes:
            return name
    return None


def load_adapter(model: str, family: str | None = None, *,
                 components: Sequence[str] = ("denoiser", "text"), device="cpu",
                 dtype: torch.dtype = torch.float32, text_dtype: torch.dtype | None = None,
                 options: Optional[Mapping[str, Any]] = None) -> FamilyAdapter:
    """Detect (unless given) the family of ``model`` and load its adapter.

    ``options``: the family's own settings (``get_family(f).options``)."""
    fam = family or detect_family(model)
    return get_family(fam).load(model, components=components, device=device, dtype=dtype,
                                text_dtype=text_dtype, options=options)
