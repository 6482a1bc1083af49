"""The `torch` backend: the loss in plain PyTorch, the ground truth for every kernel.

It works on the row-block form used by the ops (docs/internals.md section 1): `model`
is (2B, N), the targets and reference rows are (B, N) each. Everything is computed in
fp32 (or fp64 when the inputs are fp64), so bf16/fp16 inputs at beta = 22000 stay finite.

`pair_terms` is the one place of the per-pair math of every loss type; the compiled
backends use it too, on their ops' (differentiable) margins, for the types other than
`sigmoid` (which the kernels compute themselves).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .checks import LOSS_TYPES
from .stats import LossParts


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over every dim but the first (rows of any shape or memory
    layout, read as they are), accumulated in fp32 (fp64 for fp64)."""
    acc = _acc_dtype(pred.dtype)
    return (pred.to(acc) - target.to(acc)).pow(2).mean(dim=tuple(range(1, pred.dim())))


def pair_terms(margin: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair loss terms l_i (unweighted) from the margins z_i = beta * u_i.

    sigmoid: -log sigmoid(z), by torch's stable softplus (large |z| never overflows);
    hinge:   max(0, 1 - z);
    ipo:     (u - 1/(2 beta))^2 with u = z / beta (beta > 0).
    """
    if loss_type == "sigmoid":
        return F.softplus(-margin)
    if loss_type == "hinge":
        return torch.relu(1.0 - margin)
    if loss_type == "ipo":
        return (margin / beta - 0.5 / beta).square()
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


def pair_loss(margin: torch.Tensor, beta: float, loss_type: str,
              weights: Optional[torch.Tensor]) -> torch.Tensor:
    """loss = (1/B) sum_i w_i l_i, as a 0-dim fp32 tensor."""
    per_pair = pair_terms(margin, beta, loss_type)
    if weights is not None:
        per_pair = per_pair * weights.to(per_pair.dtype)
    return per_pair.mean().float()


def margins(model_mse: torch.Tensor, ref_mse: torch.Tensor, beta: float) -> torch.Tensor:
    """z_i = -(beta/2) * ((m_w - m_l) - (r_w - r_l)) from the (2B,) row MSEs."""
    m_w, m_l = model_mse.chunk(2)
    r_w, r_l = ref_mse.to(model_mse.dtype).chunk(2)
    return -0.5 * beta * ((m_w - m_l) - (r_w - r_l))


def loss_rows(model: torch.Tensor, target_w: torch.Tensor, target_l: torch.Tensor,
              ref_w: Optional[torch.Tensor], ref_l: Optional[torch.Tensor],
              weights: Optional[torch.Tensor], beta: float,
              ref_mse: Optional[torch.Tensor] = None) -> LossParts:
    """The ops' forward in PyTorch: sigmoid loss with z_i = -(beta/2) * ((m_w - m_l) - (r_w - r_l)).

    The reference enters as rows (`ref_l`, and `ref_w` unless it is `target_w`) or as its
    row errors `ref_mse` (2B,) = [r_w ; r_l] (then `ref_w`, `ref_l` are None). As with the
    ops, `loss`, `model_mse` and `margin` are differentiable with respect to `model` (and
    nothing else); `ref_mse` is not.
    """
    target = torch.cat([target_w, target_l])
    model_mse = row_mse(model, target)
    with torch.no_grad():
        if ref_mse is None:
            r_l = row_mse(ref_l, target_l)
            r_w = torch.zeros_like(r_l) if ref_w is None else row_mse(ref_w, target_w)
            ref_mse = torch.cat([r_w, r_l])
        else:
            ref_mse = ref_mse.detach().to(model_mse.dtype)
    margin = margins(model_mse, ref_mse, beta)
    loss = pair_loss(margin, beta, "sigmoid", weights)
    # model_mse and margin stay in the accumulation dtype (fp64 for fp64 inputs) so other
    # loss types computed from the margin keep that accuracy; stats are fp32 (stats.py).
    return LossParts(loss=loss, model_mse=model_mse, ref_mse=ref_mse.float(), margin=margin)
