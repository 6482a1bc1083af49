"""End-to-end benchmark: the ablation ladder of one DDSPO (TF-CPP) training step.

    ddspo-fast bench step                          # GPU: SD1.5 512px, SDXL / SD3-medium / SANA-600M 1024px
    ddspo-fast bench step --tiny --device cpu      # tiny configs, for CI
    ddspo-fast bench step --find-max-batch         # GPU: largest batch per rung, one optimizer

For each family, rung 0 is the official DDSPO recipe of that family as it runs on the
device (optimizer, precision, gradient checkpointing, LoRA or full fine-tune, two
reference calls = 6 denoiser rows per pair, the script-form loss; on a CPU the fp16
recipes run in fp32, the only way the official script runs there); each next rung adds
one change and names it: first those that remove work anywhere (gradient checkpointing
off for SDXL, 3 reference rows: 6 -> 5 rows per pair, the fused library loss), then
those whose gain depends on the device (channels_last for UNets, bf16 without a
GradScaler, 8-bit AdamW, torch.compile); bench/ladder.py has the sources and the rules.
Three library rows run `Trainer.train_step`: `ddspo_fast:defaults` (the library's own
defaults for the device, mixed_precision="auto"), `ddspo_fast:tuned` (the ladder's
settings; it names the rungs it carries that were slower on this device) and
`ddspo_fast:defaults+refcache` (the defaults row reading TrainConfig.reference_cache,
precomputed by `ddspo-fast precompute` before the timing: 2 rows per pair; it records
what the precompute cost per pair-draw).

All rows are measured in one run on the same batch, interleaved, and report step time
quantiles (p20/p50/p80) with the optimizer step, timed apart, charged per pair at the
official recipe's accumulation (128 pairs per update for SD1.5, 512 for SDXL, 1024 for
SD3 and SANA), pairs/s, denoiser rows per pair (counted at the modules), the dtype each
row computes in (every ratio against the official rung says when the two differ), peak
memory (GPU), and MFU twice: against the objective's useful FLOPs and against the FLOPs
actually executed (a 4th reference row and gradient checkpointing's recompute count
there). FLOPs come from torch.utils.flop_counter. Weights are random (bench/archs.py);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..models import get_family
from . import ladder as lad
from .archs import REAL, TINY, Spec, make_batch, write_dataset, write_model
from .device import cpu_model, device_name, free_memory, peak_tflops, slug
from .measure import Entry, find_max_batch, run_interleaved
from .report import (CACHED_ROW, DEFAULTS_ROW, DEFINITIONS, TUNED_ROW, build_rows,
                     format_table)
from .steps import LadderStep, TrainerStep, precompute_reference

# Draws per pair the library rows cycle through (and the reference cache holds).
CACHE_DRAWS = 4

# ------------------------------------------------------------ one family
def _same_settings(rungs, cfg) -> Optional[int]:
    """The measured rung whose config is `cfg`, if any."""
    return next((r.index for r in rungs if r.skipped is None and r.config == cfg), None)


def bench_family(spec: Spec, ctx: dict, rungs, *, batch_size: int, warmup: int, steps: int,
                 mode: str, rounds: int, trainer_row: bool, refcache_row: bool = False,
                 defaults_cfg: Optional[lad.StepConfig] = None,
                 pairs_per_update: Optional[int] = None, log) -> list[dict]:
    dev = ctx["device"]
    common = dict(beta=ctx["beta"], lr=ctx["lr"])
    entries = {}
    for r in rungs:
        if r.skipped is None:
            entries[r.name] = Entry(r.name, (lambda c=r.config: LadderStep(
                c, spec, ctx["model_dir"], dev, **common)))
    batch = make_batch(spec, batch_size, dev, seed=1)
    library = {}
    if trainer_row and defaults_cfg is not None:
        # The library rows train on the benchmark's batch stored as a dataset and cycle
        # through the same CACHE_DRAWS draws, so the live and the cached row take the
        # same steps.
        data_dir = write_dataset(spec, ctx["model_dir"], ctx["workdir"], batch)
        lib = dict(common, batch_size=batch_size, draws=CACHE_DRAWS)
        library[DEFAULTS_ROW] = (defaults_cfg, _same_settings(rungs, defaults_cfg))
        entries[DEFAULTS_ROW] = Entry(DEFAULTS_ROW, lambda: TrainerStep(
            defaults_cfg, spec, ctx["model_dir"], data_dir, ctx["workdir"], dev,
            defaults=True, tag="defaults", **lib))
        top = lad.tuned(rungs)
        if top.config != defaults_cfg and top.index > 0:
            library[TUNED_ROW] = (top.config, top.index if top.skipped is None else None)
            entries[TUNED_ROW] = Entry(TUNED_ROW, lambda: TrainerStep(
                top.config, spec, ctx["model_dir"], data_dir, ctx["workdir"], dev,
                tag="tuned", **lib))
        else:
            log(f"  {TUNED_ROW}: left out, the ladder's settings here are the library's "
                "defaults")
        if refcache_row:
            cache = ctx["workdir"] / f"refcache-{spec.family}-{batch_size}"
            # The defaults' settings given explicitly (mixed_precision resolved for the
            # device): the precompute does not take mixed_precision="auto".
            summary = precompute_reference(defaults_cfg, spec, ctx["model_dir"], data_dir,
                                           cache, dev, **lib)
            free_memory(dev)
            log(f"  precomputed the reference cache: {summary['pair_draws_computed']} "
                f"pair-draws, {summary['ms_per_pair_draw'] or 0:.1f} ms each "
                f"({summary['wall_seconds']:.1f}s with loading)")
            library[CACHED_ROW] = (defaults_cfg, None)
            entries[CACHED_ROW] = Entry(CACHED_ROW, lambda: TrainerStep(
                defaults_cfg, spec, ctx["model_dir"], data_dir, ctx["workdir"], dev,
                reference_cache=cache, tag="refcache", **lib),
                precompute=summary)
    useful = run_interleaved(list(entries.values()), batch, dev, warmup=warmup, steps=steps,
                             mode=mode, rounds=rounds, count=ctx["flops"], log=log)
    rows = build_rows(spec, rungs, entries, useful, batch_size, ctx["peak_tflops"],
                      pairs_per_update=pairs_per_update, library=library)
    log(format_table(rows))
    return rows


# ------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddspo-fast bench step",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU CI)")
    p.add_argument("--families", default=",".join(lad.FAMILIES),
                   help=f"comma-separated subset of {','.join(lad.FAMILIES)}")
    p.add_argument("--rungs", default=None,
                   help=f"comma-separated rungs to measure (default all: {','.join(lad.RUNG_NAMES)}); "
                        "the others are reported as not selected, their changes still apply")
    p.add_argument("--no-trainer-row", action="store_true",
                   help=f"leave out the library rows ({DEFAULTS_ROW}, {TUNED_ROW}: "
                        f"Trainer.train_step; {CACHED_ROW}: the defaults reading a reference "
                        "cache)")
    p.add_argument("--no-refcache-row", action="store_true",
                   help=f"leave out the {CACHED_ROW} row (and its precompute)")
    p.add_argument("--optimizer", default=None, choices=tuple(lad.OPTIMIZERS),
                   help="pin every rung to this optimizer (the optimizer rung is then skipped); "
                        "--find-max-batch pins the family's official optimizer by default")
    p.add_argument("--updates", choices=("recipe", "every-step"), default="recipe",
                   help="recipe (default): charge each row's optimizer step, timed apart, per "
                        "pair at the official recipe's accumulation; every-step: one optimizer "
                        "step per timed step, as timed")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default per family)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration (default 3; tiny 2); per round in "
                        "--interleave rounds")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default 10), split over the rounds")
    p.add_argument("--interleave", choices=("steps", "rounds"), default=None,
                   help="steps: all configurations live, alternating step by step (CPU "
                        "default); rounds: one configuration at a time, order alternating "
                        "between rounds (GPU default: per-configuration peak memory)")
    p.add_argument("--rounds", type=int, default=2, help="rounds for --interleave rounds")
    p.add_argument("--beta", type=float, default=5000.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--cpu-compile", action="store_true",
                   help="CPU: measure the torch.compile rung too (left out by default: "
                        "inductor builds C++ kernels with the system compiler, many minutes "
                        "per model on a small CPU)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP and row counts (and MFU)")
    p.add_argument("--find-max-batch", action="store_true",
                   help="GPU: the largest batch that fits per rung (at one optimizer), then time "
                        "each rung at its own largest batch")
    p.add_argument("--max-batch-cap", type=int, default=256)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice on GPU runs, 1 for CPU runs: on a "
                        "shared machine more threads make timings erratic)")
    p.add_argument("--cache-dir", default=None,
                   help="where the random-weight pipelines are written (default: a temp dir)")
    p.add_argument("--out", default=None,
                   help="result JSON (default benchmarks/results/step-<device>[-tiny].json)")
    return p


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"bench step: {msg}")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = "ddspo-fast bench step " + shlex.join(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda but CUDA is not available")
    if args.find_max_batch and dev.type != "cuda":
        raise _fail("--find-max-batch needs a CUDA device")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in lad.FAMILIES:
            raise _fail(f"--families: unknown family {f!r} (choose from "
                        f"{', '.join(lad.FAMILIES)})")
    only = None
    if args.rungs:
        only = {r.strip() for r in args.rungs.split(",") if r.strip()}
        bad = sorted(only - set(lad.RUNG_NAMES))
        if bad:
            raise _fail(f"--rungs: unknown rung {bad[0]!r} (choose from {', '.join(lad.RUNG_NAMES)})")
    for name in ("batch", "steps", "rounds", "max_batch_cap"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise _fail(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise _fail(f"--warmup: expected an int >= 0, got {args.warmup}")
    threads = args.threads or (1 if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    mode = args.interleave or ("steps" if dev.type == "cpu" else "rounds")
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    steps = args.steps or 10
    specs = TINY if args.tiny else REAL
    name = device_name(dev)
    peak = peak_tflops(name) if dev.type == "cuda" else None
    notes = ["every row: TF32 off (the official scripts do not pass --allow_tf32; the library "
             "rows too, though allow_tf32 defaults to on: like with like), the same (t, eps) "
             "draws per step index, gradient clipping at 1.0, weight decay 1e-2"]
    if args.updates == "recipe":
        notes.append("step_ms charges each row's optimizer step (timed apart) per pair at the "
                     "official recipe's pairs per update; step_ms_one_update is the step as "
                     "timed, one optimizer step each")
    if dev.type == "cpu":
        notes.append("CPU: the official rung runs fp32, the only precision the official scripts "
                     "run in on a CPU (official_precision); the library's defaults on a CPU are "
                     "fp32 too, so ddspo_fast:defaults' vs_official is at equal precision. The "
                     "precision rung (bf16) and the rows after it compute in bf16: their CPU "
                     "ratios say nothing about a GPU, and every row says which precisions its "
                     "vs_official compares")
        notes.append("CPU: mfu is null (no reliable peak FLOP/s for a shared, frequency-scaled "
                     "CPU) and peak_mem_gb is null (process RSS cannot be split between "
                     "configurations)")
    elif peak is None:
        notes.append(f"mfu is null: no peak FLOP/s known for {name!r} (see bench/device.py)")
    elif mode == "steps":
        notes.append("peak_mem_gb is null with --interleave steps: every configuration is "
                     "resident at once")
    compile_missing = None
    if dev.type == "cpu" and not args.cpu_compile:
        compile_missing = ("CPU: left out by default (inductor compiles C++ kernels with the "
                           "system compiler, many minutes per model here); --cpu-compile "
                           "measures it")
    prev_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    tmp = None
    if args.cache_dir:
        root = Path(args.cache_dir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ddspo-bench-step-")
        root = Path(tmp.name)
    print(f"bench step on {name} (torch {torch.__version__}), {'tiny' if args.tiny else 'real'} "
          f"configs, interleaved by {mode}, {steps} timed steps per row after {warmup} warm-up")
    rows, max_rows, sources = [], [], {}
    precisions, updates, defaults, load = {}, {}, {}, [{"before": "start", "loadavg": _loadavg()}]
    try:
        for fam in families:
            spec = specs[fam]
            tic = time.perf_counter()
            model_dir = write_model(spec, root, dev)
            ctx = {"device": dev, "model_dir": model_dir,
                   "beta": args.beta, "lr": args.lr, "workdir": root,
                   "flops": not args.no_flops, "peak_tflops": peak}
            pin = args.optimizer or (lad.official(fam).optimizer if args.find_max_batch else None)
            # the ladder's channels_last rung applies where the family runs so
            is_unet = get_family(spec.family).memory_format() == torch.channels_last
            rungs = lad.build_ladder(fam, is_unet=is_unet, lora_rank=spec.lora_rank,
                                     device_type=dev.type, pin_optimizer=pin, only=only,
                                     compile_missing=compile_missing)
            defaults_cfg = lad.library_defaults(fam, dev.type, is_unet=is_unet,
                                                lora_rank=spec.lora_rank)
            per_update = lad.OFFICIAL_PAIRS_PER_UPDATE[fam] if args.updates == "recipe" else None
            sources[fam] = lad.OFFICIAL_SOURCE[fam]
            precisions[fam] = lad.official_precision(fam, dev.type)
            updates[fam] = lad.OFFICIAL_PAIRS_PER_UPDATE[fam]
            defaults[fam] = defaults_cfg.to_dict()
            load.append({"before": fam, "loadavg": _loadavg()})
            print(f"[{fam}] {spec.notes or spec.denoiser_cls} (model written in "
                  f"{time.perf_counter() - tic:.0f}s); rungs: "
                  + ", ".join(r.name + ("" if r.skipped is None else " (skipped)") for r in rungs))
            bs = args.batch or spec.default_batch
            if args.find_max_batch:
                for r in rungs:
                    if r.skipped is not None:
                        continue
                    mb = find_max_batch(
                        lambda c=r.config: LadderStep(c, spec, model_dir, dev, beta=args.beta,
                                                      lr=args.lr),
                        lambda n: make_batch(spec, n, dev), dev, args.max_batch_cap)
                    print(f"  {fam} {r.name:18s} max batch {mb}")
                    max_rows.append({"family": fam, "rung": r.index, "name": r.name,
                                     "optimizer": r.config.optimizer, "max_batch": mb})
                    if mb > 0:
                        one = [x if x.index == r.index else
                               lad.Rung(x.index, x.name, x.adds, x.changes, x.config,
                                        x.skipped or "timed at another batch (--find-max-batch)")
                               for x in rungs]
                        rows += [row for row in bench_family(
                            spec, ctx, one, batch_size=mb, warmup=warmup, steps=steps,
                            mode="rounds", rounds=1, trainer_row=False,
                            pairs_per_update=per_update, log=print)
                            if row["rung"] == r.index]
            else:
                rows += bench_family(spec, ctx, rungs, batch_size=bs, warmup=warmup,
                                     steps=steps, mode=mode, rounds=args.rounds,
                                     trainer_row=not args.no_trainer_row,
                                     refcache_row=not args.no_refcache_row,
                                     defaults_cfg=defaults_cfg, pairs_per_update=per_update,
                                     log=print)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
        if tmp is not None:
            tmp.cleanup()

    undone = [f"{r['family']}/{r['name']}" for r in rows
              if r["config"].get("channels_last") and r.get("conv_weights_channels_last_after_steps") is False]
    if undone:
        notes.append("channels_last requested but the conv weights were contiguous again after "
                     f"the timed steps in {', '.join(undone)}: bitsandbytes' 8-bit optimizers "
                     "make every parameter contiguous on each step (p.data = p.data.contiguous()), "
                     "so only the activations stay channels_last there")
    load.append({"before": "end", "loadavg": _loadavg()})
    load_note = _load_note(load, dev)
    if load_note:
        notes.append(load_note)
    import ddspo_fast

    result = {"device": name, "device_type": dev.type, "command": command,
              "cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
              "load_average": load, "measured_under_load": bool(load_note),
              "torch": torch.__version__, "ddspo_fast": ddspo_fast.__version__,
              "versions": _versions(), "tiny": args.tiny,
              "cpu_threads": torch.get_num_threads() if dev.type == "cpu" else None,
              "interleave": mode, "rounds": args.rounds if mode == "rounds" else None,
              "warmup": warmup, "steps": steps, "peak_tflops": peak,
              "objective": "ddspo (TF-CPP)", "beta": args.beta, "lr": args.lr,
              "optimizer_pinned": args.optimizer or ("official" if args.find_max_batch else None),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "updates": args.updates,
              "official_sources": sources, "official_precision": precisions,
              "official_pairs_per_update": updates, "library_defaults": defaults,
              "definitions": DEFINITIONS, "notes": notes,
              "rows": rows}
    if max_rows:
        result["max_batch"] = max_rows
    out = Path(args.out) if args.out else Path("benchmarks/results") / (
        "step-" + ("cpu" if dev.type == "cpu" else slug(name)) + ("-tiny" if args.tiny else "")
        + ".json")
    _write_json(out, result)
    print(f"wrote {out}")
    return 0


def _loadavg() -> Optional[list]:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _load_note(load: list, dev) -> Optional[str]:
    """A note when the machine was busy: a 1-minute load average at or above its logical
    core count at any sample (the benchmark itself accounts for about one)."""
    cores = os.cpu_count() or 1
    peaks = [x["loadavg"][0] for x in load if x["loadavg"]]
    if not peaks or max(peaks) < cores:
        return None
    return (f"measured under load: the 1-minute load average reached {max(peaks):.2f} on "
            f"{cores} logical cores (samples: {', '.join(f'{p:.2f}' for p in peaks)}; the "
            "benchmark accounts for about 1); rows are interleaved so load hits them alike, "
            "but ratios are noisier than on a quiet machine"
            + (" and the GPU's host side may have been slowed" if dev.type == "cuda" else ""))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _write_json(path: Path, obj) -> None:
    import json

    from ..fsio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


@contextlib.contextmanager
def _quiet_libraries():
    """diffusers / transformers to errors and no loading bars while the benchmark loads
    models dozens of times; their previous settings are restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, level, bar in saved:
            m.set_verbosity(level)
            (m.enable_progress_bar if bar else m.disable_progress_bar)()


def main(argv=None) -> int:
    """Run the benchmark; torch's thread count (and the libraries' log levels) are
    restored afterwards, so an in-process caller (a test, a notebook) is not left on the
    benchmark's settings."""
    threads = torch.get_num_threads()
    try:
        with _quiet_libraries():
            return _main(argv)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
