"""Keep the Hugging Face libraries' noise out of our own loading and saving calls.

Three things they print on every command that tell a user of this library nothing:

* progress bars for loading pipeline components / weights and for writing shards
  (our commands have their own progress reporting);
* transformers' notice that an image processor falls back to PIL because torchvision
  is not installed (the diffusers pipeline modules import CLIP/SigLIP processors that
  no part of this library uses);
* diffusers' "modules that should be kept in float32: []" on every ``.to(dtype)`` of a
  model whose keep-in-fp32 list is empty;
* peft's "Already found a `peft_config` attribute" each time a second adapter is added
  to a module: holding several named adapters on one base is this library's design
  (``multiple_adapters``);
  (the command line also keeps bitsandbytes out of a process that needs no 8-bit
  optimizer: ``cli/_args.without_bitsandbytes``).

Everything is scoped: ``quiet_loading`` restores the libraries' settings on exit, and
``cast_module`` only changes how one module is cast. Download progress (the hub's
bars) is left as the user configured it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch

_NOTICES = {
    # logger name -> substrings of messages we drop while quiet
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}


class _DropNotices(logging.Filter):
    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


@contextmanager
def dropping_notices(notices: dict):
    """Within the block, the messages of ``{logger name: (substring, ...)}`` are dropped."""
    filters = [(logging.getLogger(name), _DropNotices(tuple(needles)))
               for name, needles in notices.items()]
    for lg, f in filters:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg, f in filters:
            lg.removeFilter(f)


@contextmanager
def quiet_loading():
    """Within the block: no diffusers / transformers progress bars, no torchvision notice.

    The notice is a ``warning_once``: dropping it here drops it for the process, which
    is the point (it is about modules this library imports, not the user's).
    """
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()  # also turns the hub's bars off: put those back
    if not hub_off:
        enable_progress_bars()
    try:
        with dropping_notices(_NOTICES):
            yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()
            if hub_off:  # transformers' enable also enabled the hub's bars
                from huggingface_hub.utils import disable_progress_bars

                disable_progress_bars()


def cast_module(module: torch.nn.Module, *, device=None, dtype: torch.dtype | None = None):
    """``module.to(device, dtype)``, without diffusers' warning when it has nothing to say.

    diffusers warns on any ``.to(dtype)`` of a model that has a keep-in-fp32 list, even an
    empty one; only a non-empty list is worth the warning (and then we let it through).
    """
    from diffusers import ModelMixin

    plain = (isinstance(module, ModelMixin) and not getattr(module, "_keep_in_fp32_modules", None)
             and not getattr(module, "is_quantized", False)
             and getattr(module, "quantization_method", None) is None)
    if plain:  # ModelMixin.to adds only warnings and quantization checks to nn.Module.to
        return torch.nn.Module.to(module, device=device, dtype=dtype)
    return module.to(device=device, dtype=dtype)


@contextmanager
def multiple_adapters():
    """Within the block, adding a further peft adapter to a module is silent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield

