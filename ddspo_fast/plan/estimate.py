"""The estimate of one training step: the traced step (``worker.py``, in a subprocess)
plus the counted parts (``analytic.py``), per phase, with FLOPs and what would fit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from . import analytic, margin
from .archs import Arch
from .fresh_process import run_worker_module
from .step import MODES, PRECISIONS, StepSetup

GiB = 1 << 30
PHASES = ("reference forward", "policy forward", "loss", "backward", "optimizer step")


def shardable_optimizer(optimizer: str) -> bool:
    """Whether a sharded run takes ``optimizer`` (an AdamW implementation of the trainer's
    own sharding: ``train/sharding.py``)."""
    from ..train.sharding import SHARDABLE_OPTIMIZERS

    return optimizer.split("-")[0] in SHARDABLE_OPTIMIZERS


@dataclass
class PlanOptions:
    """What a step's memory depends on, as the user states it."""
    batch: int = 1                       # pairs per micro-batch (rows for mode='sft')
    mode: str = "ddspo"                  # ddspo | dpo | sft (plain fine-tuning)
    reference: str = "live"              # live | cached (a reference cache)
    lora_rank: Optional[int] = None      # None: full fine-tune
    precision: str = "bf16"              # fp32 | bf16 | fp16 (autocast over fp32) | bf16-pure
    base: str = "auto"                   # frozen weights: auto (autocast dtype) | fp32 | bf16 |
                                         # fp16 | nf4 | int8 | fp8 (LoRA base only for the last 3)
    checkpointing: bool = False
    attention: str = "auto"              # auto | flash | mem-efficient | xformers | math
    optimizer: str = "adamw"             # see analytic.OPTIMIZERS (adamw = fused)
    ema: Optional[str] = None            # None | fp32 | bf16: an EMA copy of the trained weights
    text_encoders: Optional[str] = None  # None (not resident) | fp32 | bf16 | fp16 | int8 | fp8
    vae: Optional[str] = None            # None | fp32 | bf16 | fp16
    height: Optional[int] = None
    width: Optional[int] = None
    text_tokens: Optional[int] = None
    reference_first: Optional[bool] = None   # None: as the trainer of ``mode`` does
    shard_degree: int = 1                # ranks the weights, gradients and optimizer states
                                         # are sharded over (FSDP full shard); 1 = none

    def check(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch: expected >= 1, got {self.batch}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.reference not in ("live", "cached"):
            raise ValueError(f"reference: expected live or cached, got {self.reference!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.base not in analytic.BASES:
            raise ValueError(f"base: expected one of {', '.join(analytic.BASES)}, got {self.base!r}")
        if self.base in ("nf4", "int8", "fp8") and self.lora_rank is None:
            raise ValueError(f"base: a {self.base} base is frozen, so it needs LoRA (lora_rank)")
        if self.optimizer not in analytic.OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(analytic.OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        for name in ("text_encoders", "vae", "ema"):
            v = getattr(self, name)
            if v is not None and v not in ("fp32", "bf16", "fp16", "int8", "fp8"):
                raise ValueError(f"{name}: expected fp32, bf16, fp16 (int8, fp8 for text "
                                 f"encoders) or none, got {v!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank: expected >= 1, got {self.lora_rank}")
        if not isinstance(self.shard_degree, int) or self.shard_degree < 1:
            raise ValueError(f"shard_degree: expected an int >= 1, got {self.shard_degree!r}")
        if self.shard_degree > 1 and not shardable_optimizer(self.optimizer):
            from ..train.sharding import SHARDABLE_OPTIMIZERS

            raise ValueError(f"optimizer: {self.optimizer!r} cannot be sharded: a sharded run "
                             f"(train/sharding.py) takes {', '.join(SHARDABLE_OPTIMIZERS)} "
                             "(per-element states that shard with the parameters)")

    def ref_first(self) -> bool:
        """ddspo_fast's trainer runs the frozen networks before the policy in every mode
        (train/pairs.py: the live loss is the frozen call, then the policy loss); the
        official recipe's script runs the policy first."""
        if self.reference_first is None:
            return self.mode != "ddspo-official"
        return bool(self.reference_first)

    def kernel(self) -> str:
        """What SDPA would run: flash for 16-bit activations; fp32 runs the
        memory-efficient kernel (flash has no fp32), which stores the same."""
        if self.attention != "auto":
            return self.attention
        return "mem-efficient" if self.precision == "fp32" else "flash"


def step_setup(arch: Arch, opts: PlanOptions, *, granule: int = 512, gpu_rules: bool = True) -> StepSetup:
    a = arch.at(opts.height, opts.width, opts.text_tokens)
    frozen = None
    if opts.base in ("fp32", "bf16", "fp16"):
        frozen = opts.base
    elif opts.base in ("nf4", "int8", "fp8"):
        frozen = "bf16"   # traced as bf16; the stored bytes are replaced analytically
    return StepSetup(
        denoiser_cls=a.denoiser_cls, config=a.config, latent_shape=list(a.latent_shape),
        cond={k: [list(s), d] for k, (s, d) in a.cond.items()}, pairs=opts.batch, mode=opts.mode,
        reference=opts.reference, lora_rank=opts.lora_rank, lora_targets=list(a.lora_targets()),
        precision=opts.precision, frozen_dtype=frozen, checkpointing=opts.checkpointing,
        attention=opts.kernel(), reference_first=opts.ref_first(), granule=granule,
        gpu_rules=gpu_rules, family=a.family)


def run_worker(setup, timeout: float = 600):
    """The traced step, in a fresh process (the GPU rules are process-wide); a list of
    setups is traced in one process and gives a list."""
    payload = [asdict(x) for x in setup] if isinstance(setup, list) else asdict(setup)
    return run_worker_module("ddspo_fast.plan.worker", payload, timeout,
                             "the planner's traced step")


@dataclass
class Estimate:
    arch: Arch
    options: PlanOptions
    traced: dict
    extras: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)   # phase -> {category: bytes, "total": bytes}

    @property
    def peak(self) -> int:
        return max(p["total"] for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k]["total"])

    def reported(self, figure: str = "reserved") -> float:
        return margin.apply(self.peak, figure)

    def flops_per_pair(self) -> dict:
        f = self.traced["flops"]
        executed = sum(f.values())
        recompute = f.get("policy forward", 0) if self.options.checkpointing else 0
        n = self.options.batch
        return {"executed": executed / n, "useful": (executed - recompute) / n}

    def per_pair(self) -> dict:
        """phase -> (bytes that do not grow with the batch, bytes per pair)."""
        out = {}
        n = self.options.batch
        for name, p in self.phases.items():
            act = p.get("saved", 0) + p.get("transient", 0)
            out[name] = (p["total"] - act, act / n)
        return out

    def largest_batch(self, memory: float, figure: str = "reserved") -> int:
        """Largest batch whose margined peak fits ``memory`` bytes, activations taken as
        proportional to the batch (they are, to the allocator's rounding)."""
        f, c = margin.RULES[margin.kind_of(figure)]
        budget = (memory - c * GiB) / f
        best = None
        for fixed, per in self.per_pair().values():
            if per <= 0:
                cap = 10 ** 6 if fixed <= budget else 0
            else:
                cap = int((budget - fixed) // per)
            best = cap if best is None else min(best, cap)
        return max(0, best or 0)

    def to_json(self) -> dict:
        return {"model": self.arch.source, "family": self.arch.family,
                "options": asdict(self.options), "attention_kernel": self.options.kernel(),
                "peak_bytes": self.peak, "peak_phase": self.peak_phase,
                "reported_bytes": {"allocated": self.reported("allocated"),
                                   "reserved": self.reported("reserved")},
                "phases": self.phases, "extras": self.extras,
                "flops_per_pair": self.flops_per_pair(), "params": self.traced["params"],
                "trainable_params": sum(_prod(s) for s in self.traced["trainable_shapes"]),
                "margin": margin.statement()}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def combine(arch: Arch, opts: PlanOptions, traced: dict) -> Estimate:
    """Add the counted parts to each traced phase and build the optimizer step."""
    sizes = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16-pure": 2, "fp16-pure": 2}
    pbytes = sizes[opts.precision] if opts.precision.endswith("pure") else 4
    shapes = traced["trainable_shapes"]
    opt = analytic.optimizer_memory(shapes, opts.optimizer, pbytes)
    frozen_per = 2 if opts.base in ("nf4", "int8", "fp8") else None
    quant = analytic.quantized_base(traced["frozen_linear_shapes"], opts.base, frozen_per or 2)
    ema = 0
    if opts.ema:
        ema = sum(analytic._round(_prod(s) * sizes[opts.ema]) for s in shapes)
    text = analytic.component_bytes(arch.components, opts.text_encoders) if opts.text_encoders else 0
    vae = analytic.component_bytes({"vae": arch.vae}, opts.vae) if (opts.vae and arch.vae) else 0
    states_on_device = 0 if opt["paged"] else opt["states"]
    extras = {"optimizer states": opt["states"], "optimizer states paged (outside torch's "
              "allocator)": opt["states"] if opt["paged"] else 0,
              "optimizer step temporary": opt["step_temp"], "EMA copy": ema,
              "text encoders": text, "VAE": vae, "quantized base delta": quant["weights_delta"],
              "dequantization buffer": quant["dequant"]}
    # N-way sharding (FSDP full shard): each rank holds 1/N of the weights (policy and
    # live reference alike), gradients and optimizer states; activations are its own. A
    # forward or backward also holds whole the unit it computes and the next one
    # (prefetch): twice the largest denoiser block, as traced.
    ranks = opts.shard_degree
    shard = (lambda b: -(-int(b) // ranks)) if ranks > 1 else int
    gather = 2 * traced.get("largest_unit_bytes", 0) if ranks > 1 else 0
    extras["shard degree"] = ranks
    extras["all-gathered units"] = gather
    states_rank = shard(states_on_device)
    phases = {}
    for name, p in traced["phases"].items():
        if name == "setup":
            continue
        row = {k: p.get(k, 0) for k in ("weights", "autocast", "grads", "saved", "transient")}
        row["weights"] = shard(row["weights"] + quant["weights_delta"])
        row["grads"] = shard(row["grads"])
        computes = name in ("policy forward", "reference forward", "backward")
        row["transient"] += (quant["dequant"] + gather) if computes else 0
        row["optimizer states"] = states_rank
        row["other resident"] = ema + text + vae
        row["total"] = sum(row.values())
        phases[name] = row
    weights = (traced["trainable_bytes"] + traced["policy_frozen_bytes"] + traced["reference_bytes"]
               + quant["weights_delta"])
    step = {"weights": shard(weights), "autocast": 0, "grads": shard(traced["trainable_bytes"]),
            "saved": 0, "transient": shard(opt["step_temp"]), "optimizer states": states_rank,
            "other resident": ema + text + vae}
    step["total"] = sum(step.values())
    phases["optimizer step"] = step
    ordered = {k: phases[k] for k in PHASES if k in phases}
    return Estimate(arch, opts, traced, extras, ordered)


def estimate_steps(arch, options: list) -> list:
    """``estimate_step`` for several option sets of one architecture, in one process."""
    from .archs import arch_from_spec

    if not isinstance(arch, Arch):
        arch = arch_from_spec(arch, f"spec {getattr(arch, 'family', '?')}")
    for o in options:
        o.check()
    traced = run_worker([step_setup(arch, o) for o in options], timeout=600 * len(options))
    return [combine(arch, o, t) for o, t in zip(options, traced)]


def estimate_step(arch: Arch, opts: Optional[PlanOptions] = None, **kw) -> Estimate:
    """Estimated peak accelerator memory of one training step of ``arch`` (an ``Arch``
    or a Spec of bench/archs.py), with FLOPs; ``kw`` sets ``PlanOptions`` fields."""
    from .archs import arch_from_spec

    if not isinstance(arch, Arch):
        arch = arch_from_spec(arch, f"spec {getattr(arch, 'family', '?')}")
    opts = replace(opts or PlanOptions(), **kw)
    opts.check()
    traced = run_worker(step_setup(arch, opts))
    return combine(arch, opts, traced)
