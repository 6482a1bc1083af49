"""`ddspo-fast demo`: show that DDSPO works, on a 2D toy and on the real training path.

1. The toy (`toy.py`): a conditional 2D diffusion model trained on corrupted labels is
   fine-tuned with Diffusion-DPO and with DDSPO on the same pairs; metrics.json and
   PNG scatters go to --out.
2. The pipeline (`pipeline.py`, skipped with --skip-pipeline): degrade prompts,
   prepare a pair dataset, train a few steps and sample, on a tiny randomly initialised
   SD1.5-architecture model; nothing is downloaded.

`python -m ddspo_fast.demo` and `ddspo-fast demo` both call `main`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

TABLE_METRICS = (("condition_accuracy", "cond. acc ↑"), ("mmd", "MMD² ↓"),
                 ("sliced_wasserstein", "sliced W1 ↓"), ("diversity", "diversity (1=ideal)"),
                 ("pairwise_distance", "pairwise dist"))
ROWS = (("ground_truth", "ground truth (floor)"), ("reference", "reference"),
        ("dpo", "Diffusion-DPO"), ("ddspo", "DDSPO TF-CPP"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddspo-fast demo",
        description="2D toy reproduction of DDSPO vs Diffusion-DPO, then the library's real "
                    "training path end to end on a tiny SD1.5-architecture model.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="smaller toy (< 3 min on a 2-core CPU)")
    p.add_argument("--skip-pipeline", action="store_true",
                   help="run only the toy, not the tiny SD1.5 pipeline")
    p.add_argument("--skip-toy", action="store_true", help="run only the pipeline part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=None, help="beta for both fine-tunes")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps for both methods")
    p.add_argument("--negative", choices=("null", "other"), default=None,
                   help="c- for the dispreferred samples: the null condition or another one")
    p.add_argument("--label-noise", type=float, default=None,
                   help="fraction of the reference's training points with a wrong label")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the toy (default 1: the MLP is tiny, and on a "
                        "busy machine more threads spin and run many times slower)")
    p.add_argument("--toy-config", type=json.loads, default=None, metavar="JSON",
                   help="extra ToyConfig fields as a JSON object (tests use this)")
    return p


def toy_config(args):
    from .toy import ToyConfig

    over = {}
    for name, field in (("beta", "beta"), ("steps", "ft_steps"), ("negative", "negative"),
                        ("label_noise", "label_noise")):
        if getattr(args, name) is not None:
            over[field] = getattr(args, name)
    over.update(args.toy_config or {})
    over["seed"] = args.seed
    return ToyConfig.quick(**over) if args.quick else ToyConfig(**over)


def run_toy_part(args, out: Path) -> dict:
    import torch

    from . import plots
    from .toy import config_dict, run_toy

    cfg = toy_config(args)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        tic = time.perf_counter()
        result = run_toy(cfg)
        seconds = time.perf_counter() - tic
    finally:
        torch.set_num_threads(prev_threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    (out / "toy_config.json").write_text(json.dumps(
        {"config": config_dict(cfg), "seconds": {**result.seconds, "total": seconds},
         "threads": max(1, args.threads), "torch": torch.__version__}, indent=2) + "\n")
    files = [out / "metrics.json", out / "toy_config.json"]
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: metrics stand alone
        print("[toy] matplotlib is not installed: no plots (pip install 'ddspo_fast[plots]')")
    else:
        files += [plots.scatter_panels(result, out / "toy_samples.png"),
                  plots.per_condition_panels(result, out / "toy_per_condition.png"),
                  plots.training_curves(result, out / "toy_training.png")]
    for f in files:
        print(f"[toy] wrote {f}")
    return {"metrics": result.metrics, "seconds": seconds, "config": cfg}


def format_table(metrics: dict) -> str:
    head = ["method"] + [title for _, title in TABLE_METRICS]
    rows = [[title] + [f"{metrics[key][m]:.3f}" for m, _ in TABLE_METRICS]
            for key, title in ROWS if key in metrics]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def passed(metrics: dict) -> bool:
    """The demo's acceptance check: DDSPO >= reference + 5 pts and not below DPO."""
    ref, dpo, dd = (metrics[k]["condition_accuracy"] for k in ("reference", "dpo", "ddspo"))
    return dd >= ref + 0.05 and dd >= dpo


def verdict(metrics: dict) -> str:
    """The acceptance check stated as a line the reader can verify."""
    ref, dpo, dd = (metrics[k]["condition_accuracy"] for k in ("reference", "dpo", "ddspo"))
    return (f"DDSPO condition accuracy {dd:.3f} vs reference {ref:.3f} ({100 * (dd - ref):+.1f} pts) "
            f"and Diffusion-DPO {dpo:.3f} ({100 * (dd - dpo):+.1f} pts): "
            + ("PASS (>= +5 pts over reference, not below DPO)" if passed(metrics)
               else "FAIL (needs >= +5 pts over reference and not below DPO)"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    tic = time.perf_counter()
    toy = pipe = None
    if not args.skip_toy:
        print(f"== toy: 2D conditional diffusion, DDSPO vs Diffusion-DPO "
              f"({'quick' if args.quick else 'full'} settings) ==")
        toy = run_toy_part(args, out)
    if not args.skip_pipeline:
        from .pipeline import run_pipeline

        print("== pipeline: tiny SD1.5-architecture model, degrade -> prepare -> train -> sample ==")
        pipe = run_pipeline(out / "pipeline", seed=args.seed)
    print()
    if toy is not None:
        c = toy["config"]
        print(f"Toy results ({c.num_conditions} conditions, label noise {c.label_noise:g}, "
              f"c- = {c.negative}, beta {c.beta:g}, {c.ft_steps} steps, {c.n_eval} samples/condition, "
              f"{toy['seconds']:.0f}s):")
        print(format_table(toy["metrics"]))
        print(verdict(toy["metrics"]))
    if pipe is not None:
        print("Pipeline artifacts:")
        for name, path in pipe["artifacts"].items():
            print(f"  {name:12s} {path}")
    print(f"demo finished in {time.perf_counter() - tic:.0f}s; outputs in {out}")
    if pipe is not None and "report" in pipe["artifacts"]:
        report = Path(pipe["artifacts"]["report"])
        print(f"\n== the tiny run against its base: {report} ==")
        print(report.read_text(encoding="utf-8").strip())
    if toy is not None and not passed(toy["metrics"]):
        print("demo: the toy's verdict is FAIL (exit status 1)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
