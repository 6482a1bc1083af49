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

A run never loses work silently: it holds a lock on output_dir, refuses a directory
holding an earlier run unless told to resume or overwrite it (``outdir.py``), stops on a
non-finite loss or gradient before it can write non-finite weights (``nonfinite.py``),
verifies checkpoints before resuming from them and refuses a resume that changes what
defines the run (``checkpoint.py``, ``config.RUN_DEFINING``).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from ..fsio import DirLock, explain_disk_full, free_bytes, require_free_space
from . import checkpoint as ckpt
from . import outdir
from .config import RUN_DEFINING, TrainConfig, as_config, resume_differences, weight_dtype
from .errors import NonFiniteError, ResumeMismatchError
from .export import model_card_hook, write_lora
from .lora import (LOSE, POLICY, WIN, AdapterSwitch, add_policy_lora, find_pair_dirs,
                   load_named_adapter, policy_lora_state)
from .metrics import MetricsAccumulator, MetricsWriter, json_safe, peak_memory
from .nonfinite import NonFiniteGuard, all_finite, grad_norm
from .optim import build_optimizer, build_scheduler
from .pairs import PairInputs, PairLoss, make_inputs, needs_text_encoder, pair_mode
from .randcond import PromptSampler
from .runtime import (check_device_available, default_device_type, human_count,
                      training_threads)

log = logging.getLogger("ddspo_fast.train")



def _reset_accelerate_singletons() -> None:
    # accelerate keeps mixed precision and accumulation settings in process-wide
    # singletons; a second Trainer in one process (notebooks, tests, sweeps) must not
    # inherit or clash with the first one's. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _as_config(config) -> TrainConfig:
    return as_config(TrainConfig, config)


class Trainer:
    """Preference fine-tuning of one denoiser. See ``TrainConfig`` for every setting.

    Attributes: ``policy`` (the trainable denoiser, unwrapped), ``reference`` (the frozen
    reference: the same module as ``policy`` when training LoRA, whose adapters are then
    switched off for reference calls), ``adapter`` (the model family adapter),
    ``dataset``, ``optimizer``, ``scheduler``, ``accelerator``, ``global_step``.
    """

    def __init__(self, config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = cfg = _as_config(config)
        cfg.check_ready()
        check_device_available(cfg.device)
        self.mixed_precision = cfg.resolved_mixed_precision(default_device_type(cfg.device))
        if cfg.device and cfg.device.startswith("cuda:") and torch.cuda.is_available() \
                and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(torch.device(cfg.device))
        _reset_accelerate_singletons()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum, mixed_precision=self.mixed_precision,
            cpu=(cfg.device is not None and cfg.device.partition(":")[0] == "cpu"),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=cfg.ddp_find_unused_parameters)])
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # The reference calls, adapter switching and checkpoints here address the
            # unsharded module; under FSDP/DeepSpeed they would bypass the sharding.
            raise ValueError(f"distributed_type: {self.accelerator.distributed_type.value} is "
                             "not supported by this trainer; launch with DDP "
                             "(accelerate launch --multi_gpu) and use lora_rank, "
                             "gradient_checkpointing and optimizer='adamw8bit' to save memory")
        self.device = self.accelerator.device
        if cfg.device is not None and self.device.type != cfg.device.partition(":")[0]:
            raise ValueError(f"device: {cfg.device!r} asked for, but accelerate placed this "
                             f"run on {self.device}")
        if self.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"mixed_precision: 'fp16' needs a CUDA device (this run is on "
                             f"{self.device.type}); use 'bf16' or 'no'")
        self.is_main = self.accelerator.is_main_process
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = weight_dtype(self.mixed_precision)

        self._lock: DirLock | None = None
        outdir.check_apart(cfg)  # before the lock: a refused run leaves nothing behind
        self._acquire_lock()
        try:
            if self.is_main:
                outdir.check_reuse(cfg.output_dir, cfg.resume, cfg.overwrite)
                if cfg.overwrite:
                    outdir.clear_run(cfg.output_dir)
            self._setup_data()
            self._setup_models()
            self._setup_optim()
            self._setup_state()
        except BaseException:
            self.close()
            raise

    # ================================================================== output_dir lock
    def _acquire_lock(self) -> None:
        """One writer per output_dir: a second run fails at once, naming the holder."""
        if self.is_main and self._lock is None:
            self._lock = DirLock(self.config.output_dir, what="output_dir").acquire()

    def close(self) -> None:
        """Release the lock on output_dir (``train()`` does this when it ends)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ================================================================== setup
    def _setup_data(self) -> None:
        from ..data import open_dataset
        from ..data.provenance import check_encoders
        from ..models import detect_family

        cfg = self.config
        self.family = cfg.family or detect_family(cfg.model)
        self.dataset = open_dataset(cfg.data, family=self.family)
        if len(self.dataset) == 0:
            raise ValueError(f"data: {cfg.data} holds no pairs")
        check_encoders(self.dataset, cfg.model, self.family, cfg.allow_encoder_mismatch)
        world = self.accelerator.num_processes
        self.batches_per_epoch = (len(self.dataset) // world) // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch_size: {cfg.batch_size} pairs x {world} processes is more "
                             f"than the {len(self.dataset)} pairs in {cfg.data}")
        self.prompt_sampler = (PromptSampler(cfg.rand_cond_prompts,
                                             cfg.seed * 1000 + self.accelerator.process_index)
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
        from ..models import get_family, load_adapter

        cfg = self.config
        lora = cfg.lora_rank is not None
        comps = ("denoiser", "text") if self.need_text else ("denoiser",)
        # Frozen weights (text encoders, LoRA base, reference copy) are stored in the
        # autocast dtype; the trained weights stay fp32.
        self.adapter = a = load_adapter(cfg.model, self.family, components=comps,
                                        device=self.device,
                                        dtype=self.weight_dtype if lora else torch.float32,
                                        text_dtype=get_family(self.family).text_dtype_for(
                                            self.weight_dtype, cfg.text_encoder_dtype))
        if cfg.timestep_sampling is not None and cfg.timestep_sampling not in a.timestep_schemes():
            raise ValueError(f"timestep_sampling: expected one of {a.timestep_schemes()} for "
                             f"{self.family}, got {cfg.timestep_sampling!r}")
        if cfg.flow_shift is not None and not a.flow:
            raise ValueError(f"flow_shift: {self.family} is not a flow-matching family (a shift "
                             "applies to SD3, SANA and FLUX only)")
        a.set_train_guidance(cfg.guidance_scale)
        self.pair_loss = PairLoss(a, cfg.objective, cfg.pair, cfg.beta, cfg.backend,
                                  loss_type=cfg.loss_type)
        den = a.denoiser
        if cfg.attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as e:
                raise ImportError("attention='xformers' needs xformers: pip install xformers "
                                  "(or use attention='sdpa')") from e
            den.enable_xformers_memory_efficient_attention()
        a.prepare_denoiser(den, channels_last=cfg.channels_last)
        dd_cpp = self.mode == "dd_cpp"
        cached = self.ref_cache is not None  # no reference, no pair adapters
        self.ref_switch = None
        if lora:
            add_policy_lora(den, cfg.lora_rank, cfg.lora_alpha,
                            cfg.lora_targets or a.lora_targets, cfg.seed)
            if dd_cpp and not cached:
                self._load_pair_adapters(den)
            self.switch = AdapterSwitch(den)
            self.switch.set([POLICY])
            den.requires_grad_(False)
            for name, p in den.named_parameters():
                if f".{POLICY}." in name:
                    p.requires_grad_(True)
                    p.data = p.data.float()
            self.reference = None if cached else den
        elif cached:
            self.switch = None
            den.requires_grad_(True)
            self.reference = None
        else:
            self.switch = None
            ref = copy.deepcopy(den).to(self.weight_dtype).requires_grad_(False).eval()
            if dd_cpp:
                self._load_pair_adapters(ref)
                self.ref_switch = AdapterSwitch(ref)
                self.ref_switch.set(None)
                ref.requires_grad_(False)
            den.requires_grad_(True)
            self.reference = ref
        if cfg.gradient_checkpointing:
            den.enable_gradient_checkpointing()
        den.train()
        if cfg.compile:
            den.compile()
            if self.reference is not None and self.reference is not den:
                self.reference.compile()
        self.policy = den
        self.trainable = [p for p in den.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in den.named_parameters() if p.requires_grad]
        self._check_latent_shape()

    def _check_latent_shape(self) -> None:
        """Latents the model cannot take are refused before training, not found later."""
        want = tuple(self.adapter.latent_shape())
        have = getattr(self.dataset, "latent_shape", None)
        if have is None:
            have = tuple(self.dataset[0]["latent_w"].shape)
        if tuple(have) != want:
            raise ValueError(f"data: {self.config.data} holds latents of shape {list(have)} "
                             f"but the model {self.config.model} takes {list(want)} "
                             "(channels, height, width); prepare the pairs with this model "
                             "(ddspo-fast prepare --model ...)")

    def _load_pair_adapters(self, module) -> None:
        win, lose = find_pair_dirs(self.config.pair_lora)
        prefix = self.adapter.denoiser_name
        load_named_adapter(module, win, WIN, prefix)
        load_named_adapter(module, lose, LOSE, prefix)
        for name, p in module.named_parameters():
            if f".{WIN}." in name or f".{LOSE}." in name:
                p.requires_grad_(False)
                p.data = p.data.to(self.weight_dtype)

    def _setup_optim(self) -> None:
        cfg = self.config
        opt = build_optimizer(self.trainable, cfg)
        self._policy_ddp = self.accelerator.prepare_model(self.policy)
        self.optimizer = self.accelerator.prepare_optimizer(opt)
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it
        # once per process).
        self.scheduler = build_scheduler(opt, cfg)

    def _setup_state(self) -> None:
        cfg = self.config
        rank = self.accelerator.process_index
        self.global_step = 0
        self.micro_step = 0
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + rank)
        random.seed(cfg.seed + rank)
        self.metrics = MetricsAccumulator(self.device)
        self.guard = NonFiniteGuard(self.device,
                                    check_grads=self.accelerator.scaler is None)
        self.last_metrics: dict = {}
        self.last_checkpoint: str | None = None
        self._resumed_from = None
        if cfg.resume == "latest":
            path = ckpt.find_intact(cfg.output_dir, trust=cfg.trust_checkpoint)  # skips damaged ones
            if path is not None:
                self.load_checkpoint(path, verified=True)
        elif cfg.resume:
            path = Path(cfg.resume)
            if not (path / ckpt.STATE_FILE).is_file():
                raise ValueError(f"resume: {path} is not a checkpoint directory")
            self.load_checkpoint(path)

    # ================================================================== data
    def batches(self) -> Iterator[dict]:
        """This process's micro-batches, starting from ``micro_step`` (resumable)."""
        from torch.utils.data import DataLoader, Subset

        from ..data import collate_pairs

        cfg, acc = self.config, self.accelerator
        bs, per_epoch = cfg.batch_size, self.batches_per_epoch
        epoch, offset = divmod(self.micro_step, per_epoch)
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.dataset), generator=g).tolist()
            mine = perm[acc.process_index::acc.num_processes][: per_epoch * bs]
            loader = DataLoader(Subset(self.dataset, mine[offset * bs:]), batch_size=bs,
                                shuffle=False, drop_last=True, collate_fn=collate_pairs,
                                num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, offset = epoch + 1, 0

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
        return self.adapter.predict(self._policy_ddp, x, t, c)

    def _reference_fn(self, x, t, c):
        if self.switch is not None:
            with self.switch.use(None):
                return self.adapter.predict(self.policy, x, t, c)
        return self.adapter.predict(self.reference, x, t, c)

    def _phi(self, name):
        def run(x, t, c):
            sw = self.switch if self.switch is not None else self.ref_switch
            mod = self.policy if self.switch is not None else self.reference
            with sw.use([name]):
                return self.adapter.predict(mod, x, t, c)
        return run

    def compute_loss(self, batch: dict):
        """Forward only: ``(loss, stats, inputs)`` for one micro-batch (no backward)."""
        inp = self.make_inputs(batch)
        if self.ref_cache is not None:
            frozen = self.ref_cache.lookup(inp.ids, inp.draws, device=self.device)
            loss, stats = self.pair_loss.cached_loss(self._policy_fn, inp, frozen)
            return loss, stats, inp
        phi = (self._phi(WIN), self._phi(LOSE)) if self.pair_loss.mode == "dd_cpp" else (None, None)
        loss, stats = self.pair_loss(self._policy_fn, self._reference_fn, inp, *phi)
        return loss, stats, inp

    # ================================================================== step
    def train_step(self, batch: dict) -> dict:
        """One micro-batch: forward, backward and, on an accumulation boundary, the
        optimizer / LR-schedule step. Returns detached tensors (no host sync):
        ``loss``, ``implicit_acc``, ``model_mse``, ``ref_mse``, ``margin``, ``tau``."""
        acc, cfg = self.accelerator, self.config
        with acc.accumulate(self._policy_ddp):
            with acc.autocast():
                loss, stats, inp = self.compute_loss(batch)
            acc.backward(loss)
            self.guard.see_loss(loss)
            skip = False
            if acc.sync_gradients:
                if cfg.max_grad_norm is not None:
                    norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                else:
                    norm = grad_norm(self.trainable) if self.guard.check_grads else None
                bad = self.guard.end_step(self.global_step + 1, norm)
                if cfg.on_nonfinite == "skip":
                    skip = self._should_skip(bad)
            if not skip:
                self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        if acc.sync_gradients:
            self.global_step += 1
        tau = inp.tau
        self.metrics.add(loss, stats, tau, inp.mixed, n_pairs=len(batch["latent_w"]))
        return {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()},
                "tau": tau.detach()}

    def _should_skip(self, bad: torch.Tensor) -> bool:
        """on_nonfinite='skip': one host sync per step (all processes agree)."""
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.float(), reduction="sum") > 0
        if not bool(bad):
            return False
        step = self.global_step + 1
        self.guard.skipped.append(step)
        self.guard.forget()
        log.warning("step %d: non-finite loss or gradient; its update is skipped "
                    "(on_nonfinite='skip')", step)
        return True

    def _check_finite(self, where: str) -> None:
        """Raise ``NonFiniteError`` if a non-finite loss/gradient was seen (one sync)."""
        step = self.guard.first_bad_step(self.accelerator)
        if step == 0 and where in ("checkpoint", "export") and not all_finite(self.trainable):
            step = self.global_step
        if step:
            cfg = self.config
            kept = (f"the newest checkpoint, {self.last_checkpoint}, predates it and is "
                    "finite" if self.last_checkpoint else "no checkpoint was written")
            raise NonFiniteError(
                f"non-finite loss or gradient at optimizer step {step} (found at step "
                f"{self.global_step}, before the {where}); training stopped and nothing "
                f"non-finite was saved: {kept}. Lower learning_rate (now "
                f"{cfg.learning_rate:g}) or beta, keep max_grad_norm set, or set "
                "on_nonfinite='skip'.", step=step, checkpoint=self.last_checkpoint)

    # ================================================================== loop
    def train(self) -> dict:
        """Train to ``max_steps``; returns a summary (``loss``, ``steps``, ...).

        Raises ``NonFiniteError`` (non-finite loss/gradient, on_nonfinite='stop'),
        ``fsio.DiskFullError`` (no space left while writing a named path) and
        ``fsio.LockedError`` (another run holds output_dir); every finite checkpoint and
        the earlier final weights are kept in each case.
        """
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        self._acquire_lock()
        threads_before = torch.get_num_threads()
        self.threads = training_threads(cfg.threads, _local_processes(acc))
        torch.set_num_threads(self.threads)
        writer = bar = None
        start_step = self.global_step
        try:
            if self.is_main:
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                cfg.to_yaml(Path(cfg.output_dir) / outdir.CONFIG_FILE)
                writer = MetricsWriter(cfg.output_dir, cfg.tensorboard,
                                       self.global_step if self._resumed_from else None)
                print(self.banner(), file=sys.stderr, flush=True)
                self._warn_if_short_of_space()
                if self.global_step >= cfg.max_steps:
                    log.warning("nothing to train: resumed from %s at step %d, and max_steps "
                                "is %d", self._resumed_from, self.global_step, cfg.max_steps)
            bar = tqdm(total=cfg.max_steps, initial=min(self.global_step, cfg.max_steps),
                       desc="train", disable=not (self.is_main and cfg.progress),
                       dynamic_ncols=True)
            t_log, pairs_total, t_start = time.perf_counter(), 0, time.perf_counter()
            batches = self.batches()
            while self.global_step < cfg.max_steps:
                before = self.global_step
                self.train_step(next(batches))
                if self.global_step == before:
                    continue
                bar.update(1)
                if self.global_step % cfg.log_every == 0 or self.global_step == cfg.max_steps:
                    now = time.perf_counter()
                    rec = self._collect(now - t_log)
                    pairs_total += rec["pairs"]
                    t_log = now
                    if writer is not None:
                        writer.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['implicit_acc']:.2f}")
                    self._check_finite("log")
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            bar.close()
            acc.wait_for_everyone()
            final = None
            if cfg.save_final:
                final = self.save_final()
            elapsed = time.perf_counter() - t_start
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            torch.set_num_threads(threads_before)
            self.close()
        summary = {k: self.last_metrics.get(k) for k in ("loss", "implicit_acc", "margin",
                                                         "model_mse_w", "model_mse_l")}
        summary.update(steps=self.global_step, trained_steps=self.global_step - start_step,
                       output_dir=cfg.output_dir, final=final,
                       last_checkpoint=self.last_checkpoint,
                       skipped_steps=list(self.guard.skipped),
                       pairs_per_s=pairs_total / elapsed if elapsed > 0 else None)
        return summary

    def banner(self) -> str:
        """What this run is about to do: device, precision, what trains, on how much data."""
        cfg, acc = self.config, self.accelerator
        n_train = sum(p.numel() for p in self.trainable)
        n_all = sum(p.numel() for p in self.policy.parameters())
        what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank is not None else "full fine-tune"
        precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[
            self.mixed_precision]
        if cfg.mixed_precision == "auto":
            precision += " (mixed_precision auto)"
        per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        epochs = cfg.max_steps * cfg.grad_accum / self.batches_per_epoch
        threads = getattr(self, "threads", torch.get_num_threads())
        lines = [
            f"ddspo-fast train: {self.adapter.describe()} {cfg.objective} "
            f"({self.mode.replace('_', '-').upper()}), beta {cfg.beta:g}, "
            f"lr {cfg.learning_rate:g} -> {cfg.output_dir}",
            f"  device {self.device} x {acc.num_processes} process(es), {precision}, "
            f"{threads} CPU thread(s)",
            f"  trainable {human_count(n_train)} of {human_count(n_all)} denoiser parameters "
            f"({what})",
            f"  data {len(self.dataset)} pairs; {acc.num_processes} x batch {cfg.batch_size} x "
            f"accum {cfg.grad_accum} = {per_step} pairs/step; {cfg.max_steps} steps = "
            f"{epochs:.2f} epochs",
        ]
        if self._resumed_from:
            lines.append(f"  resuming from {self._resumed_from} (step {self.global_step})")
        return "\n".join(lines)

    def _collect(self, elapsed: float) -> dict:
        acc = self.accelerator
        rec = {"step": self.global_step}
        rec.update(self.metrics.collect(acc))
        pairs = self.metrics.pairs * acc.num_processes
        rec.update(lr=self.scheduler.get_last_lr()[0], pairs=pairs,
                   pairs_per_s=pairs / elapsed if elapsed > 0 else None)
        if self.config.on_nonfinite == "skip":
            rec["skipped_steps"] = len(self.guard.skipped)
        rec.update(peak_memory(self.device))
        self.metrics.reset()
        self.last_metrics = rec
        return rec

    # ================================================================== disk space
    def _checkpoint_bytes(self) -> int:
        """A lower bound of a checkpoint's size: the weights and the optimizer's tensors."""
        n = sum(p.numel() * 4 for p in self.trainable)
        for st in self.optimizer.state_dict().get("state", {}).values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return n

    def _export_bytes(self) -> int:
        """A lower bound of the final export: the trained weights in fp32."""
        if self.config.lora_rank is not None:
            return sum(p.numel() * 4 for p in self.trainable)
        return sum(p.numel() * 4 for p in self.policy.parameters())

    def _warn_if_short_of_space(self) -> None:
        cfg = self.config
        need = self._export_bytes() if cfg.save_final else 0
        if cfg.checkpoint_every:
            need += sum(p.numel() * 4 * 3 for p in self.trainable)  # weights + Adam moments
        free = free_bytes(cfg.output_dir)
        if free < need:
            log.warning("output_dir %s has %.1f MiB free; a checkpoint and the final weights "
                        "need about %.1f MiB: free space before the run gets there",
                        cfg.output_dir, free / 2**20, need / 2**20)

    # ================================================================== checkpoints
    def save_checkpoint(self) -> str:
        """Atomic checkpoint of everything needed to continue exactly. Refused (with
        ``NonFiniteError``) when a non-finite value was seen: a finite checkpoint is never
        replaced or pruned in favour of a non-finite one."""
        cfg, acc = self.config, self.accelerator
        self._check_finite("checkpoint")
        step = self.global_step
        if self.is_main:
            require_free_space(ckpt.final_path(cfg.output_dir, step), self._checkpoint_bytes(),
                               "the checkpoint")
        named = dict(self.policy.named_parameters())
        state = {"global_step": step, "micro_step": self.micro_step,
                 "num_processes": acc.num_processes, "last_metrics": json_safe(self.last_metrics),
                 "config": cfg.to_dict()}
        path = ckpt.save(
            cfg.output_dir, step, acc,
            trainable=lambda: {n: named[n].detach().to("cpu").contiguous()
                               for n in self.trainable_names},
            optimizer=self.optimizer, scheduler=self.scheduler, state=state,
            rng=ckpt.capture_rng(self.generator, self.prompt_sampler),
            keep=cfg.checkpoints_keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    def load_checkpoint(self, path, *, verified: bool = False) -> None:
        """Continue from checkpoint ``path``: verify its checksums (unless ``verified``),
        refuse a change of what defines the run, then load and apply the new settings."""
        path, acc = Path(path), self.accelerator
        trust = self.config.trust_checkpoint
        if not verified:
            ckpt.verify(path, trust=trust)
        state = ckpt.read_state(path)
        if state.get("num_processes", 1) != acc.num_processes:
            raise ValueError(f"resume: {path} was written by {state['num_processes']} "
                             f"processes, this run has {acc.num_processes}; the data order "
                             "would not continue exactly")
        changed = resume_differences(state.get("config") or {}, self.config)
        for name, old, new in changed:
            if name in RUN_DEFINING:
                raise ResumeMismatchError(
                    f"{name}: the checkpoint {path} was trained with {name}={old!r}, this run "
                    f"asks for {new!r}; a resumed run keeps the settings that define it (start "
                    f"a new output_dir to train with another {name})", field=name)
        got = ckpt.load(path, acc.process_index, verified=True, state=state, trust=trust)
        named = dict(self.policy.named_parameters())
        missing = [n for n in self.trainable_names if n not in got.trainable]
        if missing:
            raise ValueError(f"resume: {path} does not match this model/config (no "
                             f"{missing[0]})")
        with torch.no_grad():
            for n in self.trainable_names:
                p = named[n]
                p.data = p.data.float() if p.dtype != torch.float32 else p.data
                p.copy_(got.trainable[n].to(p.device, torch.float32))
        self.optimizer.load_state_dict(got.optimizer)
        self.scheduler.load_state_dict(got.scheduler)
        if got.rng is not None:
            ckpt.restore_rng(got.rng, self.generator, self.prompt_sampler)
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self.last_metrics = state.get("last_metrics") or {}
        self.accelerator.step = 0  # checkpoints sit on accumulation boundaries
        self._resumed_from = str(path)
        self.last_checkpoint = str(path)
        if changed:
            self._apply_changed_settings({name for name, _, _ in changed})
            for name, old, new in changed:
                log.warning("resume: %s changed from %r to %r (applied)", name, old, new)

    def _apply_changed_settings(self, names: set) -> None:
        """The optimizer and LR schedule state just loaded carry the checkpoint's
        hyper-parameters; put this config's in their place."""
        cfg = self.config
        groups = self.optimizer.param_groups
        for g in groups:
            if "weight_decay" in names and "weight_decay" in g:
                g["weight_decay"] = cfg.weight_decay
            if names & {"adam_beta1", "adam_beta2"} and isinstance(g.get("betas"), tuple):
                g["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
            if "adam_epsilon" in names and isinstance(g.get("eps"), float):
                g["eps"] = cfg.adam_epsilon
        sched = self.scheduler
        if names & {"learning_rate", "lr_scheduler", "lr_warmup_steps", "max_steps"}:
            # The schedule's shape comes from this config (its lambdas were built from it);
            # its base rate and the current rate follow it from the resumed step on.
            sched.base_lrs = [cfg.learning_rate for _ in groups]
            for g in groups:
                g["initial_lr"] = cfg.learning_rate
            lambdas = getattr(sched, "lr_lambdas", None)
            if lambdas is not None:
                for g, f, base in zip(groups, lambdas, sched.base_lrs):
                    g["lr"] = base * f(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in groups]

    # ================================================================== export
    def save_final(self) -> str | None:
        """Write the trained pipeline (full fine-tune) or LoRA weights to output_dir, like a
        checkpoint: into a temp dir, then renamed over the earlier export."""
        cfg, acc = self.config, self.accelerator
        out = cfg.output_dir
        self._check_finite("export")
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

    def __repr__(self) -> str:
        c = self.config
        return (f"<Trainer {self.family} objective={c.objective} pair={c.pair} "
                f"lora_rank={c.lora_rank} step={self.global_step}/{c.max_steps}>")


def _local_processes(accelerator) -> int:
    """Processes of this run on this machine (they share its cores)."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    return int(env) if env and env.isdigit() else accelerator.num_processes
