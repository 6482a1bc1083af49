"""The README's "Plan before you rent" table: estimated peak memory per family and
configuration, at 1 and 4 pairs, beside the official DDSPO recipe's configuration.

``python -m ddspo_fast.plan.table --write benchmarks/results/plan-table.json`` traces
each configuration (a few minutes in all); the 8-bit and reference-cache columns are
recomputed from the same traces (they change counted parts only, ``whatif.py``).
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
from .estimate import PlanOptions, estimate_steps
from .whatif import with_optimizer, with_reference_cache

GiB = 1 << 30

# The official DDSPO trainer per family (README, "One training step": rung 0): fp16
# autocast over fp32 weights (SANA: plain fp32), torch AdamW (foreach), the whole UNet for
# SD1.5 / SDXL with an fp16 reference copy, a rank-128 LoRA for SD3 / SANA, checkpointing
# for SDXL only, two reference calls of 2 rows per pair.
OFFICIAL = {
    "sd15": dict(mode="ddspo-official", precision="fp16", optimizer="adamw-foreach"),
    "sdxl": dict(mode="ddspo-official", precision="fp16", optimizer="adamw-foreach",
                 checkpointing=True),
    "sd3": dict(mode="ddspo-official", precision="fp16", optimizer="adamw-foreach", lora_rank=128),
    "sana": dict(mode="ddspo-official", precision="fp32", optimizer="adamw-foreach", lora_rank=128),
}
FAMILIES = tuple(OFFICIAL)  # the families the official DDSPO code trains

# ddspo_fast configurations: traced ones, and the ones derived from a trace.
TRACED = {
    "full": dict(),                                   # ddspo-fast train defaults on a GPU
    "full+ckpt": dict(checkpointing=True),
    "lora128+ckpt": dict(lora_rank=128, checkpointing=True),
}
DERIVED = {
    "full+ckpt+8bit": ("full+ckpt", "8bit"),
    "full+ckpt+8bit+cache": ("full+ckpt", "8bit+cache"),
    "lora128+ckpt+cache": ("lora128+ckpt", "cache"),
}


def _entry(est) -> dict:
    return {"count_gib": round(est.peak / GiB, 2),
            "reserved_with_margin_gib": round(est.reported("reserved") / GiB, 2),
            "peak_phase": est.peak_phase, "options": asdict(est.options)}


def build(families=FAMILIES, batches=(1, 4), log=print) -> dict:
    rows = []
    for fam in families:
        arch = by_name(fam)
        for b in batches:
            t0 = time.time()
            row = {"family": fam, "pairs": b}
            names = ["official", *TRACED]
            opts = [PlanOptions(batch=b, **OFFICIAL[fam])] + [PlanOptions(batch=b, **o)
                                                               for o in TRACED.values()]
            traced = dict(zip(names, estimate_steps(arch, opts)))
            for name in names:
                row[name] = _entry(traced[name])
            for name, (base, change) in DERIVED.items():
                est = traced[base]
                if "8bit" in change:
                    est = with_optimizer(est, "adamw8bit")
                if "cache" in change:
                    est = with_reference_cache(est)
                row[name] = _entry(est)
            row["seconds"] = round(time.time() - t0, 1)
            log(f"{fam} x{b}: official {row['official']['count_gib']} GiB, full "
                f"{row['full']['count_gib']}, full+ckpt+8bit+cache "
                f"{row['full+ckpt+8bit+cache']['count_gib']} ({row['seconds']} s)")
            rows.append(row)
    return {"rows": rows}


COLUMNS = ("official", "full", "full+ckpt", "full+ckpt+8bit", "full+ckpt+8bit+cache",
           "lora128+ckpt", "lora128+ckpt+cache")


def markdown(doc: dict) -> str:
    head = "| family | pairs | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for r in doc["rows"]:
        cells = [f"{r[c]['count_gib']:.1f}" for c in COLUMNS]
        lines.append(f"| {r['family']} | {r['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from .._version import __version__
    from ..fsio import atomic_write_text

    p = parser("python -m ddspo_fast.plan.table")
    p.add_argument("--family", action="append", choices=FAMILIES)
    args = p.parse_args(argv)
    if printed_markdown(args, markdown):
        return 0
    doc = build(tuple(args.family or FAMILIES), log=lambda s: print(s, flush=True))
    doc.update({"what": "estimated peak accelerator memory of one DDSPO step (GiB, traced "
                        "count; add the margin for a GPU figure)",
                "command": "python -m ddspo_fast.plan.table --write benchmarks/results/plan-table.json",
                "device": f"CPU ({platform.machine()}); estimates without weights, no GPU",
                "ddspo_fast": __version__, "torch": torch.__version__,
                "margin": margin.statement(), "official": OFFICIAL, "traced": TRACED,
                "derived": {k: list(v) for k, v in DERIVED.items()}})
    print(markdown(doc))
    if args.write:
        atomic_write_text(args.write, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
