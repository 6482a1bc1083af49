"""bench step's ablation ladder: rung 0 is the official recipe, each next rung changes
exactly the setting it names, in the config and in the live step it builds."""
import dataclasses
import math
import sys

import pytest
import torch

from ddspo_fast.bench import ladder as lad
from ddspo_fast.bench.archs import TINY, make_batch, write_model
from ddspo_fast.bench.measure import eager
from ddspo_fast.bench.steps import LadderStep, RowCounter

FIELDS = [f.name for f in dataclasses.fields(lad.StepConfig)]


def _ladder(family, **kw):
    kw.setdefault("bnb_missing", lambda: None)
    return lad.build_ladder(family, is_unet=family in ("sd15", "sdxl"), **kw)


def _diff(a: lad.StepConfig, b: lad.StepConfig) -> set:
    return {f for f in FIELDS if getattr(a, f) != getattr(b, f)}


def test_official_rungs_follow_the_official_scripts():
    sd15, sdxl, sd3, sana = (lad.official(f) for f in ("sd15", "sdxl", "sd3", "sana"))
    for c in (sd15, sdxl, sd3, sana):
        # AdamW everywhere (no official script passes --use_adafactor), two reference
        # calls (6 denoiser rows per pair), the script-form loss, nothing compiled
        assert (c.optimizer, c.reference_rows, c.loss, c.compile) == ("adamw", 4, "script", False)
        assert c.denoiser_rows_per_pair == 6
    assert (sd15.precision, sd15.gradient_checkpointing, sd15.lora_rank) == ("fp16-scaler", False, None)
    assert (sdxl.precision, sdxl.gradient_checkpointing, sdxl.lora_rank) == ("fp16-scaler", True, None)
    assert (sd3.precision, sd3.lora_rank) == ("fp16-scaler-fp32-frozen", 128)
    assert (sana.precision, sana.lora_rank, sana.lora_targets) == ("fp32", 128, ("to_k", "to_q", "to_v"))


def test_official_rung_runs_the_precision_the_script_runs_on_the_device():
    # GPU: the scripts' --mixed_precision; CPU: accelerate gives no fp16 autocast and no
    # GradScaler there, so the recipe runs only as --mixed_precision no (fp32), and says so
    for fam, script in (("sd15", "fp16-scaler"), ("sdxl", "fp16-scaler"),
                        ("sd3", "fp16-scaler-fp32-frozen"), ("sana", "fp32")):
        gpu, cpu = lad.official_precision(fam, "cuda"), lad.official_precision(fam, "cpu")
        assert gpu == {"script": script, "runs": script, "note": None}
        assert (cpu["script"], cpu["runs"]) == (script, "fp32")
        assert (cpu["note"] is None) == (script == "fp32")
        assert lad.official(fam, device_type="cuda").precision == script
        assert lad.official(fam, device_type="cpu").precision == "fp32"
        assert _ladder(fam, device_type="cpu")[0].config.precision == "fp32"
        # only the precision differs between the two renderings
        assert _diff(lad.official(fam, device_type="cuda"),
                     lad.official(fam, device_type="cpu")) == ({"precision"} if script != "fp32"
                                                               else set())
    assert "GradScaler" in lad.official_precision("sd15", "cpu")["note"]
    # the scripts' optimizer-step rate: batch x gradient accumulation
    assert lad.OFFICIAL_PAIRS_PER_UPDATE == {"sd15": 128, "sdxl": 512, "sd3": 1024, "sana": 1024}


def test_structural_rungs_come_first_and_device_dependent_ones_are_marked():
    names = [c.name for c in lad.CHANGES]
    dependent = set(lad.DEVICE_DEPENDENT)
    assert {"bf16", "channels_last"} <= dependent
    assert not {"no_checkpointing", "3_reference_rows", "fused_loss"} & dependent
    # every change that removes work comes before the first device-dependent one, so on
    # a CPU those rungs all run at the official (fp32) precision
    first = min(names.index(n) for n in dependent)
    assert all(names.index(n) < first for n in ("no_checkpointing", "3_reference_rows",
                                                "fused_loss"))
    for fam in ("sd15", "sdxl", "sd3", "sana"):
        by = {r.name: r for r in _ladder(fam, device_type="cpu")}
        assert by["fused_loss"].config.precision == "fp32"
        assert by["bf16"].to_dict()["device_dependent"]
        assert by["fused_loss"].to_dict()["device_dependent"] is None


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sana"])
def test_library_defaults_are_a_rung_and_tuned_is_the_last_but_compile(family, device_type):
    is_unet = family in ("sd15", "sdxl")
    d = lad.library_defaults(family, device_type, is_unet=is_unet)
    assert d.precision == ("fp32" if device_type == "cpu" else "bf16")
    assert (d.optimizer, d.gradient_checkpointing, d.compile) == ("adamw", False, False)
    assert d.channels_last == is_unet and (d.reference_rows, d.loss) == (3, "fused")
    assert (d.lora_rank, d.lora_targets) == (lad.official(family).lora_rank,
                                             lad.official(family).lora_targets)
    rungs = _ladder(family, device_type=device_type)
    same = [r.name for r in rungs if r.skipped is None and r.config == d]
    if device_type == "cuda":
        assert same == ["bf16"]
    else:   # fp32; channels_last is the last change that applies to a UNet
        assert same == (["channels_last"] if is_unet else ["fused_loss"])
    assert lad.tuned(rungs).name == "adamw8bit"
    # bitsandbytes missing: the tuned settings stop at the last rung that runs
    assert lad.tuned(_ladder(family, device_type=device_type,
                             bnb_missing=lambda: "no bnb")).name == "bf16"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sana"])
def test_each_rung_changes_exactly_what_it_names(family, device_type):
    rungs = _ladder(family, device_type=device_type)
    assert [r.name for r in rungs] == list(lad.RUNG_NAMES)
    assert [r.index for r in rungs] == list(range(len(rungs)))
    assert rungs[0].config == lad.official(family, device_type=device_type)
    assert rungs[0].skipped is None
    last_measured = 0
    for r in rungs[1:]:
        base = rungs[r.base]
        assert r.base == last_measured and base.skipped is None
        if r.skipped and r.skipped.startswith("already so"):
            assert _diff(base.config, r.config) == set(), r.name
        else:
            assert _diff(base.config, r.config) == {r.changes}, r.name
        assert r.adds and r.changes in FIELDS
        if r.skipped is None:
            last_measured = r.index
    skipped = {r.name: r.skipped for r in rungs if r.skipped}
    if family == "sdxl":   # the official SDXL recipe checkpoints; the ladder turns it off
        assert "no_checkpointing" not in skipped
    else:
        assert "already so" in skipped["no_checkpointing"]
    if family in ("sd3", "sana"):
        assert "not a UNet" in skipped["channels_last"]
    measured = [r for r in rungs if r.skipped is None]
    top = measured[-1].config
    assert (top.precision, top.optimizer, top.reference_rows, top.loss, top.compile) == \
        ("bf16", "adamw8bit", 3, "fused", True)
    assert top.denoiser_rows_per_pair == 5
    assert top.lora_rank == rungs[0].config.lora_rank    # fixed along the ladder


def test_the_reference_cache_is_not_a_script_rung():
    # the script-form step has no cache reader: the library rows measure the cache
    # (tests/test_bench_step.py), so no rung may claim it
    assert "reference_cache" not in lad.RUNG_NAMES
    assert "reference_cache" not in FIELDS
    assert min(r.config.denoiser_rows_per_pair for r in _ladder("sd15")) == 5


def test_missing_bitsandbytes_skips_only_its_rung():
    rungs = _ladder("sd15", bnb_missing=lambda: "bitsandbytes is not installed")
    by = {r.name: r for r in rungs}
    assert by["adamw8bit"].skipped == "bitsandbytes is not installed"
    # later rungs build on the last measured rung: they keep fp32 AdamW
    assert by["compile"].base == by["bf16"].index
    assert all(r.config.optimizer == "adamw" for r in rungs if r.skipped is None)


def test_bitsandbytes_probe_is_narrow_and_warns(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import raises ImportError
    with pytest.warns(UserWarning, match="bitsandbytes"):
        why = lad.bitsandbytes_missing()
    assert why and "pip install bitsandbytes" in why


def test_pinned_optimizer_holds_every_rung():
    rungs = _ladder("sdxl", pin_optimizer="adafactor")
    assert {r.config.optimizer for r in rungs if r.skipped is None} == {"adafactor"}
    by = {r.name: r for r in rungs}
    assert "pinned" in by["adamw8bit"].skipped
    with pytest.raises(ValueError, match="optimizer"):
        _ladder("sdxl", pin_optimizer="sgd")


def test_selected_rungs_keep_the_changes_of_the_others():
    rungs = _ladder("sd15", only={"official", "bf16"})
    by = {r.name: r for r in rungs}
    assert by["channels_last"].skipped == "not selected (--rungs)"
    assert by["bf16"].skipped is None
    assert by["bf16"].config.channels_last                  # not-selected changes apply
    assert lad.tuned(rungs).name == "adamw8bit"             # and count for the tuned row


# ------------------------------------------------------------ the live steps
FACT_OF = {   # StepConfig field -> the facts a live step shows for it
    "precision": {"autocast", "grad_scaler", "frozen_dtype"},
    "optimizer": {"optimizer"},
    "gradient_checkpointing": {"gradient_checkpointing"},
    "channels_last": {"channels_last"},
    "compile": {"compiled"},
    "reference_rows": {"rows", "loss_input"},
    "loss": {"loss_form"},
}
LOSS_FNS = {"script_loss": ("script", "separate"),
            "script_loss_from_reference": ("script", "stacked"),
            "ddspo_loss": ("fused", "separate"),
            "ddspo_loss_from_reference": ("fused", "stacked")}


def _observe(step, batch, monkeypatch):
    """The step's facts, the denoiser rows counted in one step and which loss it called
    (the outermost of the four loss functions, spied on)."""
    import ddspo_fast as df
    from ddspo_fast.bench import script_loss as sl

    calls = []
    for name in LOSS_FNS:
        mod = sl if name.startswith("script") else df
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    facts = step.facts()           # as built (an 8-bit optimizer step undoes channels_last)
    with eager(), RowCounter(step.denoisers()) as rc:   # the rows the modules received
        step(batch)
    monkeypatch.undo()
    facts["rows"] = rc.rows
    facts["loss_form"], facts["loss_input"] = LOSS_FNS[calls[0]]
    return facts


@pytest.mark.parametrize("family", ["sd15", "sd3"])   # a full UNet; a LoRA transformer
def test_live_steps_change_exactly_what_the_rung_names(family, tmp_path, monkeypatch):
    spec = TINY[family]
    model_dir = write_model(spec, tmp_path, torch.device("cpu"))
    batch = make_batch(spec, 1, "cpu", seed=1)
    rungs = [r for r in _ladder(family, lora_rank=spec.lora_rank)
             if r.skipped is None]
    facts = {}
    for r in rungs:
        step = LadderStep(r.config, spec, model_dir, torch.device("cpu"), beta=5000.0, lr=1e-5)
        facts[r.index] = _observe(step, batch, monkeypatch)
        step.close()
    off = facts[0]
    assert off["rows"] == 6 and off["optimizer"] == "AdamW" and not off["compiled"]
    assert off["lora"] == (family == "sd3")
    for r in rungs[1:]:
        before, after = facts[r.base], facts[r.index]
        changed = {k for k in after if after[k] != before[k]}
        assert changed and changed <= FACT_OF[r.changes], (r.name, changed)
    top = facts[rungs[-1].index]
    assert top["rows"] == 5 and top["optimizer"] == "AdamW8bit" and top["compiled"]
    assert top["autocast"] == "bfloat16" and not top["grad_scaler"]
    assert (top["loss_form"], top["loss_input"]) == ("fused", "stacked")
    assert (off["loss_form"], off["loss_input"]) == ("script", "separate")


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_three_reference_rows_and_fused_loss_compute_the_official_loss(family, tmp_path):
    """Same weights, same (t, eps): the official 4-row script loss, the 3-row script loss
    and the fused library loss agree (fp32, so only summation order differs)."""
    spec = TINY[family]
    model_dir = write_model(spec, tmp_path, torch.device("cpu"))
    batch = make_batch(spec, 2, "cpu", seed=2)
    base = dataclasses.replace(lad.official(family, spec.lora_rank), precision="fp32")
    losses = []
    for change in ({}, {"reference_rows": 3}, {"reference_rows": 3, "loss": "fused"},
                   {"loss": "fused"}):
        step = LadderStep(dataclasses.replace(base, **change), spec, model_dir,
                          torch.device("cpu"), beta=500.0, lr=1e-5)
        # move the policy away from the reference, identically in every variant, so the
        # loss is not log 2 (a LoRA starts as a no-op)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in step.trainable:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        with torch.no_grad():
            losses.append(float(step.forward_loss(batch)))
        step.close()
    assert abs(losses[0] - math.log(2)) > 1e-3      # far above the tolerance below
    for x in losses[1:]:
        assert x == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
