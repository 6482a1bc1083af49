"""The one validator every subcommand's arguments go through: numbers, devices and paths.

``harden(parser)`` runs on each command's parser right after its ``add_arguments``
(``command_parser`` in ``__init__``): it walks the parser's actions and gives

* every numeric flag (a plain ``int`` / ``float`` type, a ``_args.integer`` / ``number``
  type, an Optional config field's ``none``-or-number type) one parser that refuses
  non-finite values and enforces the flag's range (``RANGES`` by destination: a seed fits
  the generators' 32 bits, a count is >= 0, a guidance scale is finite and >= 0, any
  other int fits in 64 bits);
* every device flag (``DEVICE_DESTS``) the device check: a device torch knows and this
  machine has, before anything is loaded;
* every path flag (``INPUT_DESTS`` / ``OUTPUT_DESTS``) a role, read back after parsing
  by ``check_parsed``: an output must not be, contain or sit inside any input (the
  library repeats this where a config file can set the paths, ``fsio.check_output_apart``),
  a file output must not be a folder and a folder output must not be a file.

A flag that is none of these is a choice, a bool or plain text (``TEXT_DESTS``); the
parser-walking test (tests/test_badinput.py) fails on any flag left unclassified, so a new
flag must say what it is here. Module top level stays standard library (``--help``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

KIND_ATTR = "_ddspo_validated"  # set on every type function this module makes

INT64 = (-(2 ** 63), 2 ** 63 - 1)
SEED_RANGE = (0, 2 ** 32 - 1)  # numpy's seed (accelerate's set_seed) takes 32 bits

#: destination -> (minimum, maximum) for numbers beyond the type's own bounds (other
#: semantic ranges are the command's or the config's own checks, which name the flag too)
RANGES: Dict[str, Tuple[Optional[float], Optional[float]]] = {
    "seed": SEED_RANGE,
    "show_skipped": (0, None),
    "guidance_scale": (0, None),
    "cfg": (0, None),
    "temperature": (0, None),
}

DEVICE_DESTS = frozenset({"device", "llm_device"})
#: input paths: name -> "file" (must be a file when it exists), "dir" or "any" (a folder
#: or a hub id)
INPUT_DESTS: Dict[str, str] = {
    "model": "any", "clip": "any", "llm": "any", "data": "dir", "dataset": "dir",
    "pair_lora": "dir", "reference_cache": "dir", "prompts": "file", "pairs": "file",
    "config": "file", "template": "file", "rand_cond_prompts": "file",
    # evaluate: the model compared against, the scorers' weights, FID's references
    "against": "any", "base_model": "any", "against_base_model": "any",
    "pickscore": "dir", "imagereward": "dir", "aesthetic": "file", "hpsv2": "file",
    "fid_reference": "dir", "fid_inception": "file",
    "source": "dir",  # export: a run or a checkpoint
}
#: inputs read once, before anything is written: an output may hold them (a run's own
#: saved train_config.yaml is the natural --config of its resume)
READ_FIRST = frozenset({"config"})
#: output paths: name -> "file" or "dir" (None: a FILE metavar says file, else dir)
OUTPUT_DESTS: Dict[str, Optional[str]] = {"out": None, "output_dir": "dir"}
#: flags that are free text by design (checked by the command itself where they matter)
TEXT_DESTS = frozenset({"family", "lora_targets", "backend", "resume", "method", "metrics",
                        "gpu_memory"})



def _tag(fn: Callable, kind: str, **info) -> Callable:
    setattr(fn, KIND_ATTR, {"kind": kind, **info})
    return fn


def kind_of(type_fn: Any) -> Optional[dict]:
    """What a type function made here checks, or None."""
    return getattr(type_fn, KIND_ATTR, None)


# ---------------------------------------------------------------------------- numbers
def numeric(flag: str, kind: type = int, minimum: Optional[float] = None,
            maximum: Optional[float] = None, optional: bool = False) -> Callable[[str], Any]:
    """argparse type: an int or a finite float in [minimum, maximum] (``optional``: the
    words none/null give None), with errors naming ``flag``."""
    lo, hi = minimum, maximum
    if kind is int:
        lo = INT64[0] if lo is None else max(lo, INT64[0])
        hi = INT64[1] if hi is None else min(hi, INT64[1])

    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r} "
                                             f"(expected {what})") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expects a finite number, got {text!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if minimum is not None and maximum is not None:
                rng = f"in [{minimum}, {maximum}]"
            elif minimum is not None and v < minimum:
                rng = f">= {minimum}"
            elif maximum is not None and v > maximum:
                rng = f"<= {maximum}"
            else:
                rng = f"a 64-bit integer (in [{INT64[0]}, {INT64[1]}])"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse's "invalid <name> value"
    return _tag(parse, "number", number=kind, minimum=minimum, maximum=maximum, optional=optional)


MAX_PIXELS_SIDE = 16384  # beyond any family's use; the family's own limit is checked later


def pixels(flag: str) -> Callable[[str], Any]:
    """argparse type: an image size, ``N`` (square) or ``HxW``, each side in [1, 16384]
    (the model family's own limit is checked where the family is known)."""

    def parse(text: str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
        if not m:
            raise argparse.ArgumentTypeError(f"expects N or HxW (pixels), got {text!r}")
        sides = [int(g) for g in m.groups() if g is not None]
        if any(not 1 <= s <= MAX_PIXELS_SIDE for s in sides):
            raise argparse.ArgumentTypeError(f"each side must be in [1, {MAX_PIXELS_SIDE}] "
                                             f"pixels, got {text.strip()}")
        return sides[0] if len(sides) == 1 else tuple(sides)

    parse.__name__ = "pixels"
    return _tag(parse, "number", number=int, minimum=1, maximum=MAX_PIXELS_SIDE, optional=False)


# ---------------------------------------------------------------------------- devices
def device(flag: str, optional: bool = False) -> Callable[[str], Optional[str]]:
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        from ..devices import check_device

        try:
            return check_device(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "device"
    return _tag(parse, "device", optional=optional)


# ---------------------------------------------------------------------------- paths
def path(role: str, what: str, optional: bool = False) -> Callable[[str], Optional[str]]:
    """argparse type of a path flag: the text unchanged, tagged with its role ("input" /
    "output") and what it must be ("file", "dir", "any") for ``check_parsed``."""

    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        return text

    parse.__name__ = "path"
    return _tag(parse, "path", role=role, what=what)


def text(optional: bool = False) -> Callable[[str], Optional[str]]:
    def parse(value: str):
        if optional and value.strip().lower() in ("none", "null"):
            return None
        return value

    parse.__name__ = "str"
    return _tag(parse, "text")


def checked_text(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """Declare a command's own parser of a text flag (a list of names, say) as text that
    it checks itself, so the walk leaves it in place."""
    return _tag(fn, "text")


# ---------------------------------------------------------------------------- the walk
def _flag(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or (action.metavar or action.dest)


def _base_type(t: Any) -> Tuple[Any, bool]:
    """(the underlying type, whether 'none' is accepted) of an action's type."""
    inner = getattr(t, "__wrapped__", None)  # _config_args' none-or-X wrapper
    if inner is not None:
        return inner, True
    return t, False


def classify(action: argparse.Action) -> Optional[str]:
    """What the validator does with an action after ``harden``: "number", "device",
    "path", "text", "choice", "bool", "flag" (takes no value), or None (unclassified)."""
    if action.nargs == 0:
        return "flag"
    k = kind_of(action.type)
    if k is not None:
        return k["kind"]
    if action.choices is not None:
        return "choice"
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "bool"
    return None


def harden(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every numeric, device and path action of ``parser`` its validator (see the
    module's doc); returns the parser."""
    for action in parser._actions:
        if action.nargs == 0 or action.choices is not None:
            continue
        base, optional = _base_type(action.type)
        k = kind_of(base)
        dest, flag = action.dest, _flag(action)
        if dest in DEVICE_DESTS:
            action.type = device(flag, optional=optional)
        elif dest in INPUT_DESTS:
            action.type = path("input", INPUT_DESTS[dest], optional)
        elif dest in OUTPUT_DESTS:
            what = OUTPUT_DESTS[dest] or ("file" if action.metavar == "FILE" else "dir")
            action.type = path("output", what, optional)
        elif base in (int, float) or (k is not None and k["kind"] == "number"):
            number = base if base in (int, float) else k["number"]
            lo, hi = RANGES.get(dest, (None, None))
            if k is not None:
                lo = k["minimum"] if lo is None else (lo if k["minimum"] is None else max(lo, k["minimum"]))
                hi = k["maximum"] if hi is None else (hi if k["maximum"] is None else min(hi, k["maximum"]))
                optional = optional or k["optional"]
            action.type = numeric(flag, number, lo, hi, optional)
        elif dest in TEXT_DESTS and (base in (None, str)):
            action.type = text(optional)
    return parser


def _given(args: argparse.Namespace, action: argparse.Action) -> Any:
    v = getattr(args, action.dest, None)
    return None if v is argparse.SUPPRESS else v


def check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """After parsing: every output flag is the kind of path it should be and is apart from
    every input flag. Raises ValueError naming the flags."""
    inputs, outputs = [], []
    for action in parser._actions:
        k = kind_of(action.type)
        value = _given(args, action)
        if k is None or k["kind"] != "path" or value is None:
            continue
        (inputs if k["role"] == "input" else outputs).append((_flag(action), value, k["what"],
                                                              action.dest))
    for flag, value, what, _ in inputs:
        if what == "file" and os.path.isdir(value):
            raise ValueError(f"argument {flag}: {value} is not a file (it is a directory)")
        if what == "dir" and os.path.exists(value) and not os.path.isdir(value):
            raise ValueError(f"argument {flag}: {value} is a file (expected a directory)")
    for flag, value, what, _ in outputs:
        if what == "file" and os.path.isdir(value):
            raise ValueError(f"argument {flag}: {value} is a directory (expected a file path "
                             f"to write)")
        if what == "dir" and os.path.exists(value) and not os.path.isdir(value):
            raise ValueError(f"argument {flag}: {value} exists and is not a directory (expected "
                             f"a directory to write)")
        from ..fsio import check_output_apart

        check_output_apart(value, f"argument {flag}",
                           [(f, v) for f, v, _, dest in inputs if dest not in READ_FIRST])
