"""The networks of a step: the trained policy, the frozen reference, the pair adapters;
how they are wrapped for data parallelism, and the one way frozen calls are made.

``build_preference_networks`` (``Trainer``) and ``build_adapter_pair`` (the adapter
trainer) build a ``Networks`` on a loaded family adapter without reading or writing a
file other than the pair adapters' weights DD-CPP asks for (``pair_adapters``): on a
meta-device or fake-tensor denoiser too, which is how the planner and
``step.build_step`` use them.

* ``Networks.wrap`` is the one place the policy is wrapped for data parallelism: DDP via
  accelerate (the reference is never wrapped), or, under an FSDP2 launch, sharded
  (``sharding.py``) together with a full fine-tune's frozen copy.
* ``Networks.reference(adapters)`` is the one way a frozen network is called: LoRA
  training switches the adapters off (or to the pair adapter asked for) on the policy's
  own module; a full fine-tune calls its frozen copy (eval mode, no grad, its own pair
  adapters switched); both under ``torch.no_grad``.
* The data-parallel degree and rank come from the process group (``data_parallel``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .lora import LOSE, POLICY, WIN, AdapterSwitch, add_policy_lora
from .precision import Precision, store_frozen, store_trainable
from .quantize import apply_to_denoiser


def data_parallel(accelerator=None) -> tuple[int, int]:
    """``(size, rank)`` of the data-parallel group this process is in: the default
    process group when one is initialised (every rank holds a replica under DDP), else
    a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@dataclass
class Networks:
    """What a step calls. ``policy`` is the trained module, unwrapped; ``frozen`` the
    frozen copy of a full fine-tune (None when the policy's own module serves as the
    reference, or when nothing frozen runs: a reference cache)."""
    policy: torch.nn.Module
    frozen: Optional[torch.nn.Module] = None
    runs_reference: bool = True
    switch: Optional[AdapterSwitch] = None       # adapters on the policy's module
    frozen_switch: Optional[AdapterSwitch] = None  # pair adapters on the frozen copy
    split: object = None                          # lora.SplitAdapters, installed
    wrapped: Optional[torch.nn.Module] = None
    trainable: list = field(default_factory=list)
    trainable_names: list = field(default_factory=list)

    def collect_trainable(self) -> None:
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.trainable_names = [n for n, _ in named]

    # ------------------------------------------------------------------ wrapping
    def wrap(self, accelerator, shard: Optional[Callable[[torch.nn.Module], None]] = None
             ) -> torch.nn.Module:
        """The policy as the step calls it, wrapped for data parallelism: accelerate's
        DDP (the frozen networks are never wrapped), or with ``shard`` (an FSDP2 launch:
        ``sharding.shard`` bound to the family) the policy and the frozen copy sharded in
        place, each on its own (the copy gets no gradients and no optimizer state)."""
        if shard is None:
            self.wrapped = accelerator.prepare_model(self.policy)
            return self.wrapped
        for module in (self.policy, self.frozen):
            if module is not None:
                shard(module)
        # the sharded module is its own wrapper: gradients are reduce-scattered in its
        # backward; the trainable parameters are now its shards
        self.collect_trainable()
        self.wrapped = self.policy
        return self.wrapped

    @property
    def step_module(self) -> torch.nn.Module:
        return self.wrapped if self.wrapped is not None else self.policy

    # ------------------------------------------------------------------ frozen calls
    @property
    def reference_module(self) -> Optional[torch.nn.Module]:
        """The module reference calls run (the policy's own for LoRA), or None."""
        if not self.runs_reference:
            return None
        return self.frozen if self.frozen is not None else self.policy

    @contextmanager
    def reference(self, adapters: Optional[Sequence[str]] = None):
        """Within the block, the frozen network to call: the reference (``adapters``
        None) or the base with the pair adapters named (DD-CPP's ``[WIN]`` / ``[LOSE]``).
        No gradient is recorded."""
        module = self.reference_module
        if module is None:
            raise RuntimeError("reference: this run computes no frozen outputs (reference "
                               "cache)")
        switch = self.frozen_switch if self.frozen is not None else self.switch
        with torch.no_grad():
            if switch is None:
                if adapters is not None:
                    raise RuntimeError(f"reference: no adapters {list(adapters)} loaded")
                yield module
            else:
                with switch.use(None if adapters is None else list(adapters)):
                    yield module

    def close(self) -> None:
        if self.split is not None:
            self.split.remove()


# ====================================================================== builders
def _attention(den, attention: str) -> None:
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise ImportError("attention='xformers' needs xformers: pip install xformers "
                              "(or use attention='sdpa')") from e
        den.enable_xformers_memory_efficient_attention()


def build_preference_networks(adapter, cfg, precision: Precision, *, mode: str,
                              cached: bool,
                              pair_adapters: Optional[Callable[[torch.nn.Module], None]] = None
                              ) -> Networks:
    """The policy and the frozen networks of a preference run (``TrainConfig``): a LoRA
    on the denoiser whose adapters-off self is the reference, or the whole denoiser
    trained beside a frozen copy of it; DD-CPP's pair adapters added by
    ``pair_adapters(module)`` on the module that runs the reference; none of the frozen
    networks when ``cached`` (a reference cache holds their outputs)."""
    den = adapter.denoiser
    _attention(den, cfg.attention)
    adapter.prepare_denoiser(den, channels_last=cfg.channels_last)
    # base_quantization / fp8_compute: quantized frozen layers or fp8 matmuls, after
    # loading and before any adapter (quantize.py)
    apply_to_denoiser(den, cfg, compute_dtype=precision.frozen,
                      device=next(den.parameters()).device)
    dd_cpp = mode == "dd_cpp"

    def with_pair_adapters(module) -> AdapterSwitch:
        pair_adapters(module)
        names = [(n, p) for n, p in module.named_parameters()
                 if f".{WIN}." in n or f".{LOSE}." in n]
        for _, p in names:
            p.requires_grad_(False)
        store_frozen([p for _, p in names], precision.frozen)
        return AdapterSwitch(module)

    if cfg.lora_rank is not None:
        add_policy_lora(den, cfg.lora_rank, cfg.lora_alpha,
                        cfg.lora_targets or adapter.lora_targets, cfg.seed)
        if dd_cpp and not cached:
            with_pair_adapters(den)
        nets = Networks(den, runs_reference=not cached, switch=AdapterSwitch(den))
        nets.switch.set([POLICY])
        den.requires_grad_(False)
        for name, p in den.named_parameters():
            if f".{POLICY}." in name:
                p.requires_grad_(True)
        store_trainable(den, precision.trainable)
    elif cached:
        den.requires_grad_(True)
        nets = Networks(den, runs_reference=False)
    else:
        ref = copy.deepcopy(den).requires_grad_(False).eval()
        store_frozen(ref, precision.frozen)
        nets = Networks(den, frozen=ref)
        if dd_cpp:
            nets.frozen_switch = with_pair_adapters(ref)
            nets.frozen_switch.set(None)
        den.requires_grad_(True)
    if cfg.gradient_checkpointing:
        den.enable_gradient_checkpointing()
    den.train()
    if cfg.compile:
        den.compile()
        if nets.frozen is not None:
            nets.frozen.compile()
    nets.collect_trainable()
    return nets


def build_adapter_pair(adapter, cfg, precision: Precision) -> Networks:
    """The winning and losing adapters on the one frozen base (``AdapterTrainConfig``),
    trained in ``precision.trainable``, the stacked forward's row split installed."""
    from .lora import SplitAdapters, add_pair_adapters

    den = adapter.denoiser
    adapter.prepare_denoiser(den, channels_last=cfg.channels_last)
    targets = list(cfg.lora_targets or adapter.lora_targets)
    try:
        add_pair_adapters(den, cfg.lora_rank, cfg.lora_alpha, targets, cfg.lora_dropout,
                          cfg.seed)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_targets: {' '.join(str(e).split())}") from None
    den.requires_grad_(False)
    for name, p in den.named_parameters():
        if f".{WIN}." in name or f".{LOSE}." in name:
            p.requires_grad_(True)
    store_trainable(den, precision.trainable)  # the base stays in precision.frozen
    nets = Networks(den, runs_reference=False, split=SplitAdapters(den, (WIN, LOSE)).install())
    if cfg.gradient_checkpointing:
        den.enable_gradient_checkpointing()
    den.train()
    nets.collect_trainable()
    return nets
