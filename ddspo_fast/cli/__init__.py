"""The ``ddspo-fast`` command line (also ``python -m ddspo_fast``).

One module per subcommand, ``ddspo_fast/cli/<name>.py`` (a ``-`` in the command's name
is a ``_`` in the module's), each exposing:

    HELP: str                       one line for the command list of ``ddspo-fast --help``
    DESCRIPTION: str                (optional) the paragraph of ``ddspo-fast <name> --help``
    add_arguments(parser) -> None   declare the command's arguments on an argparse parser
    run(args) -> int                do it; return the exit code, raise CLIError for a
                                    one-line error
    NEEDS_BITSANDBYTES = True       (optional) the command may use bitsandbytes' 8-bit
                                    optimizers; every other command runs without it
                                    imported (``_args.without_bitsandbytes``)
    PASSTHROUGH = True              (optional) hand the raw arguments to another program's
                                    parser instead: ``run`` gets ``Namespace(argv=[...],
                                    parser=<this command's parser, for its --help>)``

Adding a command is one line: its name in ``COMMANDS`` below (whose order is the help
order) and its module beside this file. Keep a module's top level to the standard
library: ``ddspo-fast --help`` imports every command module, and neither it nor
``ddspo-fast <name> --help`` may pull in torch-heavy libraries (diffusers, the trainer);
import those inside ``run``. Shared argument types and helpers are in ``_args.py``.

Errors are one line on stderr (``ddspo-fast: error: ...``) with exit code 1, or 2 for a
usage error; ``--debug`` (before the command, or among a parsed command's own options)
shows the traceback instead. ``main`` returns the exit code; it never calls ``sys.exit``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Any, List, Optional, Sequence

PROG = "ddspo-fast"

#: Subcommands in help order; ``foo-bar`` lives in ``ddspo_fast/cli/foo_bar.py``.
COMMANDS = ("degrade", "prepare", "encode", "precompute", "train", "train-pair", "export", "evaluate",
            "validate", "bench", "plan", "demo")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """An error to report as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class CLIParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the --help to read."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def eprint(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def command_module(name: str):
    """The module implementing command ``name`` (imported on first use)."""
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def command_parser(name: str, module=None) -> CLIParser:
    """The parser of ``ddspo-fast <name>``, built by the command's ``add_arguments``."""
    module = module or command_module(name)
    parser = CLIParser(prog=f"{PROG} {name}", description=getattr(module, "DESCRIPTION", module.HELP))
    module.add_arguments(parser)
    from ._validate import harden

    harden(parser)  # numbers, devices and paths: one validator for every command
    if not getattr(module, "PASSTHROUGH", False):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the full traceback on errors")
    return parser


def _top_parser() -> CLIParser:
    from .._version import __version__

    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {command_module(name).HELP}" for name in COMMANDS)
    parser = CLIParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [-h] [--version] [--debug] COMMAND [ARGS...]",
        description="DDSPO / Diffusion-DPO preference fine-tuning for text-to-image diffusion models.",
        epilog=f"commands:\n{listing}\n\n'{PROG} COMMAND --help' shows a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("command", metavar="COMMAND", choices=COMMANDS, nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _run(argv: List[str], state: dict) -> int:
    top = _top_parser()
    ns = top.parse_args(argv)
    state["debug"] = ns.debug
    if ns.command is None:
        top.print_help(sys.stderr)
        return EXIT_USAGE
    module = command_module(ns.command)
    parser = command_parser(ns.command, module)
    if getattr(module, "PASSTHROUGH", False):
        args = argparse.Namespace(argv=list(ns.args), parser=parser, debug=ns.debug)
    else:
        # --debug among the command's options counts from the start, parse errors included
        state["debug"] = ns.debug or "--debug" in ns.args[: ns.args.index("--") if "--" in ns.args else None]
        args = parser.parse_args(ns.args)
        args.debug = state["debug"]
        from ._validate import check_parsed

        check_parsed(parser, args)  # before the command locks or writes anything
    from ._args import without_bitsandbytes

    with without_bitsandbytes(not getattr(module, "NEEDS_BITSANDBYTES", False)):
        return int(module.run(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ddspo-fast`` and ``python -m ddspo_fast``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    state = {"debug": False}
    try:
        return _run(argv, state)
    except CLIError as e:
        if state["debug"]:
            traceback.print_exc()
        eprint(f"{PROG}: error: {one_line(e)}")
        return e.code
    except KeyboardInterrupt:
        eprint(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help / --version, or a pass-through program's own exit
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        eprint(f"{PROG}: error: {one_line(e.code)}")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        if state["debug"]:
            traceback.print_exc()
        # The library's own exception classes (a locked directory, a full disk, a diverged
        # run, a resume that does not match) carry a complete message for the user.
        expected = (isinstance(e, (ValueError, FileNotFoundError, PermissionError,
                                   NotADirectoryError, IsADirectoryError))
                    or type(e).__module__.startswith("ddspo_fast."))
        msg = one_line(e) or type(e).__name__
        if not expected:
            msg = f"{type(e).__name__}: {msg}"
            if not state["debug"]:
                msg += " (run with --debug for the traceback)"
        eprint(f"{PROG}: error: {msg}")
        return EXIT_ERROR
