"""The training steps `bench step` times.

* `LadderStep`: one TF-CPP step built from a `StepConfig` (bench/ladder.py), written
  out like the official scripts so every rung runs the same code and differs only in
  the setting it names.
* `TrainerStep`: the library's own `Trainer.train_step` with one rung's settings: what
  `ddspo-fast train` actually runs; with a reference cache (`precompute_reference`),
  the policy-only step of ``TrainConfig.reference_cache``.

Both expose ``__call__(batch) -> loss``, ``last_update_s`` (how long the call's
once-per-optimizer-step part took: unscaling, clipping, the optimizer step and zeroing
the gradients, timed apart between device syncs, so the benchmark can charge it per pair
at a recipe's accumulation), ``denoisers()`` (the modules whose forward calls
`RowCounter` counts), ``facts()`` (the settings read back from the live objects, for the
tests), ``reset()`` after an out-of-memory error and ``close()``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Optional

import torch

from .device import sync
from .ladder import StepConfig

class RowCounter:
    """Counts the rows every forward call of the given denoiser modules receives, by a
    forward pre-hook on each module (registered only inside the ``with`` block)."""

    def __init__(self, modules):
        seen, self.modules = set(), []
        for m in modules:
            if id(m) not in seen:
                seen.add(id(m))
                self.modules.append(m)
        self.rows = 0
        self.calls = 0
        self._handles = []

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += int(x.shape[0])
        self.calls += 1

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def conv_weights_channels_last(module) -> Optional[bool]:
    """Whether the first k x k (k > 1) convolution weight is stored channels_last; None
    without one. bitsandbytes' 8-bit optimizers make every parameter contiguous on each
    step (0.50: ``p.data = p.data.contiguous()``), which undoes channels_last: the
    benchmark reads this after the timed steps to show it."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4 and m.weight.shape[-1] > 1:
            w = m.weight
            return bool(w.is_contiguous(memory_format=torch.channels_last)
                        and not w.is_contiguous())
    return None


class LadderStep:
    """One DDSPO TF-CPP training step configured by a `StepConfig`."""

    def __init__(self, cfg: StepConfig, spec, model_dir: Path, device: torch.device, *,
                 beta: float, lr: float, seed: int = 0):
        from ..models import load_adapter

        self.cfg, self.device, self.beta = cfg, device, float(beta)
        self.adapter = a = load_adapter(str(model_dir), spec.family, components=("denoiser",),
                                        device=device, dtype=torch.float32)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}.get(cfg.precision,
                                                                         torch.float16)
        self.frozen_dtype = {"fp16-scaler": torch.float16,
                             "bf16": torch.bfloat16}.get(cfg.precision, torch.float32)
        den = a.denoiser
        a.prepare_denoiser(den, channels_last=cfg.channels_last)
        self.switch = None
        if cfg.lora_rank is not None:
            from ..train.lora import POLICY, AdapterSwitch, add_policy_lora

            add_policy_lora(den, cfg.lora_rank, cfg.lora_rank, cfg.lora_targets, seed)
            den.requires_grad_(False)
            for name, p in den.named_parameters():
                if f".{POLICY}." in name:
                    p.requires_grad_(True)
                    p.data = p.data.float()
                else:
                    p.data = p.data.to(self.frozen_dtype)
            self.switch = AdapterSwitch(den)
            self.switch.set([POLICY])
            self.reference = den
        else:
            den.requires_grad_(True)
            self.reference = copy.deepcopy(den).to(self.frozen_dtype).requires_grad_(False).eval()
        if cfg.fp8_compute:  # the policy's matmuls (a full fine-tune's reference keeps its own)
            from ..train.quantize import enable_fp8_compute

            enable_fp8_compute(den, device)
        if cfg.gradient_checkpointing:
            den.enable_gradient_checkpointing()
        den.train()
        if cfg.compile:
            den.compile()
            if self.reference is not den:
                self.reference.compile()
        self.policy = den
        self.trainable = [p for p in den.parameters() if p.requires_grad]
        self.lr = lr
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision.startswith("fp16"))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.skipped = 0           # optimizer steps the GradScaler skipped (inf/NaN grads)
        self.last_update_s: Optional[float] = None

    def _optimizer(self):
        params, lr, opt = self.trainable, self.lr, self.cfg.optimizer
        if opt == "adamw8bit":
            import bitsandbytes as bnb   # the ladder skips this rung when it is missing

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-2)
        if opt == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=lr, weight_decay=1e-2, clip_threshold=1.0,
                             scale_parameter=False, relative_step=False)
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)

    def denoisers(self):
        return [self.policy, self.reference]

    @contextlib.contextmanager
    def _reference_mode(self):
        if self.switch is None:
            yield
        else:
            with self.switch.use(None):
                yield

    def _cond(self, cond: dict) -> dict:
        # Stored embeddings are fp16; the scripts' text encoders run in the frozen dtype.
        dt = self.autocast_dtype or torch.float32
        return {k: v.to(self.device, dt) if v.is_floating_point() else v.to(self.device)
                for k, v in cond.items()}

    def forward_loss(self, batch: dict) -> torch.Tensor:
        """Draw (t, eps), run the policy and the reference, return the loss (no backward)."""
        import ddspo_fast as df

        from .script_loss import script_loss, script_loss_from_reference

        a, dev, cfg = self.adapter, self.device, self.cfg
        x_w = batch["latent_w"].to(dev).float()
        x_l = batch["latent_l"].to(dev).float()
        x_w = a.prepare_input(x_w, channels_last=cfg.channels_last)
        x_l = a.prepare_input(x_l, channels_last=cfg.channels_last)
        c, cn = self._cond(batch["cond"]), self._cond(batch["neg_cond"])
        cat = lambda *ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
        n = x_w.shape[0]
        t = a.sample_timesteps(n, device=dev, generator=self.generator)
        noise = torch.randn(x_w.shape, generator=self.generator, device=dev)
        xt_w, xt_l = a.add_noise(x_w, noise, t), a.add_noise(x_l, noise, t)
        x2, t2 = torch.cat([xt_w, xt_l]), torch.cat([t, t])
        with _autocast(dev, self.autocast_dtype):
            model_pred = a.predict(self.policy, x2, t2, cat(c, c))
            with torch.no_grad(), self._reference_mode():
                if cfg.reference_rows == 4:   # the scripts' two reference calls
                    target = a.predict(self.reference, x2, t2, cat(c, cn))
                    ref_pred = a.predict(self.reference, x2, t2, cat(c, c))
                else:                         # one call on the stacked 3 rows
                    ref_out = a.predict(self.reference, torch.cat([xt_w, xt_l, xt_l]),
                                        torch.cat([t, t, t]), cat(c, c, cn))
        if cfg.loss == "script":
            if cfg.reference_rows == 4:
                return script_loss(model_pred, ref_pred, target, self.beta)[0]
            return script_loss_from_reference(model_pred, ref_out, self.beta)[0]
        if cfg.reference_rows == 4:
            return df.ddspo_loss(model_pred, ref_pred, target, self.beta)[0]
        return df.ddspo_loss_from_reference(model_pred, ref_out, self.beta)[0]

    def __call__(self, batch: dict) -> torch.Tensor:
        loss = self.forward_loss(batch)
        self.scaler.scale(loss).backward()
        # what follows runs once per optimizer step (the scripts' sync_gradients branch)
        sync(self.device)
        tic = time.perf_counter()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if before is not None and self.scaler.get_scale() < before:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        self.last_update_s = time.perf_counter() - tic
        return loss.detach()

    @contextlib.contextmanager
    def no_checkpointing(self):
        """Gradient checkpointing off inside the block (to count the objective's FLOPs)."""
        on = bool(getattr(self.policy, "is_gradient_checkpointing", False))
        if on:
            self.policy.disable_gradient_checkpointing()
        try:
            yield
        finally:
            if on:
                self.policy.enable_gradient_checkpointing()

    def objective_passes(self, batch: dict) -> None:
        """The work the objective needs, once: policy forward + backward on the 2 rows of
        each pair (no recompute) and one reference forward on its 3 rows. Gradients are
        dropped; nothing is stepped."""
        a, dev = self.adapter, self.device
        x_w = batch["latent_w"].to(dev).float()
        c, cn = self._cond(batch["cond"]), self._cond(batch["neg_cond"])
        n = x_w.shape[0]
        t = a.sample_timesteps(n, device=dev,
                               generator=torch.Generator(device=dev).manual_seed(1))
        cat = lambda *ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
        with self.no_checkpointing(), _autocast(dev, self.autocast_dtype):
            out = a.predict(self.policy, torch.cat([x_w, x_w]), torch.cat([t, t]), cat(c, c))
            out.float().square().mean().backward()
            with torch.no_grad(), self._reference_mode():
                a.predict(self.reference, torch.cat([x_w] * 3), torch.cat([t] * 3), cat(c, c, cn))
        self.optimizer.zero_grad(set_to_none=True)

    def facts(self) -> dict:
        """The settings as the live objects have them (not as the config asked)."""
        ref_param = next(p for n, p in self.reference.named_parameters()
                         if self.switch is None or ".ddspo." not in n)
        return {
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
            "grad_scaler": self.scaler.is_enabled(),
            "frozen_dtype": str(ref_param.dtype).replace("torch.", ""),
            "optimizer": type(self.optimizer).__name__,
            "gradient_checkpointing": bool(getattr(self.policy, "is_gradient_checkpointing", False)),
            "channels_last": bool(conv_weights_channels_last(self.policy)),
            "compiled": _is_compiled(self.policy),
            "lora": self.switch is not None,
        }

    def weights_channels_last(self) -> Optional[bool]:
        return conv_weights_channels_last(self.policy)

    def reset(self):
        """After an out-of-memory error mid-step: drop grads, restart the scaler."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.scaler.is_enabled())

    def close(self):
        del self.policy, self.reference, self.optimizer, self.adapter, self.trainable


def _train_config(cfg: StepConfig, spec, model_dir: Path, data_dir: Path, output_dir: Path,
                  device: torch.device, *, beta: float, lr: float, batch_size: int,
                  max_steps: int, seed: int, reference_cache: Optional[Path] = None,
                  defaults: bool = False):
    """The TrainConfig of a library row: one rung's settings (with `defaults`, the
    library's own defaults for the speed settings instead, mixed_precision "auto"; `cfg`
    then only gives the task: LoRA rank and targets), TF32 off like every rung, nothing
    written during the timed steps."""
    from ..train import TrainConfig

    if cfg.reference_rows != 3 or cfg.loss != "fused":
        raise ValueError("TrainerStep: the library's step has 3 reference rows and the "
                         "fused loss; give it such a rung's config")
    mp = {"bf16": "bf16", "fp32": "no"}.get(cfg.precision, "fp16")
    speed = dict(optimizer=cfg.optimizer, mixed_precision=mp,
                 gradient_checkpointing=cfg.gradient_checkpointing,
                 channels_last=cfg.channels_last, compile=cfg.compile)
    return TrainConfig(model=str(model_dir), data=str(data_dir), family=spec.family,
                       output_dir=str(output_dir), beta=beta, learning_rate=lr,
                       weight_decay=1e-2, batch_size=batch_size, max_steps=max_steps,
                       **({} if defaults else speed),
                       lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                       lora_targets=list(cfg.lora_targets) if cfg.lora_targets else None,
                       allow_tf32=False, device=str(device), seed=seed, log_every=10**9,
                       checkpoint_every=0, tensorboard=False, progress=False,
                       save_final=False, overwrite=True,
                       reference_cache=str(reference_cache) if reference_cache else None)


def precompute_reference(cfg: StepConfig, spec, model_dir: Path, data_dir: Path,
                         cache_dir: Path, device: torch.device, *, beta: float, lr: float,
                         batch_size: int, draws: int, seed: int = 0,
                         defaults: bool = False) -> dict:
    """`ddspo-fast precompute` of the benchmark's dataset, `draws` draws per pair, with the
    settings the cached row trains with. Returns the precompute's summary (its
    ``ms_per_pair_draw`` times the frozen networks only) plus ``wall_seconds`` (loading and
    hashing the weights included)."""
    from ..train.precompute import precompute

    # output_dir: the cached row's (the precompute writes nothing there)
    tc = _train_config(cfg, spec, model_dir, data_dir,
                       cache_dir.parent / f"run-{spec.family}-refcache", device, beta=beta,
                       lr=lr, batch_size=batch_size, max_steps=draws, seed=seed,
                       defaults=defaults)
    tic = time.perf_counter()
    out = precompute(tc, cache_dir, draws, batch_size=batch_size, progress=False)
    out["wall_seconds"] = time.perf_counter() - tic
    return out


class _UpdateClock:
    """Times the once-per-optimizer-step part of a step whose code is not ours to split
    (the Trainer's): from the start of the first wrapped `start` call to the end of the
    wrapped `stop` call, each end bracketed by a device sync."""

    def __init__(self, device: torch.device):
        self.device, self.t0, self.last = device, None, None

    def start(self, fn):
        def timed(*a, **k):
            if self.t0 is None:
                sync(self.device)
                self.t0 = time.perf_counter()
            return fn(*a, **k)
        return timed

    def stop(self, fn):
        def timed(*a, **k):
            out = fn(*a, **k)
            if self.t0 is not None:
                sync(self.device)
                self.last, self.t0 = time.perf_counter() - self.t0, None
            return out
        return timed


class TrainerStep:
    """`Trainer.train_step` with the settings of one rung (or, with `defaults`, the
    library's own defaults for the device), on the benchmark's batch stored as a dataset
    (`archs.write_dataset`, one batch per epoch). Step i uses draw ``i mod draws`` of each
    pair (draws.py), so a live row and the cached row see the same (t, eps) step by step.
    With `reference_cache` (made by `precompute_reference` with ``draws`` draws) the step
    runs the policy only. The optimizer-step part (clipping through zeroing the
    gradients) is timed apart by wrapping the Trainer's accelerator / optimizer methods."""

    def __init__(self, cfg: StepConfig, spec, model_dir: Path, data_dir: Path, workdir: Path,
                 device: torch.device, *, beta: float, lr: float, batch_size: int,
                 draws: int, reference_cache: Optional[Path] = None, seed: int = 0,
                 defaults: bool = False, tag: str = "live"):
        from ..train import Trainer

        tc = _train_config(cfg, spec, model_dir, data_dir, workdir / f"run-{spec.family}-{tag}",
                           device, beta=beta, lr=lr, batch_size=batch_size,
                           max_steps=draws if reference_cache else 10**9, seed=seed,
                           reference_cache=reference_cache, defaults=defaults)
        self.cfg, self.draws, self.calls = cfg, draws, 0
        self.trainer = tr = Trainer(tc)
        self.skipped = 0
        self._clock = clock = _UpdateClock(device)
        tr.accelerator.clip_grad_norm_ = clock.start(tr.accelerator.clip_grad_norm_)
        tr.optimizer.step = clock.start(tr.optimizer.step)
        tr.optimizer.zero_grad = clock.stop(tr.optimizer.zero_grad)

    @property
    def last_update_s(self) -> Optional[float]:
        return self._clock.last

    def __call__(self, batch: dict) -> torch.Tensor:
        epoch = self.calls % self.draws
        self.calls += 1
        return self.trainer.train_step(dict(batch, draw_epoch=epoch))["loss"]

    def facts(self) -> dict:
        """The speed settings as the live Trainer has them."""
        tr = self.trainer
        return {"mixed_precision": tr.accelerator.mixed_precision,
                "optimizer": type(getattr(tr.optimizer, "optimizer", tr.optimizer)).__name__,
                "gradient_checkpointing": bool(getattr(tr.policy, "is_gradient_checkpointing",
                                                       False)),
                "channels_last": bool(conv_weights_channels_last(tr.policy)),
                "compiled": _is_compiled(tr.policy)}

    def denoisers(self):
        # a cached full fine-tune holds no reference model (None)
        return [m for m in (self.trainer.policy, self.trainer.reference) if m is not None]

    def weights_channels_last(self) -> Optional[bool]:
        return conv_weights_channels_last(self.trainer.policy)

    def reset(self):
        self.trainer.optimizer.zero_grad(set_to_none=True)

    def close(self):
        # accelerate keeps references to prepared models / optimizers: release them
        self.trainer.accelerator.free_memory()
        if self.trainer.ref_cache is not None:
            self.trainer.ref_cache.close()
        del self.trainer
