"""The public loss functions: `ddspo_loss`, `ddspo_loss_from_reference`,
`ddspo_loss_from_ref_mse` (with `reference_mse`), `dpo_loss`, `DDSPOLoss`.

Each checks its arguments (checks.py), lays the tensors out as row blocks (layout.py) and
hands them to the chosen backend (compute.py); the math lives in eager.py and the kernels.

The one convention of the library, for B pairs with per-row MSEs m (policy) and r
(reference) against the target:

    Delta_i = (m_w,i - m_l,i) - (r_w,i - r_l,i)
    u_i     = -Delta_i / 2                     the logit (DDSPO / Diffusion-DPO papers)
    z_i     = beta * u_i                       stats["margin"]
    l_i     = -log sigmoid(z_i)                loss_type="sigmoid" (default)
            = max(0, 1 - z_i)                  loss_type="hinge"
            = (u_i - 1/(2 beta))^2             loss_type="ipo" (beta > 0)
    loss    = (1/B) sum_i w_i l_i

`dpo_loss(..., convention=...)` reproduces each public script's own spelling of it
(recipes.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import dispatch
from .checks import (Weights, check_beta, check_loss_type, check_pairs, check_same_device,
                     check_tensor, check_timesteps, check_weights)
from .compute import compute
from .layout import detached, memory_order, rows
from .recipes import get_convention, implicit_accuracy, linear_weights
from .stats import LossParts, stats_of

Result = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def _standard(model_pred, ref_pred, target, beta, weights, backend, loss_type,
              logit_scale=0.5, beta_name="beta") -> LossParts:
    check_tensor("model_pred", model_pred)
    check_tensor("ref_pred", ref_pred)
    check_tensor("target", target)
    beta = check_beta(beta, beta_name, logit_scale)
    check_loss_type(loss_type, beta, beta_name)
    for name, t in (("ref_pred", ref_pred), ("target", target)):
        if t.shape != model_pred.shape:
            raise ValueError(f"{name}: expected the shape of model_pred {tuple(model_pred.shape)}, "
                             f"got {tuple(t.shape)}")
    b = check_pairs(model_pred)
    check_same_device(model_pred=model_pred, ref_pred=ref_pred, target=target)
    w = check_weights(weights, b, model_pred.device)
    # Only model_pred gets a gradient, whatever the backend: the others are detached.
    order = memory_order(model_pred)
    model = rows(model_pred, order)
    # split_with_sizes: one call for all blocks (Tensor.split has a Python wrapper)
    target_w, target_l = detached(rows(target, order)).split_with_sizes((b, b))
    ref_w, ref_l = detached(rows(ref_pred, order)).split_with_sizes((b, b))
    return compute(model, target_w, target_l, ref_w, ref_l, w, beta, backend, loss_type,
                   logit_scale)


def ddspo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
               beta: float, *, weights: Weights = None, backend: str = "auto",
               loss_type: str = "sigmoid") -> Result:
    """DDSPO / Diffusion-DPO pair loss on (2B, *S) tensors: rows 0..B-1 preferred.

    Returns `(loss, stats)`: `loss` is a 0-dim fp32 tensor, differentiable with respect to
    `model_pred` only; `stats` holds detached fp32 `model_mse` (2B,), `ref_mse` (2B,),
    `margin` (B,) and `implicit_acc` (the fraction of pairs with margin > 0).
    `loss_type` is "sigmoid", "hinge" or "ipo" (the module docstring has the formulas).
    """
    parts = _standard(model_pred, ref_pred, target, beta, weights, backend, loss_type)
    return parts.loss, stats_of(parts)


def ddspo_loss_from_reference(model_pred: torch.Tensor, ref_out: torch.Tensor, beta: float, *,
                              weights: Weights = None, backend: str = "auto",
                              loss_type: str = "sigmoid") -> Result:
    """DDSPO TF-CPP loss straight from the reference's one call on 3B stacked rows.

    `ref_out` = reference([x_w|c ; x_l|c ; x_l|c-]): target_w = ref_pred_w = rows 0..B-1,
    ref_pred_l = rows B..2B-1, target_l = rows 2B..3B-1. The rows are read in place (views,
    no copies); `ref_mse` for the preferred half is exactly 0.
    """
    check_tensor("model_pred", model_pred)
    check_tensor("ref_out", ref_out)
    beta = check_beta(beta)
    check_loss_type(loss_type, beta)
    b = check_pairs(model_pred)
    if ref_out.shape[0] != 3 * b or ref_out.shape[1:] != model_pred.shape[1:]:
        raise ValueError(f"ref_out: expected shape {(3 * b,) + tuple(model_pred.shape[1:])} "
                         f"(3B rows [x_w|c ; x_l|c ; x_l|c-] for B={b} pairs), "
                         f"got {tuple(ref_out.shape)}")
    check_same_device(model_pred=model_pred, ref_out=ref_out)
    w = check_weights(weights, b, model_pred.device)
    order = memory_order(model_pred)
    target_w, ref_l, target_l = detached(rows(ref_out, order)).split_with_sizes((b, b, b))
    parts = compute(rows(model_pred, order), target_w, target_l, None, ref_l, w, beta, backend,
                    loss_type)
    return parts.loss, stats_of(parts)


def _target_halves(target, pred: torch.Tensor, b: int, pred_name: str):
    """`target` as (2B, *S) or a pair (target_w, target_l) of (B, *S): its two halves."""
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"target: expected a (2B, *S) tensor or a pair (target_w, "
                             f"target_l), got a sequence of {len(target)}")
        target_w, target_l = (check_tensor(n, t) for n, t in zip(("target_w", "target_l"),
                                                                   target))
        half = (b,) + tuple(pred.shape[1:])
        for name, t in (("target_w", target_w), ("target_l", target_l)):
            if t.shape != half:
                raise ValueError(f"{name}: expected shape {half} (half of {pred_name}), "
                                 f"got {tuple(t.shape)}")
        if target_w.dtype != target_l.dtype:
            raise ValueError(f"target_l: expected the dtype of target_w ({target_w.dtype}), "
                             f"got {target_l.dtype}")
    else:
        check_tensor("target", target)
        if target.shape != pred.shape:
            raise ValueError(f"target: expected the shape of {pred_name} "
                             f"{tuple(pred.shape)}, got {tuple(target.shape)}")
        target_w, target_l = target[:b], target[b:]
    return target_w, target_l


def reference_mse(ref_pred: torch.Tensor, target, *, backend: str = "auto") -> torch.Tensor:
    """Each reference row's mean squared error against its target: the (2B,) fp32
    `[r_w ; r_l]` that `ddspo_loss_from_ref_mse` takes, computed by the backend's kernels
    exactly as they compute the policy's errors (so a policy equal to the reference has a
    margin of exactly 0). No gradient. `target` as in `ddspo_loss_from_ref_mse`."""
    check_tensor("ref_pred", ref_pred)
    b = check_pairs(ref_pred)
    target_w, target_l = _target_halves(target, ref_pred, b, "ref_pred")
    check_same_device(ref_pred=ref_pred, target=target_w, target_l=target_l)
    order = memory_order(ref_pred)
    tw, tl = (detached(rows(t, order)) for t in (target_w, target_l))
    with torch.no_grad():
        # the loss ops with the reference as the model: their model_mse is what is wanted
        unused = torch.zeros(2 * b, dtype=torch.float32, device=ref_pred.device)
        parts = compute(detached(rows(ref_pred, order)), tw, tl, None, None, None, 1.0,
                        backend, ref_mse=unused)
    return parts.model_mse.float()


def ddspo_loss_from_ref_mse(model_pred: torch.Tensor, target, ref_mse: torch.Tensor,
                            beta: float, *, weights: Weights = None, backend: str = "auto",
                            loss_type: str = "sigmoid") -> Result:
    """The pair loss given the reference's per-row errors instead of its predictions.

    `ref_mse` (2B,) = [r_w ; r_l], the mean squared error of each reference row against
    its target (`reference_mse`, `stats["ref_mse"]` of another call, or what a reference
    cache stored): only the policy's rows and the targets are read, by the same backends
    as `ddspo_loss`. `target` is (2B, *S), or a pair `(target_w, target_l)` of (B, *S)
    tensors (views of other tensors, so nothing is copied). Same result as `ddspo_loss` on
    rows whose reference errors are `ref_mse`; `stats["ref_mse"]` is `ref_mse` as fp32.
    """
    check_tensor("model_pred", model_pred)
    check_tensor("ref_mse", ref_mse)
    beta = check_beta(beta)
    check_loss_type(loss_type, beta)
    b = check_pairs(model_pred)
    target_w, target_l = _target_halves(target, model_pred, b, "model_pred")
    if ref_mse.shape != (2 * b,):
        raise ValueError(f"ref_mse: expected shape ({2 * b},) (one error per row of "
                         f"model_pred), got {tuple(ref_mse.shape)}")
    check_same_device(model_pred=model_pred, target=target_w, target_l=target_l,
                      ref_mse=ref_mse)
    w = check_weights(weights, b, model_pred.device)
    order = memory_order(model_pred)
    tw, tl = (detached(rows(t, order)) for t in (target_w, target_l))
    parts = compute(rows(model_pred, order), tw, tl, None, None, w, beta, backend, loss_type,
                    ref_mse=detached(ref_mse))
    return parts.loss, stats_of(parts)


def dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
             beta_dpo: float, timesteps: Optional[torch.Tensor] = None,
             loss_weighting: Optional[str] = None, num_train_timesteps: int = 1000, *,
             backend: str = "auto", loss_type: str = "sigmoid",
             convention: str = "ddspo_official") -> Result:
    """Drop-in for the hand-written loss block of the Diffusion-DPO / DDSPO training scripts.

    Same arguments and result as those scripts' loss block: `metrics` holds
    `raw_model_loss` (mean model MSE over all 2B rows), `raw_ref_loss` (mean reference
    MSE) and `implicit_acc`. `loss_weighting="linear"` weights pair i by t_i/(T-1) taken
    from the preferred half of `timesteps`. `convention` names the script whose spelling
    of the loss to reproduce: "ddspo_official" (default; also the library's own),
    "salesforce", "diffusers_sdxl" or "diffusers_sd15" (recipes.py).
    """
    conv = get_convention(convention)
    if loss_weighting not in (None, "linear"):
        raise ValueError(f"loss_weighting: expected None or 'linear', got {loss_weighting!r}")
    weights = None
    if loss_weighting == "linear":
        if timesteps is None:
            raise ValueError("timesteps: required when loss_weighting='linear'")
        check_tensor("model_pred", model_pred)
        b = check_pairs(model_pred)
        timesteps = check_timesteps(timesteps, b, num_train_timesteps)
        weights = linear_weights(timesteps, b, num_train_timesteps).to(model_pred.device)
    parts = _standard(model_pred, ref_pred, target, beta_dpo, weights, backend, loss_type,
                      conv.logit_scale, "beta_dpo")
    stats = stats_of(parts)
    metrics = {
        "raw_model_loss": stats["model_mse"].mean(),
        "raw_ref_loss": stats["ref_mse"].mean(),
        "implicit_acc": implicit_accuracy(conv, stats),
    }
    return parts.loss, metrics


class DDSPOLoss(torch.nn.Module):
    """`nn.Module` form of the loss.

    `forward(model_pred, ref_pred, target)` is `ddspo_loss`; `forward(model_pred,
    ref_out=...)` is `ddspo_loss_from_reference` (TF-CPP's packed reference rows).
    """

    def __init__(self, beta: float, *, backend: str = "auto", loss_type: str = "sigmoid"):
        super().__init__()
        self.beta = check_beta(beta)
        check_loss_type(loss_type, self.beta)
        if backend != "auto" and backend not in dispatch.BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {dispatch.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.loss_type = loss_type

    def forward(self, model_pred, ref_pred=None, target=None, *, ref_out=None, weights=None):
        kw = dict(weights=weights, backend=self.backend, loss_type=self.loss_type)
        if ref_out is not None:
            if ref_pred is not None or target is not None:
                raise ValueError("ref_out: give either ref_out (packed TF-CPP rows) or "
                                 "ref_pred and target, not both")
            return ddspo_loss_from_reference(model_pred, ref_out, self.beta, **kw)
        if ref_pred is None or target is None:
            raise ValueError("ref_pred, target: both required unless ref_out is given")
        return ddspo_loss(model_pred, ref_pred, target, self.beta, **kw)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, backend={self.backend!r}, loss_type={self.loss_type!r}"
