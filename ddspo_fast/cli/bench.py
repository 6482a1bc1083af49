"""``ddspo-fast bench {loss,step} [ARGS...]``: run a benchmark with its own arguments."""

from __future__ import annotations

import argparse

from . import EXIT_OK, EXIT_USAGE, PROG, CLIError
from ._passthrough import run_main

HELP = "run a benchmark: bench {loss,step} [ARGS...]"
DESCRIPTION = "Run a benchmark; everything after the benchmark's name is passed to it."
PASSTHROUGH = True
NEEDS_BITSANDBYTES = True  # the step ladder's adamw8bit rung

BENCHES = {"loss": ("ddspo_fast.bench.loss", "loss kernels, every backend"),
           "step": ("ddspo_fast.bench.step", "one full training step")}


def add_arguments(p) -> None:
    p.usage = f"%(prog)s {{{','.join(BENCHES)}}} [ARGS...]"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("benchmarks:\n" + "\n".join(f"  {name:<6}  {what} ({module})" for name, (module, what) in BENCHES.items())
                + f"\n\n'{PROG} bench loss --help' shows the benchmark's own options.")


def run(args) -> int:
    rest = args.argv
    if not rest:
        raise CLIError(f"bench: name a benchmark: {' or '.join(BENCHES)} (see '{PROG} bench --help')", EXIT_USAGE)
    if rest[0] in ("-h", "--help"):
        print(args.parser.format_help(), end="")
        return EXIT_OK
    if rest[0] not in BENCHES:
        raise CLIError(f"bench: unknown benchmark {rest[0]!r}; choose from {', '.join(BENCHES)}", EXIT_USAGE)
    return run_main(BENCHES[rest[0]][0], f"the {rest[0]} benchmark", rest[1:])
