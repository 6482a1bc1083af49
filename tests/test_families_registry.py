"""Every family is declared once and complete: its adapter in the registry, a tiny model in
``testing``, a REAL and a TINY spec in ``bench/archs.py``, the denoiser blocks a sharded run
wraps; every other family list is asked of the registry; family plugins load from
``DDSPO_FAST_FAMILIES``."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ddspo_fast import testing
from ddspo_fast.bench import archs, ladder
from ddspo_fast.models import FAMILIES, SD15Adapter, family_names, get_family, load_family_plugins
from ddspo_fast.plan import table

BUILT_IN = ("sd15", "sdxl", "sd3", "sana", "flux", "qwen_image", "flux2")


def test_every_built_in_family_is_declared_everywhere():
    assert family_names()[:len(BUILT_IN)] == BUILT_IN
    tiny = {fam for fam, _ in testing.TINY_MODELS.values()}
    for fam in BUILT_IN:
        cls = get_family(fam)
        assert fam in tiny, f"{fam}: no tiny model in ddspo_fast.testing"
        assert any(s.family == fam for s in archs.REAL.values()), f"{fam}: no REAL spec"
        assert any(s.family == fam for s in archs.TINY.values()), f"{fam}: no TINY spec"
        assert cls.lora_targets and cls.wrap_blocks, fam
    # the official recipes' families (ladder, plan table) are registered families
    assert set(ladder.FAMILIES) <= set(family_names())
    assert set(table.FAMILIES) <= set(family_names())


@pytest.mark.parametrize("spec_name", sorted(archs.TINY))
def test_wrap_blocks_are_blocks_of_the_denoiser(spec_name):
    import diffusers

    spec = archs.TINY[spec_name]
    with torch.device("meta"):
        den = getattr(diffusers, spec.denoiser_cls)(**spec.config)
    present = {type(m).__name__ for m in den.modules()}
    cls = get_family(spec.family)
    assert set(cls.wrap_blocks) & present, (spec_name, cls.wrap_blocks)
    units = cls.wrap_units(den)
    ids = [id(p) for m in units for p in m.parameters()]
    assert len(ids) == len(set(ids))  # no parameter in two units
    # the blocks hold most of the weights (what sharding them is for)
    inside = sum(p.numel() for m in units for p in m.parameters())
    assert inside > 0.5 * sum(p.numel() for p in den.parameters())


@pytest.mark.parametrize("fam", BUILT_IN)
def test_memory_format_and_timestep_dtype_are_the_family_s(fam):
    cls = get_family(fam)
    unet = cls.denoiser_name == "unet"
    assert cls.memory_format(True) == (torch.channels_last if unet else None)
    assert cls.memory_format(False) is None
    assert cls.timestep_dtype() == (torch.float32 if cls.flow else torch.int64)
    assert cls.latent_axes[-2:] == ("height", "width") and "channels" in cls.latent_axes


def test_plugins_load_from_the_environment(monkeypatch):
    mod = types.ModuleType("ddspo_fast_test_plugin")

    class PluginA(SD15Adapter):
        name = "plugin_a"

    class PluginB(SD15Adapter):
        name = "plugin_b"

    def register():
        from ddspo_fast.models import register_family
        register_family(PluginB)

    mod.PluginA, mod.register = PluginA, register
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setenv("DDSPO_FAST_FAMILIES",
                       f" {mod.__name__}:PluginA , {mod.__name__}:register ,")
    try:
        assert {"plugin_a", "plugin_b"} <= set(family_names())
        assert get_family("plugin_a") is PluginA and get_family("plugin_b") is PluginB
        load_family_plugins()  # each entry once: nothing registered twice
    finally:
        FAMILIES.pop("plugin_a", None)
        FAMILIES.pop("plugin_b", None)
    monkeypatch.setenv("DDSPO_FAST_FAMILIES", f"{mod.__name__}:nothing")
    with pytest.raises(ValueError, match="DDSPO_FAST_FAMILIES: cannot load the family plugin"):
        family_names()
    monkeypatch.setenv("DDSPO_FAST_FAMILIES", "ddspo_fast.models:PLUGIN_ENV")
    with pytest.raises(ValueError, match="expected a FamilyAdapter subclass"):
        family_names()


def test_a_tiny_model_needs_a_registered_family():
    with pytest.raises(ValueError, match="not a registered family"):
        testing.register_tiny_model("x", "no_such_family", lambda: None)
