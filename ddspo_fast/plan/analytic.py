"""The parts of a step's memory that are counted, not traced: optimizer states (the
bitsandbytes ones cannot run on fake tensors), quantized frozen weights, an EMA copy, and
the pipeline components (text encoders, VAE) kept on the accelerator.
"""
from __future__ import annotations

import math

GiB = 1 << 30
OPTIMIZERS = ("adamw", "adamw-foreach", "adamw8bit", "paged-adamw8bit", "lion8bit",
              "paged-lion8bit", "adafactor", "sgd")
BASES = ("auto", "fp32", "bf16", "fp16", "nf4", "int8", "fp8")
_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}

# bitsandbytes 8-bit optimizers: blockwise-quantized states of 256 values with one fp32
# absmax per block; tensors under 4096 elements keep 32-bit states.
_BNB_BLOCK, _BNB_MIN = 256, 4096


def _round(n: int, granule: int = 512) -> int:
    return (int(n) + granule - 1) // granule * granule


def optimizer_memory(shapes: list, optimizer: str, param_bytes: int) -> dict:
    """{'states', 'step_temp', 'paged'} bytes for trainable tensors of ``shapes``
    (``param_bytes`` per element: the states of torch's AdamW take the param's dtype)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    numels = [math.prod(s) for s in shapes]
    states = temp = 0
    if optimizer in ("adamw", "adamw-foreach"):
        states = sum(2 * _round(n * param_bytes) for n in numels)
        # foreach AdamW builds one state-sized temporary (the denominator) for the whole
        # group; the fused kernel updates in place.
        temp = sum(_round(n * param_bytes) for n in numels) if optimizer == "adamw-foreach" else 0
    elif optimizer.endswith("8bit"):
        k = 1 if "lion" in optimizer else 2
        for n in numels:
            if n < _BNB_MIN:
                states += k * _round(4 * n)
            else:
                states += k * (_round(n) + _round(4 * math.ceil(n / _BNB_BLOCK)))
    elif optimizer == "adafactor":
        # transformers' Adafactor without momentum: factored second moments (row and
        # column vectors, fp32) for tensors of 2+ dims, a full one otherwise; its update
        # makes two fp32 temporaries of the largest tensor.
        for s in shapes:
            if len(s) >= 2:
                states += _round(4 * math.prod(s[:-1])) + _round(4 * math.prod(s[:-2]) * s[-1])
            else:
                states += _round(4 * math.prod(s))
        temp = 2 * _round(4 * max(numels, default=0))
    paged = optimizer.startswith("paged")
    return {"states": states, "step_temp": temp, "paged": paged}


def quantized_base(linear_shapes: list, base: str, frozen_bytes_per: int) -> dict:
    """Bytes a quantized frozen base saves (negative delta on weights) and the transient
    of dequantizing the largest layer, against the traced base in ``frozen_bytes_per``
    bytes per element. Stored sizes are those ``train/quantize.py`` allocates (each of a
    layer's tensors: codes, scales, code book, rounded to the allocator's granule)."""
    from ..train.quantize import stored_tensors

    if base in ("auto", "fp32", "bf16", "fp16") or not linear_shapes:
        return {"weights_delta": 0, "dequant": 0}
    numels = [math.prod(s) for s in linear_shapes]
    traced = sum(_round(n * frozen_bytes_per) for n in numels)
    stored = sum(_round(b) for s in linear_shapes for b in stored_tensors(base, s))
    return {"weights_delta": stored - traced, "dequant": _round(2 * max(numels))}


def count_params(cls_name: str, config: dict) -> int:
    """Parameters of a component built from its config on the meta device."""
    import torch

    if cls_name.startswith(("CLIP", "T5", "Gemma")):
        import transformers

        cfg_cls = {"CLIP": transformers.CLIPTextConfig, "T5": transformers.T5Config,
                   "Gemma": transformers.Gemma2Config}[next(p for p in ("CLIP", "T5", "Gemma")
                                                          if cls_name.startswith(p))]
        with torch.device("meta"):
            model = getattr(transformers, cls_name)(cfg_cls(**config))
    else:
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, cls_name)(**config)
    return sum(p.numel() for p in model.parameters())


def component_bytes(components: dict, dtype: str) -> int:
    """Resident bytes of pipeline components stored in ``dtype`` (or int8/fp8)."""
    return sum(_round(count_params(cls, cfg) * _SIZE[dtype]) for cls, cfg in components.values())
