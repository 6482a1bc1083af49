"""``ddspo-fast train``: fine-tune with DDSPO or Diffusion-DPO.

Every ``TrainConfig`` field is a flag (``_config_args``: transformers' HfArgumentParser,
both ``--learning_rate`` and ``--learning-rate``). ``--config FILE.yaml`` sets fields from
a file (``TrainConfig.from_yaml``) and flags override it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Dict, Optional

from . import EXIT_OK, CLIError, one_line
from ._args import allow_bitsandbytes, quiet_libraries, short
from ._config_args import add_dataclass_arguments, flag_name

HELP = "fine-tune with DDSPO or Diffusion-DPO"
DESCRIPTION = ("Train on a pair dataset. Every TrainConfig field is a flag, spelled --snake_case or "
               "--kebab-case; --config FILE.yaml sets fields from a file and flags override it. "
               "'none' unsets an optional field.")


def _config_cls():
    from ..train.config import TrainConfig

    return TrainConfig


def add_config_arguments(p, cls, title: str) -> None:
    """``--config FILE.yaml`` and one flag per field of the config dataclass ``cls``."""
    p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                   help="YAML file of field: value (snake_case or kebab-case keys); flags override it")
    add_dataclass_arguments(p, cls, title)


def add_arguments(p) -> None:
    add_config_arguments(p, _config_cls(), "TrainConfig options")


def given_values(args: argparse.Namespace, cls=None) -> Dict[str, Any]:
    """The config fields the command line set (absent flags leave no attribute)."""
    cls = cls or _config_cls()
    return {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}


def build_config(args: argparse.Namespace, cls=None):
    """Config (``cls``, default TrainConfig) defaults < ``--config`` file < flags, checked
    ready to train; a bad value is a CLIError naming the flag, or the file and its key."""
    cls = cls or _config_cls()
    given = given_values(args, cls)
    path: Optional[str] = getattr(args, "config", None)
    if path is not None and not Path(path).is_file():
        what = "is not a file" if Path(path).exists() else "does not exist"
        raise CLIError(f"argument --config: {path} {what} (expected a YAML file)")
    try:
        cfg = cls.from_yaml(path, overrides=given) if path is not None else cls.from_dict(given)
        cfg.check_ready()
        _check_local_model(cfg.model)
    except ValueError as e:
        raise _blame(one_line(e), cls, given, path) from e
    return cfg


def _check_local_model(model: Optional[str]) -> None:
    # a hub id is resolved by the trainer; a plainly local path must exist (train-pair's
    # config has its own check_ready, so this is checked here for both)
    from ..train.config import missing_local_model

    problem = missing_local_model(model) if model else None
    if problem:
        raise ValueError(f"model: {problem}")


def _blame(msg: str, cls, given: Dict[str, Any], path: Optional[str]) -> CLIError:
    """Name what a config error is about: the flag, or the --config file (and its key)."""
    if path is not None and msg.startswith(f"{path}:"):  # the file itself: missing, not YAML ...
        return CLIError(f"argument --config: {msg}")
    m = re.match(r"(\w+): (.*)", msg)
    if m and m[1] in cls.__dataclass_fields__ and (m[1] in given or path is None):
        return CLIError(f"argument {flag_name(m[1])}: {m[2]}")
    if path is not None:  # a key of the file, or a combination it set
        return CLIError(f"argument --config: {path}: {msg}")
    return CLIError(msg)


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
