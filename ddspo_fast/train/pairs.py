"""Target construction: which rows each network sees, and the loss on them.

Per pair-draw (one pair at one (t, eps)), rows given to the denoiser:

=================  ====================================  ===========================
objective / pair   policy (with grad)                    no grad
=================  ====================================  ===========================
DDSPO, TF-CPP      [x_w|c ; x_l|c]                       ref [x_w|c ; x_l|c ; x_l|c-]
Diffusion-DPO      [x_w|c ; x_l|c]                       ref [x_w|c ; x_l|c]
DDSPO, DD-CPP      [x_w|c ; x_l|c]                       ref [x_w|c ; x_l|c],
                                                         phi_w [x_w|c], phi_l [x_l|c]
=================  ====================================  ===========================

i.e. 5, 4 and 6 rows. Each reference / adapter call is one stacked forward. With
random-condition mixing under Diffusion-DPO the reference runs on the TF-CPP layout
(5 rows) and mixed pairs take its targets (selected with ``torch.where``, no sync).

``make_inputs`` turns a data batch into ``PairInputs`` (one text-encoder call for every
prompt the step needs, shared (t, eps) per pair); ``PairLoss`` runs the networks on the
rows above and returns the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..loss import ddspo_loss, ddspo_loss_from_reference
from ..loss.eager import margins, pair_loss, row_mse
from ..loss.stats import LossParts, stats_of


def cat_cond(*conds: dict) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def where_cond(mask: torch.Tensor, a: dict, b: dict) -> dict:
    """Row-wise ``mask ? a : b`` over every tensor of two cond dicts."""
    out = {}
    for k in a:
        m = mask.reshape(-1, *([1] * (a[k].dim() - 1)))
        out[k] = torch.where(m, a[k], b[k].to(a[k].dtype))
    return out


@dataclass
class PairInputs:
    x_w: torch.Tensor          # (n, *S) clean latents, preferred
    x_l: torch.Tensor          # (n, *S) clean latents, dispreferred
    noise: torch.Tensor        # (n, *S) shared by both rows of a pair
    t: torch.Tensor            # (n,) shared by both rows of a pair
    cond: dict                 # c   (n, ...)
    neg_cond: Optional[dict]   # c-  (n, ...) (TF-CPP and mixed rows)
    weights: Optional[torch.Tensor] = None  # (n,) per-pair loss weights
    mixed: Optional[torch.Tensor] = None    # (n,) bool: random-condition rows
    tau: Optional[torch.Tensor] = None      # (n,) noise level of t in [0, 1] (metrics, weights)


def pair_mode(objective: str, pair: str) -> str:
    """``dpo`` (Diffusion-DPO), ``tf_cpp`` (DDSPO, reference pair) or ``dd_cpp`` (DDSPO,
    LoRA pair)."""
    if objective == "dpo":
        return "dpo"
    return "tf_cpp" if pair == "reference" else "dd_cpp"


def needs_neg_cond(mode: str, mixing: bool) -> bool:
    """Whether c- is needed: TF-CPP always; Diffusion-DPO for its mixed pairs;
    DD-CPP never (its targets are conditioned on c, or c' when mixed)."""
    return mode == "tf_cpp" or (mixing and mode == "dpo")


def needs_text_encoder(mode: str, mixing: bool, dataset, policy_only: bool = False) -> bool:
    """Whether a step must encode prompts: the data lacks c (or a needed c-), or mixing
    draws substitute prompts. ``policy_only`` (reference cache): c- is never needed."""
    has_cond = dataset.has_text_embeddings
    info = getattr(dataset, "info", None) or {}
    has_neg = bool(info.get("neg_cond_keys")) if has_cond else False
    need_neg = needs_neg_cond(mode, mixing) and not policy_only
    return not has_cond or mixing or (need_neg and not has_neg)


# ---------------------------------------------------------------------- inputs
def _cast(d: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in d.items()}


def _to_device(cond: dict, device, dtype: torch.dtype) -> dict:
    return _cast({k: v.to(device, non_blocking=True) for k, v in cond.items()}, dtype)


def assemble_conditions(batch: dict, adapter, need_neg: bool, mixing_prompts, *, device,
                        dtype: torch.dtype) -> tuple[dict, dict | None, tuple | None]:
    """c, c- (when ``need_neg``) and the mixing conds ``(c', c'-)``, encoding only what
    the data lacks, in one text-encoder call; floating tensors cast to ``dtype``."""
    texts, slots = [], {}

    def want(name, prompts):
        slots[name] = (len(texts), len(texts) + len(prompts))
        texts.extend(prompts)

    if batch.get("cond") is None:
        want("cond", batch["prompt"])
    if need_neg and batch.get("neg_cond") is None:
        negs = batch["neg_prompt"]
        if any(n is None for n in negs):
            raise ValueError("data: a pair has no degraded prompt (neg_prompt), which DDSPO's "
                             "reference pair (TF-CPP) needs: encode the data with "
                             "`ddspo-fast encode --degrade random` (or structural), or train "
                             "with --objective dpo (Diffusion-DPO needs none)")
        want("neg", negs)
    if mixing_prompts is not None:
        want("mix", mixing_prompts[0])
        if need_neg:
            want("mix_neg", mixing_prompts[1])
    enc = {}
    if texts:
        out = adapter.encode_prompts(texts)
        enc = {name: {k: v[s:e] for k, v in out.items()} for name, (s, e) in slots.items()}
    cond = enc.get("cond") or _to_device(batch["cond"], device, dtype)
    neg = None
    if need_neg:
        neg = enc.get("neg") or (_to_device(batch["neg_cond"], device, dtype)
                                 if batch.get("neg_cond") is not None else None)
    mix = None
    if mixing_prompts is not None:
        mix = (_cast(enc["mix"], dtype), _cast(enc["mix_neg"], dtype) if need_neg else None)
    return _cast(cond, dtype), (_cast(neg, dtype) if neg is not None else None), mix


def make_inputs(batch: dict, adapter, mode: str, cfg, *, device, dtype: torch.dtype,
                epoch: int, prompt_pool=None, policy_only: bool = False) -> PairInputs:
    """Batch -> the tensors of one step: latents, shared (t, eps), conds, weights.

    ``cfg`` is the ``TrainConfig`` (seed, timesteps_per_pair K, timestep density, mixing
    schedule, loss weighting, channels_last); ``dtype`` the autocast dtype the conds are
    cast to. The draws are the pairs' draws ``epoch * K + j`` (``draws.py``: a function of
    seed, pair id and draw index only); ``batch["draw_epoch"]``, when present, overrides
    ``epoch``. ``prompt_pool`` is the random-condition pool (None: no mixing).
    ``policy_only`` (reference cache): c- is not encoded, only the policy runs.
    """
    from .draws import batch_ids, draw_indices, make_draws, pick_prompts

    a, dev = adapter, device
    x_w = batch["latent_w"].to(dev, non_blocking=True).float()
    x_l = batch["latent_l"].to(dev, non_blocking=True).float()
    k = cfg.timesteps_per_pair
    epoch = int(batch.get("draw_epoch", epoch))
    ids = batch_ids(batch)
    d = make_draws(a, ids, [draw_indices(epoch, k)] * len(ids), x_w.shape[1:], seed=cfg.seed,
                   logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                   scheme=cfg.timestep_sampling, mode_scale=cfg.mode_scale, shift=cfg.flow_shift,
                   mix_schedule=cfg.rand_cond_schedule if prompt_pool is not None else None,
                   mix_lambda=cfg.rand_cond_lambda)
    mixing = pick_prompts(prompt_pool, d.pick) if prompt_pool is not None else None
    need_neg = False if policy_only else needs_neg_cond(mode, mixing is not None)
    cond, neg, mix = assemble_conditions(batch, a, need_neg, mixing, device=dev, dtype=dtype)
    if k > 1:  # K draws per pair: repeat rows, text work is already done once
        rep = lambda c: None if c is None else {n: v.repeat_interleave(k, 0)  # noqa
                                                for n, v in c.items()}
        x_w, x_l = x_w.repeat_interleave(k, 0), x_l.repeat_interleave(k, 0)
        cond, neg = rep(cond), rep(neg)  # the mixing conds are per draw already
    t = d.t.to(dev, non_blocking=True)
    noise = d.noise.to(dev, non_blocking=True)
    tau = a.noise_level(t)
    mixed = None
    if mix is not None:
        mixed = d.mixed.to(dev, non_blocking=True)
        if mix[1] is not None:
            neg = where_cond(mixed, mix[1], neg if neg is not None else cond)
        cond = where_cond(mixed, mix[0], cond)
    x_w = a.prepare_input(x_w, channels_last=cfg.channels_last)
    x_l = a.prepare_input(x_l, channels_last=cfg.channels_last)
    weights = tau.float() if cfg.loss_weighting == "linear" else None
    return PairInputs(x_w=x_w, x_l=x_l, noise=noise, t=t, cond=cond, neg_cond=neg,
                      weights=weights, mixed=mixed, tau=tau)


# ---------------------------------------------------------------------- loss
class PairLoss:
    """Builds the rows for one objective and returns ``(loss, stats)``.

    ``reference(rows...)``, ``phi_w`` / ``phi_l`` are callables running the frozen
    networks (no grad) with the adapter's ``predict`` signature; the trainer supplies
    them so this module knows nothing about LoRA switching or DDP.
    """

    def __init__(self, adapter, objective: str, pair: str, beta: float, backend: str = "auto",
                 loss_type: str = "sigmoid"):
        self.adapter, self.objective, self.pair = adapter, objective, pair
        self.beta, self.backend, self.loss_type = float(beta), backend, loss_type
        self.mode = pair_mode(objective, pair)

    def needs_neg_cond(self, mixing: bool) -> bool:
        return needs_neg_cond(self.mode, mixing)

    def rows_per_pair(self, mixing: bool = False) -> int:
        return {"tf_cpp": 5, "dpo": 5 if mixing else 4, "dd_cpp": 6}[self.mode]

    def __call__(self, policy: Callable, reference: Callable, inp: PairInputs,
                 phi_w: Callable | None = None, phi_l: Callable | None = None):
        a = self.adapter
        n = inp.x_w.shape[0]
        xt_w = a.add_noise(inp.x_w, inp.noise, inp.t)
        xt_l = a.add_noise(inp.x_l, inp.noise, inp.t)
        mode = self.mode
        # TF-CPP (and Diffusion-DPO with mixed pairs) send [x_w|c; x_l|c; x_l|c-] to the
        # reference: build it once and give the policy its first 2n rows as a view.
        three = mode == "tf_cpp" or (mode == "dpo" and inp.mixed is not None)
        if three:
            x3, t3 = torch.cat([xt_w, xt_l, xt_l]), torch.cat([inp.t] * 3)
            c3 = cat_cond(inp.cond, inp.cond, inp.neg_cond)
            x2, t2, c2 = x3[: 2 * n], t3[: 2 * n], {k: v[: 2 * n] for k, v in c3.items()}
        else:
            x2, t2 = torch.cat([xt_w, xt_l]), torch.cat([inp.t, inp.t])
            c2 = cat_cond(inp.cond, inp.cond)
        if mode == "tf_cpp":
            # The reference runs first, so its working set never sits on top of the
            # policy's saved activations (ddspo-fast plan, SDXL full fine-tune, 4 pairs,
            # no checkpointing: peak 104.98 -> 102.95 GiB); its output is small.
            with torch.no_grad():
                ref_out = reference(x3, t3, c3)
            model_pred = policy(x2, t2, c2)
            return ddspo_loss_from_reference(model_pred, ref_out, self.beta, weights=inp.weights,
                                             backend=self.backend, loss_type=self.loss_type)
        model_pred = policy(x2, t2, c2)
        if mode == "dpo":
            target = torch.cat([a.dpo_target(inp.x_w, inp.noise, inp.t),
                                a.dpo_target(inp.x_l, inp.noise, inp.t)])
            with torch.no_grad():
                if inp.mixed is None:
                    ref_pred = reference(x2, t2, c2)
                else:
                    ref_out = reference(x3, t3, c3)
                    ref_pred = ref_out[: 2 * n]
                    m = torch.cat([inp.mixed, inp.mixed]).reshape(-1, *([1] * (x2.dim() - 1)))
                    tf_target = torch.cat([ref_out[:n], ref_out[2 * n:]])
                    target = torch.where(m, tf_target.to(target.dtype), target)
            return ddspo_loss(model_pred, ref_pred, target, self.beta, weights=inp.weights,
                              backend=self.backend, loss_type=self.loss_type)
        # DD-CPP: targets from the winning / losing adapters on the one base.
        with torch.no_grad():
            ref_pred = reference(x2, t2, c2)
            target = torch.cat([phi_w(xt_w, inp.t, inp.cond), phi_l(xt_l, inp.t, inp.cond)])
        return ddspo_loss(model_pred, ref_pred, target.to(ref_pred.dtype), self.beta,
                          weights=inp.weights, backend=self.backend, loss_type=self.loss_type)

    # ------------------------------------------------------------------ reference cache
    # The frozen part of __call__ split from the policy's (DESIGN.md section 1b): what
    # ``frozen`` returns for a draw is all the loss needs besides the policy's output, so
    # it can be computed ahead of training and ``cached_loss`` runs the policy alone.
    # Both mirror __call__ row for row; tests hold cached and live runs equal.

    @torch.no_grad()
    def frozen(self, reference: Callable, inp: PairInputs, phi_w: Callable | None = None,
               phi_l: Callable | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(target, ref_mse)`` of the frozen networks: ``target`` (2n, *S) the pair
        targets (None for Diffusion-DPO without mixing: the noise, regenerated); on
        Diffusion-DPO with mixing, the TF-CPP targets the mixed rows take. ``ref_mse``
        (2n,) fp32 is r_w, r_l as the loss computes them."""
        a, n, mode = self.adapter, inp.x_w.shape[0], self.mode
        xt_w = a.add_noise(inp.x_w, inp.noise, inp.t)
        xt_l = a.add_noise(inp.x_l, inp.noise, inp.t)
        three = mode == "tf_cpp" or (mode == "dpo" and inp.mixed is not None)
        if three:
            ref_out = reference(torch.cat([xt_w, xt_l, xt_l]), torch.cat([inp.t] * 3),
                                cat_cond(inp.cond, inp.cond, inp.neg_cond))
            ref_pred = ref_out[: 2 * n]
            target = torch.cat([ref_out[:n], ref_out[2 * n:]])
        else:
            ref_pred = reference(torch.cat([xt_w, xt_l]), torch.cat([inp.t, inp.t]),
                                 cat_cond(inp.cond, inp.cond))
            target = None
        if mode == "dd_cpp":
            target = torch.cat([phi_w(xt_w, inp.t, inp.cond),
                                phi_l(xt_l, inp.t, inp.cond)]).to(ref_pred.dtype)
        loss_target = target
        if mode == "dpo":
            loss_target = self._dpo_target(inp, target)
        ref_mse = row_mse(ref_pred.reshape(2 * n, -1), loss_target.reshape(2 * n, -1))
        if mode == "tf_cpp":
            ref_mse[:n] = 0  # ref_pred_w is target_w: exactly 0, as the loss has it
        return target, ref_mse.float()

    def _dpo_target(self, inp: PairInputs, tf_target: torch.Tensor | None) -> torch.Tensor:
        a = self.adapter
        target = torch.cat([a.dpo_target(inp.x_w, inp.noise, inp.t),
                            a.dpo_target(inp.x_l, inp.noise, inp.t)])
        if inp.mixed is not None:
            m = torch.cat([inp.mixed, inp.mixed]).reshape(-1, *([1] * (target.dim() - 1)))
            target = torch.where(m, tf_target.to(target.dtype), target)
        return target

    def cached_loss(self, policy: Callable, inp: PairInputs, target: torch.Tensor | None,
                    ref_mse: torch.Tensor):
        """The loss from the policy's 2n rows and the cached ``frozen`` outputs (on the
        inputs' device). Same value and stats as ``__call__``; the math is the torch
        backend's (the loss is a negligible share of a step)."""
        a, n = self.adapter, inp.x_w.shape[0]
        xt_w = a.add_noise(inp.x_w, inp.noise, inp.t)
        xt_l = a.add_noise(inp.x_l, inp.noise, inp.t)
        model_pred = policy(torch.cat([xt_w, xt_l]), torch.cat([inp.t, inp.t]),
                            cat_cond(inp.cond, inp.cond))
        if self.mode == "dpo":
            target = self._dpo_target(inp, target)
        model_mse = row_mse(model_pred.reshape(2 * n, -1), target.reshape(2 * n, -1))
        ref_mse = ref_mse.float()
        margin = margins(model_mse, ref_mse, self.beta)
        loss = pair_loss(margin, self.beta, self.loss_type, inp.weights)
        parts = LossParts(loss=loss.float(), model_mse=model_mse.detach().float(),
                          ref_mse=ref_mse, margin=margin.detach().float())
        return parts.loss, stats_of(parts)
