"""Training: ``TrainConfig`` (every setting) and ``Trainer`` (the accelerate loop);
``AdapterTrainConfig`` and ``AdapterTrainer`` for DD-CPP's pair adapters (``train-pair``).

The trainers are imported on first use, so reading or validating a config (the CLI's
``train --help`` and argument parsing) does not load the training loop and its
dependencies.
"""

from .config import AdapterTrainConfig, TrainConfig

__all__ = ["Trainer", "TrainConfig", "AdapterTrainer", "AdapterTrainConfig"]


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "AdapterTrainer":
        from .adapter_trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'ddspo_fast.train' has no attribute {name!r}")
