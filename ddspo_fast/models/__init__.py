"""Model-family adapters: one module and one class per family.

    from ddspo_fast.models import get_family, detect_family, load_adapter
    cls = get_family("sdxl")                 # the adapter class
    fam = detect_family("/models/sdxl")      # "sdxl", from model_index.json
    adapter = load_adapter("/models/sdxl", components=("denoiser", "text"))

``FAMILIES`` is the one registry of families: the config's choices, the precompute CLI,
the tiny models of ``testing`` and every other family list derive from it. A family
defined elsewhere (a test, a plugin) joins with ``register_family(cls)``.
"""

from __future__ import annotations

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

__all__ = ["FAMILIES", "FamilyAdapter", "get_family", "detect_family", "family_of_pipeline",
           "load_adapter", "register_family", "family_names", "SD15Adapter", "SDXLAdapter",
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


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(FAMILIES)


def get_family(name: str) -> type[FamilyAdapter]:
    """The adapter class of family ``name`` (one of ``FAMILIES``)."""
    if name not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def detect_family(model: str) -> str:
    """Family of a diffusers pipeline dir (or cached hub id) from model_index.json."""
    cls_name = read_model_index(str(model)).get("_class_name", "")
    for name, cls in FAMILIES.items():
        if cls_name in cls.pipeline_classes:
            return name
    raise ValueError(f"model: cannot tell the family of {model} (pipeline class {cls_name!r}); "
                     f"pass family= one of {sorted(FAMILIES)}")


def family_of_pipeline(pipe) -> Optional[str]:
    """Family of a loaded diffusers pipeline object, or None if no adapter handles it."""
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
