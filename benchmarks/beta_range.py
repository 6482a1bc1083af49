#!/usr/bin/env python
"""Which DPO temperatures beta hold on the tiny Qwen-Image and FLUX.2 models.

For each tiny model, objective and beta: a short LoRA run on a tiny random-pair dataset
(CPU, fp32), reading the collapse signs the trainer logs. A run *held* when every record is
finite, the saturated fraction of the last record is under ``--max-saturated`` and neither
reference drift (policy MSE minus reference MSE) exceeds ``--max-drift`` times the run's
first reference MSE at any log. The drift is judged only where that reference MSE is at
least ``--min-ref-mse``: DDSPO's targets are the reference's own predictions under two
prompts, and on a tiny random model (whose output barely depends on the prompt) they nearly
coincide, so its MSEs are too small for a ratio to mean anything.
Tiny random models on random latents say little about real ones: the result is a starting
range to check on the real model, not a recommendation.

    python benchmarks/beta_range.py --out benchmarks/results/beta-range-cpu-tiny.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(model, data, out, objective, beta, args):
    from ddspo_fast.train import Trainer, TrainConfig

    cfg = TrainConfig(model=model, data=data, output_dir=str(out), objective=objective,
                      beta=beta, lora_rank=4, learning_rate=args.lr, max_steps=args.steps,
                      batch_size=2, mixed_precision="no", device="cpu", seed=args.seed,
                      checkpoint_every=0, log_every=args.log_every, progress=False,
                      tensorboard=False, save_final=False)
    Trainer(cfg).train()
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _summary(records, args) -> dict:
    keys = ("loss", "implicit_acc", "margin", "margin_max", "saturated_frac", "drift_w",
            "drift_l")
    finite = all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                 for r in records for k in ("loss", "margin"))
    drift = max((max(abs(r.get("drift_w") or 0.0), abs(r.get("drift_l") or 0.0))
                 for r in records), default=float("nan"))
    first = records[0] if records else {}
    scale = ((first.get("ref_mse_w") or 0.0) + (first.get("ref_mse_l") or 0.0)) / 2
    last = records[-1] if records else {}
    sat = last.get("saturated_frac")
    judged = scale >= args.min_ref_mse
    held = bool(finite and sat is not None and sat < args.max_saturated
                and (not judged or drift <= args.max_drift * scale))
    return {"held": held, "finite": finite, "max_abs_drift": drift, "ref_mse_scale": scale,
            "drift_judged": judged,
            "last": {k: last.get(k) for k in keys},
            "margin_max_over_run": max((r.get("margin_max") or -math.inf for r in records),
                                       default=None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen_image,flux2,flux2-klein")
    p.add_argument("--objectives", default="ddspo,dpo")
    p.add_argument("--betas", default="500,2000,5000,20000,100000,500000")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-saturated", type=float, default=0.5)
    p.add_argument("--max-drift", type=float, default=0.25)
    p.add_argument("--min-ref-mse", type=float, default=1e-2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import diffusers
    import transformers

    import ddspo_fast
    from ddspo_fast.bench.device import device_name
    from ddspo_fast.fsio import atomic_write_json
    from ddspo_fast.testing import make_tiny_dataset, make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="beta-range-"))
    rows = []
    t0 = time.time()
    for name in args.models.split(","):
        model = make_tiny_model(name, root / "models" / name)
        data = make_tiny_dataset(model, root / "data" / name, n_pairs=args.pairs,
                                 seed=args.seed)
        for objective in args.objectives.split(","):
            for beta in (float(b) for b in args.betas.split(",")):
                out = root / "runs" / f"{name}-{objective}-{beta:g}"
                try:
                    row = _summary(_run(model, data, out, objective, beta, args), args)
                except Exception as e:  # a run that stopped (non-finite loss...) did not hold
                    row = {"held": False, "finite": False, "max_abs_drift": float("nan"),
                           "last": {"implicit_acc": None, "saturated_frac": None},
                           "error": f"{type(e).__name__}: {e}"}
                row = {"model": name, "objective": objective, "beta": beta, **row}
                rows.append(row)
                print(f"{name:12s} {objective:6s} beta {beta:>8g}: "
                      f"{'held' if row['held'] else 'FAILED'} "
                      f"acc {row['last']['implicit_acc']} sat {row['last']['saturated_frac']} "
                      f"drift {row['max_abs_drift']:.3g}", file=sys.stderr)
    held: dict = {}
    for r in rows:
        betas = held.setdefault(f"{r['model']}/{r['objective']}", [])
        if r["held"]:
            betas.append(r["beta"])
    result = {
        "what": "beta range that held on tiny random models (not a recommendation for real "
                "models)",
        "criterion": {"finite": True, "last_saturated_frac_below": args.max_saturated,
                      "max_abs_drift_at_most_times_first_ref_mse": args.max_drift,
                      "drift_judged_where_first_ref_mse_at_least": args.min_ref_mse},
        "setup": {"steps": args.steps, "lr": args.lr, "lora_rank": 4, "batch_size": 2,
                  "pairs": args.pairs, "seed": args.seed, "precision": "fp32"},
        "device": device_name("cpu"),
        "command": "python benchmarks/beta_range.py " + " ".join(argv or sys.argv[1:]),
        "versions": {"ddspo_fast": ddspo_fast.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "wall_s": round(time.time() - t0, 1),
        "held_betas": held,
        "runs": rows,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(held), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
