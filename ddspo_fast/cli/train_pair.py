"""``ddspo-fast train-pair``: train DD-CPP's winning and losing LoRA adapters.

Every ``AdapterTrainConfig`` field is a flag (both spellings, as ``train``); ``--config
FILE.yaml`` sets fields from a file and flags override it. The output directory is what
``ddspo-fast train --pair lora --pair-lora DIR`` reads.
"""

from __future__ import annotations

import argparse

from . import EXIT_OK, CLIError, one_line
from ._args import add_threads_argument, allow_bitsandbytes, quiet_libraries, short, torch_threads
from .train import _blame, add_config_arguments, given_values
from .train import build_config as build_train_config

HELP = "train DD-CPP's winning and losing LoRA adapters (for train --pair lora)"
DESCRIPTION = ("Train the winning adapter on the preferred and the losing adapter on the "
               "dispreferred latents of a pair dataset (plain denoising loss, both on the "
               "prompt, as the official train_lora_target.py), two adapters on one base. "
               "Writes OUTPUT_DIR/pos_lora_unet/ and neg_lora_unet/; pass OUTPUT_DIR to "
               "'train --pair lora --pair-lora'. Every AdapterTrainConfig field is a flag; "
               "--config FILE.yaml sets fields from a file and flags override it; "
               "--resume latest continues a killed run exactly.")


def _config_cls():
    from ..train.config import AdapterTrainConfig

    return AdapterTrainConfig


def add_arguments(p) -> None:
    add_config_arguments(p, _config_cls(), "train-pair options")
    add_threads_argument(p)


def build_config(args: argparse.Namespace):
    """Defaults < ``--config`` file < flags, checked ready to train."""
    return build_train_config(args, _config_cls())


def run(args) -> int:
    cfg = build_config(args)
    if cfg.optimizer == "adamw8bit":
        allow_bitsandbytes()
    quiet_libraries(debug=args.debug, progress=cfg.progress)
    from ..fsio import DiskFullError, LockedError
    from ..train.adapter_trainer import train_adapters
    from ..train.errors import NonFiniteError

    try:
        with torch_threads(args.threads):
            summary = train_adapters(cfg)
    except ValueError as e:  # name the flag the message is about
        raise _blame(one_line(e), _config_cls(), given_values(args, _config_cls()),
                     getattr(args, "config", None)) from e
    except (NonFiniteError, LockedError, DiskFullError) as e:
        raise CLIError(one_line(e)) from e
    print("trained pair: " + ", ".join(f"{k}={short(v)}" for k, v in summary.items()
                                       if v is not None), flush=True)
    return EXIT_OK
