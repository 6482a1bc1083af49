"""``ddspo-fast prepare``: sample preferred / dispreferred latents into a pair dataset."""

from __future__ import annotations

from pathlib import Path

from . import EXIT_OK, PROG, CLIError, eprint, one_line
from ._args import (add_threads_argument, field_of_error, import_optional, integer, number,
                    positive_int, quiet_libraries, torch_threads)

HELP = "sample preferred/dispreferred latents into a pair dataset"
DESCRIPTION = ("Generate a packed pair dataset (latents and text embeddings) from degraded prompts with "
               "a local diffusers model. Resumable: rerun the same command after an interruption.")

_FLAGS = {"model": "--model", "prompts": "--prompts", "out": "--out", "steps": "--steps", "cfg": "--cfg",
          "batch_size": "--batch-size", "seed": "--seed", "family": "--family", "device": "--device",
          "shard_size": "--shard-size", "store_dtype": "--store-dtype"}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="local diffusers model directory")
    p.add_argument("--prompts", required=True, metavar="FILE", help="degraded prompts JSONL (from 'degrade')")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--steps", type=positive_int("--steps"), default=None, metavar="N",
                   help="sampling steps (default: the family's default)")
    p.add_argument("--cfg", type=number("--cfg"), default=None, metavar="S",
                   help="classifier-free guidance scale (default: the family's default)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=4, metavar="B",
                   help="prompts sampled at once (default: 4)")
    p.add_argument("--seed", type=integer("--seed"), default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--family", default=None, help="model family (default: detected from --model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--shard-size", type=positive_int("--shard-size"), default=None, metavar="N",
                   help="pairs per shard file; a killed run loses at most this many (default: 64)")
    p.add_argument("--store-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype latents and embeddings are stored in (default: float16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(p)


def run(args) -> int:
    mod = import_optional("ddspo_fast.data.prepare", "prepare")
    if not Path(args.model).exists():
        raise CLIError(f"argument --model: {args.model} does not exist")
    if not Path(args.prompts).is_file():
        raise CLIError(f"argument --prompts: {args.prompts} does not exist")
    extra = {}
    if args.shard_size is not None:
        extra["shard_size"] = args.shard_size
    if args.store_dtype is not None:
        extra["store_dtype"] = args.store_dtype
    quiet_libraries(debug=args.debug, progress=not args.no_progress)
    try:
        with torch_threads(args.threads):
            result = mod.prepare_dataset(
                args.model, args.prompts, args.out, steps=args.steps, cfg=args.cfg,
                batch_size=args.batch_size, seed=args.seed, family=args.family, device=args.device,
                progress=not args.no_progress, **extra)
    except ValueError as e:
        msg = one_line(e)
        name = field_of_error(msg, list(_FLAGS))
        raise CLIError(f"argument {_FLAGS[name]}: {msg}" if name else msg) from e
    if result is not None:
        eprint(f"{PROG}: prepared {result}")
    return EXIT_OK
