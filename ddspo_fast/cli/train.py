"""``ddspo-fast train``: fine-tune with DDSPO or Diffusion-DPO.

Every ``TrainConfig`` field is a flag (``_config_args``: transformers' HfArgumentParser,
both ``--learning_rate`` and ``--learning-rate``). ``--config FILE.yaml`` sets fields from
a file (``TrainConfig.from_yaml``) and flags override it.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import EXIT_OK
from ._args import allow_bitsandbytes, quiet_libraries, short
from ._config_args import add_config_arguments, config_from_args

HELP = "fine-tune with DDSPO or Diffusion-DPO"
DESCRIPTION = ("Train on a pair dataset. Every TrainConfig field is a flag, spelled --snake_case or "
               "--kebab-case; --config FILE.yaml sets fields from a file and flags override it. "
               "'none' unsets an optional field.")


def _config_cls():
    from ..train.config import TrainConfig

    return TrainConfig


def add_arguments(p) -> None:
    add_config_arguments(p, _config_cls(), "TrainConfig options")


def build_config(args: argparse.Namespace):
    """TrainConfig defaults < ``--config`` file < flags, checked ready to train; a bad value
    is a CLIError naming the flag, or the file and its key."""
    return config_from_args(args, _config_cls(), ready=True)


def summary_line(summary: Any) -> str:
    if isinstance(summary, dict):
        return "trained: " + ", ".join(f"{k}={short(v)}" for k, v in summary.items() if v is not None)
    return f"trained: {summary}"


def run(args) -> int:
    cfg = build_config(args)
    if cfg.optimizer == "adamw8bit":
        allow_bitsandbytes()
    quiet_libraries(debug=args.debug, progress=cfg.progress)
    from ..train import Trainer

    summary = Trainer(cfg).train()
    print(summary_line(summary), flush=True)
    return EXIT_OK
