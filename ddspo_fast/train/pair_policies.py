"""DD-CPP's policy pair: train the winning and losing LoRA adapters (``train-pair``).

    from ddspo_fast.train.pair_policies import PairTrainConfig, PairTrainer
    summary = PairTrainer(PairTrainConfig(model=M, data=D, output_dir=P)).train()
    # then: Trainer(TrainConfig(..., objective="ddspo", pair="lora", pair_lora=P))

DD-CPP takes its targets from the base with a *winning* LoRA trained on the preferred
samples and the base with a *losing* LoRA trained on the dispreferred ones. As the
official ``train_lora_target.py``: the plain denoising loss, both adapters conditioned on
the (positive) prompt, one timestep per pair shared by both, independent noise,
``loss = mse_w + mse_l``, one AdamW (lr 1e-4, constant_with_warmup) over both adapters
with gradient clipping (1.0) over both together; rank 4, alpha 4, dropout 0 on
to_q/to_k/to_v/to_out.0 (the family's attention projections elsewhere). The denoising
target is the family's Diffusion-DPO target (``adapter.dpo_target``: epsilon for SD,
x0 for SD3's preconditioned outputs, velocity for SANA), so every family trains.

Unlike the official script, which deep-copies the base once per adapter (two fp32
copies) and runs each on its B rows, both adapters live on ONE base module (stored in
the autocast dtype) and ONE forward runs the 2B rows stacked: ``SplitAdapters`` routes
rows [0:B) through the winning adapter and [B:2B) through the losing one inside every
LoRA layer. Same FLOPs, same result, one base copy and half the denoiser calls.

``output_dir`` receives ``pos_lora_unet/`` and ``neg_lora_unet/`` (peft adapter dirs,
exactly what the official script's ``PeftModel.save_pretrained`` writes, so both
``Trainer(pair_lora=output_dir)`` and the official ``--lora_path`` read them; the names
are kept for every family), ``metrics.jsonl``, ``checkpoints/checkpoint-N/``,
``train_pair_config.yaml`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..models import family_names
from . import checkpoint as ckpt
from .config import (LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS,
                     TRUST_CHECKPOINT_HELP, TrainConfig, as_config, weight_dtype)
from .config import config_field as _f
from .config import field_choices
from .lora import LOSE, WIN, add_adapter_named

WIN_DIR, LOSE_DIR = "pos_lora_unet", "neg_lora_unet"  # the official script's names
CONFIG_FILE = "train_pair_config.yaml"
SUMMARY_FILE = "summary.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # key prefix of PeftModel.save_pretrained
TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode", "cosmap", "linear", "sigmoid")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; nothing after the last good
    checkpoint was saved."""




@dataclass
class PairTrainConfig:
    # ---------------------------------------------------------------- what to train on
    model: Optional[str] = _f(None, "Local diffusers pipeline directory or hub id (required).")
    data: Optional[str] = _f(None, "Pair dataset directory (`prepare` / `encode` output or the "
                                   "official DDSPO layout); latent_w trains the winning "
                                   "adapter, latent_l the losing one (required).")
    output_dir: str = _f("ddspo-pair", "Where pos_lora_unet/ and neg_lora_unet/ (pass this "
                                       "directory as train's pair_lora), checkpoints and "
                                       "metrics go.")
    family: Optional[str] = _f(None, "Model family (a registered one: models.family_names()); "
                                     "detected from the model when unset.",
                               choices=family_names)
    # ---------------------------------------------------------------- the adapters
    lora_rank: int = _f(4, "LoRA rank of both adapters (official: 4).")
    lora_alpha: float = _f(4.0, "LoRA alpha of both adapters (official: 4).")
    lora_targets: Optional[list] = _f(None, "LoRA target modules (default: the family's "
                                            "attention projections; SD: to_q to_k to_v "
                                            "to_out.0 as the official script).")
    lora_dropout: float = _f(0.0, "LoRA dropout (official: 0).")
    timestep_sampling: Optional[str] = _f(None, "How t is drawn (None = the family's official "
                                                "default): uniform | linear | sigmoid (SD), "
                                                "uniform | logit_normal | mode | cosmap (flow).",
                                          choices=TIMESTEP_SCHEMES)
    logit_mean: float = _f(0.0, "logit_normal timesteps: mean.")
    logit_std: float = _f(1.0, "logit_normal timesteps: std.")
    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(1e-4, "Learning rate (official --lora_lr: 1e-4).")
    lr_scheduler: str = _f("constant_with_warmup", "LR schedule: " + " | ".join(LR_SCHEDULERS),
                           choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Linear warm-up steps (optimizer steps).")
    batch_size: int = _f(1, "Preference pairs per device per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    max_steps: Optional[int] = _f(None, "Optimizer steps; None = num_epochs epochs (as the "
                                        "official script).")
    num_epochs: int = _f(100, "Epochs when max_steps is None (official: 100).")
    max_grad_norm: Optional[float] = _f(1.0, "Gradient clipping over both adapters together "
                                             "(None = none).")
    optimizer: str = _f("adamw", "adamw | adamw8bit (bitsandbytes) | adafactor.",
                        choices=OPTIMIZERS)
    weight_decay: float = _f(1e-2, "AdamW weight decay (torch's default, as the official).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    # ---------------------------------------------------------------- speed and memory
    mixed_precision: str = _f("bf16", "bf16 | fp16 (CUDA) | no: autocast dtype; the frozen "
                                      "base is stored in it, the adapters stay fp32.",
                              choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward.")
    channels_last: bool = _f(True, "UNets only: channels_last memory format.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    # ---------------------------------------------------------------- bookkeeping
    checkpoint_every: int = _f(500, "Atomic checkpoint every N optimizer steps (0 = never).")
    checkpoints_keep: Optional[int] = _f(None, "Keep only the newest N checkpoints.")
    resume: Optional[str] = _f(None, "None | 'latest' (newest checkpoint in output_dir, fresh "
                                     "start if none) | a checkpoint directory.")
    trust_checkpoint: bool = _f(False, TRUST_CHECKPOINT_HELP)
    overwrite: bool = _f(False, "Start afresh in an output_dir that already holds adapters "
                                "or checkpoints (they are replaced); without it such a "
                                "directory is refused unless resuming.")
    allow_encoder_mismatch: bool = _f(False, "Train on a dataset whose recorded text encoders "
                                             "(or VAE) differ from model's, with a warning; "
                                             "without it such a dataset is refused.")
    seed: int = _f(0, "Seed for data order, timesteps, noise and LoRA init.")
    device: Optional[str] = _f(None, "Device (default: accelerate's choice).")
    log_every: int = _f(10, "Log metrics and check the loss is finite every N steps.")
    tensorboard: bool = _f(True, "Also log to TensorBoard under output_dir/logs when installed.")
    progress: bool = _f(True, "Show a progress bar.")

    # The layered-config plumbing (dict / YAML / kebab-case keys / help) is TrainConfig's.
    from_dict = classmethod(TrainConfig.from_dict.__func__)
    from_yaml = classmethod(TrainConfig.from_yaml.__func__)
    fields_help = classmethod(TrainConfig.fields_help.__func__)
    to_dict = TrainConfig.to_dict
    to_yaml = TrainConfig.to_yaml
    replace = TrainConfig.replace

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:  # and fits torch's 64-bit ints
            return isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("model", "data", "output_dir", "resume"):
            v = getattr(self, name)
            if v is None and name != "output_dir":
                continue
            if not isinstance(v, (str, os.PathLike)) or str(v) == "":
                raise bad(name, "a path")
            setattr(self, name, str(v))
        for f in dataclasses.fields(self):
            allowed = field_choices(f)
            v = getattr(self, f.name)
            if allowed and v not in allowed and not (v is None and f.default is None):
                raise bad(f.name, "one of " + ", ".join(repr(a) for a in allowed))
        for name in ("lora_rank", "batch_size", "grad_accum", "num_epochs", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        for name in ("lr_warmup_steps", "checkpoint_every", "num_workers", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an int >= 0")
        if self.seed >= 2 ** 32:  # numpy's seed (accelerate's set_seed) takes 32 bits
            raise bad("seed", "an int in [0, 4294967295]")
        for name in ("max_steps", "checkpoints_keep"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise bad(name, "None or an int >= 1")
        for name in ("lora_alpha", "learning_rate", "logit_std"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite positive number")
        for name in ("weight_decay", "adam_epsilon"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if not is_num(self.logit_mean):
            raise bad("logit_mean", "a finite number")
        for name in ("lora_dropout", "adam_beta1", "adam_beta2"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise bad(name, "a number in [0, 1)")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm)
                                               or self.max_grad_norm <= 0):
            raise bad("max_grad_norm", "None or a finite positive number")
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                self.lora_targets = [s.strip() for s in self.lora_targets.split(",") if s.strip()]
            if (not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets
                    or not all(isinstance(s, str) and s for s in self.lora_targets)):
                raise bad("lora_targets", "None or a non-empty list of module names")
            self.lora_targets = list(self.lora_targets)
        if self.device is not None and not isinstance(self.device, str):
            raise bad("device", "None or a device string such as 'cuda:0' or 'cpu'")
        for f in dataclasses.fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, "True or False")

    def check_ready(self) -> None:
        """Checks that only matter when training starts (required paths present)."""
        if not self.model:
            raise ValueError("model: required (a local diffusers pipeline directory or hub id)")
        if not self.data:
            raise ValueError("data: required (a pair dataset directory)")
        if not os.path.isdir(self.data):
            raise ValueError(f"data: {self.data} is not a directory")


# ====================================================================== adapters
class SplitAdapters:
    """One stacked forward, two adapters: rows [0:n) of every LoRA layer's input go
    through ``names[0]``, rows [n:2n) through ``names[1]`` (n = half the rows).

    While installed the layers' own adapter path is off (they return the base output)
    and a forward hook adds each half's ``B(A(dropout(x))) * scaling`` in place on that
    half's rows (views, no gather, no index tensors). The base runs once on all rows.
    """

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        from peft.tuners.lora import LoraLayer

        self.names = tuple(names)
        self.layers = [m for m in module.modules()
                       if isinstance(m, LoraLayer) and all(n in m.lora_A for n in self.names)]
        if not self.layers:
            raise ValueError(f"lora_targets: no LoRA layer holds adapters {self.names}")
        for m in self.layers:
            if any(m.use_dora.get(n, False) for n in self.names):
                raise ValueError("lora: DoRA adapters cannot be trained as a pair")
        self._handles: list = []
        self._saved = None

    def _hook(self, layer, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        k = len(self.names)
        if x.shape[0] % k:
            raise ValueError(f"SplitAdapters: {x.shape[0]} rows do not split into {k} equal parts")
        n = x.shape[0] // k
        for i, name in enumerate(self.names):
            a = layer.lora_A[name]
            rows = x[i * n:(i + 1) * n].to(a.weight.dtype)
            delta = layer.lora_B[name](a(layer.lora_dropout[name](rows))) * layer.scaling[name]
            output[i * n:(i + 1) * n] += delta.to(output.dtype)
        return output

    def install(self) -> "SplitAdapters":
        if not self._handles:
            self._saved = [(m._active_adapter, m._disable_adapters) for m in self.layers]
            for m in self.layers:
                m._disable_adapters = True
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None:
            for m, (a, d) in zip(self.layers, self._saved):
                m._active_adapter, m._disable_adapters = a, d
            self._saved = None

    def __enter__(self) -> "SplitAdapters":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def add_pair_adapters(module, rank: int, alpha: float, targets, dropout: float,
                      seed: int) -> None:
    """The winning and losing adapters on ``module``, initialised as peft's default
    (A Kaiming-uniform, B zero: both start as the base), from ``seed``."""
    from ..models.quiet import multiple_adapters

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with multiple_adapters():  # two adapters on one module is the point here
            for name in (WIN, LOSE):
                add_adapter_named(module, pair_lora_config(rank, alpha, targets, dropout),
                                  name, targets)
    finally:
        torch.random.set_rng_state(state)


def pair_lora_config(rank: int, alpha: float, targets, dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                      lora_dropout=dropout)


def adapter_state(module, name: str) -> dict:
    """peft keys (no adapter name) -> fp32 CPU tensors."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module, adapter_name=name).items()}


def write_adapter_dir(directory, state: dict, lora_config, extra=None) -> None:
    """A peft adapter dir as ``PeftModel.save_pretrained`` writes it (``adapter_config.json``
    + ``adapter_model.safetensors`` with ``base_model.model.`` keys), atomically, with
    the umask's modes (safetensors creates its file 0600, so the mode is set here)."""
    from safetensors.torch import save_file

    from ..fsio import atomic_dir, file_mode

    with atomic_dir(directory) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        if extra is not None:  # more files in the same folder (the diffusers LoRA file)
            extra(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, file_mode())


def write_pair_adapters(out, denoiser, pipeline_cls, denoiser_name: str) -> None:
    """``out/pos_lora_unet/`` and ``out/neg_lora_unet/`` from the two adapters on
    ``denoiser``, each a peft folder (what the official scripts and ``train --pair lora``
    read) that also holds the diffusers LoRA file ``pipe.load_lora_weights`` reads, at the
    trained alpha. A non-finite weight writes nothing."""
    from .export import write_lora

    states = {name: adapter_state(denoiser, name) for name in (WIN, LOSE)}
    for name in (WIN, LOSE):
        bad = [k for k, v in states[name].items() if not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"loss: adapter weight {bad[0]} is NaN/inf; "
                                     "nothing was written")
    out = Path(out)
    for name, d in ((LOSE, LOSE_DIR), (WIN, WIN_DIR)):
        lcfg = denoiser.peft_config[name]
        write_adapter_dir(out / d, states[name], lcfg,
                          extra=lambda tmp, n=name, c=lcfg: write_lora(
                              tmp, pipeline_cls, denoiser_name, states[n], c))


# ====================================================================== trainer
def _as_config(config) -> PairTrainConfig:
    return as_config(PairTrainConfig, config)


class PairTrainer:
    """Trains the winning / losing LoRA pair of DD-CPP. See ``PairTrainConfig``.

    Attributes: ``denoiser`` (the one base module carrying both adapters), ``adapter``
    (model family), ``dataset``, ``optimizer``, ``scheduler``, ``accelerator``,
    ``global_step``, ``max_steps``. The output directory is locked from construction
    until ``train()`` returns (or ``close()``).
    """

    def __init__(self, config):
        from accelerate import Accelerator

        from .trainer import _reset_accelerate_singletons

        self.config = cfg = _as_config(config)
        cfg.check_ready()
        if cfg.device and cfg.device.startswith("cuda:") and torch.cuda.is_available() \
                and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(torch.device(cfg.device))
        _reset_accelerate_singletons()
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                       mixed_precision=cfg.mixed_precision,
                                       cpu=(cfg.device == "cpu"))
        self.device = self.accelerator.device
        if cfg.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"mixed_precision: 'fp16' needs a CUDA device (this run is on "
                             f"{self.device.type}); use 'bf16' or 'no'")
        self.is_main = self.accelerator.is_main_process
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = weight_dtype(cfg.mixed_precision)
        self.out = Path(cfg.output_dir)
        self._lock = None
        try:
            self._claim_output_dir()
            self._setup_data_and_models()
            self._setup_optim()
            self._setup_state()
        except BaseException:
            self.close()
            raise

    # ================================================================== setup
    def _claim_output_dir(self) -> None:
        from ..fsio import DirLock
        from .outdir import check_apart

        cfg = self.config
        if self.is_main:
            check_apart(cfg)  # before the lock: a refused run leaves nothing behind
            if self.out.exists() and not self.out.is_dir():
                raise ValueError(f"output_dir: {self.out} exists and is not a directory")
            self._lock = DirLock(self.out, "output_dir").acquire()
            previous = [p for p in (self.out / WIN_DIR, self.out / LOSE_DIR,
                                    ckpt.checkpoints_dir(self.out)) if p.exists()]
            if previous and cfg.resume is None:
                if not cfg.overwrite:
                    raise ValueError(
                        f"output_dir: {self.out} already holds "
                        f"{', '.join(p.name + '/' for p in previous)} from an earlier run; "
                        "pass resume='latest' (--resume latest) to continue it, "
                        "overwrite=True (--overwrite) to start afresh, or another directory")
                shutil.rmtree(ckpt.checkpoints_dir(self.out), ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _setup_data_and_models(self) -> None:
        from ..data import open_dataset
        from ..data.provenance import check_encoders
        from ..models import detect_family, load_adapter

        cfg, acc = self.config, self.accelerator
        self.family = cfg.family or detect_family(cfg.model)
        self.dataset = open_dataset(cfg.data, family=self.family)
        if len(self.dataset) == 0:
            raise ValueError(f"data: {cfg.data} holds no pairs")
        check_encoders(self.dataset, cfg.model, self.family, cfg.allow_encoder_mismatch)
        self.batches_per_epoch = (len(self.dataset) // acc.num_processes) // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch_size: {cfg.batch_size} pairs x {acc.num_processes} "
                             f"processes is more than the {len(self.dataset)} pairs in {cfg.data}")
        self.max_steps = cfg.max_steps or cfg.num_epochs * math.ceil(
            self.batches_per_epoch / cfg.grad_accum)
        self.need_text = not self.dataset.has_text_embeddings
        comps = ("denoiser", "text") if self.need_text else ("denoiser",)
        self.adapter = a = load_adapter(cfg.model, self.family, components=comps,
                                        device=self.device, dtype=self.weight_dtype,
                                        text_dtype=self.weight_dtype)
        if cfg.timestep_sampling is not None and cfg.timestep_sampling not in a.timestep_schemes():
            raise ValueError(f"timestep_sampling: expected one of {a.timestep_schemes()} for "
                             f"{self.family}, got {cfg.timestep_sampling!r}")
        den = a.denoiser
        a.prepare_denoiser(den, channels_last=cfg.channels_last)
        self.targets = list(cfg.lora_targets or a.lora_targets)
        try:
            add_pair_adapters(den, cfg.lora_rank, cfg.lora_alpha, self.targets, cfg.lora_dropout,
                              cfg.seed)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"lora_targets: {' '.join(str(e).split())}") from None
        den.requires_grad_(False)
        for name, p in den.named_parameters():
            if f".{WIN}." in name or f".{LOSE}." in name:
                p.requires_grad_(True)
                p.data = p.data.float()  # trained in fp32; the base stays in weight_dtype
        self.split = SplitAdapters(den, (WIN, LOSE)).install()
        if cfg.gradient_checkpointing:
            den.enable_gradient_checkpointing()
        den.train()
        self.denoiser = den
        self.trainable_names = [n for n, p in den.named_parameters() if p.requires_grad]
        self.trainable = [p for p in den.parameters() if p.requires_grad]

    def _setup_optim(self) -> None:
        from .optim import build_optimizer, build_scheduler

        cfg = self.config
        opt = build_optimizer(self.trainable, cfg)
        self._ddp = self.accelerator.prepare_model(self.denoiser)
        self.optimizer = self.accelerator.prepare_optimizer(opt)
        # Stepped by hand once per optimizer step (as the main trainer does).
        self.scheduler = build_scheduler(opt, dataclasses.replace(cfg, max_steps=self.max_steps))

    def _setup_state(self) -> None:
        cfg, rank = self.config, self.accelerator.process_index
        self.global_step = self.micro_step = 0
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + rank)
        random.seed(cfg.seed + rank)
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._pairs = 0
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.last_metrics: dict = {}
        self.last_checkpoint: Optional[str] = None
        self._resumed_from: Optional[str] = None
        if cfg.resume:
            path = ckpt.latest(self.out) if cfg.resume == "latest" else Path(cfg.resume)
            if path is not None:
                if not (Path(path) / ckpt.STATE_FILE).is_file():
                    raise ValueError(f"resume: {path} is not a checkpoint directory")
                self.load_checkpoint(path)

    # ================================================================== data
    def batches(self) -> Iterator[dict]:
        """This process's micro-batches from ``micro_step`` on: a seeded permutation per
        epoch, so a resumed run continues with exactly the batches it would have seen."""
        from torch.utils.data import DataLoader, Subset

        from ..data import collate_pairs

        cfg, acc = self.config, self.accelerator
        bs, per_epoch = cfg.batch_size, self.batches_per_epoch
        epoch, offset = divmod(self.micro_step, per_epoch)
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.dataset), generator=g).tolist()
            mine = perm[acc.process_index::acc.num_processes][: per_epoch * bs]
            yield from DataLoader(Subset(self.dataset, mine[offset * bs:]), batch_size=bs,
                                  shuffle=False, drop_last=True, collate_fn=collate_pairs,
                                  num_workers=cfg.num_workers,
                                  pin_memory=self.device.type == "cuda")
            epoch, offset = epoch + 1, 0

    # ================================================================== step
    def compute_loss(self, batch: dict):
        """``(loss, mse_w, mse_l)`` of one micro-batch: the 2B rows [x_w ; x_l] (shared t,
        independent noise, both on c) in one forward, winning adapter on the first half."""
        from .pairs import assemble_conditions, cat_cond

        a, cfg, dev = self.adapter, self.config, self.device
        x_w = batch["latent_w"].to(dev, non_blocking=True).float()
        x_l = batch["latent_l"].to(dev, non_blocking=True).float()
        n = x_w.shape[0]
        cond, _, _ = assemble_conditions(batch, a, False, None, device=dev,
                                         dtype=self.weight_dtype)
        t = a.sample_timesteps(n, device=dev, generator=self.generator,
                               scheme=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                               logit_std=cfg.logit_std)
        x0, t2 = torch.cat([x_w, x_l]), torch.cat([t, t])
        noise = torch.randn(x0.shape, generator=self.generator, device=dev, dtype=x0.dtype)
        x_t = a.add_noise(x0, noise, t2)
        x_t = a.prepare_input(x_t, channels_last=cfg.channels_last)
        pred = a.predict(self._ddp, x_t, t2, cat_cond(cond, cond))
        err = (pred.float() - a.dpo_target(x0, noise, t2).float()).square()
        mse_w, mse_l = err[:n].mean(), err[n:].mean()
        return mse_w + mse_l, mse_w, mse_l

    def train_step(self, batch: dict) -> dict:
        """One micro-batch: forward, backward and, on an accumulation boundary, the
        clipped optimizer and schedule step. Returns detached tensors (no host sync)."""
        acc, cfg = self.accelerator, self.config
        with acc.accumulate(self._ddp):
            with acc.autocast():
                loss, mse_w, mse_l = self.compute_loss(batch)
            acc.backward(loss)
            bad = ~torch.isfinite(loss.detach())
            if acc.sync_gradients and cfg.max_grad_norm is not None:
                norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                if norm is not None:
                    bad = bad | ~torch.isfinite(torch.as_tensor(norm, device=loss.device))
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        if acc.sync_gradients:
            self.global_step += 1
        # Remembered on the device (no sync); checked at each log and before any save.
        step = self.global_step if acc.sync_gradients else self.global_step + 1
        self._first_bad = torch.where(bad & ~self._bad, step, self._first_bad)
        self._bad |= bad
        n = len(batch["latent_w"])
        self._sums += torch.stack([loss.detach(), mse_w.detach(), mse_l.detach()]).double() * n
        self._pairs += n
        return {"loss": loss.detach(), "mse_w": mse_w.detach(), "mse_l": mse_l.detach()}

    def _check_finite(self) -> None:
        bad = self._bad
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.long(), reduction="sum") > 0
        if bool(bad):
            step = int(self._first_bad)
            last = self.last_checkpoint or "none"
            raise NonFiniteLossError(
                f"loss: became NaN/inf at step {step if step > 0 else self.global_step} "
                f"(nothing after the last good checkpoint was saved; last checkpoint: {last}); "
                "lower learning_rate, try mixed_precision='no', or check the data")

    # ================================================================== loop
    def train(self) -> dict:
        """Train to ``max_steps``, then write both adapters; returns a summary."""
        from tqdm.auto import tqdm

        from .metrics import MetricsWriter

        cfg, acc = self.config, self.accelerator
        writer = bar = None
        try:
            if self.is_main:
                cfg.to_yaml(self.out / CONFIG_FILE)
                writer = MetricsWriter(self.out, cfg.tensorboard,
                                       self.global_step if self._resumed_from else None)
            bar = tqdm(total=self.max_steps, initial=self.global_step, desc="train-pair",
                       disable=not (self.is_main and cfg.progress), dynamic_ncols=True)
            t_start = t_log = time.perf_counter()
            pairs_total, batches = 0, self.batches()
            while self.global_step < self.max_steps:
                before = self.global_step
                self.train_step(next(batches))
                if self.global_step == before:
                    continue
                bar.update(1)
                step = self.global_step
                if step % cfg.log_every == 0 or step == self.max_steps:
                    now = time.perf_counter()
                    rec = self._collect(now - t_log)
                    pairs_total += rec["pairs"]
                    t_log = now
                    if writer is not None:
                        writer.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    self._check_finite()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            acc.wait_for_everyone()
            self._check_finite()
            paths = self.save_adapters()
            elapsed = time.perf_counter() - t_start
            summary = {k: self.last_metrics.get(k) for k in ("loss", "mse_w", "mse_l")}
            summary.update(steps=self.global_step, output_dir=str(self.out),
                           win=paths[0], lose=paths[1], last_checkpoint=self.last_checkpoint,
                           pairs_per_s=pairs_total / elapsed if elapsed > 0 else None,
                           seconds=elapsed)
            if self.is_main:
                from ..fsio import atomic_write_json

                atomic_write_json(self.out / SUMMARY_FILE, _finite_or_none(summary))
            return summary
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            self.close()

    def _collect(self, elapsed: float) -> dict:
        from .metrics import peak_memory

        acc = self.accelerator
        packed = torch.cat([self._sums, torch.tensor([float(self._pairs)], dtype=torch.float64,
                                                     device=self.device)])
        if acc.num_processes > 1:
            packed = acc.reduce(packed, reduction="sum")
        s = packed.tolist()  # the one host sync per log
        pairs = int(s[3])
        rec = {"step": self.global_step}
        rec.update({k: (v / pairs if pairs else None) for k, v in zip(("loss", "mse_w", "mse_l"),
                                                                      s[:3])})
        rec.update(lr=self.scheduler.get_last_lr()[0], pairs=pairs,
                   pairs_per_s=pairs / elapsed if elapsed > 0 else None)
        rec.update(peak_memory(self.device))
        self._sums.zero_()
        self._pairs = 0
        self.last_metrics = rec
        return rec

    # ================================================================== checkpoints
    def save_checkpoint(self) -> str:
        """Atomic checkpoint of everything needed to continue exactly (refused, with
        ``NonFiniteLossError``, if a loss since the start was not finite)."""
        cfg, acc = self.config, self.accelerator
        self._check_finite()
        named = dict(self.denoiser.named_parameters())
        state = {"global_step": self.global_step, "micro_step": self.micro_step,
                 "num_processes": acc.num_processes, "max_steps": self.max_steps,
                 "last_metrics": _finite_or_none(self.last_metrics), "config": cfg.to_dict(),
                 "kind": "train-pair"}
        path = ckpt.save(
            self.out, self.global_step, acc,
            trainable=lambda: {n: named[n].detach().to("cpu", torch.float32).contiguous()
                               for n in self.trainable_names},
            optimizer=self.optimizer, scheduler=self.scheduler, state=state,
            rng=ckpt.capture_rng(self.generator), keep=cfg.checkpoints_keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    def load_checkpoint(self, path) -> None:
        path, acc = Path(path), self.accelerator
        got = ckpt.load(path, acc.process_index, trust=self.config.trust_checkpoint)
        state = got.state
        if state.get("kind") != "train-pair":
            raise ValueError(f"resume: {path} is not a train-pair checkpoint")
        if state.get("num_processes", 1) != acc.num_processes:
            raise ValueError(f"resume: {path} was written by {state['num_processes']} "
                             f"processes, this run has {acc.num_processes}; the data order "
                             "would not continue exactly")
        named = dict(self.denoiser.named_parameters())
        for n in self.trainable_names:
            if n not in got.trainable or got.trainable[n].shape != named[n].shape:
                raise ValueError(f"resume: {path} does not match this model/config (no "
                                 f"{n} of shape {tuple(named[n].shape)}; lora_rank or "
                                 "lora_targets changed?)")
        with torch.no_grad():
            for n in self.trainable_names:
                named[n].copy_(got.trainable[n].to(named[n].device, torch.float32))
        self.optimizer.load_state_dict(got.optimizer)
        self.scheduler.load_state_dict(got.scheduler)
        if got.rng is not None:
            ckpt.restore_rng(got.rng, self.generator)
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self.last_metrics = state.get("last_metrics") or {}
        self.accelerator.step = 0  # checkpoints sit on accumulation boundaries
        self._resumed_from = self.last_checkpoint = str(path)

    # ================================================================== export
    def save_adapters(self) -> tuple[str, str]:
        """Write ``pos_lora_unet/`` and ``neg_lora_unet/`` (each atomically)."""
        cfg = self.config
        win, lose = self.out / WIN_DIR, self.out / LOSE_DIR
        if self.is_main:
            from .export import model_card_hook, pipeline_class

            write_pair_adapters(self.out, self.denoiser, pipeline_class(self.family),
                                self.adapter.denoiser_name)
            model_card_hook(self.out, {"kind": "pair", "family": self.family,
                                       "base_model": cfg.model, "config": cfg.to_dict(),
                                       "step": self.global_step})
        self.accelerator.wait_for_everyone()
        return str(win), str(lose)

    def close(self) -> None:
        """Release the output directory (also done at the end of ``train``)."""
        split = getattr(self, "split", None)
        if split is not None:
            split.remove()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __repr__(self) -> str:
        c = self.config
        return (f"<PairTrainer {getattr(self, 'family', '?')} rank={c.lora_rank} "
                f"step={getattr(self, 'global_step', 0)}/{getattr(self, 'max_steps', '?')}>")


def _finite_or_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}


def train_pair(config) -> dict:
    """``PairTrainer(config).train()``: train DD-CPP's winning and losing adapters."""
    return PairTrainer(config).train()
