"""ddspo_fast: kernel-backed DDSPO and Diffusion-DPO preference fine-tuning.

The loss API imports only torch; the trainer, data, evaluation and demo pieces (which
pull in diffusers and transformers) load on first access.
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .loss import (BackendUnavailableError, DDSPOLoss, available_backends, ddspo_loss,
                   ddspo_loss_from_ref_mse, ddspo_loss_from_reference, dpo_loss,
                   reference_mse)

_LAZY = {
    "Trainer": ("ddspo_fast.train", "Trainer"),
    "TrainConfig": ("ddspo_fast.train", "TrainConfig"),
    "evaluate": ("ddspo_fast.evaluate", "evaluate"),
}
_LAZY_MODULES = ("testing", "data", "models", "train", "demo", "bench", "plan", "cli")

__all__ = [
    "__version__", "ddspo_loss", "ddspo_loss_from_reference", "ddspo_loss_from_ref_mse",
    "reference_mse", "dpo_loss", "DDSPOLoss",
    "available_backends", "BackendUnavailableError", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"ddspo_fast.{name}")
    else:
        raise AttributeError(f"module 'ddspo_fast' has no attribute {name!r}")
    globals()[name] = value
    return value
