"""The README's "When to shard, when to quantize" table: per-rank memory of the large
configurations under N-way sharding, and a LoRA's memory over a quantized base.

``python -m ddspo_fast.plan.fit --write benchmarks/results/plan-shard-quant.json`` traces
each configuration once; the sharded and quantized columns are recomputed from the same
trace (they change counted parts only, ``whatif.py``). Estimates, with the planner's
stated margin, on a CPU without weights.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict

from . import margin
from .table_cli import parser, printed_markdown
from .archs import by_name
from .estimate import PlanOptions, estimate_step
from .whatif import with_base, with_sharding

GiB = 1 << 30
RANKS = (1, 2, 4, 8)
BASES = ("bf16", "int8", "fp8", "nf4")

# (name, architecture, options, what varies: "shard" over RANKS or "base" over BASES)
# A sharded run takes AdamW only (train/sharding.py: per-element states that shard with
# the parameters), so the sharded rows count AdamW's fp32 states.
CONFIGS = (
    ("sdxl full, 4 pairs, ckpt, AdamW, live reference", "sdxl",
     dict(batch=4, checkpointing=True, optimizer="adamw"), "shard"),
    ("flux-dev full, 1 pair, ckpt, AdamW, reference cache", "flux-dev",
     dict(batch=1, checkpointing=True, optimizer="adamw", reference="cached"), "shard"),
    ("flux-dev full, 1 pair, ckpt, AdamW, live reference", "flux-dev",
     dict(batch=1, checkpointing=True, optimizer="adamw"), "shard"),
    ("flux-dev LoRA r16, 1 pair, ckpt, live reference (adapters off)", "flux-dev",
     dict(batch=1, checkpointing=True, lora_rank=16, base="bf16"), "base"),
)


def _entry(est) -> dict:
    return {"count_gib": round(est.peak / GiB, 2),
            "reserved_with_margin_gib": round(est.reported("reserved") / GiB, 2),
            "peak_phase": est.peak_phase, "options": asdict(est.options)}


def build(log=print) -> dict:
    rows = []
    for name, model, opts, varies in CONFIGS:
        t0 = time.time()
        est = estimate_step(by_name(model), PlanOptions(**opts))
        if varies == "shard":
            cols = {f"{n} rank{'s' if n > 1 else ''}": _entry(with_sharding(est, n) if n > 1 else est)
                    for n in RANKS}
        else:
            cols = {f"{b} base": _entry(with_base(est, b) if b != "bf16" else est) for b in BASES}
        rows.append({"config": name, "model": model, "varies": varies, "columns": cols,
                     "seconds": round(time.time() - t0, 1)})
        log(f"{name}: " + ", ".join(f"{k} {v['count_gib']}" for k, v in cols.items()))
    return {"rows": rows}


def markdown(doc: dict) -> str:
    out = []
    for varies, head in (("shard", "per rank, sharded over"), ("base", "frozen base")):
        rows = [r for r in doc["rows"] if r["varies"] == varies]
        if not rows:
            continue
        cols = list(rows[0]["columns"])
        out.append(f"| configuration ({head}) | " + " | ".join(cols) + " |")
        out.append("|" + " --- |" * (len(cols) + 1))
        for r in rows:
            cells = [f"{r['columns'][c]['count_gib']:.1f} "
                     f"({r['columns'][c]['reserved_with_margin_gib']:.1f})" for c in cols]
            out.append(f"| {r['config']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def main(argv=None) -> int:
    import torch

    from .._version import __version__
    from ..fsio import atomic_write_text

    p = parser("python -m ddspo_fast.plan.fit")
    args = p.parse_args(argv)
    if printed_markdown(args, markdown):
        return 0
    doc = build(log=lambda s: print(s, flush=True))
    doc.update({"what": "estimated peak accelerator memory of one DDSPO TF-CPP step per rank "
                        "(GiB: traced count, and reserved with the margin)",
                "command": "python -m ddspo_fast.plan.fit --write "
                           "benchmarks/results/plan-shard-quant.json",
                "device": f"CPU ({platform.machine()}); estimates without weights, no GPU",
                "ddspo_fast": __version__, "torch": torch.__version__,
                "margin": margin.statement(),
                "sharding": "weights (policy and live reference), gradients and optimizer "
                            "states divided over the ranks, activations not, two whole "
                            "denoiser blocks gathered during forward and backward",
                "quantized bases": "as train/quantize.py stores them: nf4 0.5 B per weight + "
                                   "an fp32 absmax per 64; int8 and fp8 1 B + an fp32 scale "
                                   "per output row; the largest layer dequantized to bf16"})
    print(markdown(doc))
    if args.write:
        atomic_write_text(args.write, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
