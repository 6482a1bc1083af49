"""``ddspo-fast evaluate``: score a trained model with CLIP, or a run against its base with
several metrics, or write a benchmark's image folder (the Python API is
``ddspo_fast.evaluation``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from . import EXIT_OK, CLIError, one_line
from ._args import integer, positive_int, quiet_libraries, short
from ._validate import checked_text

HELP = "score a trained model (alone with CLIP, or against its base with several metrics)"
DESCRIPTION = (
    "Generate --num-images-per-prompt images per prompt with MODEL and score them. Alone: the "
    "CLIP score (100 * max(cos(image, text), 0)) with a local --clip model. With --against BASE: "
    "both models sample the same prompts with the same seeds, every --metrics scorer scores both, "
    "and --out receives scores.json / scores.csv (per prompt and per metric), report.md (means, "
    "the mean difference with a bootstrap 95% interval, the win rate), grid.png (base | run) and "
    "curves.png (the run's training curves). With --format geneval / t2i-compbench the images "
    "are written in that benchmark's folder layout for its own scorer. Images already in --out "
    "are kept and skipped, so a killed evaluation continues where it stopped.")

METRIC_FLAGS = {"clip": "DIR", "pickscore": "DIR", "hpsv2": "FILE", "imagereward": "DIR",
                "aesthetic": "FILE"}
# library argument names -> how the command line spells them
_ARGS = {"pipeline_or_dir": "MODEL", "run": "MODEL", "against": "--against", "prompts": "--prompts",
         "clip_model_path": "--clip", "num_images_per_prompt": "--num-images-per-prompt",
         "steps": "--steps", "seed": "--seed", "device": "--device", "out_dir": "--out",
         "guidance_scale": "--guidance-scale", "batch_size": "--batch-size", "dtype": "--dtype",
         "metrics": "--metrics", "base_model": "--base-model", "format": "--format",
         "against_base_model": "--against-base-model", "fid_reference": "--fid-reference",
         "fid": "--fid-inception",
         **{m: f"--{m}" for m in METRIC_FLAGS}}


def _metric_list(text: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METRIC_FLAGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--metrics expects a comma-separated list of "
                                         f"{', '.join(METRIC_FLAGS)}, got {text!r}")
    return names


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="what to score: a diffusers pipeline folder, a training run's output_dir "
                        "(full or LoRA) or an export")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="a .txt file (one prompt per line) or .jsonl with a 'prompt' field "
                        "(--format geneval: GenEval's evaluation_metadata.jsonl)")
    p.add_argument("--against", default=None, metavar="BASE_OR_RUN",
                   help="compare MODEL with this model (its base, or another run) on the same "
                        "prompts and seeds; needs --out")
    p.add_argument("--metrics", type=checked_text(_metric_list), default=None, metavar="LIST",
                   help=f"with --against: comma-separated, from {','.join(METRIC_FLAGS)} (default: clip)")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="local CLIP model folder (transformers CLIPModel, e.g. "
                        "openai/clip-vit-large-patch14); also the aesthetic predictor's CLIP")
    p.add_argument("--pickscore", default=None, metavar="DIR",
                   help="PickScore_v1 folder (CLIPModel with the CLIP-ViT-H-14 tokenizer and processor)")
    p.add_argument("--aesthetic", default=None, metavar="FILE",
                   help="LAION aesthetic predictor MLP (sac+logos+ava1-l14-linearMSE.pth); uses --clip "
                        "(ViT-L/14)")
    p.add_argument("--hpsv2", default=None, metavar="FILE",
                   help="HPS checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt); its tokenizer "
                        "is --clip's")
    p.add_argument("--imagereward", default=None, metavar="DIR",
                   help="ImageReward folder (ImageReward.pt, med_config.json, bert-base-uncased tokenizer files)")
    p.add_argument("--fid-reference", default=None, metavar="DIR",
                   help="with --against: also the FID of each model's images against the images in DIR "
                        "(needs --fid-inception, torchmetrics and torch-fidelity)")
    p.add_argument("--fid-inception", default=None, metavar="FILE",
                   help="FID's Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--format", choices=("geneval", "t2i-compbench"), default=None,
                   help="only generate, into this benchmark's image folder layout (needs --out)")
    p.add_argument("--num-images-per-prompt", type=positive_int("--num-images-per-prompt"), default=None,
                   metavar="N", help="images per prompt (default: 1; 4 with --format)")
    p.add_argument("--steps", type=positive_int("--steps"), default=25, metavar="N",
                   help="sampling steps (default: 25)")
    p.add_argument("--seed", type=integer("--seed", minimum=0), default=0, metavar="S",
                   help="image j of prompt i uses seed S + 1000 i + j (default: 0)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   metavar="X", help="classifier-free guidance scale (default: the model family's)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=4, metavar="B",
                   help="images generated at once (default: 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="sampling precision (default: fp16 on CUDA, else fp32)")
    p.add_argument("--threads", type=positive_int("--threads"), default=None, metavar="N",
                   help="CPU threads for torch (default: torch's)")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="base pipeline of a LoRA MODEL without train_config.yaml")
    p.add_argument("--against-base-model", default=None, metavar="DIR",
                   help="base pipeline of a LoRA --against without train_config.yaml")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the images and scores (a rerun keeps the images there)")
    p.add_argument("--no-card", action="store_true",
                   help="with --against: leave MODEL's model card (README.md) as it is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _read_prompts(path: str) -> list:
    from ..data.degrade import prompt_texts

    try:
        return prompt_texts(path)
    except ValueError as e:  # "prompts: ..."
        raise CLIError(f"argument --{one_line(e)}") from e


def _emit(text: str) -> None:
    """Print; a reader that went away (``| head``) ends the output quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit


def _usage(args) -> None:
    if args.against is None and args.format is None:
        for m in METRIC_FLAGS:
            if m != "clip" and getattr(args, m) is not None:
                raise CLIError(f"argument --{m}: only used with --against (alone, MODEL is scored "
                               "with --clip)")
        if args.metrics is not None:
            raise CLIError("argument --metrics: only used with --against")
        if args.fid_reference is not None:
            raise CLIError("argument --fid-reference: only used with --against")
        if args.clip is None:
            raise CLIError("argument --clip: required to score MODEL alone (or give --against / --format)")
    if args.format is not None:
        used = [f"--{m}" for m in METRIC_FLAGS if m != "clip" and getattr(args, m) is not None]
        if args.metrics is not None or used:
            raise CLIError(f"argument {(used or ['--metrics'])[0]}: not used with --format (the "
                           "benchmark's own scorer scores the folder)")
    if (args.against is not None or args.format is not None) and args.out is None:
        raise CLIError("argument --out: required with --against and --format (the images and "
                       "reports go there)")
    if args.against is not None:
        for m in args.metrics or ["clip"]:
            if getattr(args, m) is None:
                raise CLIError(f"argument --{m}: --metrics {m} needs --{m} {METRIC_FLAGS[m]}")
        if "aesthetic" in (args.metrics or []) and args.clip is None:
            raise CLIError("argument --clip: --metrics aesthetic needs --clip DIR (the CLIP "
                           "ViT-L/14 its MLP reads)")
        if args.fid_reference is not None and args.fid_inception is None:
            raise CLIError("argument --fid-inception: --fid-reference needs --fid-inception FILE "
                           "(pt_inception-2015-12-05-6726825d.pth)")
        if "hpsv2" in (args.metrics or []) and args.clip is None:
            raise CLIError("argument --clip: --metrics hpsv2 needs --clip DIR (its CLIP tokenizer)")


def run(args) -> int:
    _usage(args)
    quiet_libraries(debug=args.debug, progress=False)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    try:
        if args.format is not None:
            result = _render(args, progress)
        elif args.against is not None:
            result = _compare(args, progress)
        else:
            result = _alone(args, progress)
    except ValueError as e:
        msg = one_line(e)
        m = re.match(r"(\w+): (.*)", msg)
        if m and m[1] in _ARGS:
            raise CLIError(f"argument {_ARGS[m[1]]}: {m[2]}") from e
        raise CLIError(msg) from e
    if args.json:
        _emit(json.dumps(result, indent=2))
    return EXIT_OK


def _common(args) -> dict:
    return dict(steps=args.steps, seed=args.seed, device=args.device, dtype=args.dtype,
                guidance_scale=args.guidance_scale, batch_size=args.batch_size)


def _alone(args, progress) -> dict:
    from ..evaluation import evaluate

    prompts = _read_prompts(args.prompts)
    result = evaluate(args.model, prompts, args.clip, out_dir=args.out, base_model=args.base_model,
                      num_images_per_prompt=args.num_images_per_prompt or 1, progress=progress,
                      **_common(args))
    if not args.json:
        lines = [f"{rec['clip_score']:8.3f}  {rec['prompt']}" for rec in result["per_prompt"]]
        lines.append(f"CLIP score {short(result['clip_score'])} over {result['num_images']} images "
                     f"({len(result['per_prompt'])} prompts, {result['steps']} steps, seed {result['seed']})")
        _emit("\n".join(lines))
    return result


def _compare(args, progress) -> dict:
    from ..evaluation import compare

    prompts = _read_prompts(args.prompts)
    weights = {m: getattr(args, m) for m in METRIC_FLAGS if getattr(args, m) is not None}
    if args.fid_inception is not None:
        weights["fid"] = args.fid_inception
    result = compare(args.model, args.against, prompts, metrics=args.metrics or ["clip"],
                     weights=weights, out_dir=args.out, base_model=args.base_model,
                     against_base_model=args.against_base_model,
                     num_images_per_prompt=args.num_images_per_prompt or 1, progress=progress,
                     update_card=not args.no_card, fid_reference=args.fid_reference,
                     **_common(args))
    if not args.json:
        from ..evaluation.report import score_table

        lines = [score_table(result), "",
                 f"{len(prompts)} prompts x {result['settings']['num_images_per_prompt']} image(s); "
                 f"report: {os.path.join(args.out, 'report.md')}, grid: {os.path.join(args.out, 'grid.png')}"]
        if "card" in result["files"]:
            lines.append(f"model card updated: {result['files']['card']}")
        _emit("\n".join(lines))
    return result


def _render(args, progress) -> dict:
    from ..evaluation.api import render_benchmark

    if args.against is not None:
        raise CLIError("argument --format: writes one model's images; run it once per model "
                       "(without --against)")
    result = render_benchmark(args.model, args.format, args.prompts, args.out,
                              num_images_per_prompt=args.num_images_per_prompt or 4,
                              base_model=args.base_model, progress=progress, **_common(args))
    if not args.json:
        _emit(f"{result['num_images']} images for {result['prompts']} prompts in {args.format}'s "
              f"layout in {result['out']}")
    return result
