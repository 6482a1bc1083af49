"""Evaluation: sample a model (or a run and its base on the same prompts and seeds), score
the images, and report.

* ``sources``: what a model path is (pipeline, LoRA run, checkpoint, export, DD-CPP
  adapters) and the pipeline it samples with.
* ``generate``: the seed rule and resumable, batched generation.
* ``scorers``: one module per metric behind one interface.
* ``stats``: paired means, bootstrap intervals, win rates.
* ``report``: scores.csv, report.md, the side-by-side grid, training curves.
* ``formats``: the image folders GenEval and T2I-CompBench read.
* ``model_card``: the README.md beside exported weights.
"""

from .api import compare, evaluate
from .model_card import write_model_card

__all__ = ["compare", "evaluate", "write_model_card"]
