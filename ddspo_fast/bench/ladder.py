"""The ablation ladder of `bench step`: each family's official recipe, then one change at
a time, so each gain can be read off on its own.

A rung is a `StepConfig`; rung k+1 is rung k with exactly one field replaced (the field
it names). A change that cannot run here (no bitsandbytes, a transformer has no
convolutions for channels_last, torch.compile on a small CPU) is reported as a skipped
rung with its reason and not carried into the next rungs, so every measured rung still
differs from the previous measured one by exactly what it names.

Rung 0 follows the official DDSPO code (github KU-MIIL/DDSPO: scripts/train_ddspo*.sh,
ddspo/train.py, ddspo/adapters/*.py), read for these facts:

* optimizer: ``torch.optim.AdamW`` (fp32 states) for every family; Adafactor only with
  ``--use_adafactor``, which no official script passes. (Adafactor forced on for SDXL is
  the original Diffusion-DPO code's rule, Salesforce/DiffusionDPO ``train.py``, which
  DDSPO's trainer dropped; it keeps only the forced gradient checkpointing.)
* precision: ``--mixed_precision fp16`` (accelerate: fp16 autocast + GradScaler, trained
  weights fp32) for SD1.x, SDXL and SD3; ``no`` (fp32) for SANA. SD1.x/SDXL store the
  frozen reference UNet in fp16; SD3's frozen LoRA base is never cast (fp32).
* gradient checkpointing: forced on for SDXL (``adapters/sd.py``:
  ``if args.gradient_checkpointing or self.sdxl``), off for the others.
* what is trained: the whole UNet (SD1.x, SDXL; a second full UNet is the reference);
  a rank-128 LoRA (alpha 128, gaussian init) for SD3 (attention q/k/v/out and the
  context-stream projections) and SANA (to_q/to_k/to_v), whose reference is the same
  module with the adapter off.
* reference calls: two per step, ``ref([x_w|c ; x_l|c-])`` for the targets and
  ``ref([x_w|c ; x_l|c])`` for ref_pred: 4 reference rows + 2 policy rows per pair.
* loss: the script-form block (`ddspo_fast.bench.script_loss`), gradient clipping at 1.0.
* TF32: off (no script passes ``--allow_tf32``); every rung keeps it off.
* optimizer steps: one per ``--train_batch_size`` x ``--gradient_accumulation_steps``
  pairs: 8 x 16 = 128 (SD1.x), 8 x 64 = 512 (SDXL), 4 x 256 = 1024 (SD3, SANA); the
  clipping and the optimizer step run once per accumulation (``accelerator.sync_gradients``).

On a CPU the fp16 recipes cannot run as written: accelerate (1.x) gives neither fp16
autocast nor a GradScaler on the CPU (``Accelerator.native_amp`` stays False) while
``ddspo/train.py`` still takes ``weight_dtype = fp16`` from ``accelerator.mixed_precision``
and the adapters cast the latents and the frozen models to it, so fp16 latents meet the
fp32 policy and the first convolution / linear layer fails on the dtype mismatch. A CPU
runs the recipe only as ``--mixed_precision no``: fp32 everywhere. `official` gives that
rendering for ``device_type="cpu"`` and says so (`official_precision`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

# Precision settings, each one name for what a rung runs.
PRECISIONS = {
    "fp32": "fp32, no autocast",
    "fp16-scaler": "fp16 autocast + GradScaler; trained weights fp32, frozen reference fp16",
    "fp16-scaler-fp32-frozen": "fp16 autocast + GradScaler; every weight fp32 (the frozen "
                               "LoRA base is not cast)",
    "bf16": "bf16 autocast, no GradScaler; trained weights fp32, frozen weights bf16",
}
OPTIMIZERS = {
    "adamw": "torch.optim.AdamW (fp32 states)",
    "adafactor": "transformers Adafactor (factored second moments)",
    "adamw8bit": "bitsandbytes AdamW8bit (8-bit states)",
}
LOSSES = {
    "script": "the script-form loss block (ddspo_fast.bench.script_loss)",
    "fused": "ddspo_fast.ddspo_loss_from_reference / ddspo_loss, backend auto",
}

# LoRA targets of the official SD3 / SANA adapters.
_SD3_LORA = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
_SANA_LORA = ("to_k", "to_q", "to_v")


@dataclass(frozen=True)
class StepConfig:
    """Everything that differs between rungs. `lora_rank` / `lora_targets` are the
    family's (None: full fine-tune) and stay fixed along a ladder."""
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    channels_last: bool
    reference_rows: int          # per pair: 4 = two reference calls (official), 3 = one call
    loss: str
    compile: bool
    lora_rank: Optional[int] = None
    lora_targets: Optional[tuple] = None
    fp8_compute: bool = False    # the denoiser's linear matmuls in fp8 (torchao float8)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {self.loss!r}")
        if self.reference_rows not in (3, 4):
            raise ValueError(f"reference_rows: expected 3 or 4, got {self.reference_rows!r}")

    @property
    def denoiser_rows_per_pair(self) -> int:
        """What the config asks for (the benchmark also counts what ran)."""
        return 2 + self.reference_rows

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return d


# The precision each official script asks for (--mixed_precision) as a PRECISIONS key.
_SCRIPT_PRECISION = {"sd15": "fp16-scaler", "sdxl": "fp16-scaler",
                     "sd3": "fp16-scaler-fp32-frozen", "sana": "fp32"}
CPU_FP16_NOTE = ("the official script's --mixed_precision fp16 does not run on a CPU: "
                 "accelerate gives no fp16 autocast and no GradScaler there while the script "
                 "still casts the latents and frozen models to fp16 (fp16 latents into the "
                 "fp32 policy fail); the CPU rendering of the recipe is --mixed_precision no "
                 "(fp32), which this rung runs")


def official_precision(family: str, device_type: str) -> dict:
    """What precision the official recipe of `family` asks for, what rung 0 runs on
    `device_type`, and why they differ (None when they do not)."""
    if family not in _SCRIPT_PRECISION:
        raise ValueError(f"family: expected one of {', '.join(_SCRIPT_PRECISION)}, got {family!r}")
    script = _SCRIPT_PRECISION[family]
    runs = "fp32" if device_type == "cpu" else script
    return {"script": script, "runs": runs,
            "note": CPU_FP16_NOTE if runs != script else None}


def official(family: str, lora_rank: int = 128, device_type: str = "cuda") -> StepConfig:
    """Rung 0: the official DDSPO recipe of `family` as it runs on `device_type` (see the
    module doc for sources; on a CPU the fp16 recipes run in fp32, `official_precision`)."""
    common = dict(optimizer="adamw", channels_last=False, reference_rows=4, loss="script",
                  compile=False, precision=official_precision(family, device_type)["runs"])
    if family in ("sd15", "sdxl"):
        return StepConfig(gradient_checkpointing=family == "sdxl", **common)
    if family == "sd3":
        return StepConfig(gradient_checkpointing=False, lora_rank=lora_rank,
                          lora_targets=_SD3_LORA, **common)
    return StepConfig(gradient_checkpointing=False, lora_rank=lora_rank,
                      lora_targets=_SANA_LORA, **common)


# Pairs per optimizer step in the official scripts: --train_batch_size x
# --gradient_accumulation_steps (scripts/train_ddspo.sh GA=16 / 64, train_ddspo_sd3.sh and
# train_ddspo_sana.sh 256). Every row is charged its optimizer step per pair at this rate.
OFFICIAL_PAIRS_PER_UPDATE = {"sd15": 8 * 16, "sdxl": 8 * 64, "sd3": 4 * 256, "sana": 4 * 256}


OFFICIAL_SOURCE = {
    "sd15": "KU-MIIL/DDSPO scripts/train_ddspo.sh (MODEL_TYPE=sd15): --mixed_precision fp16, "
            "AdamW, no gradient checkpointing; full UNet, fp16 reference copy",
    "sdxl": "KU-MIIL/DDSPO scripts/train_ddspo.sh (MODEL_TYPE=sdxl): --mixed_precision fp16, "
            "AdamW; gradient checkpointing forced for SDXL in ddspo/adapters/sd.py",
    "sd3": "KU-MIIL/DDSPO scripts/train_ddspo_sd3.sh: --mixed_precision fp16, --rank 128 LoRA, "
           "AdamW; reference = adapter off (ddspo/adapters/sd3.py)",
    "sana": "KU-MIIL/DDSPO scripts/train_ddspo_sana.sh: --mixed_precision no, --rank 128 LoRA "
            "on to_q/to_k/to_v, AdamW; reference = adapter off (ddspo/adapters/sana.py)",
}
# The families the official DDSPO code trains (the recipes above): the ladder's families.
FAMILIES = tuple(OFFICIAL_SOURCE)


@dataclass(frozen=True)
class Change:
    name: str
    field: str
    value: object
    adds: str
    # Why its speed-up depends on the device (None: it removes work wherever it runs).
    device_dependent: Optional[str] = None


# The ladder's order: first the changes that remove work on any device (checkpointing's
# recompute, a reference row, the loss block's passes), all at the official precision,
# so their gain reads off at equal precision; then the ones whose gain depends on the
# device's kernels, channels_last before bf16 so that the library's defaults are a rung
# (CPU: fp32 + channels_last; GPU: + bf16).
CHANGES = (
    Change("no_checkpointing", "gradient_checkpointing", False,
           "gradient checkpointing off (no recomputed forward in the backward)"),
    Change("3_reference_rows", "reference_rows", 3,
           "one reference call on [x_w|c ; x_l|c ; x_l|c-]: 3 reference rows per pair "
           "instead of 4 (5 denoiser rows instead of 6)"),
    Change("fused_loss", "loss", "fused", "the library loss on the stacked reference output "
                                          "instead of the script-form block"),
    Change("channels_last", "channels_last", True, "channels_last memory format (UNet "
                                                   "convolutions)",
           "memory layout: the gain depends on the device's convolution kernels (it differs "
           "between CPUs, and between a CPU and a GPU)"),
    Change("bf16", "precision", "bf16", "bf16 autocast without a GradScaler, frozen weights "
                                        "stored in bf16",
           "precision: 16-bit autocast is the fast path on a GPU and usually slower than fp32 "
           "on a CPU; its CPU ratio says nothing about a GPU"),
    Change("adamw8bit", "optimizer", "adamw8bit", "8-bit AdamW states (bitsandbytes)",
           "bitsandbytes runs different kernels on a CPU and a GPU"),
    Change("fp8_compute", "fp8_compute", True, "fp8 matmuls in the denoiser's linear layers "
                                               "(torchao float8 training, dynamic scales)",
           "fp8 tensor cores: CUDA GPUs of compute capability 8.9+ only"),
    Change("compile", "compile", True, "torch.compile of the denoiser (policy and reference)",
           "inductor generates C++ on a CPU and Triton on a GPU"),
)
DEVICE_DEPENDENT = {c.name: c.device_dependent for c in CHANGES if c.device_dependent}
# The reference cache is not a rung: the script-form step has no cache reader. The library
# rows after the ladder measure it (bench/report.py: ddspo_fast and ddspo_fast+refcache).
RUNG_NAMES = ("official",) + tuple(c.name for c in CHANGES)


@dataclass(frozen=True)
class Rung:
    index: int
    name: str
    adds: str
    changes: Optional[str]          # the StepConfig field this rung changes (None: rung 0)
    config: StepConfig
    skipped: Optional[str] = None   # why it is not measured here
    base: Optional[int] = None      # index of the rung whose config this one changes

    def to_dict(self) -> dict:
        return {"rung": self.index, "name": self.name, "adds": self.adds,
                "changes": self.changes, "base_rung": self.base,
                "device_dependent": DEVICE_DEPENDENT.get(self.name),
                "config": self.config.to_dict(), "skipped": self.skipped}


NOT_SELECTED = "not selected (--rungs)"


# Changes a user opts into, left out of the tuned row: compile (its warm-up) and fp8
# matmuls (another precision than the recipe's).
OPT_IN = ("compile", "fp8_compute")


def tuned(rungs: list) -> Rung:
    """The rung whose settings the library's tuned row uses: every change of the ladder
    that applies here but the opt-in ones (a rung not selected with --rungs still applies;
    one that cannot run here does not)."""
    out = rungs[0]
    for r in rungs[1:]:
        if r.name not in OPT_IN and r.skipped in (None, NOT_SELECTED):
            out = r
    return out


def library_defaults(family: str, device_type: str, *, is_unet: bool,
                     lora_rank: int = 128) -> StepConfig:
    """The library's own defaults on `device_type` (TrainConfig's defaults, with
    mixed_precision="auto" resolved for the device) as a StepConfig, on the family's
    official task (full fine-tune, or its LoRA rank and targets) so the row trains what
    the official recipe trains."""
    from ..train import TrainConfig

    d = TrainConfig()
    mp = d.resolved_mixed_precision(device_type)
    return dataclasses.replace(
        official(family, lora_rank, device_type),
        precision={"no": "fp32", "bf16": "bf16", "fp16": "fp16-scaler"}[mp],
        optimizer=d.optimizer, gradient_checkpointing=d.gradient_checkpointing,
        channels_last=bool(d.channels_last and is_unet), compile=d.compile,
        reference_rows=3, loss="fused")


def bitsandbytes_missing() -> Optional[str]:
    """None when bitsandbytes imports, else why not (narrow: only an ImportError)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        warnings.warn(f"bench step: bitsandbytes is not importable ({e}); the 8-bit AdamW "
                      "rung is skipped (pip install bitsandbytes)", stacklevel=2)
        return f"bitsandbytes is not installed ({e}); pip install bitsandbytes"
    return None


def fp8_compute_missing(device_type: str) -> Optional[str]:
    """None when fp8 matmuls can run on ``device_type``, else why not."""
    import torch

    from ..train.quantize import fp8_compute_problem

    device = torch.device("cuda" if device_type == "cuda" else device_type)
    why = fp8_compute_problem(device)
    if why is not None:
        return why
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        return f"torchao is not installed ({e}); pip install torchao"
    return None


def build_ladder(family: str, *, is_unet: bool, lora_rank: int = 128,
                 device_type: str = "cuda", pin_optimizer: Optional[str] = None, only: Optional[set] = None,
                 compile_missing: Optional[str] = None,
                 bnb_missing: Callable[[], Optional[str]] = bitsandbytes_missing) -> list[Rung]:
    """The rungs of `family`. `pin_optimizer` holds every rung at one optimizer (the
    optimizer rung is then skipped); `only` keeps the named rungs measured and marks the
    rest skipped (their changes still apply, so the measured ones keep their meaning);
    `compile_missing` is the reason the compile rung is left out. Rung 0 is the recipe
    as it runs on `device_type` (a CPU runs the fp16 recipes in fp32)."""
    base = official(family, lora_rank, device_type)
    if pin_optimizer is not None:
        if pin_optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {pin_optimizer!r}")
        base = dataclasses.replace(base, optimizer=pin_optimizer)
    rungs = [Rung(0, "official", f"the official DDSPO recipe for {family}", None, base,
                  None if only is None or "official" in only else NOT_SELECTED)]
    base_index = 0
    for i, ch in enumerate(CHANGES, start=1):
        cfg = dataclasses.replace(base, **{ch.field: ch.value})
        why = None
        if ch.field == "optimizer" and pin_optimizer is not None:
            why = f"optimizer pinned to {pin_optimizer} for every rung"
        elif getattr(base, ch.field) == ch.value:
            why = f"already so in the rung before ({ch.field}={ch.value!r})"
        elif ch.name == "adamw8bit":
            why = bnb_missing()
        elif ch.name == "channels_last" and not is_unet:
            why = "not a UNet: channels_last only changes convolutions"
        elif ch.name == "fp8_compute":
            why = fp8_compute_missing(device_type)
        elif ch.name == "compile":
            why = compile_missing
        if why is not None:
            rungs.append(Rung(i, ch.name, ch.adds, ch.field, cfg, why, base_index))
            continue
        selected = only is None or ch.name in only
        rungs.append(Rung(i, ch.name, ch.adds, ch.field, cfg,
                          None if selected else NOT_SELECTED, base_index))
        base, base_index = cfg, i
    return rungs
