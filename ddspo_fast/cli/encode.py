"""``ddspo-fast encode``: image-pair preference data (JSONL of image paths, or Pick-a-Pic v2
Parquet) into a packed pair dataset. The command-line face of :func:`.encode.encode_pairs`.

Subcommand convention of the CLI package: ``HELP`` (one line for the command list),
``add_arguments(parser)`` and ``run(args) -> exit code``. Errors are raised as
``ValueError`` messages that start with the flag they concern; the CLI prints them as one
line.
"""

from __future__ import annotations

import argparse
import re
import sys

from ._args import positive_int
from ._validate import pixels

HELP = "encode image-pair preference data (JSONL or Pick-a-Pic Parquet) into a pair dataset"

DESCRIPTION = (
    "Encode existing preferred/dispreferred image pairs into a packed pair dataset "
    "(VAE latents and text embeddings), trainable unchanged with 'train'. --pairs is a "
    "JSONL file with {\"prompt\", \"image_w\", \"image_l\"} per line (image paths relative "
    "to the file; optional \"id\" and \"neg_prompt\") or a Parquet file in the Pick-a-Pic v2 "
    "layout (caption, jpg_0, jpg_1, label_0; needs pip install 'ddspo_fast[parquet]'). "
    "Images are resized and centre-cropped to the model's resolution. Resumable: rerun the "
    "same command after an interruption. Several processes: accelerate launch -m ddspo_fast "
    "encode ..."
)

# encode_pairs argument -> the flag that sets it (for error messages)
FLAGS = {"model": "--model", "pairs": "--pairs", "out": "--out", "resolution": "--resolution",
         "batch_size": "--batch-size", "ties": "--ties", "on_bad": "--on-bad", "latent": "--latent",
         "degrade": "--degrade", "seed": "--seed", "family": "--family", "device": "--device",
         "store_dtype": "--store-dtype", "shard_size": "--shard-size"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--model", required=True, metavar="DIR", help="local diffusers model directory")
    p.add_argument("--pairs", required=True, metavar="FILE", help="image pairs: .jsonl or Pick-a-Pic .parquet")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--resolution", type=pixels("--resolution"), default=None, metavar="N|HxW",
                   help="pixel size images are resized and centre-cropped to, a multiple of the VAE's "
                        "downsampling factor (default: the model's native resolution)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=8, metavar="B",
                   help="pairs encoded at once (default: 8)")
    p.add_argument("--ties", choices=("drop", "keep"), default="drop",
                   help="Pick-a-Pic ties (label_0 = 0.5): drop them (default, as the Diffusion-DPO "
                        "script) or keep them with jpg_0 as the preferred image")
    p.add_argument("--on-bad", choices=("skip", "fail"), default="skip",
                   help="a pair whose image is missing or cannot be decoded, or whose line/row is "
                        "malformed: skip it and report it (default) or stop with an error naming it")
    p.add_argument("--latent", choices=("sample", "mean"), default=None,
                   help="store a VAE posterior sample (seeded per pair; as the Diffusion-DPO script) "
                        "or the posterior mean; default: the family's training script's choice "
                        "(the mean for FLUX.2, a sample for the others)")
    p.add_argument("--degrade", choices=("none", "random", "structural"), default="none",
                   help="also store a degraded prompt c- per pair, needed by DDSPO with the reference "
                        "pair (default: none, enough for --objective dpo)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the VAE samples and degradations (default: 0)")
    p.add_argument("--family", default=None, help="model family (default: detected from --model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--shard-size", type=positive_int("--shard-size"), default=64, metavar="N",
                   help="pairs per shard file; a killed run loses at most this many (default: 64)")
    p.add_argument("--store-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype latents and embeddings are stored in (default: float16)")
    p.add_argument("--show-skipped", type=int, default=10, metavar="K",
                   help="list at most K left-out pairs on stderr (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ._args import add_threads_argument

    add_threads_argument(p)


def _flag_error(e: ValueError) -> ValueError:
    msg = " ".join(str(e).split())
    m = re.match(r"^([a-z_]+):\s*", msg)
    if m and m.group(1) in FLAGS:
        return ValueError(f"argument {FLAGS[m.group(1)]}: {msg[m.end():]}")
    return ValueError(msg)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.encode import encode_pairs
    from ..fsio import LockedError
    from ._args import quiet_libraries, torch_threads

    quiet_libraries(debug=getattr(args, "debug", False), progress=not args.no_progress)

    if not Path(args.model).exists():
        raise ValueError(f"argument --model: {args.model} does not exist")
    if not Path(args.pairs).is_file():
        raise ValueError(f"argument --pairs: {args.pairs} does not exist or is not a file")
    shown = []

    def show(problem) -> None:
        shown.append(problem)
        if len(shown) <= args.show_skipped:
            print(f"ddspo-fast: left out {problem}", file=sys.stderr, flush=True)

    try:
        with torch_threads(args.threads):
            result = encode_pairs(
                args.model, args.pairs, args.out, resolution=args.resolution,
                batch_size=args.batch_size, ties=args.ties, on_bad=args.on_bad, latent=args.latent,
                degrade=None if args.degrade == "none" else args.degrade, seed=args.seed,
                family=args.family, device=args.device, store_dtype=args.store_dtype,
                shard_size=args.shard_size, progress=not args.no_progress, on_problem=show)
    except ValueError as e:
        raise _flag_error(e) from e
    except LockedError as e:  # a second writer on the same dataset
        raise ValueError(f"argument --out: {e}") from e
    if len(shown) > args.show_skipped:
        print(f"ddspo-fast: ... and {len(shown) - args.show_skipped} more left out", file=sys.stderr)
    print(f"ddspo-fast: {result.summary()}", file=sys.stderr, flush=True)
    return 0
