"""One training step of a denoiser, run under the memory tracker.

``build`` makes the denoiser (on the meta device for an estimate, from a folder's
weights for a check), adds the LoRA the trainer adds and gives the parameters the
dtypes and ``requires_grad`` the trainer gives them; ``run_step`` runs what
``Trainer.train_step`` runs for one micro-batch: the frozen reference (live, three rows
per pair for DDSPO, two for Diffusion-DPO, none with a reference cache or for plain
fine-tuning), the policy forward, the loss, the backward. The optimizer's step is
counted analytically by the caller (``optim_memory.py``), as bitsandbytes' states cannot
run on fake tensors.

Everything here runs inside one process per estimate (``worker.py``).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
PRECISIONS = ("fp32", "fp16", "bf16", "bf16-pure", "fp16-pure")
# ddspo: TF-CPP as ddspo_fast runs it (one reference call on 3 rows per pair);
# ddspo-official: as the official DDSPO trainer runs it (two reference calls of 2 rows);
# dpo: Diffusion-DPO (reference on 2 rows); sft: plain fine-tuning, no reference.
MODES = ("ddspo", "ddspo-official", "dpo", "sft")


@dataclass
class StepSetup:
    """What one step's memory depends on (all JSON-serialisable)."""
    denoiser_cls: str
    config: dict
    latent_shape: list          # one row's latent, as the family stores it
    cond: dict                  # key -> [shape per row, dtype name]
    pairs: int = 1              # pairs per micro-batch (rows, for sft)
    mode: str = "ddspo"
    reference: str = "live"     # live | cached (no reference run)
    lora_rank: Optional[int] = None
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    precision: str = "bf16"
    frozen_dtype: Optional[str] = None   # frozen weights (LoRA base, reference copy)
    checkpointing: bool = False
    attention: str = "flash"
    reference_first: bool = False
    granule: int = 512
    gpu_rules: bool = True
    family: Optional[str] = None  # the registered family (its timestep dtype)

    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    def trained_dtype(self) -> torch.dtype:
        return {"bf16-pure": torch.bfloat16, "fp16-pure": torch.float16}.get(self.precision,
                                                                              torch.float32)

    def frozen(self) -> torch.dtype:
        if self.frozen_dtype:
            return DTYPES[self.frozen_dtype]
        return self.autocast_dtype() or self.trained_dtype()

    def policy_rows(self) -> int:
        return self.pairs if self.mode == "sft" else 2 * self.pairs

    def reference_rows(self) -> int:
        """Rows of one reference call."""
        if self.mode == "sft" or self.reference == "cached":
            return 0
        return 3 * self.pairs if self.mode == "ddspo" else 2 * self.pairs

    def reference_calls(self) -> int:
        return 2 if self.mode == "ddspo-official" else 1


# ------------------------------------------------------------------ model
def new_denoiser(setup: StepSetup, weights_dir: Optional[str] = None) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, setup.denoiser_cls)
    if weights_dir is not None:
        return cls.from_pretrained(weights_dir)
    with torch.device("meta"):
        return cls(**setup.config)


def add_lora(den: torch.nn.Module, setup: StepSetup) -> None:
    from ..train.lora import add_policy_lora

    device = next(den.parameters()).device
    with torch.device(device):
        add_policy_lora(den, setup.lora_rank, None, setup.lora_targets, 0)


def set_dtypes(den: torch.nn.Module, setup: StepSetup, make, *, frozen_only=False) -> None:
    """Give each parameter the trainer's dtype and requires_grad (LoRA: the adapters
    train in fp32 over a frozen base; full: every weight trains); ``make(p, dtype)``
    returns the new tensor (a fake one for an estimate, a cast for a check)."""
    lora = setup.lora_rank is not None
    for mname, mod in den.named_modules():
        in_lora = ".lora_A." in f".{mname}." or ".lora_B." in f".{mname}."
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            trained = not frozen_only and (in_lora if lora else True)
            dtype = setup.trained_dtype() if trained else setup.frozen()
            mod._parameters[name] = torch.nn.Parameter(make(p, dtype), requires_grad=trained)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = make(b, b.dtype)


def build(setup: StepSetup, make, weights_dir: Optional[str] = None):
    """(policy, reference) as the trainer holds them; reference None when not run,
    the policy itself (adapters off) for LoRA."""
    from .gpu_rules import use_attention

    den = new_denoiser(setup, weights_dir)
    use_attention(den, setup.attention)
    ref = None
    live_ref = setup.reference_rows() > 0
    if setup.lora_rank is not None:
        add_lora(den, setup)
        ref = den if live_ref else None
    elif live_ref:
        ref = copy.deepcopy(den)
        set_dtypes(ref, setup, make, frozen_only=True)
        ref.eval()
    set_dtypes(den, setup, make)
    if setup.checkpointing:
        # diffusers' own checkpointing, without saving the CPU RNG state per block: on a
        # GPU that state is host memory, and a CPU check must not count it either.
        import functools

        import torch.utils.checkpoint as ckpt
        den.enable_gradient_checkpointing(functools.partial(
            ckpt.checkpoint, use_reentrant=False, preserve_rng_state=False))
    den.train()
    return den, ref


# ------------------------------------------------------------------ inputs
def inputs(setup: StepSetup, rows: int, make_input) -> tuple:
    x = make_input((rows, *setup.latent_shape), torch.float32)
    t = make_input((rows,), timestep_dtype(setup.family))
    # Stored embeddings are fp16; CPU autocast refuses to mix fp16 into bf16 promotion
    # (CUDA does not), so they come in the compute dtype: the same bytes, tiny anyway.
    fdt = setup.autocast_dtype() or setup.trained_dtype()
    cond = {k: make_input((rows, *shape), fdt if DTYPES[dt].is_floating_point else DTYPES[dt])
            for k, (shape, dt) in setup.cond.items()}
    return x, t, cond


def timestep_dtype(family: Optional[str]) -> torch.dtype:
    """The dtype of the timesteps ``family``'s denoiser takes (its adapter says)."""
    from ..models import get_family

    if family is None:
        raise ValueError("family: a traced step needs its model family (StepSetup.family)")
    return get_family(family).timestep_dtype()


def call(den, setup: StepSetup, x, t, cond):
    """The denoiser call of the family's adapter (models/), on stacked rows."""
    cls = setup.denoiser_cls
    if cls == "UNet2DConditionModel":
        added = None
        if "pooled_prompt_embeds" in cond:
            pooled = cond["pooled_prompt_embeds"]
            ids = torch.zeros((x.shape[0], 6), dtype=pooled.dtype, device=x.device)
            added = {"text_embeds": pooled, "time_ids": ids}
        return den(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                   return_dict=False)[0]
    if cls == "SD3Transformer2DModel":
        v = den(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        return x - 0.5 * v
    if cls == "SanaTransformer2DModel":
        return den(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                   encoder_attention_mask=cond["prompt_attention_mask"], timestep=t,
                   return_dict=False)[0]
    if cls == "FluxTransformer2DModel":
        n, c, h, w = x.shape
        packed = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(n, (h // 2) * (w // 2), c * 4)
        txt = cond["prompt_embeds"]
        img_ids = torch.zeros(((h // 2) * (w // 2), 3), device=x.device)
        txt_ids = torch.zeros((txt.shape[1], 3), device=x.device)
        guidance = (torch.full((n,), 3.5, device=x.device)
                    if setup.config.get("guidance_embeds", False) else None)
        out = den(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                  pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=txt,
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        out = out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, c, h, w)
    raise ValueError(f"model: no planner call for denoiser class {cls!r} (known: "
                     "UNet2DConditionModel, SD3Transformer2DModel, SanaTransformer2DModel, "
                     "FluxTransformer2DModel)")


def _loss(pred: torch.Tensor, target: torch.Tensor, ref_out, setup: StepSetup, n: int):
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if setup.mode == "sft":
        return mse.mean()
    m_w, m_l = mse[:n], mse[n:]
    if ref_out is None:
        return torch.nn.functional.softplus(-(m_l - m_w)).mean()
    r = (ref_out[n:2 * n].float() - target[n:].float()).pow(2).flatten(1).mean(1)
    return torch.nn.functional.softplus(-(m_l - m_w - r)).mean()


def run_step(den, ref, setup: StepSetup, make_input, tracker=None) -> None:
    """Reference, policy forward, loss and backward of one micro-batch."""
    from ..train.lora import AdapterSwitch

    phase = tracker.in_phase if tracker is not None else (lambda name: contextlib.nullcontext())
    n = setup.pairs
    rows = setup.policy_rows()
    ref_rows = setup.reference_rows()
    x, t, cond = inputs(setup, max(rows, ref_rows), make_input)
    target = make_input((rows, *setup.latent_shape), torch.float32)
    dt = setup.autocast_dtype()
    amp = torch.autocast("cpu", dtype=dt) if dt is not None else contextlib.nullcontext()
    attn = contextlib.nullcontext()
    if setup.attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attn = sdpa_kernel([SDPBackend.MATH])
    switch = AdapterSwitch(den) if (ref is den and setup.lora_rank is not None) else None

    def reference():
        with phase("reference forward"), torch.no_grad():
            ctx = switch.use(None) if switch is not None else contextlib.nullcontext()
            with ctx:
                return call(ref, setup, x[:ref_rows], t[:ref_rows],
                            {k: v[:ref_rows] for k, v in cond.items()})

    def references():
        outs = [reference() for _ in range(setup.reference_calls())]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    with attn:
        with amp:
            ref_out = references() if (ref_rows and setup.reference_first) else None
            with phase("policy forward"):
                pred = call(den, setup, x[:rows], t[:rows], {k: v[:rows] for k, v in cond.items()})
            if tracker is not None:
                tracker.keep_as_saved("policy forward")
            if ref_rows and not setup.reference_first:
                ref_out = references()
            with phase("loss"):
                loss = _loss(pred, target, ref_out, setup, n)
        del ref_out, pred
        with phase("backward"):
            loss.backward()
