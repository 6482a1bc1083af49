"""The precision of a run, resolved once from its config and its device.

Every dtype a run uses comes from one ``Precision``: the autocast dtype of the forward
passes, the storage of the frozen weights (the LoRA base, the reference copy, the pair
adapters, the text encoders), the dtype the trained weights stay in (fp32) and the dtype
a reference cache stores its targets in. ``mixed_precision='auto'`` is resolved here and
nowhere else (bf16 on a GPU, fp32 on the CPU, where bf16 autocast is slower).

The frozen storage is a dtype today; ``frozen_quantization`` is the slot where a
quantized base (4 / 8 bit) declares itself, so that everything that sizes or casts the
frozen weights asks this object rather than assuming a dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

# resolved ``mixed_precision`` -> autocast dtype (None: no autocast, fp32)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
# dtype -> the name a reference cache records
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CACHE_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
LABELS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def resolve_mixed_precision(mixed_precision: str, device_type: str) -> str:
    """``mixed_precision`` as accelerate takes it: ``auto`` is bf16 on a GPU, ``no``
    elsewhere; any other value is returned as it is."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device_type == "cuda" else "no"


@dataclass(frozen=True)
class Precision:
    """What each kind of tensor of a run is stored or computed in."""
    mixed_precision: str                      # resolved: 'bf16' | 'fp16' | 'no' (accelerate's)
    autocast: Optional[torch.dtype]           # None: no autocast
    frozen: torch.dtype                       # storage of frozen weights
    trainable: torch.dtype = torch.float32    # the trained weights (and their optimizer)
    frozen_quantization: Any = None           # a quantized frozen base's config, or None
    asked: str = "auto"                       # the config's value, for the banner

    @classmethod
    def resolve(cls, mixed_precision: str, device_type: str,
                frozen_quantization: Any = None) -> "Precision":
        resolved = resolve_mixed_precision(mixed_precision, device_type)
        if resolved not in AUTOCAST:
            raise ValueError(f"mixed_precision: expected one of 'auto', 'bf16', 'fp16', 'no', "
                             f"got {mixed_precision!r}")
        autocast = AUTOCAST[resolved]
        if frozen_quantization in (None, "none"):
            frozen_quantization = None
        return cls(mixed_precision=resolved, autocast=autocast,
                   frozen=autocast or torch.float32, frozen_quantization=frozen_quantization,
                   asked=mixed_precision)

    @classmethod
    def from_config(cls, config, device_type: str) -> "Precision":
        """The precision a run of ``config`` (TrainConfig or the adapter trainer's) has
        on ``device_type``."""
        return cls.resolve(config.mixed_precision, device_type,
                           getattr(config, "base_quantization", None))

    @property
    def compute(self) -> torch.dtype:
        """The dtype inputs and conditions are fed in (the autocast dtype, else fp32)."""
        return self.autocast or torch.float32

    @property
    def cache(self) -> str:
        """A reference cache's default dtype name: the autocast dtype (nothing is lost
        that the frozen networks' outputs had)."""
        return DTYPE_NAMES[self.compute]

    def label(self) -> str:
        text = LABELS[self.mixed_precision]
        if self.asked == "auto":
            text += " (mixed_precision auto)"
        return text


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen-weight (and autocast) dtype of a resolved ``mixed_precision``."""
    return Precision.resolve(mixed_precision, "cpu").compute


def store_frozen(what, dtype: torch.dtype) -> None:
    """Store frozen weights in ``dtype``: a module's parameters and floating buffers, or
    the parameters given (each in place on its parameter object, so the modules, hooks
    and references that hold it keep holding it)."""
    if isinstance(what, torch.nn.Module):
        what.to(dtype)
        return
    for p in what:
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


def store_trainable(module_or_modules, dtype: torch.dtype = torch.float32) -> None:
    """Every parameter with ``requires_grad`` in ``dtype`` (diffusers' training utils)."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(module_or_modules, dtype=dtype)


def nbytes(tensors: Iterable[torch.Tensor], dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of ``tensors`` as stored (or as ``dtype`` when given)."""
    if dtype is not None:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(t.numel() * size for t in tensors)
    return sum(t.numel() * t.element_size() for t in tensors)
