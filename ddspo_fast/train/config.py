"""``TrainConfig``: every training setting, validated on construction.

Each field carries ``metadata={"help": ...}`` (``TrainConfig.fields_help()``) so the
CLI can generate its ``--flags`` from the dataclass. Build one directly, from a dict
(``TrainConfig.from_dict``) or from YAML (``TrainConfig.from_yaml``); unknown keys and
invalid values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..models import family_names

OBJECTIVES = ("ddspo", "dpo")
PAIRS = ("reference", "lora")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
ATTENTION = ("sdpa", "xformers")
LOSS_WEIGHTING = (None, "linear")
RAND_COND_SCHEDULES = ("sigmoid", "exponential", "constant")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")
FAMILIES = family_names()  # the registry's families when this module loaded (CLI choices)
ON_NONFINITE = ("stop", "skip")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # = ddspo_fast.loss.LOSS_TYPES (checked by a test)
# every family's schemes; each family accepts its own subset (models/base.py)
TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode", "cosmap", "linear", "sigmoid")
# torch.device strings a run may name; anything else ("gpu0", "banana") is refused.
DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


# Settings that define a run: a checkpoint continues it exactly only with the same values,
# so resuming with another value is refused, naming the field. Every other setting may
# change on resume and the new value is applied (and logged).
RUN_DEFINING = ("model", "data", "family", "objective", "pair", "pair_lora", "beta",
                "timesteps_per_pair", "loss_weighting", "logit_mean", "logit_std",
                "loss_type", "timestep_sampling", "mode_scale", "flow_shift", "guidance_scale",
                "text_encoder_dtype",
                "rand_cond_prompts", "rand_cond_lambda", "rand_cond_schedule", "batch_size",
                "grad_accum", "seed", "lora_rank", "lora_alpha", "lora_targets", "optimizer")
# Where and how this invocation runs; not compared on resume.
RESUME_IGNORED = ("resume", "overwrite", "output_dir", "progress", "trust_checkpoint")
_PATH_FIELDS = ("model", "data", "pair_lora", "rand_cond_prompts")
TRUST_CHECKPOINT_HELP = (
    "Allow what cannot be verified as data only, for files you trust: resume from a "
    "checkpoint of an earlier version (its pickled optimizer.pt / scheduler.pt / "
    "rng-rank*.pt are unpickled, which can run code stored in them) or from one without a "
    "manifest.json, and use a reference cache whose shards have no checksums. Without it "
    "such files are refused, naming the file.")


def resume_differences(saved: Mapping[str, Any], new: "RunConfig") -> list[tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` for every compared field that differs between a
    checkpoint's config (a dict, as stored) and ``new``; fields the checkpoint predates
    count as their defaults. Local paths are compared by what they point to."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(new))}
    out = []
    for name, value in dataclasses.asdict(new).items():
        if name in type(new).RESUME_IGNORED:
            continue
        old = saved.get(name, defaults[name])
        same = old == value
        if not same and name in _PATH_FIELDS and old is not None and value is not None:
            same = os.path.realpath(str(old)) == os.path.realpath(str(value))
        if not same and isinstance(old, list) and isinstance(value, (list, tuple)):
            same = list(old) == list(value)
        if not same:
            out.append((name, old, value))
    return out


# a diffusers pipeline on the hub is always "org/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def missing_local_model(model: str) -> Optional[str]:
    """Why ``model`` is plainly a local path that is not there (None when it exists or may
    be a hub id). Caught here, before diffusers spends half a minute asking the hub for a
    mistyped folder: an absolute, ``./`` or ``~`` path, anything that is no hub id, and
    ``a/b`` where ``a`` is a local folder (``models/tiny-sd5`` beside ``models/``)."""
    text = str(model)
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return None
    first = text.replace("\\", "/").split("/", 1)[0]
    local = (os.path.isabs(path) or text.startswith((".", "~")) or not _HUB_ID.match(text)
             or ("/" in text and os.path.isdir(first)))
    if not local:
        return None
    near = ""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(path), os.listdir(parent), n=1)
        if close:
            near = f"; did you mean {os.path.join(os.path.dirname(text), close[0])}?"
    return f"{text} does not exist (a local path, not a hub id){near}"


def config_field(default, help: str, **kw):
    """A dataclass field whose help (and argparse extras such as ``choices``) the command
    line reads through HfArgumentParser (TrainConfig, AdapterTrainConfig)."""
    return field(default=default, metadata={"help": help, **kw})


_f = config_field


def weight_dtype(mixed_precision: str):
    """The dtype of frozen weights and of autocast for a resolved ``mixed_precision``
    ('bf16' | 'fp16' | 'no'); see ``precision.Precision`` (torch is imported there, not
    with the config)."""
    from .precision import weight_dtype as resolved

    return resolved(mixed_precision)


def _is_int(v) -> bool:  # and fits torch's 64-bit ints
    return isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RunConfig:
    """What every training run's config shares (``TrainConfig``, ``AdapterTrainConfig``):
    reading it from a dict or YAML, writing it, its help for the command line, the
    checks of the settings both have, and which settings define a run on resume."""

    RUN_DEFINING: tuple = ()   # resuming with another value is refused, naming the field
    RESUME_IGNORED: tuple = RESUME_IGNORED  # where and how this invocation runs

    def resolved_mixed_precision(self, device_type: str) -> str:
        """The autocast setting a run on ``device_type`` uses (``precision.py`` resolves
        ``auto``: bf16 on a GPU, ``no`` elsewhere)."""
        from .precision import resolve_mixed_precision

        return resolve_mixed_precision(self.mixed_precision, device_type)

    def _bad(self, name: str, expected: str) -> ValueError:
        return ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    def _check_run_settings(self) -> None:
        """The settings of the loop, the optimizer and the bookkeeping, as both configs
        have them."""
        bad = self._bad
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not _is_num(v) or not 0 <= v < 1:
                raise bad(name, "a number in [0, 1)")
        for name in ("batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, "an int >= 1")
        for name in ("lr_warmup_steps", "checkpoint_every", "num_workers", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise bad(name, "an int >= 0")
        if self.seed >= 2 ** 32:  # numpy's seed (accelerate's set_seed) takes 32 bits
            raise bad("seed", "an int in [0, 4294967295]")
        if self.checkpoints_keep is not None and (not _is_int(self.checkpoints_keep)
                                                  or self.checkpoints_keep < 1):
            raise bad("checkpoints_keep", "None or an int >= 1")
        if self.max_grad_norm is not None and (not _is_num(self.max_grad_norm)
                                               or self.max_grad_norm <= 0):
            raise bad("max_grad_norm", "None or a finite positive number")

    def _check_lora_targets(self) -> None:
        """lora_targets as a list of names (a comma-separated string is split)."""
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                self.lora_targets = [s.strip() for s in self.lora_targets.split(",") if s.strip()]
            if (not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets
                    or not all(isinstance(s, str) and s for s in self.lora_targets)):
                raise self._bad("lora_targets", "None or a non-empty list of module names")
            self.lora_targets = list(self.lora_targets)

    def _check_inputs_ready(self) -> None:
        """model and data given, data a directory."""
        if not self.model:
            raise ValueError("model: required (a local diffusers pipeline directory or hub id)")
        if not self.data:
            raise ValueError("data: required (a pair dataset directory)")
        if not os.path.isdir(self.data):
            raise ValueError(f"data: {self.data} is not a directory")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """A config from ``{field: value}``; keys may be snake_case or kebab-case. Each
        value is read as its field's type by ``as_field_type`` (or refused naming the
        field and the type)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config: expected a mapping of field names to values, got "
                             f"{type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values: dict = {}
        for key, value in d.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                near = difflib.get_close_matches(name, fields, n=1)
                hint = f"did you mean {near[0]!r}?" if near else "known: " + ", ".join(fields)
                raise ValueError(f"{key}: unknown config field ({hint})")
            if name in values:
                raise ValueError(f"{name}: given twice (as {name!r} and {name.replace('_', '-')!r})")
            values[name] = as_field_type(name, value, hints[name],
                                         fields[name].metadata.get("choices", ()))
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, overrides: Optional[Mapping[str, Any]] = None) -> "RunConfig":
        """A config from a YAML mapping of fields (as ``from_dict``), with ``overrides``
        (e.g. command-line flags) taking precedence over the file. A file that is not
        YAML or not a mapping raises ValueError starting with ``f"{path}:"``."""
        import yaml

        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            d = yaml.load(text, Loader=_config_loader())  # noqa: S506 - a SafeLoader subclass
        except _DuplicateKey as e:
            raise ValueError(f"{path}: line {e.line}: {e.key}: given twice (each setting "
                             "once)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(f"{path}: not valid YAML ({where}{' '.join(str(problem).split())})") from None
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{path}: expected a mapping of field names to values, got "
                             f"{type(d).__name__}")
        if overrides:
            overridden = {str(k).replace("-", "_") for k in overrides}
            d = {k: v for k, v in d.items() if str(k).replace("-", "_") not in overridden}
            d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path) -> None:
        import yaml

        from ..fsio import atomic_write_text

        d = self.to_dict()
        # a permission of one invocation, never carried into a file that a later run (or
        # someone else) reads back as its config
        d.pop("trust_checkpoint", None)
        atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields_help(cls) -> dict[str, dict]:
        """{name: {"default", "help", "type", "choices"}} for every field, in declaration
        order (``choices`` is None for a field without a fixed set of values)."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = {"default": f.default, "help": f.metadata.get("help", ""),
                           "type": f.type, "choices": f.metadata.get("choices")}
        return out


@dataclass
class TrainConfig(RunConfig):
    RUN_DEFINING = RUN_DEFINING

    # ---------------------------------------------------------------- what to train on
    model: Optional[str] = _f(None, "Local diffusers pipeline directory or hub id (required).")
    data: Optional[str] = _f(None, "Pair dataset directory: the ddspo_fast packed format "
                                   "(written by `prepare`) or the official DDSPO layout "
                                   "(metadata.jsonl + latents/) (required).")
    output_dir: str = _f("ddspo-output", "Where checkpoints, metrics.jsonl, logs and the "
                                         "final pipeline / LoRA weights go.")
    family: Optional[str] = _f(None, f"Model family ({' | '.join(FAMILIES)}); detected from "
                                     "the model's model_index.json when unset.",
                               choices=FAMILIES)
    # ---------------------------------------------------------------- objective
    objective: str = _f("ddspo", "ddspo: targets from a contrastive policy pair; dpo: plain "
                                 "Diffusion-DPO with the forward-process (noise/flow) target.",
                                 choices=OBJECTIVES)
    pair: str = _f("reference", "DDSPO policy pair. reference (TF-CPP): the frozen reference "
                                "on the original vs the degraded prompt; lora (DD-CPP): the "
                                "base with the winning vs the losing LoRA adapter "
                                "(needs pair_lora).", choices=PAIRS)
    pair_lora: Optional[str] = _f(None, "DD-CPP only: directory with the winning and losing "
                                        "adapters in subdirectories win/ and lose/ (also "
                                        "accepted: pos_lora_unet/ and neg_lora_unet/), each "
                                        "a diffusers LoRA (pytorch_lora_weights.safetensors) "
                                        "or a peft adapter (adapter_config.json).")
    beta: float = _f(5000.0, "DPO temperature beta (the paper uses 2000 to 22000).")
    timesteps_per_pair: int = _f(1, "K >= 1 independent (t, noise) draws per pair per step; "
                                    "text encoding is shared across the K draws.")
    loss_weighting: Optional[str] = _f(None, "None or 'linear': weight pair i by its noise "
                                             "level (t/(T-1) for SD, sigma for flow models).",
                                       choices=LOSS_WEIGHTING)
    logit_mean: float = _f(0.0, "Flow models: mean of the logit-normal timestep density.")
    logit_std: float = _f(1.0, "Flow models: std of the logit-normal timestep density.")
    rand_cond_prompts: Optional[str] = _f(
        None, "Random-condition mixing (the paper's rand_cond): a degraded-prompts JSONL "
              "({'prompt', 'neg_prompts': [...]}, e.g. from `degrade`) of extra prompts. When "
              "set, each pair is, with probability p(tau) depending on its drawn noise level "
              "tau in [0, 1] (DDPM t/(T-1); flow: sigma, so it follows the logit-normal draws), "
              "re-conditioned on a random extra prompt c' and gets the TF-CPP target "
              "ref(x_t, c') vs ref(x_t, c'-) whatever the objective.")
    rand_cond_lambda: float = _f(20.0, "Steepness of the random-condition schedule.")
    rand_cond_schedule: str = _f("sigmoid", "p(tau) of random-condition mixing: sigmoid = "
                                            "1/(1+exp(-lambda*(tau-0.7))); exponential = "
                                            "exp(-lambda*(1-tau)); constant = 1.",
                                            choices=RAND_COND_SCHEDULES)
    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(1e-5, "Peak learning rate (LoRA usually wants ~1e-4).")
    lr_scheduler: str = _f("constant_with_warmup", "LR schedule: " + " | ".join(LR_SCHEDULERS),
    choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Linear warm-up steps (optimizer steps).")
    batch_size: int = _f(1, "Preference pairs per device per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = _f(1000, "Optimizer steps to train for.")
    max_grad_norm: Optional[float] = _f(1.0, "Gradient clipping norm (None = no clipping).")
    optimizer: str = _f("adamw", "adamw | adamw8bit (bitsandbytes; 4x smaller states) | "
                                 "adafactor.", choices=OPTIMIZERS)
    weight_decay: float = _f(1e-2, "Decoupled weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    lora_rank: Optional[int] = _f(None, "Train a LoRA of this rank on the denoiser; None = "
                                        "full fine-tune. With LoRA the reference is the same "
                                        "module with adapters off (no second copy).")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha (default: lora_rank).")
    lora_targets: Optional[list] = _f(None, "LoRA target module names (default: the family's "
                                            "attention projections).")
    # ---------------------------------------------------------------- speed and memory
    mixed_precision: str = _f("auto", "auto | bf16 | fp16 | no: autocast dtype of the forward "
                                      "passes; frozen weights are stored in it, trainable ones "
                                      "and the loss math stay fp32. auto = bf16 on a GPU, no "
                                      "(fp32) on the CPU, where bf16 autocast is slower.",
                                      choices=MIXED_PRECISION)
    attention: str = _f("sdpa", "sdpa (PyTorch scaled_dot_product_attention) | xformers.",
    choices=ATTENTION)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    compile: bool = _f(False, "torch.compile the denoiser.")
    channels_last: bool = _f(True, "UNets only: channels_last memory format.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls/convolutions on Ampere+ GPUs.")
    backend: str = _f("auto", "Loss backend (see ddspo_fast.available_backends()).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    ddp_find_unused_parameters: bool = _f(False, "Multi-GPU DDP: let DDP look for parameters "
                                                 "that get no gradient (needed only if the "
                                                 "model has such trainable parameters).")
    # ---------------------------------------------------------------- bookkeeping
    checkpoint_every: int = _f(500, "Write an atomic checkpoint every N optimizer steps "
                                    "(0 = never).")
    checkpoints_keep: Optional[int] = _f(None, "Keep only the newest N checkpoints.")
    resume: Optional[str] = _f(None, "None | 'latest' (newest intact checkpoint in output_dir, "
                                     "fresh start if none) | a checkpoint directory. Settings "
                                     "that define the run (model, data, objective, seed, batch "
                                     "geometry, ...) must match the checkpoint's; others "
                                     "(max_steps, learning rate, logging, ...) may change and "
                                     "are applied.")
    # ---------------------------------------------------------------- trusting files
    trust_checkpoint: bool = _f(False, TRUST_CHECKPOINT_HELP)
    seed: int = _f(0, "Seed for data order, timesteps, noise and LoRA init.")
    device: Optional[str] = _f(None, "Device: cpu, cuda, cuda:N or mps (default: "
                                     "accelerate's choice, e.g. cuda:LOCAL_RANK or cpu). A "
                                     "device that is not there is an error, never a silent "
                                     "fall-back to the CPU.")
    log_every: int = _f(10, "Log metrics (and sync with the host) every N optimizer steps.")
    tensorboard: bool = _f(True, "Also log to TensorBoard under output_dir/logs (needs the "
                                 "tensorboard package; without it a warning says so and "
                                 "metrics go to metrics.jsonl only).")
    progress: bool = _f(True, "Show a tqdm progress bar on the main process.")
    save_final: bool = _f(True, "Save the trained pipeline / LoRA weights to output_dir at "
                                "the end.")
    # ---------------------------------------------------------------- run safety (issue 10)
    overwrite: bool = _f(False, "Start afresh in an output_dir that holds an earlier run: its "
                                "checkpoints, metrics and logs are deleted (its final weights "
                                "are replaced at the end). Without it such a directory is "
                                "refused unless resume is set.")
    allow_encoder_mismatch: bool = _f(False, "Train on a dataset whose recorded text encoders "
                                             "(or VAE) differ from model's, with a warning; "
                                             "without it such a dataset is refused.")
    on_nonfinite: str = _f("stop", "What a non-finite loss or gradient does (checked on log "
                                   "and checkpoint steps, no per-step sync): stop = raise "
                                   "NonFiniteError naming the step, keeping every finite "
                                   "checkpoint; skip = check every step (one host sync each) "
                                   "and skip that step's update.", choices=ON_NONFINITE)
    # ---------------------------------------------------------------- CPU threads (issue 9)
    threads: Optional[int] = _f(None, "Intra-op CPU threads while training. None = torch's "
                                      "setting (the physical cores, or OMP_NUM_THREADS) "
                                      "shared among the processes on this machine; on a "
                                      "machine busy with other work fewer threads (even 1) "
                                      "are often faster.")
    # ---------------------------------------------------------------- reference cache (issue 13)
    reference_cache: Optional[str] = _f(
        None, "A directory written by `ddspo-fast precompute` with the frozen networks' "
              "outputs for every pair-draw of this run: each step then runs the policy only "
              "(2 rows per pair), and no reference copy, adapters-off call or pair adapter "
              "is loaded. Refused, naming the setting, when it was made for another model, "
              "data, objective, seed or precision, or holds too few draws.")
    # ---------------------------------------------------------------- loss type (issue 12)
    loss_type: str = _f("sigmoid", "Per-pair loss on the margin z = -(beta/2)*((m_w-m_l)-(r_w-r_l)): "
                                   "sigmoid = -log sigmoid(z) (DDSPO, Diffusion-DPO); hinge = "
                                   "max(0, 1-z); ipo = (z/beta - 1/(2 beta))^2.",
                        choices=LOSS_TYPES)
    # ---------------------------------------------------------------- timestep sampling (issue 12)
    timestep_sampling: Optional[str] = _f(
        None, "How training timesteps are drawn. None = the family's official default "
              "(uniform for SD1.x, SDXL, SANA and FLUX; logit_normal for SD3 / SD3.5). Flow "
              "families (SD3, SANA, FLUX): uniform | logit_normal | mode | cosmap (cosmap "
              "draws uniformly, as the official code, which uses it as a loss weighting it "
              "never applies). DDPM "
              "families (SD1.x, SDXL): uniform | linear | sigmoid.",
        choices=TIMESTEP_SCHEMES)
    mode_scale: float = _f(1.29, "timestep_sampling='mode': the mode scale (the scripts' default).")
    flow_shift: Optional[float] = _f(None, "Flow families: the training scheduler's shift. None = "
                                           "the model's scheduler config (SANA 1.0, SD3 3.0; "
                                           "FLUX shifts by resolution only when sampling and "
                                           "trains on the unshifted table).")
    text_encoder_dtype: Optional[str] = _f(None, "Dtype of the text encoders when prompts are "
                                                 "encoded during training. None = the official "
                                                 "code's (SANA: Gemma-2 in bf16; others: the "
                                                 "frozen-weight dtype); 'run' = the frozen-weight "
                                                 "dtype for every family.",
                                           choices=(None, "run"))
    guidance_scale: Optional[float] = _f(None, "Guidance-distilled models (FLUX.1 [dev]): the "
                                               "guidance value fed to the denoiser in training. "
                                               "None = diffusers' DreamBooth script default 3.5; "
                                               "refused for models without a guidance embedding.")

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        bad, is_int, is_num = self._bad, _is_int, _is_num
        for name in ("model", "data"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (str, os.PathLike)) or str(v) == ""):
                raise bad(name, "a path or hub id string")
            if v is not None:
                setattr(self, name, str(v))
        if not isinstance(self.output_dir, (str, os.PathLike)) or str(self.output_dir) == "":
            raise bad("output_dir", "a directory path")
        self.output_dir = str(self.output_dir)
        choices = {"family": (None,) + family_names(), "objective": OBJECTIVES, "pair": PAIRS,
                   "mixed_precision": MIXED_PRECISION, "optimizer": OPTIMIZERS,
                   "attention": ATTENTION, "loss_weighting": LOSS_WEIGHTING,
                   "rand_cond_schedule": RAND_COND_SCHEDULES, "lr_scheduler": LR_SCHEDULERS}
        if self.mixed_precision is False:  # YAML reads a bare `no` as False
            self.mixed_precision = "no"
        choices["on_nonfinite"] = ON_NONFINITE
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, "one of " + ", ".join(repr(a) for a in allowed))
        if self.pair == "lora" and self.objective == "ddspo":
            if not self.pair_lora:
                raise ValueError("pair_lora: required with pair='lora' (DD-CPP): a directory "
                                 "holding the winning and losing adapters")
        if self.pair_lora is not None:
            if not isinstance(self.pair_lora, (str, os.PathLike)) or str(self.pair_lora) == "":
                raise bad("pair_lora", "a directory path")
            self.pair_lora = str(self.pair_lora)
        for name in ("beta", "learning_rate", "weight_decay", "adam_epsilon", "logit_std",
                     "rand_cond_lambda"):
            v = getattr(self, name)
            if not is_num(v) or v < 0 or (name in ("beta", "learning_rate", "logit_std")
                                           and v == 0):
                raise bad(name, "a finite positive number" if name in
                          ("beta", "learning_rate", "logit_std") else "a finite number >= 0")
        if not is_num(self.logit_mean):
            raise bad("logit_mean", "a finite number")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"one of {LOSS_TYPES}")
        if self.timestep_sampling is not None and self.timestep_sampling not in TIMESTEP_SCHEMES:
            raise bad("timestep_sampling", f"None or one of {TIMESTEP_SCHEMES}")
        if not is_num(self.mode_scale):
            raise bad("mode_scale", "a finite number")
        if self.flow_shift is not None and (not is_num(self.flow_shift) or self.flow_shift <= 0):
            raise bad("flow_shift", "None or a finite number > 0")
        if self.text_encoder_dtype not in (None, "run"):
            raise bad("text_encoder_dtype", "None or 'run'")
        if self.guidance_scale is not None and (not is_num(self.guidance_scale)
                                                or self.guidance_scale < 0):
            raise bad("guidance_scale", "None or a finite number >= 0")
        self._check_run_settings()
        for name in ("max_steps", "timesteps_per_pair"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise bad(name, "an int >= 1")
        if self.lora_rank is not None and (not is_int(self.lora_rank) or self.lora_rank < 1):
            raise bad("lora_rank", "None (full fine-tune) or an int >= 1")
        if self.lora_alpha is not None and (not is_num(self.lora_alpha) or self.lora_alpha <= 0):
            raise bad("lora_alpha", "None or a positive number")
        if self.lora_rank is None:  # LoRA settings alone would silently train every weight
            for name in ("lora_alpha", "lora_targets"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to a LoRA only; set lora_rank too "
                                     "(without it the whole denoiser is fine-tuned)")
        self._check_lora_targets()
        if self.resume is not None and (not isinstance(self.resume, (str, os.PathLike))
                                        or str(self.resume) == ""):
            raise bad("resume", "None, 'latest' or a checkpoint directory")
        if self.resume is not None:
            self.resume = str(self.resume)
        if self.overwrite and self.resume is not None:
            raise ValueError("overwrite: cannot be combined with resume (overwrite starts "
                             "afresh, resume continues the run in output_dir)")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise bad("threads", "None or an int >= 1")
        if self.rand_cond_prompts is not None and (
                not isinstance(self.rand_cond_prompts, (str, os.PathLike))
                or str(self.rand_cond_prompts) == ""):
            raise bad("rand_cond_prompts", "None or a JSONL path")
        if self.device is not None and (not isinstance(self.device, str)
                                        or not DEVICE_RE.match(self.device)):
            raise bad("device", "None or one of 'cpu', 'cuda', 'cuda:N', 'mps'")
        if not isinstance(self.backend, str) or not self.backend:
            raise bad("backend", "a backend name such as 'auto'")
        if self.reference_cache is not None:  # reference cache (issue 13)
            if not isinstance(self.reference_cache, (str, os.PathLike)) \
                    or str(self.reference_cache) == "":
                raise bad("reference_cache", "None or a directory written by "
                                             "`ddspo-fast precompute`")
            self.reference_cache = str(self.reference_cache)
        for name in ("gradient_checkpointing", "compile", "channels_last", "allow_tf32",
                     "tensorboard", "progress", "save_final", "ddp_find_unused_parameters",
                     "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")

    def check_ready(self) -> None:
        """Checks that only matter when training starts (required paths present)."""
        self._check_inputs_ready()
        if self.pair_lora and self.pair == "lora" and self.objective == "ddspo" \
                and not os.path.isdir(self.pair_lora):
            raise ValueError(f"pair_lora: {self.pair_lora} is not a directory")
        if self.rand_cond_prompts and not os.path.isfile(self.rand_cond_prompts):
            raise ValueError(f"rand_cond_prompts: {self.rand_cond_prompts} is not a file")
        if self.reference_cache and not os.path.isdir(self.reference_cache):
            raise ValueError(f"reference_cache: {self.reference_cache} is not a directory "
                             "(make one with `ddspo-fast precompute`)")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"output_dir: {self.output_dir} is a file, not a directory")
        problem = missing_local_model(self.model)
        if problem:
            raise ValueError(f"model: {problem}")


# ---------------------------------------------------------------------- reading values
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_NONE = ("none", "null", "~", "")


def as_field_type(name: str, value: Any, hint, choices=()) -> Any:
    """``value`` (from YAML, a dict or JSON) as field ``name`` of type ``hint`` holds it,
    or ValueError ``"name: expected <type>, got <value>"``. The quantities people write:
    ``1e-4`` or ``"1e-4"`` for a float, ``1000.0`` or ``1e3`` for an int, ``yes`` / ``no``
    / ``true`` / ``"false"`` for a bool, ``null`` / ``none`` for an optional field, and
    YAML's bare ``no`` (read as False) for a setting whose choices include "no"."""
    args = typing.get_args(hint)
    optional = type(None) in args
    tp = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        return value  # the dataclass names what the field needs
    what = {bool: "true or false", int: "an integer", float: "a number"}.get(tp)
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value if isinstance(value, float) else _number(text)
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _number(text)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, bool) and ("no", "yes")[value] in choices:
            return ("no", "yes")[value]  # YAML 1.1 reads a bare `no` as False
        return value
    else:
        return value
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    if isinstance(value, bool):
        shown = str(value).lower()
    raise ValueError(f"{name}: expected {what}{' or null' if optional else ''}, got {shown}")


def _number(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        return float(text.replace("_", ""))
    except ValueError:
        return None


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key)
        self.key, self.line = key, line


_LOADER = None


def _config_loader():
    """A yaml SafeLoader for config files: ``1e-4`` is a float (YAML 1.1 wants ``1.0e-4``;
    every config written by hand says ``1e-4``), and a key given twice is refused instead
    of the later value silently winning."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    dup = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    break
                if dup:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    ConfigLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    ConfigLoader.yaml_implicit_resolvers = {
        k: sorted(v, key=lambda r: r[0] != "tag:yaml.org,2002:float")
        for k, v in ConfigLoader.yaml_implicit_resolvers.items()}
    _LOADER = ConfigLoader
    return _LOADER


def as_config(cls, config):
    """``config`` as an instance of the config dataclass ``cls``: given as one, as a dict of
    fields, or as the path of a YAML file."""
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return cls.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return cls.from_yaml(config)
    raise ValueError(f"config: expected a {cls.__name__}, a dict or a YAML path, got "
                     f"{type(config).__name__}")


# ---------------------------------------------------------------------- train-pair
# What defines a train-pair run: resuming with another value is refused (the command
# promises an exact resume). max_steps / num_epochs, the learning rate and its schedule,
# logging and checkpointing may change and are applied.
ADAPTER_RUN_DEFINING = ("model", "data", "family", "lora_rank", "lora_alpha", "lora_targets",
                        "lora_dropout", "timestep_sampling", "logit_mean", "logit_std",
                        "batch_size", "grad_accum", "seed", "optimizer")


@dataclass
class AdapterTrainConfig(RunConfig):
    """``train-pair``: the winning and losing LoRA adapters DD-CPP takes its targets
    from (``adapter_trainer.AdapterTrainer``)."""
    RUN_DEFINING = ADAPTER_RUN_DEFINING

    # ---------------------------------------------------------------- what to train on
    model: Optional[str] = _f(None, "Local diffusers pipeline directory or hub id (required).")
    data: Optional[str] = _f(None, "Pair dataset directory (`prepare` / `encode` output or the "
                                   "official DDSPO layout); latent_w trains the winning "
                                   "adapter, latent_l the losing one (required).")
    output_dir: str = _f("ddspo-pair", "Where pos_lora_unet/ and neg_lora_unet/ (pass this "
                                       "directory as train's pair_lora), checkpoints and "
                                       "metrics go.")
    family: Optional[str] = _f(None, f"Model family ({' | '.join(FAMILIES)}); detected from "
                                     "the model when unset.",
                               choices=FAMILIES)
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
    mixed_precision: str = _f("bf16", "auto | bf16 | fp16 (CUDA) | no: autocast dtype; the "
                                      "frozen base is stored in it, the adapters stay fp32. "
                                      "auto = bf16 on a GPU, no (fp32) on the CPU.",
                              choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward.")
    channels_last: bool = _f(True, "UNets only: channels_last memory format.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    # ---------------------------------------------------------------- bookkeeping
    checkpoint_every: int = _f(500, "Atomic checkpoint every N optimizer steps (0 = never).")
    checkpoints_keep: Optional[int] = _f(None, "Keep only the newest N checkpoints.")
    resume: Optional[str] = _f(None, "None | 'latest' (newest intact checkpoint in output_dir, "
                                     "fresh start if none) | a checkpoint directory. Settings "
                                     "that define the run (model, data, adapters, seed, batch "
                                     "geometry, ...) must match the checkpoint's; others "
                                     "(max_steps, learning rate, logging, ...) may change.")
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

    def __post_init__(self) -> None:
        bad, is_int, is_num = self._bad, _is_int, _is_num
        for name in ("model", "data", "output_dir", "resume"):
            v = getattr(self, name)
            if v is None and name != "output_dir":
                continue
            if not isinstance(v, (str, os.PathLike)) or str(v) == "":
                raise bad(name, "a path")
            setattr(self, name, str(v))
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            v = getattr(self, f.name)
            if allowed and v not in allowed and not (v is None and f.default is None):
                raise bad(f.name, "one of " + ", ".join(repr(a) for a in allowed))
        for name in ("lora_rank", "num_epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise bad("max_steps", "None or an int >= 1")
        self._check_run_settings()
        for name in ("lora_alpha", "learning_rate", "logit_std"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite positive number")
        for name in ("weight_decay", "adam_epsilon"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if not is_num(self.logit_mean):
            raise bad("logit_mean", "a finite number")
        if not is_num(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        self._check_lora_targets()
        if self.device is not None and not isinstance(self.device, str):
            raise bad("device", "None or a device string such as 'cuda:0' or 'cpu'")
        for f in dataclasses.fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, "True or False")

    def check_ready(self) -> None:
        """Checks that only matter when training starts (required paths present)."""
        self._check_inputs_ready()
