"""``ddspo-fast degrade``: write degraded (dispreferred) prompts c- for each prompt."""

from __future__ import annotations

from pathlib import Path

from . import EXIT_OK, PROG, CLIError, eprint
from ._args import add_threads_argument, integer, number, positive_int, torch_threads

HELP = "write degraded (dispreferred) prompts for each prompt"
DESCRIPTION = ("Degrade prompts into dispreferred prompts c- for DDSPO. Output: JSONL lines "
               '{"id", "prompt", "neg_prompts": [...]}. Prompts that cannot be degraded are '
               "reported on stderr and left out.")


def add_arguments(p) -> None:
    p.add_argument("prompts", metavar="PROMPTS", help="a .txt file (one prompt per line) or .jsonl with a 'prompt' field")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL file (written atomically)")
    p.add_argument("--method", choices=("random", "structural", "llm"), default="random",
                   help="random: drop k = max(1, int(U(0.4, 0.7) * n)) of the n words, as the official "
                        "script; structural: drop or swap attributes, relations and objects; llm: a local "
                        "instruction-tuned LM rewrites the prompt (--llm) (default: random)")
    p.add_argument("--variants", type=positive_int("--variants"), default=1, metavar="N",
                   help="up to N distinct degraded prompts per prompt (default: 1); prepare "
                        "still makes one pair per prompt, choosing one of them by its seed")
    p.add_argument("--seed", type=integer("--seed"), default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--tries", type=positive_int("--tries"), default=None, metavar="N",
                   help="draws per prompt of random / structural (default: 5 for random, as the official "
                        "random_removal.py, so short prompts may get fewer than --variants; "
                        "max(40, 20 x variants) for structural)")
    p.add_argument("--show-skipped", type=integer("--show-skipped"), default=10, metavar="K",
                   help="list at most K skipped prompts on stderr (default: 10)")
    _add_llm_arguments(p)
    add_threads_argument(p)  # --method llm runs a torch model


def run(args) -> int:
    from ..data.degrade import degrade_file

    if not Path(args.prompts).is_file():
        raise CLIError(f"argument PROMPTS: {args.prompts} does not exist")
    if Path(args.out).resolve() == Path(args.prompts).resolve():
        raise CLIError("argument --out: refusing to overwrite the input prompts file")
    with torch_threads(args.threads):
        result = degrade_file(args.prompts, args.out, method=args.method, variants=args.variants,
                              seed=args.seed, tries=args.tries, **_degrade_options(args))
    if not result.records and not result.skipped:
        raise CLIError(f"argument PROMPTS: no prompts found in {args.prompts}")
    for rec in result.skipped[: args.show_skipped]:
        eprint(f"{PROG}: skipped {rec['id']}: {rec['reason']}: {rec['prompt']!r}")
    if len(result.skipped) > args.show_skipped:
        eprint(f"{PROG}: ... and {len(result.skipped) - args.show_skipped} more skipped")
    rejected = getattr(result, "rejected", [])
    for rec in rejected[: args.show_skipped]:
        eprint(f"{PROG}: rejected LLM output for {rec.get('id')}: {rec.get('reason')}: {rec.get('output')!r}")
    if len(rejected) > args.show_skipped:
        eprint(f"{PROG}: ... and {len(rejected) - args.show_skipped} more rejected LLM outputs")
    eprint(f"{PROG}: {result.summary()} -> {args.out}")
    if args.variants > 1:
        eprint(f"{PROG}: note: prepare makes one pair per prompt and picks one of its "
               f"{args.variants} variants by seed (a fixed choice per prompt and seed)")
    return EXIT_OK


def _add_llm_arguments(p) -> None:
    """The LLM method's options and the text-encoder window."""
    g = p.add_argument_group("LLM degradation (--method llm)")
    g.add_argument("--llm", metavar="MODEL_DIR", default=None,
                   help="local transformers causal LM (an instruction-tuned one, e.g. Llama-3-8B-Instruct "
                        "as the paper) that rewrites each prompt")
    g.add_argument("--template", metavar="FILE", default=None,
                   help="instruction template, UTF-8 text with one {prompt} slot (default: ask to remove or "
                        "alter the prompt's important words; see ddspo_fast.data.degrade_llm.DEFAULT_TEMPLATE)")
    g.add_argument("--llm-batch-size", type=positive_int("--llm-batch-size"), default=8, metavar="B",
                   help="prompts generated at once (default: 8)")
    g.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=64, metavar="N",
                   help="longest answer in tokens (default: 64)")
    g.add_argument("--temperature", type=number("--temperature", minimum=0), default=0.7, metavar="T",
                   help="sampling temperature, 0 = greedy (default: 0.7, as the official script)")
    g.add_argument("--llm-device", default=None, metavar="DEV",
                   help="device of the LLM (default: cuda if available, else cpu)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="diffusion model whose text encoders will read the prompts: a long prompt is "
                        "degraded only within the part they see (their token limit)")


def _degrade_options(args) -> dict:
    """``{"window": ..., "llm": ...}`` for ``degrade_file`` from parsed arguments."""
    from pathlib import Path

    from ..data.degrade_llm import DEFAULT_TEMPLATE, LLMDegrader, read_template
    from ..data.token_window import TokenWindow

    llm_flags = [f for f, v in (("--llm", args.llm), ("--template", args.template)) if v is not None]
    if args.method != "llm" and llm_flags:
        raise ValueError(f"argument {llm_flags[0]}: only used with --method llm")
    window = None
    if args.model is not None:
        if not Path(args.model).exists():
            raise ValueError(f"argument --model: {args.model} does not exist")
        try:
            window = TokenWindow.from_model(args.model)
        except (OSError, ValueError) as e:
            raise ValueError(f"argument --model: {e}") from None
    llm = None
    if args.method == "llm":
        if args.llm is None:
            raise ValueError("argument --llm: required with --method llm (a local causal LM directory)")
        try:
            template = read_template(args.template) if args.template is not None else DEFAULT_TEMPLATE
        except ValueError as e:
            raise ValueError(f"argument --template: {e}") from None
        try:
            llm = LLMDegrader.from_pretrained(args.llm, template=template, device=args.llm_device,
                                              batch_size=args.llm_batch_size,
                                              max_new_tokens=args.max_new_tokens,
                                              temperature=args.temperature, window=window)
        except ValueError as e:
            raise ValueError(f"argument --llm: {e}") from None
    return {"window": window, "llm": llm}
