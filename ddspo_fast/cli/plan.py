"""``ddspo-fast plan``: peak accelerator memory and FLOPs of a step, estimated on a CPU."""

from __future__ import annotations

import argparse
import json
import sys

from . import CLIError
from ._args import positive_int

HELP = "estimate the GPU memory and FLOPs of a train / prepare / evaluate step, on a CPU, without weights"
DESCRIPTION = (
    "Estimate the peak accelerator memory of one training step (or of the pipeline runs of "
    "prepare and evaluate), broken down by phase, with FLOPs per pair, the largest batch "
    "that fits a GPU and what would make it fit. The denoiser is built without weights and "
    "one step is traced on this CPU (seconds to a minute); the figure is an estimate and "
    "the output states its margin.")

_PREC = ("fp32", "bf16", "fp16", "bf16-pure", "fp16-pure")
_DT = ("none", "fp32", "bf16", "fp16", "int8", "fp8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plan.analytic import BASES, OPTIMIZERS  # standard library only at their top

    p.add_argument("--model", help="published architecture (sd15, sdxl, sd3, sana, flux-dev, "
                   "sd35-large, sd35-medium, qwen_image, flux2, flux2-klein: bench/archs.py) "
                   "or a diffusers pipeline folder (its config files only are read)")
    p.add_argument("--config", help="a train config YAML (ddspo-fast train --config): plan "
                   "the step it runs; other flags override it")
    p.add_argument("--task", choices=("train", "prepare", "evaluate"), default="train",
                   help="train: one training step (default); prepare / evaluate: pipeline "
                   "inference (text encoders, denoiser with CFG, VAE decode)")
    p.add_argument("--batch", type=positive_int("--batch"), help="pairs per step (rows with "
                   "--mode sft; images per pipeline call for prepare / evaluate); default 1")
    p.add_argument("--mode", choices=("ddspo", "ddspo-official", "dpo", "sft"),
                   help="ddspo (default): policy on 2 rows and the reference on 3 rows per "
                   "pair; ddspo-official: the official trainer's two reference calls of 2 "
                   "rows; dpo: 2 and 2; sft: plain fine-tuning, one row per sample, no reference")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="full fine-tune (the default)")
    g.add_argument("--lora-rank", type=positive_int("--lora-rank"), help="train a LoRA of this rank")
    p.add_argument("--precision", choices=_PREC, help="fp32 | bf16 / fp16 autocast over fp32 "
                   "trained weights (default bf16) | bf16-pure / fp16-pure")
    p.add_argument("--base", choices=BASES, help="frozen weights' dtype (LoRA base, reference "
                   "copy); nf4 / int8 / fp8 quantize a LoRA base (default: the autocast dtype)")
    p.add_argument("--base-quantization", choices=("none", "nf4", "int8", "fp8"),
                   help="as train's base_quantization: a LoRA base stored quantized (the same "
                   "as --base nf4 / int8 / fp8; none = --base auto)")
    p.add_argument("--shard", type=positive_int("--shard"), metavar="N", dest="shard_degree",
                   help="per-rank memory with weights, gradients and optimizer states sharded "
                   "over N GPUs (FSDP full shard); activations are not sharded")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--attention", choices=("auto", "flash", "mem-efficient", "xformers", "math"),
                   help="attention kernel (default auto: what SDPA picks on a GPU)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw (fused)")
    p.add_argument("--reference-cache", action="store_true", dest="cached_reference", help="the frozen reference's "
                   "outputs come from a precomputed cache (ddspo-fast precompute)")
    p.add_argument("--reference-first", choices=("yes", "no"), help="run the reference "
                   "before the policy forward (default: as ddspo_fast's trainer, yes for "
                   "DDSPO, no otherwise)")
    p.add_argument("--ema", choices=("fp32", "bf16"), help="keep an EMA copy of the trained weights")
    p.add_argument("--text-encoders", choices=_DT, help="text encoders resident on the GPU in "
                   "this dtype (train default none: embeddings are precomputed)")
    p.add_argument("--vae", choices=_DT[:4], help="VAE resident on the GPU in this dtype")
    p.add_argument("--height", type=positive_int("--height"), help="image height in pixels")
    p.add_argument("--width", type=positive_int("--width"), help="image width in pixels")
    p.add_argument("--text-tokens", type=positive_int("--text-tokens"),
                   help="text tokens per prompt (the family's default otherwise)")
    p.add_argument("--offload", choices=("none", "model"), default="none",
                   help="prepare / evaluate: none, or model CPU offload (one component on "
                   "the GPU at a time)")
    p.add_argument("--gpu-memory", help="GPU memory (24GB, 80GiB) or a GPU name (rtx4090, "
                   "a100, h100...): say whether it fits and the largest batch that does")
    p.add_argument("--what-if", action="store_true", help="also trace checkpointing, LoRA "
                   "and reference-before-policy variants (one more trace each)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _options(args, cfg):
    from ..plan import PlanOptions, options_from_train_config

    opts = options_from_train_config(cfg) if cfg is not None else PlanOptions()
    changes = {}
    if args.base_quantization is not None:
        if args.base is not None:
            raise CLIError("--base-quantization: give it or --base, not both")
        args.base = "auto" if args.base_quantization == "none" else args.base_quantization
    for name in ("batch", "mode", "precision", "base", "attention", "optimizer", "ema",
                 "height", "width", "text_tokens", "shard_degree"):
        v = getattr(args, name)
        if v is not None:
            changes[name] = v
    if args.full:
        changes["lora_rank"] = None
    if args.lora_rank is not None:
        changes["lora_rank"] = args.lora_rank
    if args.checkpointing:
        changes["checkpointing"] = True
    if args.cached_reference:
        changes["reference"] = "cached"
    if args.reference_first:
        changes["reference_first"] = args.reference_first == "yes"
    for name in ("text_encoders", "vae"):
        v = getattr(args, name)
        if v is not None:
            changes[name] = None if v == "none" else v
    from dataclasses import replace
    opts = replace(opts, **changes)
    opts.check()
    return opts


def run(args: argparse.Namespace) -> int:
    from ..plan import archs
    from ..plan.gpus import parse_memory

    cfg = None
    if args.config:
        from ..train import TrainConfig
        from ._config_args import config_from_args

        # the file only: plan's own flags are no TrainConfig fields
        cfg = config_from_args(args, TrainConfig, fields=())
    model = args.model or (cfg.model if cfg is not None else None)
    if not model:
        raise CLIError("--model: required (a published architecture such as sdxl, or a "
                       "pipeline folder), or --config with a model")
    arch = archs.resolve(model)
    memory = label = None
    if args.gpu_memory:
        memory, label = parse_memory(args.gpu_memory)
    if args.task != "train":
        from ..plan.inference import estimate_inference, render_inference

        est = estimate_inference(arch, task=args.task, batch=args.batch or 1,
                                 height=args.height, width=args.width,
                                 text_tokens=args.text_tokens, precision=args.precision or "bf16",
                                 text_encoders=args.text_encoders, offload=args.offload,
                                 attention=args.attention or "auto")
        if args.json:
            print(json.dumps(est.to_json(), indent=1))
        else:
            print(render_inference(est, memory=memory, memory_label=label))
        return 0
    from ..plan.estimate import estimate_step
    from ..plan.report import render
    from ..plan.whatif import variants

    opts = _options(args, cfg)
    est = estimate_step(arch, opts)
    var = variants(est, traced=args.what_if)
    if args.json:
        out = est.to_json()
        out["what_if"] = {d: (v if isinstance(v, int) else v.peak) for d, v in var}
        if memory is not None:
            out["gpu_memory_bytes"] = memory
            out["largest_batch"] = est.largest_batch(memory)
        print(json.dumps(out, indent=1))
    else:
        print(render(est, memory=memory, memory_label=label, variants=var))
    sys.stdout.flush()
    return 0
