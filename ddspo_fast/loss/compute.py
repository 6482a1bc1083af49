"""The loss on row blocks, by the chosen backend: the eager math or a compiled op."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, eager
from ._ops import run_fwd
from .layout import common_dtype
from .stats import LossParts


def compute(model: torch.Tensor, target_w: torch.Tensor, target_l: torch.Tensor,
            ref_w: Optional[torch.Tensor], ref_l: Optional[torch.Tensor],
            weights: Optional[torch.Tensor], beta: float, backend: str,
            loss_type: str = "sigmoid", logit_scale: float = 0.5,
            ref_mse: Optional[torch.Tensor] = None) -> LossParts:
    """Every block but `model` arrives detached (api.py): only `model` gets a gradient.
    The reference is its rows (`ref_l`, `ref_w`) or its row errors `ref_mse` (2B,).

    The margin is z_i = beta * u_i with u_i = -logit_scale * ((m_w - m_l) - (r_w - r_l));
    the ops and the eager forward compute z with the factor 1/2 built in, so they get
    beta * 2 * logit_scale. The sigmoid loss is theirs; other loss types are computed
    from their differentiable margins (eager.pair_loss), so every backend runs every type.
    """
    beta_op = beta if logit_scale == 0.5 else 2.0 * logit_scale * beta
    # target_w / target_l and ref_w / ref_l are views of one tensor each (api.py): three
    # dtypes (two when the reference is its row errors, which the ops take as they are)
    dtype = common_dtype(model, target_w, *([] if ref_l is None else [ref_l]))
    name = dispatch.resolve(backend, model.device, dtype)
    if name == "torch":
        parts = eager.loss_rows(model, target_w, target_l, ref_w, ref_l, weights, beta_op,
                                ref_mse)
    else:
        if (dtype != model.dtype or dtype != target_w.dtype
                or (ref_l is not None and dtype != ref_l.dtype)):
            cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
            model, target_w, target_l, ref_w, ref_l = map(
                cast, (model, target_w, target_l, ref_w, ref_l))
        parts = LossParts(*run_fwd(name, model, target_w, target_l, ref_w, ref_l, weights,
                                   beta_op, ref_mse)[:4])
    if loss_type != "sigmoid":
        parts = parts._replace(loss=eager.pair_loss(parts.margin, beta, loss_type, weights))
    return parts
