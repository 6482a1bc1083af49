"""``ddspo-fast export``: a checkpoint (or a run's newest one) as a finished run's weights."""

from __future__ import annotations

from . import EXIT_OK, CLIError, one_line
from ._args import add_threads_argument, quiet_libraries, torch_threads

HELP = "turn a checkpoint (or a run) into LoRA weights or a pipeline that diffusers loads"
DESCRIPTION = ("Write what a finished run writes from one of its checkpoints: a LoRA run's "
               "pytorch_lora_weights.safetensors (pipe.load_lora_weights(OUT) applies it at the "
               "trained strength), a full fine-tune's diffusers pipeline folder, or a "
               "train-pair run's pos_lora_unet/ and neg_lora_unet/. SOURCE is a checkpoint "
               "directory (RUN/checkpoints/checkpoint-N) or a run directory (its newest intact "
               "checkpoint). The base model is the one the checkpoint was trained on (--model "
               "if it has moved).")


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--model", metavar="DIR",
                   help="the base model, when it is no longer where the checkpoint says")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what a non-empty --out holds")
    add_threads_argument(p)


def run(args) -> int:
    quiet_libraries(debug=args.debug, progress=False)
    from ..train.export import export

    try:
        with torch_threads(args.threads):
            info = export(args.source, args.out, overwrite=args.overwrite, model=args.model)
    except ValueError as e:
        msg = one_line(e)
        for field, flag in (("source: ", "RUN_OR_CHECKPOINT"), ("out: ", "--out"),
                            ("model: ", "--model")):
            if msg.startswith(field):
                raise CLIError(f"argument {flag}: {msg[len(field):]}") from e
        raise CLIError(msg) from e
    what = {"lora": "LoRA weights (pipe.load_lora_weights)", "pipeline": "a diffusers pipeline",
            "pair": "the winning and losing adapters"}[info["kind"]]
    print(f"exported {info['checkpoint']} (step {info['step']}) to {info['out']}: {what} "
          f"for {info['family']} base {info['base_model']}", flush=True)
    return EXIT_OK
