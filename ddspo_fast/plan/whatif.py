"""What would make a step fit: variants of one estimate.

Changes that only move counted parts (8-bit optimizer states, a reference cache, a
quantized LoRA base, sharding) are recomputed from the same trace; changes of the traced step itself (checkpointing,
LoRA, reference before policy) run another trace, only when asked (``traced=True``).
"""
from __future__ import annotations

import copy
from dataclasses import replace

from .estimate import Estimate, combine, estimate_step, shardable_optimizer

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


def with_sharding(est: Estimate, ranks: int) -> Estimate:
    """The same step with weights, gradients and optimizer states sharded over ``ranks``
    (per-rank memory; see ``estimate.combine``). A sharded run takes AdamW only, so an
    8-bit or other optimizer is counted as AdamW (``sharding_label`` says so)."""
    opts = replace(est.options, shard_degree=ranks)
    if not shardable_optimizer(opts.optimizer):
        opts = replace(opts, optimizer="adamw")
    return combine(est.arch, opts, est.traced)


def sharding_label(est: Estimate, ranks: int) -> str:
    note = "" if shardable_optimizer(est.options.optimizer) else ", AdamW"
    return f"sharding over {ranks} GPUs (per rank{note})"


def with_base(est: Estimate, base: str) -> Estimate:
    """The same LoRA step over a ``base`` (nf4 | int8 | fp8) quantized frozen base."""
    return combine(est.arch, replace(est.options, base=base), est.traced)


def _traced_base_is_16_bit(o) -> bool:
    # a quantized base is counted against a base traced in bf16
    return o.base in ("bf16", "fp16") or (o.base == "auto" and o.precision != "fp32")


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
    if o.lora_rank is not None and _traced_base_is_16_bit(o):
        for base, what in (("nf4", "NF4 base (base_quantization nf4)"),
                           ("int8", "int8 base (base_quantization int8)")):
            out.append((what, with_base(est, base)))
    if o.shard_degree == 1:
        for n in (2, 4, 8):
            out.append((sharding_label(est, n), with_sharding(est, n)))
    return out
