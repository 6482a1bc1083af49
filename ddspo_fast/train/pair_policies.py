"""The public names ``train-pair`` has had since it shipped (the README, the CLI and user
code import them from here): DD-CPP's adapter trainer lives in ``adapter_trainer.py``, its
config in ``config.py`` and the pair adapters' LoRA mechanics in ``lora.py``."""

from .adapter_trainer import CONFIG_FILE, SUMMARY_FILE, AdapterTrainer, train_adapters
from .config import AdapterTrainConfig
from .errors import NonFiniteError
from .lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LOSE_DIR, PEFT_PREFIX, WIN_DIR,
                   SplitAdapters, adapter_state, add_pair_adapters, pair_lora_config,
                   write_adapter_dir, write_pair_adapters)

PairTrainer = AdapterTrainer
PairTrainConfig = AdapterTrainConfig
NonFiniteLossError = NonFiniteError
train_pair = train_adapters

__all__ = ["PairTrainer", "PairTrainConfig", "NonFiniteLossError", "train_pair",
           "AdapterTrainer", "AdapterTrainConfig", "train_adapters", "SplitAdapters",
           "add_pair_adapters", "pair_lora_config", "adapter_state", "write_adapter_dir",
           "write_pair_adapters", "WIN_DIR", "LOSE_DIR", "CONFIG_FILE", "SUMMARY_FILE",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX"]
