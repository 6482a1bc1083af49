"""``Trainer``: DDSPO / Diffusion-DPO fine-tuning on accelerate.

    import ddspo_fast as df
    summary = df.Trainer(df.TrainConfig(model=..., data=..., output_dir=...)).train()

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` pairs per process.
Per micro-batch the text encoders run at most once (on every prompt the step needs,
stacked), the policy once on 2n rows and the frozen networks once per role on their
stacked rows (see ``pairs.py``); nothing syncs with the host except every
``log_every`` steps (and on checkpoint steps). With ``reference_cache`` the frozen
networks' outputs are read from a precomputed cache (``refcache.py``) and only the
policy runs.

The run itself (lock, loop, non-finite guard, checkpoints, resume) is ``run.TrainingRun``;
the networks are built by ``networks.build_preference_networks``; what is left here is
what a preference run does: its data and frozen-output cache, its loss and metrics, its
banner and its export.
"""

from __future__ import annotations

import copy

import torch

from ..fsio import require_free_space
from . import outdir
from .config import TrainConfig
from .errors import NonFiniteError
from .export import model_card_hook, write_lora
from .lora import LOSE, POLICY, WIN, find_pair_dirs, load_named_adapter, policy_lora_state
from .metrics import MetricsAccumulator
from .pairs import PairInputs, make_inputs, needs_text_encoder, pair_mode
from .precision import nbytes
from .randcond import PromptSampler
from .run import TrainingRun
from .runtime import human_count
from .step import build_step


class Trainer(TrainingRun):
    """Preference fine-tuning of one denoiser. See ``TrainConfig`` for every setting.

    Attributes: ``policy`` (the trainable denoiser, unwrapped), ``reference`` (the frozen
    reference: the same module as ``policy`` when training LoRA, whose adapters are then
    switched off for reference calls), ``networks`` (both, and how they are called),
    ``adapter`` (the model family adapter), ``dataset``, ``optimizer``, ``scheduler``,
    ``accelerator``, ``global_step``.
    """

    config_cls = TrainConfig
    shardable = True

    # ================================================================== setup
    def _setup(self) -> None:
        self.max_steps = self.config.max_steps
        self._setup_data()
        self._setup_models()

    def _setup_data(self) -> None:
        cfg = self.config
        self._open_data()
        self.prompt_sampler = (PromptSampler(cfg.rand_cond_prompts,
                                             cfg.seed * 1000 + self.dp_rank)
                               if cfg.rand_cond_prompts else None)
        self.mode = pair_mode(cfg.objective, cfg.pair)
        mixing = self.prompt_sampler is not None
        self.ref_cache = None
        if cfg.reference_cache:  # refcache.py: the frozen networks' outputs, precomputed
            from .refcache import open_for_training

            # compared in the precision this run resolved ('auto' -> bf16 / no)
            resolved = cfg.replace(mixed_precision=self.mixed_precision)
            self.ref_cache = open_for_training(resolved, self.family, self.dataset,
                                               self.batches_per_epoch)
        self.need_text = needs_text_encoder(self.mode, mixing, self.dataset,
                                            policy_only=self.ref_cache is not None)

    def _setup_models(self) -> None:
        from ..models import family_names, get_family, load_adapter

        cfg, prec = self.config, self.precision
        lora = cfg.lora_rank is not None
        sharded = self.shard_options is not None
        comps = ("denoiser", "text") if self.need_text else ("denoiser",)
        # Frozen weights (text encoders, LoRA base, reference copy) are stored in
        # precision.frozen; the trained weights in precision.trainable (fp32). A sharded
        # denoiser is loaded on the CPU and reaches the device shard by shard.
        self.adapter = a = load_adapter(cfg.model, self.family, components=comps,
                                        device="cpu" if sharded else self.device,
                                        dtype=prec.frozen if lora else prec.trainable,
                                        text_dtype=get_family(self.family).text_dtype_for(
                                            prec.frozen, cfg.text_encoder_dtype))
        if sharded and self.device.type != "cpu":
            for name, comp in a.pipe.components.items():
                if isinstance(comp, torch.nn.Module) and name != a.denoiser_name:
                    comp.to(self.device)
            a.device = self.device
        self.step = build_step(cfg, a, prec, cached=self.ref_cache is not None,
                               pair_adapters=self._load_pair_adapters)
        self.pair_loss = self.step.pair_loss
        nets = self.step.networks
        self.reference = nets.reference_module
        self.switch = nets.switch
        self._check_latent_shape()
        self._use_networks(nets)

    def _check_latent_shape(self) -> None:
        """Latents the model cannot take are refused before training, not found later."""
        want = tuple(self.adapter.latent_shape())
        have = getattr(self.dataset, "latent_shape", None)
        if have is None:
            have = tuple(self.dataset[0]["latent_w"].shape)
        if tuple(have) != want:
            raise ValueError(f"data: {self.config.data} holds latents of shape {list(have)} "
                             f"but the model {self.config.model} takes "
                             f"{self.adapter.describe_latents(want)}; prepare the pairs with "
                             "this model (ddspo-fast prepare --model ...)")

    def _load_pair_adapters(self, module) -> None:
        """DD-CPP: the winning and losing adapters of ``pair_lora`` on ``module``."""
        win, lose = find_pair_dirs(self.config.pair_lora)
        prefix = self.adapter.denoiser_name
        load_named_adapter(module, win, WIN, prefix)
        load_named_adapter(module, lose, LOSE, prefix)

    def _new_metrics(self):
        return MetricsAccumulator(self.device)

    def make_inputs(self, batch: dict) -> PairInputs:
        """Batch -> the tensors of one step (see ``pairs.make_inputs``)."""
        ps = self.prompt_sampler
        return make_inputs(batch, self.adapter, self.mode, self.config, device=self.device,
                           dtype=self.weight_dtype,
                           epoch=self.micro_step // self.batches_per_epoch,
                           prompt_pool=ps.pool if ps is not None else None,
                           policy_only=self.ref_cache is not None)

    # ================================================================== networks
    def _policy_fn(self, x, t, c):
        return self.step.policy_fn(x, t, c)

    def _reference_fn(self, x, t, c):
        return self.step.reference_fn(x, t, c)

    def _phi(self, name):
        return self.step.phi(name)

    def compute_loss(self, batch: dict):
        """Forward only: ``(loss, stats, inputs)`` for one micro-batch (no backward)."""
        inp = self.make_inputs(batch)
        if self.ref_cache is not None:
            frozen = self.ref_cache.lookup(inp.ids, inp.draws, device=self.device)
            loss, stats = self.step.cached_loss(inp, frozen)
            return loss, stats, inp
        loss, stats = self.step.loss(inp)
        return loss, stats, inp

    def _record(self, batch: dict, out) -> dict:
        loss, stats, inp = out
        tau = inp.tau
        self.metrics.add(loss, stats, tau, inp.mixed, n_pairs=len(batch["latent_w"]))
        return {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()},
                "tau": tau.detach()}

    def _nonfinite_error(self, step: int, where: str) -> Exception:
        cfg = self.config
        kept = (f"the newest checkpoint, {self.last_checkpoint}, predates it and is "
                "finite" if self.last_checkpoint else "no checkpoint was written")
        return NonFiniteError(
            f"non-finite loss or gradient at optimizer step {step} (found at step "
            f"{self.global_step}, before the {where}); training stopped and nothing "
            f"non-finite was saved: {kept}. Lower learning_rate (now "
            f"{cfg.learning_rate:g}) or beta, keep max_grad_norm set, or set "
            "on_nonfinite='skip'.", step=step, checkpoint=self.last_checkpoint)

    # ================================================================== loop
    def _on_start(self) -> None:
        import sys

        print(self.banner(), file=sys.stderr, flush=True)

    def _postfix(self, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "acc": f"{rec['implicit_acc']:.2f}"}

    def _export(self):
        return self.save_final() if self.config.save_final else None

    def _summary(self, exported, *, start_step: int, pairs_per_s, seconds: float) -> dict:
        summary = {k: self.last_metrics.get(k) for k in ("loss", "implicit_acc", "margin",
                                                         "model_mse_w", "model_mse_l")}
        summary.update(steps=self.global_step, trained_steps=self.global_step - start_step,
                       output_dir=self.config.output_dir, final=exported,
                       last_checkpoint=self.last_checkpoint,
                       skipped_steps=list(self.guard.skipped), pairs_per_s=pairs_per_s)
        return summary

    def banner(self) -> str:
        """What this run is about to do: device, precision, what trains, on how much data."""
        cfg = self.config
        n_train = sum(p.numel() for p in self.trainable)
        n_all = sum(p.numel() for p in self.policy.parameters())
        what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank is not None else "full fine-tune"
        precision = self.precision.label()
        per_step = cfg.batch_size * cfg.grad_accum * self.dp_size
        epochs = cfg.max_steps * cfg.grad_accum / self.batches_per_epoch
        threads = getattr(self, "threads", torch.get_num_threads())
        lines = [
            f"ddspo-fast train: {self.adapter.describe()} {cfg.objective} "
            f"({self.mode.replace('_', '-').upper()}), beta {cfg.beta:g}, "
            f"lr {cfg.learning_rate:g} -> {cfg.output_dir}",
            f"  device {self.device} x {self.dp_size} process(es)"
            f"{', sharded (FSDP2)' if self.shard_options is not None else ''}, {precision}, "
            f"{threads} CPU thread(s)",
            f"  trainable {human_count(n_train)} of {human_count(n_all)} denoiser parameters "
            f"({what})",
            f"  data {len(self.dataset)} pairs; {self.dp_size} x batch {cfg.batch_size} x "
            f"accum {cfg.grad_accum} = {per_step} pairs/step; {cfg.max_steps} steps = "
            f"{epochs:.2f} epochs",
        ]
        if self._resumed_from:
            lines.append(f"  resuming from {self._resumed_from} (step {self.global_step})")
        return "\n".join(lines)

    def _export_bytes(self) -> int:
        """A lower bound of the final export: the trained weights in fp32."""
        if self.config.lora_rank is not None:
            return nbytes(self.trainable, torch.float32)
        return nbytes(self.policy.parameters(), torch.float32)

    # ================================================================== export
    def save_final(self) -> str | None:
        """Write the trained pipeline (full fine-tune) or LoRA weights to output_dir, like a
        checkpoint: into a temp dir, then renamed over the earlier export."""
        cfg, acc = self.config, self.accelerator
        out = cfg.output_dir
        self._check_finite("export")
        if self.shard_options is not None:
            return self._save_final_sharded()
        if self.is_main:
            require_free_space(out, self._export_bytes(), "the final weights")
            den = self.policy
            den = getattr(den, "_orig_mod", den)
            if cfg.lora_rank is not None:
                # with the adapter's config as metadata: load_lora_weights applies the
                # trained alpha (without it diffusers assumes alpha = rank)
                lora = policy_lora_state(den)
                outdir.publish_export(out, lambda tmp: write_lora(
                    tmp, type(self.adapter.pipe), self.adapter.denoiser_name, lora,
                    den.peft_config[POLICY]))
            else:
                export = copy.deepcopy(den).to("cpu", torch.float32)
                if cfg.gradient_checkpointing and hasattr(export, "disable_gradient_checkpointing"):
                    export.disable_gradient_checkpointing()
                outdir.publish_export(out,
                                      lambda tmp: self.adapter.save_pipeline(export, str(tmp)))
            model_card_hook(out, {"kind": "pipeline" if cfg.lora_rank is None else "lora",
                                  "family": self.family, "base_model": cfg.model,
                                  "config": cfg.to_dict(), "step": self.global_step})
        acc.wait_for_everyone()
        return out

    def _save_final_sharded(self) -> str:
        """``save_final`` of a sharded run: the trained weights gathered whole onto the main
        process's CPU (a collective), written there as a checkpoint's export is."""
        from .export import export_writer
        from .sharding import full_state

        cfg, out = self.config, self.config.output_dir
        tensors = full_state(self.policy)
        if self.is_main:
            require_free_space(out, self._export_bytes(), "the final weights")
            kind = "pipeline" if cfg.lora_rank is None else "lora"
            outdir.publish_export(out, export_writer(cfg, self.family, cfg.model, kind, tensors,
                                                     "the run's final weights"))
            model_card_hook(out, {"kind": kind, "family": self.family, "base_model": cfg.model,
                                  "config": cfg.to_dict(), "step": self.global_step})
        self.accelerator.wait_for_everyone()
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"<Trainer {self.family} objective={c.objective} pair={c.pair} "
                f"lora_rank={c.lora_rank} step={self.global_step}/{c.max_steps}>")
