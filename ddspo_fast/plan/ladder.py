"""The step ladder's rows at real size: each row of a ``bench step`` JSON gets the planned
peak memory of its settings on the family's released denoiser (``bench/archs.py``
``REAL``), so every rung has a real-size memory column even where it cannot run (on a CPU,
or on a GPU too small for it).

    python -m ddspo_fast.plan.ladder benchmarks/results/step-cpu-tiny.json --write

How a row's settings read as planner options (``options_of``): precision as it ran; the
optimizer as the row built it (the ladder's ``adamw`` is ``torch.optim.AdamW``, whose
CUDA default is the foreach kernel with its state-sized temporary; the library rows use
the trainer's fused AdamW); four reference rows per pair are the official recipe's two
reference calls, three the library's one; checkpointing, LoRA rank and the reference cache
as set (a LoRA row at the recipe's rank for the released model, ``Spec.lora_rank``, not
the tiny model's). ``channels_last``, ``compile`` and the loss form change no tensor the planner
counts. The batch is the released model's benchmark batch (``Spec.default_batch``), not
the tiny run's, and each figure is an estimate: the count with the margin rule of
``margin.py`` beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from . import margin
from .estimate import PlanOptions, estimate_steps

GiB = 1024 ** 3


def options_of(row: dict, batch: int) -> Optional[PlanOptions]:
    """Planner options for a ladder row's ``config`` (None when the row has none)."""
    cfg = row.get("config")
    if not cfg:
        return None
    library = str(row.get("name", "")).startswith("ddspo_fast")
    opt = cfg.get("optimizer", "adamw")
    if opt == "adamw":
        opt = "adamw" if library else "adamw-foreach"
    return PlanOptions(
        batch=batch, mode="ddspo-official" if cfg.get("reference_rows") == 4 else "ddspo",
        reference="cached" if cfg.get("reference_cache") else "live",
        lora_rank=cfg.get("lora_rank"), precision=cfg.get("precision", "fp32"),
        checkpointing=bool(cfg.get("gradient_checkpointing")), optimizer=opt)


def annotate(doc: dict, families=None) -> dict:
    """``doc`` (a ``bench step`` JSON) with ``planned_real`` in every row that has a config:
    one worker process per family traces all of its rows."""
    from ..bench.archs import REAL

    rows = doc.get("rows", [])
    for family in dict.fromkeys(r["family"] for r in rows):
        if families and family not in families:
            continue
        spec = REAL.get(family)
        if spec is None:
            continue
        batch = int(getattr(spec, "default_batch", 1) or 1)
        todo = [(r, o) for r in rows if r["family"] == family
                for o in [options_of(r, batch)] if o is not None]
        for _, o in todo:  # a LoRA row trains the released model's recipe rank, not the tiny one's
            if o.lora_rank is not None:
                o.lora_rank = int(getattr(spec, "lora_rank", o.lora_rank))
        if todo:
            estimates = estimate_steps(spec, [o for _, o in todo])
            for (r, o), e in zip(todo, estimates):
                r["planned_real"] = {
                    "estimate": True, "arch": f"{family} (bench/archs.py REAL)",
                    "batch": batch, "count_gib": round(e.peak / GiB, 2),
                    "peak_phase": e.peak_phase,
                    "allocated_gib": round(margin.apply(e.peak, "allocated") / GiB, 2),
                    "reserved_gib": round(margin.apply(e.peak, "reserved") / GiB, 2),
                    "options": {"precision": o.precision, "optimizer": o.optimizer,
                                "mode": o.mode, "reference": o.reference,
                                "checkpointing": o.checkpointing, "lora_rank": o.lora_rank}}
    doc["planned_real_note"] = (
        "planned_real: an estimate (ddspo-fast plan's traced count on fake tensors, no GPU) "
        "of the row's settings on the released model at its benchmark batch; "
        + margin.statement())
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddspo_fast.plan.ladder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="a bench step JSON (its rows gain planned_real)")
    p.add_argument("--families", default=None, help="comma-separated; default: all in the file")
    p.add_argument("--write", action="store_true", help="rewrite the JSON in place (atomically)")
    args = p.parse_args(argv)
    from ..fsio import atomic_write_text

    try:
        doc = json.loads(args.json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {args.json}: {e}", file=sys.stderr)
        return 1
    fams = [f for f in (args.families or "").split(",") if f] or None
    doc = annotate(doc, fams)
    text = json.dumps(doc, indent=1) + "\n"
    if args.write:
        atomic_write_text(args.json, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
