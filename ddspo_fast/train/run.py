"""``TrainingRun``: the life of one training run, whatever it trains.

The preference trainer (``trainer.Trainer``: TF-CPP, DD-CPP, Diffusion-DPO) and the
adapter trainer of ``train-pair`` (``adapter_trainer.AdapterTrainer``) are both a
``TrainingRun``; each says only what differs: how its networks are built, its loss, what
it records per step and what it exports. Everything else is here, once:

* the accelerator (mixed precision from ``precision.Precision``, TF32, accelerate's
  process-wide singletons reset for a second run in one process) and the refusal of the
  distributed modes the networks are not wrapped for (FSDP, DeepSpeed);
* the output directory: apart from the inputs, one writer (``fsio.DirLock`` from
  construction until ``train()`` returns or ``close()``), no silent reuse;
* ``batches``: a seeded permutation per epoch, split over the data-parallel ranks, so a
  resumed run continues with exactly the batches it would have seen;
* the loop: ``grad_accum`` micro-batches per optimizer step, logging every ``log_every``
  steps (the only host syncs), a checkpoint every ``checkpoint_every`` steps;
* the non-finite guard (``nonfinite.py``): a non-finite loss or gradient stops the run
  before anything non-finite is written (or skips that step where the config says so);
* checkpoints (``checkpoint.py``): atomic, verified before a resume, resumed from the
  newest intact one (``resume='latest'``), refused when a setting that defines the run
  (the config class's ``RUN_DEFINING``) changed.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..fsio import DirLock, free_bytes, require_free_space
from . import checkpoint as ckpt
from . import outdir
from .config import as_config, resume_differences
from .errors import ResumeMismatchError, UnsupportedDistributedError
from .metrics import json_safe, peak_memory
from .nonfinite import NonFiniteGuard, all_finite, grad_norm
from .precision import Precision, nbytes, store_trainable
from .runtime import check_device_available, default_device_type, training_threads

log = logging.getLogger("ddspo_fast.train")


def reset_accelerate_singletons() -> None:
    """accelerate keeps mixed precision and accumulation settings in process-wide
    singletons; a second run in one process (notebooks, tests, sweeps) must not inherit
    or clash with the first one's. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def local_processes(accelerator) -> int:
    """Processes of this run on this machine (they share its cores)."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    return int(env) if env and env.isdigit() else accelerator.num_processes


class TrainingRun:
    """One run: construct it (validates, claims output_dir, builds everything and
    resumes when asked), then ``train()``.

    Attributes every run has: ``config``, ``precision``, ``accelerator``, ``device``,
    ``dataset``, ``policy`` (the trained module, unwrapped), ``trainable`` /
    ``trainable_names``, ``optimizer``, ``scheduler``, ``global_step``, ``micro_step``,
    ``max_steps``, ``last_metrics``, ``last_checkpoint``.
    """

    config_cls: type = None          # the run's config dataclass
    config_file: str = outdir.CONFIG_FILE
    checkpoint_kind: Optional[str] = None   # recorded in (and required of) checkpoints
    progress_desc = "train"
    prompt_sampler = None
    shardable = False                # whether an FSDP2 launch may shard its networks

    def __init__(self, config):
        self.config = cfg = as_config(self.config_cls, config)
        cfg.check_ready()
        self._lock: DirLock | None = None
        self._setup_accelerator()
        try:
            self._claim_output_dir()
            self._setup()
            self._setup_state()
        except BaseException:
            self.close()
            raise

    # ================================================================== accelerator
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        cfg = self.config
        check_device_available(cfg.device)
        self.precision = Precision.from_config(cfg, default_device_type(cfg.device))
        self.mixed_precision = self.precision.mixed_precision
        if cfg.device and cfg.device.startswith("cuda:") and torch.cuda.is_available() \
                and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(torch.device(cfg.device))
        reset_accelerate_singletons()
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum, mixed_precision=self.mixed_precision,
            cpu=(cfg.device is not None and cfg.device.partition(":")[0] == "cpu"),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=getattr(cfg, "ddp_find_unused_parameters", False))])
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise UnsupportedDistributedError(
                "distributed_type: DEEPSPEED is not supported by this trainer; launch with "
                "DDP (accelerate launch --multi_gpu) or shard with FSDP2 (accelerate launch "
                "--config_file configs/accelerate_fsdp2.yaml)")
        # FSDP2 (sharding.py): the policy, and a full fine-tune's frozen copy, sharded over
        # the processes; None for DDP and one-process runs
        from . import sharding

        if sharding.is_fsdp_launch(acc) and not self.shardable:
            raise UnsupportedDistributedError(
                f"distributed_type: FSDP is not supported by {type(self).__name__} (a "
                "sharded launch trains with ddspo-fast train); launch it with DDP "
                "(accelerate launch --multi_gpu)")
        self.shard_options = sharding.launch_options(acc)
        if self.shard_options is not None:
            sharding.check_config(cfg, self.precision.mixed_precision)
        self.device = acc.device
        if cfg.device is not None and self.device.type != cfg.device.partition(":")[0]:
            raise ValueError(f"device: {cfg.device!r} asked for, but accelerate placed this "
                             f"run on {self.device}")
        if self.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"mixed_precision: 'fp16' needs a CUDA device (this run is on "
                             f"{self.device.type}); use 'bf16' or 'no'")
        self.is_main = acc.is_main_process
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # frozen weights and conditions are stored / fed in this dtype
        self.weight_dtype = self.precision.compute
        from .networks import data_parallel

        self.dp_size, self.dp_rank = data_parallel(acc)

    # ================================================================== output_dir
    def _claim_output_dir(self) -> None:
        """Apart from the inputs (checked before the lock: a refused run leaves nothing
        behind), locked, and not silently reusing an earlier run (``_check_reuse``)."""
        cfg = self.config
        outdir.check_apart(cfg)
        if self.is_main:
            out = Path(cfg.output_dir)
            if out.exists() and not out.is_dir():
                raise ValueError(f"output_dir: {out} exists and is not a directory")
            self._acquire_lock()
            self._check_reuse()
        self.accelerator.wait_for_everyone()

    def _check_reuse(self) -> None:
        """Main process, lock held: refuse (or clear, with overwrite) an earlier run."""
        cfg = self.config
        outdir.check_reuse(cfg.output_dir, cfg.resume, cfg.overwrite)
        if cfg.overwrite:
            outdir.clear_run(cfg.output_dir)

    def _acquire_lock(self) -> None:
        """One writer per output_dir: a second run fails at once, naming the holder."""
        if self.is_main and self._lock is None:
            self._lock = DirLock(self.config.output_dir, what="output_dir").acquire()

    def close(self) -> None:
        """Release the lock on output_dir (``train()`` does this when it ends)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ================================================================== setup
    def _setup(self) -> None:
        """Data, networks, optimizer: the subclass's."""
        raise NotImplementedError

    def _open_data(self) -> None:
        """The dataset (of the model's family, recorded encoders checked) and how many
        micro-batches each data-parallel rank gets per epoch."""
        from ..data import open_dataset
        from ..data.provenance import check_encoders
        from ..models import detect_family

        cfg = self.config
        self.family = cfg.family or detect_family(cfg.model)
        self.dataset = open_dataset(cfg.data, family=self.family)
        if len(self.dataset) == 0:
            raise ValueError(f"data: {cfg.data} holds no pairs")
        check_encoders(self.dataset, cfg.model, self.family, cfg.allow_encoder_mismatch)
        world = self.dp_size
        self.batches_per_epoch = (len(self.dataset) // world) // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch_size: {cfg.batch_size} pairs x {world} processes is more "
                             f"than the {len(self.dataset)} pairs in {cfg.data}")

    def _use_networks(self, nets) -> None:
        """Adopt the networks the subclass built (``networks.Networks``), wrap them for
        data parallelism and build the optimizer over their trainable parameters."""
        from .optim import build_optimizer, build_scheduler

        self.networks = nets
        self.policy = nets.policy
        self.trainable = nets.trainable
        self.trainable_names = nets.trainable_names
        shard = None
        if self.shard_options is not None:
            from functools import partial

            from .sharding import device_mesh
            from .sharding import shard as shard_module

            shard = partial(shard_module, family=self.family, mesh=device_mesh(self.device),
                            mixed_precision=self.mixed_precision, options=self.shard_options)
        self._policy_ddp = nets.wrap(self.accelerator, shard=shard)
        self.trainable = nets.trainable  # a sharded policy's are its shards
        opt = build_optimizer(self.trainable, self.config)
        self.optimizer = self.accelerator.prepare_optimizer(opt)
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it
        # once per process).
        self.scheduler = build_scheduler(opt, self.config.replace(max_steps=self.max_steps))

    def _new_metrics(self):
        raise NotImplementedError

    def _setup_state(self) -> None:
        cfg = self.config
        rank = self.dp_rank
        self.global_step = 0
        self.micro_step = 0
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + rank)
        random.seed(cfg.seed + rank)
        self.metrics = self._new_metrics()
        self.guard = NonFiniteGuard(self.device, check_grads=self.accelerator.scaler is None)
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

        cfg = self.config
        bs, per_epoch = cfg.batch_size, self.batches_per_epoch
        epoch, offset = divmod(self.micro_step, per_epoch)
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.dataset), generator=g).tolist()
            mine = perm[self.dp_rank::self.dp_size][: per_epoch * bs]
            yield from DataLoader(Subset(self.dataset, mine[offset * bs:]), batch_size=bs,
                                  shuffle=False, drop_last=True, collate_fn=collate_pairs,
                                  num_workers=cfg.num_workers,
                                  pin_memory=self.device.type == "cuda")
            epoch, offset = epoch + 1, 0

    # ================================================================== step
    def compute_loss(self, batch: dict):
        """Forward only, for one micro-batch: a tuple whose first item is the loss."""
        raise NotImplementedError

    def _record(self, batch: dict, out) -> dict:
        """Add one micro-batch's results to the metrics; return them detached."""
        raise NotImplementedError

    def train_step(self, batch: dict) -> dict:
        """One micro-batch: forward, backward and, on an accumulation boundary, the
        (clipped) optimizer and LR-schedule step. Returns detached tensors (no host
        sync)."""
        acc, cfg = self.accelerator, self.config
        sharded = self.shard_options is not None
        # sharded: no accumulation without sync (it would keep whole gradients per process)
        with acc.accumulate(*(() if sharded else (self._policy_ddp,))):
            with acc.autocast():
                out = self.compute_loss(batch)
            loss = out[0]
            acc.backward(loss)
            self.guard.see_loss(loss)
            skip = False
            if acc.sync_gradients:
                if cfg.max_grad_norm is not None and sharded:
                    from .sharding import clip_grad_norm_

                    norm = clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                elif cfg.max_grad_norm is not None:
                    norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                else:
                    norm = grad_norm(self.trainable) if self.guard.check_grads else None
                bad = self.guard.end_step(self.global_step + 1, norm)
                if getattr(cfg, "on_nonfinite", "stop") == "skip":
                    skip = self._should_skip(bad)
            if not skip:
                self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        if acc.sync_gradients:
            self.global_step += 1
        return self._record(batch, out)

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
        """Raise the run's ``NonFiniteError`` if a non-finite loss/gradient was seen (one
        sync), or, before a checkpoint or export, a trained weight is not finite."""
        step = self.guard.first_bad_step(self.accelerator)
        if self.shard_options is not None:
            from .sharding import all_finite as finite  # each process holds a shard
        else:
            finite = all_finite
        if step == 0 and where in ("checkpoint", "export") and not finite(self.trainable):
            step = self.global_step
        if step:
            raise self._nonfinite_error(step, where)

    def _nonfinite_error(self, step: int, where: str) -> Exception:
        raise NotImplementedError

    # ================================================================== loop
    def train(self) -> dict:
        """Train to ``max_steps``, export, and return a summary.

        Raises ``NonFiniteError`` (non-finite loss/gradient), ``fsio.DiskFullError`` (no
        space left while writing a named path) and ``fsio.LockedError`` (another run
        holds output_dir); every finite checkpoint and the earlier exported weights are
        kept in each case.
        """
        from tqdm.auto import tqdm

        from .metrics import MetricsWriter

        cfg, acc = self.config, self.accelerator
        self._acquire_lock()
        threads_before = torch.get_num_threads()
        self.threads = training_threads(getattr(cfg, "threads", None), local_processes(acc))
        torch.set_num_threads(self.threads)
        writer = bar = None
        start_step = self.global_step
        try:
            if self.is_main:
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                cfg.to_yaml(Path(cfg.output_dir) / self.config_file)
                writer = MetricsWriter(cfg.output_dir, cfg.tensorboard,
                                       self.global_step if self._resumed_from else None)
                self._on_start()
                self._warn_if_short_of_space()
                if self.global_step >= self.max_steps:
                    log.warning("nothing to train: resumed from %s at step %d, and max_steps "
                                "is %d", self._resumed_from, self.global_step, self.max_steps)
            bar = tqdm(total=self.max_steps, initial=min(self.global_step, self.max_steps),
                       desc=self.progress_desc, disable=not (self.is_main and cfg.progress),
                       dynamic_ncols=True)
            t_log, pairs_total, t_start = time.perf_counter(), 0, time.perf_counter()
            batches = self.batches()
            while self.global_step < self.max_steps:
                before = self.global_step
                self.train_step(next(batches))
                if self.global_step == before:
                    continue
                bar.update(1)
                if self.global_step % cfg.log_every == 0 or self.global_step == self.max_steps:
                    now = time.perf_counter()
                    rec = self._collect(now - t_log)
                    pairs_total += rec["pairs"]
                    t_log = now
                    if writer is not None:
                        writer.write(rec)
                    bar.set_postfix(self._postfix(rec))
                    self._check_finite("log")
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            bar.close()
            acc.wait_for_everyone()
            exported = self._export()
            elapsed = time.perf_counter() - t_start
            summary = self._summary(exported, start_step=start_step,
                                    pairs_per_s=pairs_total / elapsed if elapsed > 0 else None,
                                    seconds=elapsed)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            torch.set_num_threads(threads_before)
            self.close()
        return summary

    def _on_start(self) -> None:
        """Main process, before the first step (the preference trainer prints a banner)."""

    def _postfix(self, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}"}

    def _export(self):
        """After the last step: write what the run made; returns what the summary needs."""
        raise NotImplementedError

    def _summary(self, exported, *, start_step: int, pairs_per_s, seconds: float) -> dict:
        raise NotImplementedError

    def _collect(self, elapsed: float) -> dict:
        """The log record of the window since the last one (one host sync)."""
        rec = {"step": self.global_step}
        rec.update(self.metrics.collect(self.accelerator))
        pairs = self.metrics.pairs * self.dp_size
        rec.update(lr=self.scheduler.get_last_lr()[0], pairs=pairs,
                   pairs_per_s=pairs / elapsed if elapsed > 0 else None)
        if getattr(self.config, "on_nonfinite", "stop") == "skip":
            rec["skipped_steps"] = len(self.guard.skipped)
        rec.update(peak_memory(self.device))
        self.metrics.reset()
        self.last_metrics = rec
        return rec

    # ================================================================== disk space
    def _checkpoint_bytes(self) -> int:
        """A lower bound of a checkpoint's size: the weights and the optimizer's tensors."""
        n = nbytes(self.trainable, self.precision.trainable)
        for st in self.optimizer.state_dict().get("state", {}).values():
            n += nbytes(v for v in st.values() if torch.is_tensor(v))
        return n

    def _export_bytes(self) -> int:
        """A lower bound of the final export: the trained weights in fp32."""
        return nbytes(self.trainable, torch.float32)

    def _warn_if_short_of_space(self) -> None:
        cfg = self.config
        need = self._export_bytes() if getattr(cfg, "save_final", True) else 0
        if cfg.checkpoint_every:  # weights + two Adam moments
            need += 3 * nbytes(self.trainable, self.precision.trainable)
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
                 "num_processes": self.dp_size, "last_metrics": json_safe(self.last_metrics),
                 "config": cfg.to_dict()}
        if self.checkpoint_kind is not None:
            state.update(kind=self.checkpoint_kind, max_steps=self.max_steps)
        if self.shard_options is not None:  # each process writes its own shards
            from .sharding import local_optimizer, local_trainable

            path = ckpt.save_sharded(
                cfg.output_dir, step, acc,
                shards=lambda: local_trainable(self.policy, self.trainable_names),
                optimizer=lambda: local_optimizer(self.policy, self.optimizer),
                scheduler=self.scheduler, state=state,
                rng=ckpt.capture_rng(self.generator, self.prompt_sampler),
                keep=cfg.checkpoints_keep)
            self.last_checkpoint = str(path)
            return self.last_checkpoint
        path = ckpt.save(
            cfg.output_dir, step, acc,
            trainable=lambda: {n: named[n].detach().to("cpu", self.precision.trainable)
                               .contiguous() for n in self.trainable_names},
            optimizer=self.optimizer, scheduler=self.scheduler, state=state,
            rng=ckpt.capture_rng(self.generator, self.prompt_sampler),
            keep=cfg.checkpoints_keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    def load_checkpoint(self, path, *, verified: bool = False) -> None:
        """Continue from checkpoint ``path``: verify its checksums (unless ``verified``),
        refuse a change of what defines the run, then load and apply the new settings."""
        path = Path(path)
        trust = self.config.trust_checkpoint
        if not verified:
            ckpt.verify(path, trust=trust)
        state = ckpt.read_state(path)
        kind = state.get("kind")
        if kind != self.checkpoint_kind:
            raise ValueError(f"resume: {path} is not a {self.checkpoint_kind or 'train'} "
                             f"checkpoint (it was written by {kind or 'train'})")
        if state.get("num_processes", 1) != self.dp_size:
            raise ValueError(f"resume: {path} was written by {state['num_processes']} "
                             f"processes, this run has {self.dp_size}; the data order "
                             "would not continue exactly")
        changed = resume_differences(state.get("config") or {}, self.config)
        for name, old, new in changed:
            if name in self.config.RUN_DEFINING:
                raise ResumeMismatchError(
                    f"{name}: the checkpoint {path} was trained with {name}={old!r}, this run "
                    f"asks for {new!r}; a resumed run keeps the settings that define it (start "
                    f"a new output_dir to train with another {name})", field=name)
        if (self.shard_options is not None) != ckpt.is_sharded(path):
            raise ValueError(
                f"resume: {path} was written by a {'' if ckpt.is_sharded(path) else 'not '}"
                f"sharded (FSDP2) run, this run is {'' if self.shard_options else 'not '}"
                "sharded; resume with the launch that wrote it (or export it with "
                "ddspo-fast export and start a new run from the export)")
        if self.shard_options is not None:
            got = self._load_shards(path, state)
        else:
            got = ckpt.load(path, self.accelerator.process_index, verified=True, state=state,
                            trust=trust)
            named = dict(self.policy.named_parameters())
            for n in self.trainable_names:
                if n not in got.trainable or got.trainable[n].shape != named[n].shape:
                    raise ValueError(f"resume: {path} does not match this model/config (no "
                                     f"{n} of shape {tuple(named[n].shape)}; lora_rank or "
                                     "lora_targets changed?)")
            store_trainable(self.policy, self.precision.trainable)
            with torch.no_grad():
                for n in self.trainable_names:
                    p = named[n]
                    p.copy_(got.trainable[n].to(p.device, p.dtype))
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

    def _load_shards(self, path: Path, state: dict):
        """A sharded run's resume: this process's shards of the trained weights and of the
        optimizer state, into the sharded policy (same number of processes only)."""
        from .sharding import load_local_optimizer, load_local_trainable

        got = ckpt.load_sharded(path, self.accelerator.process_index,
                                self.accelerator.num_processes, verified=True, state=state)
        try:
            load_local_trainable(self.policy, got.trainable, self.trainable_names)
            load_local_optimizer(self.policy, self.optimizer, got.optimizer)
        except ValueError as e:
            raise ValueError(f"resume: {path} does not match this model/config: {e}") from None
        return got

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
        if names & {"learning_rate", "lr_scheduler", "lr_warmup_steps", "max_steps",
                    "num_epochs"}:
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
