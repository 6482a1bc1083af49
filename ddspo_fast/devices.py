"""The one device check of the library: a device string torch knows and this machine has.

Every command's ``--device`` goes through it (``cli/_validate.py``), and so do the library
entry points that take a device, so ``--device cuda`` on a machine without CUDA, or
``--device banana``, is one sentence naming the device before anything is loaded. Its own
layer (like ``fsio``): anything may import it; torch is imported only when a device other
than the CPU is asked for.
"""

from __future__ import annotations

import re

_DEVICE_RE = re.compile(r"(cpu|cuda|mps|xpu)(?::(\d+))?")


def check_device(text: str) -> str:
    """``text`` if it names a device torch knows and this machine has; ValueError (no
    flag in it) otherwise."""
    m = _DEVICE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"expects a device: cpu, cuda, cuda:N, mps or xpu, got {text!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise ValueError(f"expects cpu (one CPU device), got {text!r}")
        return text.strip()
    import torch

    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        what = "CUDA"
    elif kind == "mps":
        n = 1 if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else 0
        what = "Apple MPS"
    else:
        xpu = getattr(torch, "xpu", None)
        n = xpu.device_count() if xpu is not None and xpu.is_available() else 0
        what = "Intel XPU"
    if n == 0:
        raise ValueError(f"{text!r} asked for, but this machine has no {what} device visible "
                         f"to torch; use cpu")
    if index is not None and int(index) >= n:
        raise ValueError(f"{text!r} asked for, but this machine has {n} {what} device(s) "
                         f"({kind}:0 to {kind}:{n - 1})")
    return text.strip()
