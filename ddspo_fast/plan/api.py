"""``ddspo_fast.plan(...)``: an estimate from what a user has at hand."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from .archs import Arch, resolve
from .estimate import Estimate, PlanOptions, estimate_step

_OPTION_NAMES = {f.name for f in fields(PlanOptions)}


def options_from_train_config(cfg) -> PlanOptions:
    """The step a ``TrainConfig`` runs on a GPU (``mixed_precision='auto'`` is bf16 there)."""
    mp = cfg.mixed_precision
    precision = {"auto": "bf16", "bf16": "bf16", "fp16": "fp16", "no": "fp32"}[mp]
    if cfg.objective == "ddspo" and cfg.pair != "reference":
        raise ValueError("pair: the planner models the reference pair (TF-CPP) and "
                         "Diffusion-DPO; DD-CPP's pair adapters are not modelled yet")
    quant = getattr(cfg, "base_quantization", "none")
    base = "auto" if quant in (None, "none") else quant
    shards = getattr(cfg, "shard_degree", None)  # the sharding setting, where a config has one
    return PlanOptions(
        base=base, shard_degree=int(shards) if shards else 1,
        batch=cfg.batch_size, mode="ddspo" if cfg.objective == "ddspo" else "dpo",
        reference="cached" if cfg.reference_cache else "live", lora_rank=cfg.lora_rank,
        precision=precision, checkpointing=bool(cfg.gradient_checkpointing),
        attention="xformers" if cfg.attention == "xformers" else "auto",
        optimizer=cfg.optimizer if cfg.optimizer != "adamw" else "adamw")


def plan(config_or_args: Any, **options) -> Estimate:
    """Estimated peak accelerator memory and FLOPs of one training step.

    ``config_or_args``: a ``TrainConfig`` (its model is read for its config only), a
    published architecture name (``sd15``, ``sdxl``, ``sd3``, ``sana``, ``flux-dev``), a
    diffusers pipeline folder, an ``Arch``, or any object with a ``model`` attribute and
    ``PlanOptions`` fields (the CLI's arguments). ``options`` set ``PlanOptions`` fields.
    No weights are read; the step is traced on a CPU in a subprocess.
    """
    from ..train import TrainConfig

    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"plan() got unknown options {sorted(unknown)} (see PlanOptions)")
    if isinstance(config_or_args, TrainConfig):
        cfg = config_or_args
        if not cfg.model:
            raise ValueError("model: required (a pipeline folder or a published name)")
        return estimate_step(resolve(cfg.model), replace(options_from_train_config(cfg), **options))
    if isinstance(config_or_args, Arch):
        return estimate_step(config_or_args, PlanOptions(**options))
    if isinstance(config_or_args, str):
        return estimate_step(resolve(config_or_args), PlanOptions(**options))
    model = getattr(config_or_args, "model", None)
    if model is None:
        raise TypeError("plan(): expected a TrainConfig, a model name or folder, or arguments "
                        "with a 'model'")
    given = {k: getattr(config_or_args, k) for k in _OPTION_NAMES if hasattr(config_or_args, k)}
    return estimate_step(resolve(model), PlanOptions(**{**given, **options}))
