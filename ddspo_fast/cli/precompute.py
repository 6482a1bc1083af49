"""``ddspo-fast precompute``: write a reference cache for policy-only training steps.

The command line registers this module with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; errors are raised as ``ValueError`` naming the flag, for the CLI to
print as one line.
"""

from __future__ import annotations

import argparse
import re
import sys

HELP = "run the frozen networks once over every pair x K draws (a reference cache)"

DESCRIPTION = """\
Runs the frozen networks (reference; DD-CPP's winning / losing adapters) in inference
mode over every pair x K draws and stores what the loss needs, so that training with
--reference-cache runs the policy only (2 rows per pair, no reference model in memory).
Use the settings of the training run (or its --config): model, data, objective, pair,
seed, mixed precision and mixing must match, or training refuses the cache naming the
setting. A run needs ceil(max_steps x grad_accum / micro-batches per epoch) x
timesteps_per_pair draws per pair; the trainer says how many before its first step.
Rerun the same command after a kill to finish, or with a larger --draws to add draws.
Multi-GPU: accelerate launch -m ddspo_fast precompute ... splits the shards.
"""

# --flag -> TrainConfig field, for the settings that change the frozen outputs
_CONFIG_FLAGS = {
    "model": "--model", "data": "--data", "family": "--family", "objective": "--objective",
    "pair": "--pair", "pair_lora": "--pair-lora", "seed": "--seed",
    "mixed_precision": "--mixed-precision", "device": "--device",
    "rand_cond_prompts": "--rand-cond-prompts", "rand_cond_schedule": "--rand-cond-schedule",
    "rand_cond_lambda": "--rand-cond-lambda", "logit_mean": "--logit-mean",
    "logit_std": "--logit-std", "attention": "--attention", "guidance_scale": "--guidance-scale",
}
_OWN_FLAGS = {"out": "--out", "draws": "--draws", "dtype": "--dtype", "batch_size": "--batch-size",
              "pairs_per_shard": "--pairs-per-shard"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", metavar="FILE.yaml",
                   help="the training run's TrainConfig YAML; its settings are used, flags "
                        "given here override them")
    p.add_argument("--model", help="diffusers pipeline directory or hub id")
    p.add_argument("--data", help="pair dataset directory")
    p.add_argument("--out", required=True, help="cache directory (new, or one to finish / extend)")
    p.add_argument("--draws", type=int, required=True, metavar="K",
                   help="draws (t, noise) per pair to store")
    p.add_argument("--objective", choices=("ddspo", "dpo"))
    p.add_argument("--pair", choices=("reference", "lora"),
                   help="DDSPO pair: reference (TF-CPP) or lora (DD-CPP, needs --pair-lora)")
    p.add_argument("--pair-lora", metavar="DIR", help="DD-CPP: directory with win/ and lose/")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"),
                   help="autocast dtype of the frozen networks, as in training (default auto: "
                        "bf16 on a GPU, no (fp32) on the CPU)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="stored dtype of the target rows (default: that of --mixed-precision)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="pairs per forward (default 32 on CUDA, halved on out-of-memory; 8 "
                        "on CPU); keep it when resuming for a bit-identical cache")
    p.add_argument("--pairs-per-shard", type=int, metavar="N",
                   help="pairs per shard file (default: about 256 MiB per shard)")
    p.add_argument("--family", help="model family, one of the registered families (default: "
                                    "detected from the model)")
    p.add_argument("--device", help="device (default: accelerate's choice)")
    p.add_argument("--rand-cond-prompts", metavar="FILE.jsonl",
                   help="random-condition mixing pool, as in training")
    p.add_argument("--rand-cond-schedule", choices=("sigmoid", "exponential", "constant"))
    p.add_argument("--rand-cond-lambda", type=float)
    p.add_argument("--logit-mean", type=float, help="flow models' timestep density, as in training")
    p.add_argument("--logit-std", type=float)
    p.add_argument("--attention", choices=("sdpa", "xformers"))
    p.add_argument("--guidance-scale", type=float,
                   help="FLUX.1 [dev]: the guidance value of training (default 3.5, as in training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ._args import add_threads_argument

    add_threads_argument(p)


def _flag_of(message: str) -> str:
    """'draws: expected ...' -> 'argument --draws: expected ...' when the field is a flag."""
    m = re.match(r"^([a-z_]+):\s*", message)
    if m:
        flags = {**_CONFIG_FLAGS, **_OWN_FLAGS}
        if m.group(1) in flags:
            return f"argument {flags[m.group(1)]}: {message[m.end():]}"
    return message


def _config(args):
    from ..train.config import TrainConfig

    flags = {name: getattr(args, name) for name in _CONFIG_FLAGS
             if getattr(args, name, None) is not None}
    flags.setdefault("progress", not args.no_progress)
    try:
        if args.config:
            try:
                return TrainConfig.from_yaml(args.config, overrides=flags)
            except OSError as e:
                raise ValueError(f"argument --config: cannot read {args.config} ({e.strerror})") from None
        return TrainConfig.from_dict(flags)
    except ValueError as e:
        msg = str(e)
        if args.config and msg.startswith(f"{args.config}:"):
            raise ValueError(f"argument --config: {msg}") from None
        raise ValueError(_flag_of(msg)) from None


def run(args: argparse.Namespace) -> int:
    from ..train.precompute import precompute
    from ._args import quiet_libraries, torch_threads

    quiet_libraries(debug=getattr(args, "debug", False), progress=not args.no_progress)

    cfg = _config(args)
    try:
        with torch_threads(args.threads):
            res = precompute(cfg, args.out, args.draws, dtype=args.dtype,
                             batch_size=args.batch_size, pairs_per_shard=args.pairs_per_shard,
                             progress=not args.no_progress)
    except ValueError as e:
        raise ValueError(_flag_of(str(e))) from None
    gib = res["pairs"] * res["draws"] * res["bytes_per_pair_draw"] / 2 ** 30
    ms = res["ms_per_pair_draw"]
    state = "complete" if res["complete"] else "this process's share done"
    print(f"ddspo-fast: reference cache {res['out']} ({state}): {res['pairs']} pairs x "
          f"{res['draws']} draws, {', '.join(res['fields'])} ({res['dtype']}), "
          f"{gib:.3g} GiB; computed {res['pair_draws_computed']} pair-draws"
          + (f" at {ms:.1f} ms each" if ms is not None else ""), file=sys.stderr)
    return 0

