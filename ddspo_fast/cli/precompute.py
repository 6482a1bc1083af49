"""``ddspo-fast precompute``: write a reference cache for policy-only training steps.

The run's settings are TrainConfig's own flags (a subset, ``CONFIG_FIELDS``, generated
from the dataclass as ``train``'s are) or its ``--config`` file; errors are one-line
CLIErrors naming the flag (or the file and its key).
"""

from __future__ import annotations

import argparse
import re
import sys

from . import CLIError, one_line

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

# The TrainConfig fields that are precompute's flags (generated from the dataclass as
# train's are, same spellings and help): every setting the cache's fingerprint records or
# the frozen networks run with (tests/test_precompute_cli.py derives that set from the
# code and checks each is here), and the progress bar. The run's other settings, given with
# --config, are read and ignored.
CONFIG_FIELDS = (
    "model", "data", "family", "objective", "pair", "pair_lora", "seed", "mixed_precision",
    "device", "attention", "channels_last", "text_encoder_dtype", "guidance_scale",
    "timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_shift",
    "rand_cond_prompts", "rand_cond_schedule", "rand_cond_lambda", "progress",
    # a quantized base's cache (the LoRA run's adapters-off reference): base_quantization
    # is for LoRA runs, so lora_rank comes with it (it changes nothing in the cache)
    "base_quantization", "lora_rank",
)
# precompute's own flags: what it writes and how it batches (not settings of the run)
OWN_FLAGS = {"out": "--out", "draws": "--draws", "dtype": "--dtype",
             "batch_size": "--batch-size", "pairs_per_shard": "--pairs-per-shard"}


def _config_cls():
    from ..train.config import TrainConfig

    return TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._args import add_threads_argument
    from ._config_args import RawDescriptionHelpFormatter, add_config_arguments

    p.description = DESCRIPTION
    p.formatter_class = RawDescriptionHelpFormatter
    own = p.add_argument_group("precompute options")
    own.add_argument("--out", required=True,
                     help="cache directory (new, or one to finish / extend)")
    own.add_argument("--draws", type=int, required=True, metavar="K",
                     help="draws (t, noise) per pair to store")
    own.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                     help="stored dtype of the target rows (default: that of --mixed-precision)")
    own.add_argument("--batch-size", type=int, metavar="N",
                     help="pairs per forward (default 32 on CUDA, halved on out-of-memory; 8 "
                          "on CPU); keep it when resuming for a bit-identical cache")
    own.add_argument("--pairs-per-shard", type=int, metavar="N",
                     help="pairs per shard file (default: about 256 MiB per shard)")
    add_threads_argument(own)
    add_config_arguments(p, _config_cls(), "settings of the training run (TrainConfig fields; "
                                           "--config FILE.yaml sets them from the run's file)",
                         CONFIG_FIELDS)


def _blame(e: ValueError, args: argparse.Namespace) -> CLIError:
    """A precompute error as one line naming its flag: one of precompute's own, or a
    setting of the run (its flag, or the --config file)."""
    from ._config_args import blame

    msg = one_line(e)
    m = re.match(r"(\w+): (.*)", msg)
    if m and m[1] in OWN_FLAGS:
        return CLIError(f"argument {OWN_FLAGS[m[1]]}: {m[2]}")
    return blame(msg, _config_cls(), args, CONFIG_FIELDS)


def run(args: argparse.Namespace) -> int:
    from ..train.precompute import precompute
    from ._args import quiet_libraries, torch_threads
    from ._config_args import config_from_args

    # the ready checks are precompute's own (the run's reference_cache is this cache)
    cfg = config_from_args(args, _config_cls(), CONFIG_FIELDS)
    quiet_libraries(debug=getattr(args, "debug", False), progress=cfg.progress)
    try:
        with torch_threads(args.threads):
            res = precompute(cfg, args.out, args.draws, dtype=args.dtype,
                             batch_size=args.batch_size, pairs_per_shard=args.pairs_per_shard,
                             progress=cfg.progress)
    except ValueError as e:
        raise _blame(e, args) from e
    gib = res["pairs"] * res["draws"] * res["bytes_per_pair_draw"] / 2 ** 30
    ms = res["ms_per_pair_draw"]
    state = "complete" if res["complete"] else "this process's share done"
    print(f"ddspo-fast: reference cache {res['out']} ({state}): {res['pairs']} pairs x "
          f"{res['draws']} draws, {', '.join(res['fields'])} ({res['dtype']}), "
          f"{gib:.3g} GiB; computed {res['pair_draws_computed']} pair-draws"
          + (f" at {ms:.1f} ms each" if ms is not None else ""), file=sys.stderr)
    return 0

