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
prompt the step needs, shared (t, eps) per pair, the pair ids and draw indices);
``PairLoss`` runs the networks on the rows above and returns the loss: the frozen part
(``PairLoss.frozen``: targets and the reference's row errors) then the policy's, which a
reference cache lets a step run alone (``PairLoss.cached_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..loss import ddspo_loss_from_ref_mse, reference_mse


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
    # Which pair-draws the rows are (draws.py), pair-major as the rows: pair ids (one per
    # pair) and each pair's draw indices. A reference cache looks its rows up by them.
    ids: Optional[list] = None
    draws: Optional[list] = None


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
    cast to. The draws are the pairs' draws at visit ``epoch`` (``draws.batch_draws``: a
    function of seed, pair id and draw index only). ``prompt_pool`` is the random-condition
    pool (None: no mixing). ``policy_only`` (reference cache): c- is not encoded, only the
    policy runs.
    """
    from .draws import batch_draws, make_draws, pick_prompts

    a, dev = adapter, device
    x_w = batch["latent_w"].to(dev, non_blocking=True).float()
    x_l = batch["latent_l"].to(dev, non_blocking=True).float()
    k = cfg.timesteps_per_pair
    ids, draws = batch_draws(batch, epoch, k)
    d = make_draws(a, ids, draws, x_w.shape[1:], seed=cfg.seed,
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
                      weights=weights, mixed=mixed, tau=tau, ids=ids, draws=draws)


# ---------------------------------------------------------------------- loss
class FrozenOutputs(NamedTuple):
    """The frozen networks' part of one micro-batch's loss (``PairLoss.frozen``)."""

    target: Optional[tuple]     # (target_w, target_l) (n, *S) each, what a cache stores:
    #                             the pair targets; on Diffusion-DPO with mixing the TF-CPP
    #                             targets the mixed rows take; None on Diffusion-DPO without
    #                             mixing (the targets are the noise, regenerated)
    ref_mse: torch.Tensor       # (2n,) fp32 [r_w ; r_l], as the loss computes them


def _head(rows: tuple, m: int) -> tuple:
    """The first ``m`` rows of stacked ``(x, t, cond)``, as views."""
    x, t, c = rows
    return x[:m], t[:m], {k: v[:m] for k, v in c.items()}


class PairLoss:
    """Builds the rows for one objective and returns ``(loss, stats)``.

    ``reference(rows...)``, ``phi_w`` / ``phi_l`` are callables running the frozen
    networks (no grad) with the adapter's ``predict`` signature; the trainer supplies
    them so this module knows nothing about LoRA switching or DDP.

    A live call is ``frozen`` (the frozen networks, no grad) followed by the policy's loss
    on the same rows; a cached call (``cached_loss``) is the same policy loss with the
    frozen part read from a reference cache. So both run one row builder (``_rows``) and
    one loss (``ddspo_loss_from_ref_mse``, the fused kernels on the policy's rows).
    """

    def __init__(self, adapter, objective: str, pair: str, beta: float, backend: str = "auto",
                 loss_type: str = "sigmoid"):
        self.adapter, self.objective, self.pair = adapter, objective, pair
        self.beta, self.backend, self.loss_type = float(beta), backend, loss_type
        self.mode = pair_mode(objective, pair)

    # ------------------------------------------------------------------ rows
    def _rows(self, inp: PairInputs, reference: bool) -> tuple:
        """``(x, t, cond)`` stacked once: the policy's ``[x_w|c ; x_l|c]``, and for the
        reference of TF-CPP (and of Diffusion-DPO with mixing) ``[... ; x_l|c-]``, whose
        first 2n rows the policy then takes as views. Also returns ``(xt_w, xt_l)``."""
        a = self.adapter
        xt_w = a.add_noise(inp.x_w, inp.noise, inp.t)
        xt_l = a.add_noise(inp.x_l, inp.noise, inp.t)
        if reference and self._three(inp):
            rows = (torch.cat([xt_w, xt_l, xt_l]), torch.cat([inp.t] * 3),
                    cat_cond(inp.cond, inp.cond, inp.neg_cond))
        else:
            rows = (torch.cat([xt_w, xt_l]), torch.cat([inp.t, inp.t]),
                    cat_cond(inp.cond, inp.cond))
        return rows, (xt_w, xt_l)

    def _three(self, inp: PairInputs) -> bool:
        return self.mode == "tf_cpp" or (self.mode == "dpo" and inp.mixed is not None)

    def _loss_targets(self, inp: PairInputs, target: Optional[tuple]) -> tuple:
        """The loss's ``(target_w, target_l)`` from the frozen part's ``target``: itself,
        or on Diffusion-DPO the family's targets (noise / velocity), mixed rows taking the
        TF-CPP ones."""
        if self.mode != "dpo":
            return target
        a = self.adapter
        tw = a.dpo_target(inp.x_w, inp.noise, inp.t)
        tl = a.dpo_target(inp.x_l, inp.noise, inp.t)
        if inp.mixed is not None:
            m = inp.mixed.reshape(-1, *([1] * (tw.dim() - 1)))
            tw = torch.where(m, target[0].to(tw.dtype), tw)
            tl = torch.where(m, target[1].to(tl.dtype), tl)
        return tw, tl

    # ------------------------------------------------------------------ the two parts
    @torch.no_grad()
    def _frozen(self, reference: Callable, inp: PairInputs, phi_w: Callable | None,
                phi_l: Callable | None):
        """``(FrozenOutputs, loss targets, the policy's rows)``: the frozen networks run
        first, so their working set never sits on top of the policy's saved activations
        (ddspo-fast plan, SDXL full fine-tune, 4 pairs, no checkpointing: peak 104.98 ->
        102.95 GiB)."""
        n = inp.x_w.shape[0]
        rows, (xt_w, xt_l) = self._rows(inp, reference=True)
        ref_out = reference(*rows)
        target = None
        if self._three(inp):  # [x_w|c ; x_l|c ; x_l|c-]: the targets are rows 0..n-1, 2n..3n-1
            target = (ref_out[:n], ref_out[2 * n:])
        elif self.mode == "dd_cpp":  # from the winning / losing adapters on the one base
            target = (phi_w(xt_w, inp.t, inp.cond).to(ref_out.dtype),
                      phi_l(xt_l, inp.t, inp.cond).to(ref_out.dtype))
        tw, tl = self._loss_targets(inp, target)
        # by the kernels that compute the policy's errors, so equal rows give equal errors
        # (TF-CPP: ref_pred_w is target_w, so r_w is exactly 0)
        ref_mse = reference_mse(ref_out[:2 * n], (tw, tl), backend=self.backend)
        return FrozenOutputs(target, ref_mse), (tw, tl), _head(rows, 2 * n)

    def frozen(self, reference: Callable, inp: PairInputs, phi_w: Callable | None = None,
               phi_l: Callable | None = None) -> FrozenOutputs:
        """What the frozen networks contribute to the loss on ``inp`` (no grad): all the
        loss needs besides the policy's output, so a precompute can store it and
        ``cached_loss`` run the policy alone."""
        return self._frozen(reference, inp, phi_w, phi_l)[0]

    def _policy_loss(self, policy: Callable, inp: PairInputs, ref_mse: torch.Tensor,
                     targets: tuple, rows: tuple):
        model_pred = policy(*rows)
        return ddspo_loss_from_ref_mse(model_pred, targets, ref_mse, self.beta,
                                       weights=inp.weights, backend=self.backend,
                                       loss_type=self.loss_type)

    # ------------------------------------------------------------------ the calls
    def __call__(self, policy: Callable, reference: Callable, inp: PairInputs,
                 phi_w: Callable | None = None, phi_l: Callable | None = None):
        """The live loss: ``frozen`` on the rows, then the policy's loss on their first 2n."""
        fr, targets, rows = self._frozen(reference, inp, phi_w, phi_l)
        return self._policy_loss(policy, inp, fr.ref_mse, targets, rows)

    def cached_loss(self, policy: Callable, inp: PairInputs, frozen: FrozenOutputs):
        """The loss from the policy's 2n rows and a cached ``frozen`` (on the inputs'
        device): the same value and stats as ``__call__``, through the same kernels."""
        rows, _ = self._rows(inp, reference=False)
        targets = self._loss_targets(inp, frozen.target)
        return self._policy_loss(policy, inp, frozen.ref_mse, targets, rows)
