"""The loss's result types, shared by every backend."""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch


class LossParts(NamedTuple):
    loss: torch.Tensor       # 0-dim fp32
    # model_mse and margin are differentiable with respect to the model rows, fp32 (fp64
    # from the torch backend on fp64 inputs); stats_of hands out detached fp32 copies.
    model_mse: torch.Tensor  # (2B,)
    ref_mse: torch.Tensor    # (2B,) fp32
    margin: torch.Tensor     # (B,) z_i


def stats_of(parts: LossParts) -> Dict[str, torch.Tensor]:
    """The `stats` dict the public loss functions return (implicit_acc, margin, model_mse,
    ref_mse; see the README): detached, so logging it keeps no graph; no host sync."""
    # detach only what has history, and .float() of an fp32 tensor is itself: no extra ops
    margin, model_mse = parts.margin, parts.model_mse
    if margin.requires_grad:
        margin, model_mse = margin.detach(), model_mse.detach()
    margin = margin.float()
    return {
        "model_mse": model_mse.float(),
        "ref_mse": parts.ref_mse,
        "margin": margin,
        "implicit_acc": torch.mean(margin > 0, dtype=torch.float32),   # 2 small ops, not 3
    }
