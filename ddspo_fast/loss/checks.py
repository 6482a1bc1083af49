"""Argument checks of the public loss API: one clear `ValueError` naming the argument.

They run on every training step, so they read metadata only; the one look at values
(weights) happens where it costs no device sync, on CPU.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

Weights = Optional[Union[torch.Tensor, Sequence[float]]]
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
_F32_MAX = float(torch.finfo(torch.float32).max)


def _one_real_number(x) -> Optional[float]:
    """x as a float if it is one real number (Python, numpy scalar or 0-d array, or a
    tensor / array holding exactly one), else None. Booleans are not numbers here."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):    # int, float, numpy ints and floats (numpy bools are not)
        return float(x)
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype == torch.bool or x.is_complex():
            return None
        return float(x.item())
    kind = getattr(getattr(x, "dtype", None), "kind", None)   # numpy arrays, without numpy
    if kind in ("f", "i", "u") and getattr(x, "size", None) == 1:
        return float(x.item())
    return None


def check_beta(beta, name: str = "beta", logit_scale: float = 0.5) -> float:
    """beta as a float in [0, limit]: the kernels take beta * 2 * logit_scale in fp32
    (compute.py), which must not overflow."""
    limit = _F32_MAX / (2.0 * logit_scale)
    try:
        value = _one_real_number(beta)
    except OverflowError:                             # an int too large for a float
        value = float("inf")
    if value is None:
        raise ValueError(f"{name}: expected a finite non-negative number, got "
                         f"{type(beta).__name__}"
                         + (f" of shape {tuple(beta.shape)}" if hasattr(beta, "shape") else ""))
    if not 0.0 <= value <= limit:                     # NaN fails both comparisons
        raise ValueError(f"{name}: expected a finite non-negative number of at most {limit:.4g} "
                         f"(the loss is computed in fp32), got {value!r}")
    return value


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {x.layout} "
                         f"(call .to_dense() first)")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (fp32, fp16, bf16 or fp64), "
                         f"got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (2B, ...) with B >= 1, got {tuple(x.shape)}")
    if x.numel() == 0:                                # a mean over no elements means nothing
        raise ValueError(f"{name}: expected at least one element per row, got shape "
                         f"{tuple(x.shape)}")
    return x


def check_pairs(model_pred: torch.Tensor) -> int:
    """B, the number of pairs, from model_pred's leading dim (2B)."""
    rows = model_pred.shape[0]
    if rows % 2:
        raise ValueError(f"model_pred: the leading dim must be even (2B rows: B preferred then B "
                         f"dispreferred), got {rows}")
    return rows // 2


def check_same_device(**tensors: torch.Tensor) -> None:
    first, *others = tensors.values()
    if any(t.device != first.device for t in others):
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def _as_real_tensor(name: str, values, device) -> torch.Tensor:
    """A sequence of real numbers as an fp32 tensor; anything else (strings, ragged lists,
    objects) is a ValueError naming ``name``."""
    try:
        return torch.as_tensor(values, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        shown = repr(values)
        raise ValueError(f"{name}: expected a tensor or a sequence of real numbers, got "
                         f"{shown if len(shown) <= 80 else shown[:77] + '...'}") from None


def check_timesteps(timesteps, b: int, num_train_timesteps) -> torch.Tensor:
    """The timesteps of ``loss_weighting="linear"``: (2B,) or (B,) real numbers in
    [0, num_train_timesteps] (values checked on CPU only, as weights are; a flow
    scheduler's timesteps reach num_train_timesteps itself)."""
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")
    if not isinstance(timesteps, torch.Tensor):
        timesteps = _as_real_tensor("timesteps", timesteps, "cpu")
    if timesteps.layout != torch.strided:
        raise ValueError(f"timesteps: expected a dense (strided) tensor, got layout {timesteps.layout}")
    if timesteps.dtype == torch.bool or timesteps.is_complex():
        raise ValueError(f"timesteps: expected real numbers, got dtype {timesteps.dtype}")
    if timesteps.dim() != 1 or timesteps.shape[0] not in (b, 2 * b):
        raise ValueError(f"timesteps: expected shape ({2 * b},) or ({b},), "
                         f"got {tuple(timesteps.shape)}")
    if timesteps.device.type == "cpu" and not torch.compiler.is_compiling():
        t = timesteps.detach()[:b].double()
        hi = num_train_timesteps
        if not bool(((t >= 0) & (t <= hi)).all()):       # NaN fails both
            raise ValueError(f"timesteps: expected values in [0, {hi}] (num_train_timesteps), "
                             f"got {[float(v) for v in t.flatten()[:8]]}")
    return timesteps


def check_weights(weights: Weights, b: int, device: torch.device) -> Optional[torch.Tensor]:
    """None, or the per-pair weights as a detached fp32 (B,) tensor on `device`."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):  # a plain sequence goes to the inputs' device
        weights = _as_real_tensor("weights", weights, device)
    if weights.layout != torch.strided:
        raise ValueError(f"weights: expected a dense (strided) tensor, got layout {weights.layout}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise ValueError(f"weights: expected real numbers, got dtype {weights.dtype}")
    if weights.shape != (b,):
        raise ValueError(f"weights: expected shape ({b},) (one weight per pair), "
                         f"got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights: expected a tensor on {device}, got one on {weights.device}")
    w = weights.detach().to(torch.float32).contiguous()
    # Values are checked where that costs no host sync (CPU); on an accelerator a NaN or
    # inf weight shows up as a non-finite loss instead. A negative weight would make the
    # pair's term unbounded below (training would push its margin to -inf): refused.
    if w.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(w)
        if not (float(lo) >= 0.0 and float(hi) < math.inf):
            raise ValueError(f"weights: expected finite non-negative numbers, got "
                             f"{[float(v) for v in weights.detach().flatten()[:8]]}")
    return w


def check_loss_type(loss_type, beta: float, beta_name: str = "beta") -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and beta == 0.0:
        raise ValueError(f"{beta_name}: loss_type='ipo' needs beta > 0 (its target is 1/(2 beta))")
