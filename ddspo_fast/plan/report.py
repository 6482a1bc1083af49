"""The planner's answer as text."""
from __future__ import annotations

from . import margin
from .estimate import Estimate

GiB = 1 << 30
_COLS = (("weights", "weights"), ("autocast", "autocast copies"), ("grads", "gradients"),
         ("optimizer states", "optimizer states"), ("saved", "saved activations"),
         ("transient", "transient"), ("other resident", "other resident"), ("total", "total"))


def _g(b: float) -> str:
    return f"{b / GiB:.2f}"


def describe(est: Estimate) -> str:
    o = est.options
    what = {"ddspo": "DDSPO (TF-CPP)", "ddspo-official": "DDSPO as the official trainer runs "
            "it (two reference calls of 2 rows per pair)", "dpo": "Diffusion-DPO", "sft": "plain fine-tuning"}[o.mode]
    rows = "rows" if o.mode == "sft" else "pairs"
    train = f"LoRA rank {o.lora_rank}" if o.lora_rank else "full fine-tune"
    prec = {"fp32": "fp32", "bf16": "bf16 autocast over fp32 weights",
            "fp16": "fp16 autocast over fp32 weights", "bf16-pure": "pure bf16",
            "fp16-pure": "pure fp16"}[o.precision]
    h, w = est.arch.at(o.height, o.width).pixels()
    parts = [f"{what}, {o.batch} {rows} per step", train, prec,
             f"frozen base {o.base}" if o.base != "auto" else None,
             f"{w}x{h} px", f"{est.arch.at(tokens=o.text_tokens).text_tokens()} text tokens",
             f"attention {o.kernel()}", f"optimizer {o.optimizer}",
             "gradient checkpointing" if o.checkpointing else "no checkpointing",
             "reference cache" if o.reference == "cached" and o.mode != "sft" else None,
             "reference before policy" if o.ref_first() and o.reference == "live" and o.mode != "sft" else None,
             f"EMA {o.ema}" if o.ema else None,
             f"text encoders resident ({o.text_encoders})" if o.text_encoders else None,
             f"VAE resident ({o.vae})" if o.vae else None,
             f"sharded over {o.shard_degree} ranks (per-rank memory)" if o.shard_degree > 1 else None]
    return ", ".join(p for p in parts if p)


def table(est: Estimate) -> str:
    head = ["phase"] + [label for _, label in _COLS]
    lines = [head]
    for name, p in est.phases.items():
        lines.append([name] + [_g(p.get(k, 0)) for k, _ in _COLS])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])  # noqa: E731
                              for i, c in enumerate(r))
    return "\n".join(fmt(r) for r in lines)


def render(est: Estimate, *, memory=None, memory_label: str = "", variants=()) -> str:
    out = [f"model: {est.arch.source}" + (f" ({est.arch.notes})" if est.arch.notes else ""),
           f"step: {describe(est)}",
           "",
           "estimated accelerator memory of one training step, GiB (traced count at each phase's peak):",
           table(est), "",
           f"peak (count): {_g(est.peak)} GiB in {est.peak_phase}",
           f"with margin: allocated ~ {_g(est.reported('allocated'))} GiB, "
           f"reserved / nvidia-smi ~ {_g(est.reported('reserved'))} GiB",
           margin.statement()]
    paged = est.extras.get("optimizer states paged (outside torch's allocator)", 0)
    if paged:
        out.append(f"paged optimizer states: {_g(paged)} GiB in CUDA unified memory (not in the "
                   "count; the driver may evict them to the host)")
    f = est.flops_per_pair()
    unit = "pair" if est.options.mode != "sft" else "row"
    out.append(f"FLOPs per {unit}: useful {f['useful'] / 1e12:.1f} TFLOP, executed "
               f"{f['executed'] / 1e12:.1f} TFLOP (matmul, convolution and attention; recompute "
               "counted as one policy forward)")
    if memory is not None:
        fits = est.reported("reserved") <= memory
        best = est.largest_batch(memory)
        out += ["", f"fits {memory_label}: {'yes' if fits else 'no'} (reserved with margin "
                    f"{_g(est.reported('reserved'))} GiB); largest batch that fits: {best} "
                    f"{'rows' if est.options.mode == 'sft' else 'pairs'} (activations scale "
                    "with the batch)"]
    if variants:
        out += ["", "what would lower the peak (reserved with margin, GiB):"]
        for desc, v in variants:
            if isinstance(v, int):
                val = margin.apply(v, "reserved")
            else:
                val = v.reported("reserved")
            mark = ""
            if memory is not None:
                mark = "  fits" if val <= memory else "  does not fit"
            out.append(f"  {desc}: {_g(val)}{mark}")
    return "\n".join(out)
