"""Argument types and small helpers shared by the subcommand modules."""

from __future__ import annotations

import importlib
import logging
import os
import re
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
