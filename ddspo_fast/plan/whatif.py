"""What would make a step fit: variants of one estimate.

Changes that only move counted parts (8-bit optimizer states, a reference cache, sharding)
are recomputed from the same trace; changes of the traced step itself (checkpointing,
LoRA, reference before policy) run another trace, only when asked (``traced=True``).
"""
from __future__ import annotations

import copy
from dataclasses import replace

from .estimate import Estimate, combine, estimate_step

GiB = 1 << 30


def with_reference_cache(est: Estimate) -> Estimate:
    """The same step reading the frozen outputs from a reference cache: no reference
    forward, and no reference copy of the weights (full fine-tuning)."""
    if est.options.reference == "cached" or est.options.mode == "sft":
        return est
    traced = copy.deepcopy(est.traced)
    traced["phases"].pop("reference forward", None)
    ref = traced["reference_bytes"]
    for p in traced["phases"].values():
        p["weights"] = p.get("weights", 0) - ref
    traced["reference_bytes"] = 0
    traced["flops"].pop("reference forward", None)
    return combine(est.arch, replace(est.options, reference="cached"), traced)


def with_optimizer(est: Estimate, optimizer: str) -> Estimate:
    return combine(est.arch, replace(est.options, optimizer=optimizer), est.traced)


def sharded_peak(est: Estimate, ranks: int) -> int:
    """Per-rank peak with weights, gradients and optimizer states sharded over ``ranks``
    (FSDP full shard / ZeRO-3), activations unchanged; the all-gathered working layer is
    not counted. ddspo_fast does not shard yet: this is what it would need."""
    best = 0
    for p in est.phases.values():
        shardable = p["weights"] + p["grads"] + p["optimizer states"]
        best = max(best, int(p["total"] - shardable * (1 - 1 / ranks)))
    return best


def variants(est: Estimate, *, traced: bool = False) -> list[tuple[str, Estimate | int]]:
    """(description, estimate or per-rank bytes) for each way to lower the peak."""
    out: list = []
    o = est.options
    if not o.optimizer.endswith("8bit"):
        out.append(("8-bit AdamW states (bitsandbytes)", with_optimizer(est, "adamw8bit")))
    if o.reference == "live" and o.mode != "sft":
        out.append(("reference cache (ddspo-fast precompute)", with_reference_cache(est)))
    if traced:
        if not o.checkpointing:
            out.append(("gradient checkpointing", estimate_step(est.arch, replace(o, checkpointing=True))))
        if o.lora_rank is None:
            out.append(("LoRA rank 64", estimate_step(est.arch, replace(o, lora_rank=64))))
        if o.reference == "live" and o.mode != "sft" and not o.ref_first():
            out.append(("reference before policy", estimate_step(est.arch, replace(o, reference_first=True))))
    for n in (2, 4, 8):
        out.append((f"sharding over {n} GPUs (per rank; when sharding lands)", sharded_peak(est, n)))
    return out
