"""Argument types and small helpers shared by the subcommand modules."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

from . import CLIError
from ._validate import numeric


def integer(flag: str, minimum: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an int (>= ``minimum``), with an error naming ``flag`` (the shared
    validator, ``_validate.numeric``)."""
    return numeric(flag, int, minimum=minimum)


def positive_int(flag: str) -> Callable[[str], int]:
    return integer(flag, minimum=1)


def number(flag: str, minimum: Optional[float] = None) -> Callable[[str], float]:
    """argparse type: a finite float (>= ``minimum``), with an error naming ``flag``."""
    return numeric(flag, float, minimum=minimum)


def import_optional(module: str, what: str):
    """Import ``module``; a missing module (itself or its package) is a one-line CLIError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        ours = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if e.name in ours:
            raise CLIError(f"{what} is not available in this install (module {module} is missing)") from None
        raise


def field_of_error(message: str, names: Sequence[str]) -> Optional[str]:
    """The argument a validation message is about: the earliest (then longest) name in it."""
    best: Optional[tuple] = None
    for name in names:
        m = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
        if m and (best is None or (m.start(), -len(name)) < (best[0], best[1])):
            best = (m.start(), -len(name), name)
    return best[2] if best else None


def quiet_libraries(debug: bool = False, progress: bool = True) -> None:
    """Keep diffusers / transformers to errors on the console unless ``debug`` (or the
    user set their verbosity); ``progress=False`` also hides their loading bars."""
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # optional-kernel notices on import ("Failed to load CPU gemm_4bit_forward ...")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for mod in ("diffusers.utils.logging", "transformers.utils.logging"):
            try:
                importlib.import_module(mod).disable_progress_bar()
            except ImportError:  # the library is not installed: no bars to hide
                pass


def short(v: Any) -> str:
    """A value for a one-line summary."""
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


_BNB = "bitsandbytes"


@contextmanager
def without_bitsandbytes(active: bool = True):
    """Keep bitsandbytes out of a command that uses no 8-bit optimizer.

    peft, accelerate and transformers import it whenever it is installed: a second or
    more of import, and on some CPUs a network lookup for an optional kernel that prints
    a warning when it fails. Within the block ``import bitsandbytes`` fails and
    ``importlib.util.find_spec`` reports it missing (a ``None`` entry in ``sys.modules``,
    the import system's own mark for an unavailable module), so the libraries behave as
    on an install without it. Nothing happens when it was imported already; the entry is
    removed on exit, or earlier by ``allow_bitsandbytes`` (a run that needs it).
    """
    hidden = active and _BNB not in sys.modules
    if hidden:
        sys.modules[_BNB] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hidden:
            allow_bitsandbytes()


def allow_bitsandbytes() -> None:
    """Undo ``without_bitsandbytes`` now: bitsandbytes imports again."""
    if sys.modules.get(_BNB, False) is None:
        del sys.modules[_BNB]


def add_threads_argument(p) -> None:
    """``--threads N``: every command that runs torch takes it (a shared CPU is easily
    oversubscribed: torch starts one thread per core in every process)."""
    p.add_argument("--threads", type=positive_int("--threads"), metavar="N", default=None,
                   help="intra-op CPU threads for torch (default: torch's setting, the "
                        "physical cores or OMP_NUM_THREADS); on a busy machine fewer are "
                        "often faster")


@contextmanager
def torch_threads(threads: Optional[int]):
    """Within the block torch uses ``threads`` intra-op threads (None: unchanged)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
