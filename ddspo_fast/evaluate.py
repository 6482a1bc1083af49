"""``ddspo_fast.evaluate``: the single-model CLIP evaluation, kept at its old import path
(the implementation is the ``evaluation`` package)."""

from .evaluation.api import evaluate
from .evaluation.sources import LORA_WEIGHTS, load_pipeline as _load_pipeline

__all__ = ["evaluate", "LORA_WEIGHTS", "_load_pipeline"]
