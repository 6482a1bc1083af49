"""``AdapterTrainer``: train DD-CPP's winning and losing LoRA adapters (``train-pair``).

    from ddspo_fast.train.adapter_trainer import AdapterTrainConfig, AdapterTrainer
    summary = AdapterTrainer(AdapterTrainConfig(model=M, data=D, output_dir=P)).train()
    # then: Trainer(TrainConfig(..., objective="ddspo", pair="lora", pair_lora=P))

DD-CPP takes its targets from the base with a *winning* LoRA trained on the preferred
samples and the base with a *losing* LoRA trained on the dispreferred ones. As the
official ``train_lora_target.py``: the plain denoising loss, both adapters conditioned on
the (positive) prompt, one timestep per pair shared by both, independent noise,
``loss = mse_w + mse_l``, one AdamW (lr 1e-4, constant_with_warmup) over both adapters
with gradient clipping (1.0) over both together; rank 4, alpha 4, dropout 0 on
to_q/to_k/to_v/to_out.0 (the family's attention projections elsewhere). The denoising
target is the family's Diffusion-DPO target (``adapter.dpo_target``: epsilon for SD,
x0 for SD3's preconditioned outputs, velocity for SANA), so every family trains.

Unlike the official script, which deep-copies the base once per adapter (two fp32
copies) and runs each on its B rows, both adapters live on ONE base module (stored in
the autocast dtype) and ONE forward runs the 2B rows stacked: ``SplitAdapters`` routes
rows [0:B) through the winning adapter and [B:2B) through the losing one inside every
LoRA layer (``lora.py``). Same FLOPs, same result, one base copy and half the denoiser
calls. The run itself (lock, loop, checkpoints, an exact resume) is ``run.TrainingRun``.

``output_dir`` receives ``pos_lora_unet/`` and ``neg_lora_unet/`` (peft adapter dirs,
exactly what the official script's ``PeftModel.save_pretrained`` writes, so both
``Trainer(pair_lora=output_dir)`` and the official ``--lora_path`` read them; the names
are kept for every family), ``metrics.jsonl``, ``checkpoints/checkpoint-N/``,
``train_pair_config.yaml`` and ``summary.json``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import AdapterTrainConfig
from .errors import NonFiniteError
from .lora import LOSE_DIR, WIN_DIR, write_pair_adapters
from .metrics import LossSums, json_safe
from .networks import build_adapter_pair
from .run import TrainingRun

CONFIG_FILE = "train_pair_config.yaml"
SUMMARY_FILE = "summary.json"


class AdapterTrainer(TrainingRun):
    """Trains the winning / losing LoRA pair of DD-CPP. See ``AdapterTrainConfig``.

    Attributes: ``denoiser`` (= ``policy``: the one base module carrying both adapters),
    ``adapter`` (model family), ``dataset``, ``optimizer``, ``scheduler``,
    ``accelerator``, ``global_step``, ``max_steps``. The output directory is locked from
    construction until ``train()`` returns (or ``close()``).
    """

    config_cls = AdapterTrainConfig
    config_file = CONFIG_FILE
    checkpoint_kind = "train-pair"
    progress_desc = "train-pair"

    # ================================================================== setup
    def _check_reuse(self) -> None:
        cfg, out = self.config, Path(self.config.output_dir)
        previous = [p for p in (out / WIN_DIR, out / LOSE_DIR, ckpt.checkpoints_dir(out))
                    if p.exists()]
        if previous and cfg.resume is None:
            if not cfg.overwrite:
                raise ValueError(
                    f"output_dir: {out} already holds "
                    f"{', '.join(p.name + '/' for p in previous)} from an earlier run; "
                    "pass resume='latest' (--resume latest) to continue it, "
                    "overwrite=True (--overwrite) to start afresh, or another directory")
            shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)

    def _setup(self) -> None:
        from ..models import load_adapter
        from .step import check_family_settings

        cfg = self.config
        self.out = Path(cfg.output_dir)
        self._open_data()
        self.max_steps = cfg.max_steps or cfg.num_epochs * math.ceil(
            self.batches_per_epoch / cfg.grad_accum)
        self.need_text = not self.dataset.has_text_embeddings
        comps = ("denoiser", "text") if self.need_text else ("denoiser",)
        self.adapter = a = load_adapter(cfg.model, self.family, components=comps,
                                        device=self.device, dtype=self.precision.frozen,
                                        text_dtype=self.precision.frozen)
        check_family_settings(cfg, a)
        nets = build_adapter_pair(a, cfg, self.precision)
        self.targets = list(cfg.lora_targets or a.lora_targets)
        self.split = nets.split
        self.denoiser = nets.policy
        self._use_networks(nets)

    def _new_metrics(self):
        return LossSums(self.device, ("loss", "mse_w", "mse_l"))

    # ================================================================== step
    def compute_loss(self, batch: dict):
        """``(loss, mse_w, mse_l)`` of one micro-batch: the 2B rows [x_w ; x_l] (shared t,
        independent noise, both on c) in one forward, winning adapter on the first half."""
        from .pairs import assemble_conditions, cat_cond

        a, cfg, dev = self.adapter, self.config, self.device
        x_w = batch["latent_w"].to(dev, non_blocking=True).float()
        x_l = batch["latent_l"].to(dev, non_blocking=True).float()
        n = x_w.shape[0]
        cond, _, _ = assemble_conditions(batch, a, False, None, device=dev,
                                         dtype=self.weight_dtype)
        t = a.sample_timesteps(n, device=dev, generator=self.generator,
                               scheme=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                               logit_std=cfg.logit_std)
        x0, t2 = torch.cat([x_w, x_l]), torch.cat([t, t])
        noise = torch.randn(x0.shape, generator=self.generator, device=dev, dtype=x0.dtype)
        x_t = a.add_noise(x0, noise, t2)
        x_t = a.prepare_input(x_t, channels_last=cfg.channels_last)
        pred = a.predict(self._policy_ddp, x_t, t2, cat_cond(cond, cond))
        err = (pred.float() - a.dpo_target(x0, noise, t2).float()).square()
        mse_w, mse_l = err[:n].mean(), err[n:].mean()
        return mse_w + mse_l, mse_w, mse_l

    def _record(self, batch: dict, out) -> dict:
        loss, mse_w, mse_l = (v.detach() for v in out)
        self.metrics.add((loss, mse_w, mse_l), len(batch["latent_w"]))
        return {"loss": loss, "mse_w": mse_w, "mse_l": mse_l}

    def _nonfinite_error(self, step: int, where: str) -> Exception:
        last = self.last_checkpoint or "none"
        return NonFiniteError(
            f"loss: became NaN/inf at step {step} (nothing after the last good checkpoint "
            f"was saved; last checkpoint: {last}); lower learning_rate, try "
            "mixed_precision='no', or check the data", step=step,
            checkpoint=self.last_checkpoint)

    # ================================================================== export
    def _export(self):
        self._check_finite("export")
        return self.save_adapters()

    def _summary(self, exported, *, start_step: int, pairs_per_s, seconds: float) -> dict:
        summary = {k: self.last_metrics.get(k) for k in ("loss", "mse_w", "mse_l")}
        summary.update(steps=self.global_step, output_dir=str(self.out), win=exported[0],
                       lose=exported[1], last_checkpoint=self.last_checkpoint,
                       pairs_per_s=pairs_per_s, seconds=seconds)
        if self.is_main:
            from ..fsio import atomic_write_json

            atomic_write_json(self.out / SUMMARY_FILE, json_safe(summary))
        return summary

    def save_adapters(self) -> tuple[str, str]:
        """Write ``pos_lora_unet/`` and ``neg_lora_unet/`` (each atomically)."""
        cfg = self.config
        win, lose = self.out / WIN_DIR, self.out / LOSE_DIR
        if self.is_main:
            from .export import model_card_hook, pipeline_class

            write_pair_adapters(self.out, self.denoiser, pipeline_class(self.family),
                                self.adapter.denoiser_name)
            model_card_hook(self.out, {"kind": "pair", "family": self.family,
                                       "base_model": cfg.model, "config": cfg.to_dict(),
                                       "step": self.global_step})
        self.accelerator.wait_for_everyone()
        return str(win), str(lose)

    def close(self) -> None:
        """Release the output directory (also done at the end of ``train``)."""
        nets = getattr(self, "networks", None)
        if nets is not None:
            nets.close()
        super().close()

    def __repr__(self) -> str:
        c = self.config
        return (f"<AdapterTrainer {getattr(self, 'family', '?')} rank={c.lora_rank} "
                f"step={getattr(self, 'global_step', 0)}/{getattr(self, 'max_steps', '?')}>")


def train_adapters(config) -> dict:
    """``AdapterTrainer(config).train()``: train DD-CPP's winning and losing adapters."""
    return AdapterTrainer(config).train()
