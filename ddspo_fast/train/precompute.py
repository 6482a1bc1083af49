"""Precompute a reference cache: the frozen networks, in inference mode, over every pair x
``draws`` draws (format in ``refcache.py``).

    from ddspo_fast.train import TrainConfig
    from ddspo_fast.train.precompute import precompute
    precompute(TrainConfig(model=..., data=..., objective=..., seed=...), "cache/", draws=4)

The settings that change the frozen outputs are read from the same ``TrainConfig`` the
training run will use (model, data, objective, pair / pair_lora, seed, mixed_precision,
timestep density, mixing, channels_last, attention); everything else in it is ignored.

Each shard (one draw of one block of pairs) is computed in fixed batches of pairs and
written atomically, so a killed precompute resumes where it stopped and, with the same
batch size, writes a bit-identical cache. Under ``accelerate launch`` the shards are
split over the processes. On CUDA an out-of-memory batch is halved and retried.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..fsio import DirLock, atomic_write
from . import refcache as rc
from .config import TrainConfig, as_config
from .outdir import INPUT_FIELDS, check_apart
from .pairs import PairLoss, make_inputs, needs_text_encoder, pair_mode
from .precision import Precision, store_frozen


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class _Frozen:
    """The frozen networks of one precompute: reference (and DD-CPP's phi_w / phi_l)."""

    def __init__(self, cfg, family: str, mode: str, need_text: bool, device, shard_options=None):
        from ..models import get_family, load_adapter
        from .lora import LOSE, WIN, AdapterSwitch, find_pair_dirs, load_named_adapter
        from .quantize import quantize_base

        self.dtype = Precision.from_config(cfg, torch.device(device).type).frozen
        comps = ("denoiser", "text") if need_text else ("denoiser",)
        sharded = shard_options is not None
        # Stored in the autocast dtype, as the trainer stores its frozen copies. A sharded
        # denoiser is loaded on the CPU and reaches the device shard by shard.
        self.adapter = a = load_adapter(cfg.model, family, components=comps,
                                        device="cpu" if sharded else device, dtype=self.dtype,
                                        text_dtype=get_family(family).text_dtype_for(
                                            self.dtype, cfg.text_encoder_dtype))
        if sharded and torch.device(device).type != "cpu":
            for name, comp in a.pipe.components.items():
                if isinstance(comp, torch.nn.Module) and name != a.denoiser_name:
                    comp.to(device)
            a.device = torch.device(device)
        a.set_train_guidance(cfg.guidance_scale)
        den = a.denoiser.requires_grad_(False).eval()
        if cfg.attention == "xformers":
            den.enable_xformers_memory_efficient_attention()
        a.prepare_denoiser(den, channels_last=cfg.channels_last)
        quantize_base(den, cfg.base_quantization, compute_dtype=self.dtype)  # as the trainer
        self.den, self.switch = den, None
        if mode == "dd_cpp":
            win, lose = find_pair_dirs(cfg.pair_lora)
            load_named_adapter(den, win, WIN, a.denoiser_name)
            load_named_adapter(den, lose, LOSE, a.denoiser_name)
            den.requires_grad_(False)
            # the pair adapters in the frozen dtype (a quantized base keeps its codes)
            store_frozen([p for n, p in den.named_parameters()
                          if f".{WIN}." in n or f".{LOSE}." in n], self.dtype)
            self.switch = AdapterSwitch(den)
            self.switch.set(None)
        if sharded:
            from .sharding import device_mesh, shard

            shard(den, family, device_mesh(torch.device(device)),
                  mixed_precision=cfg.mixed_precision, options=shard_options)

    def reference(self, x, t, c):
        return self.adapter.predict(self.den, x, t, c)

    def phi(self, name):
        def run(x, t, c):
            with self.switch.use([name]):
                return self.adapter.predict(self.den, x, t, c)
        return run

    def phis(self) -> tuple:
        """DD-CPP's ``(phi_w, phi_l)``; ``(None, None)`` for the other objectives."""
        if self.switch is None:
            return None, None
        from .lora import LOSE, WIN
        return self.phi(WIN), self.phi(LOSE)


def _lock(out: Path) -> DirLock:
    return DirLock(out, "reference cache").acquire()


def _prepare_dir(out: Path, fp: dict, files: dict, *, fields, latent_shape, dtype, ids,
                 pairs_per_shard: Optional[int], default_pps: int) -> dict:
    """The cache's metadata: the existing cache's (checked against this precompute) or a
    new one written now."""
    if (out / rc.META_FILE).is_file():
        meta = rc.read_meta(out)
        if meta["version"] < rc.FORMAT_VERSION:
            raise ValueError(f"out: {out} holds a cache of an earlier version (its shards have "
                             "no checksums); precompute into a new --out")
        diff = rc.mismatch(meta["fingerprint"], fp)
        if diff is not None:
            raise ValueError(f"out: {out} holds a cache made for other settings ({diff}); "
                             "use another --out")
        for key, want in (("fields", list(fields)), ("dtype", dtype),
                          ("latent_shape", [int(s) for s in latent_shape])):
            if meta[key] != want:
                raise ValueError(f"out: {out} holds a cache with {key}={meta[key]!r}, this "
                                 f"precompute makes {want!r}; use another --out")
        if pairs_per_shard is not None and pairs_per_shard != meta["pairs_per_shard"]:
            raise ValueError(f"pairs_per_shard: {out} was started with "
                             f"{meta['pairs_per_shard']}, got {pairs_per_shard}")
        if meta.get("files") != files:  # same contents (checked), new stat records
            meta["files"] = files
            rc.write_meta(out, meta)
        return meta
    stray = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if stray:
        raise ValueError(f"out: {out} is not empty and holds no reference cache "
                         f"({stray[0].name}); use a new directory")
    meta = rc.new_meta(fp, files, fields=fields, latent_shape=latent_shape, dtype=dtype, ids=ids,
                       pairs_per_shard=pairs_per_shard or default_pps)
    rc.write_meta(out, meta)
    return meta


def _frozen_step(cfg, family: str, mode: str, need_text: bool, device, shard_options=None):
    """What one precompute runs per batch: ``(frozen networks, PairLoss, the config with
    one draw per pair, DD-CPP's phis, the autocast context)``."""
    frozen = _Frozen(cfg, family, mode, need_text, device, shard_options=shard_options)
    loss = PairLoss(frozen.adapter, cfg.objective, cfg.pair, cfg.beta, cfg.backend,
                    loss_type=cfg.loss_type)
    one = cfg.replace(timesteps_per_pair=1)  # draw d of a pair = its "epoch" d
    autocast = (torch.autocast(torch.device(device).type, dtype=frozen.dtype)
                if cfg.mixed_precision != "no" else contextlib.nullcontext())
    return frozen, loss, one, frozen.phis(), autocast


def _cache_fields(fr, n: int, fields, dtype: str) -> dict:
    """One batch's frozen outputs (``FrozenOutputs`` of ``n`` pairs) as the cache stores
    them: the reference's row errors in fp32, the targets in the cache's dtype."""
    got = {"r_w": fr.ref_mse[:n], "r_l": fr.ref_mse[n:]}
    if fr.target is not None:
        got.update(target_w=fr.target[0], target_l=fr.target[1])
    return {f: got[f].to("cpu", torch.float32 if f.startswith("r_") else rc.DTYPES[dtype])
            .contiguous() for f in fields}


def _write_shard(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        rc.write_checksum(path, tmp)  # before the shard appears

    atomic_write(path, write)


def precompute(config, out, draws: int, *, dtype: Optional[str] = None,
               batch_size: Optional[int] = None, pairs_per_shard: Optional[int] = None,
               progress: bool = True, process_index: Optional[int] = None,
               num_processes: Optional[int] = None) -> dict:
    """Compute (or finish, or extend to ``draws``) the reference cache at ``out``.

    ``dtype`` (bf16 | fp16 | fp32) stores the targets (default: the autocast dtype of
    ``config.mixed_precision``); ``batch_size`` pairs per forward (default 32 on CUDA,
    8 elsewhere; halved on out-of-memory); ``pairs_per_shard`` the pairs of one shard
    (default: about 256 MiB of targets). ``process_index`` / ``num_processes`` split the
    work by hand (default: accelerate's processes). Returns a summary dict.
    """
    from ..data import collate_pairs, open_dataset
    from ..models import detect_family
    from .randcond import load_prompt_pool

    # The cache being built is no input of its own precompute (a run's YAML names it).
    cfg = as_config(TrainConfig, config).replace(reference_cache=None)
    cfg.check_ready()
    for name, v in (("draws", draws), ("batch_size", batch_size),
                    ("pairs_per_shard", pairs_per_shard)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if dtype is not None and dtype not in rc.DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(rc.DTYPES)}, got {dtype!r}")
    manual = process_index is not None or num_processes is not None
    shard_options = None
    if manual:
        rank, world = int(process_index or 0), int(num_processes or 1)
        if not 0 <= rank < world:
            raise ValueError(f"process_index: expected 0 <= {rank} < num_processes={world}")
        device = torch.device(cfg.device or "cpu")
        barrier = lambda: None  # noqa: E731
    else:
        from accelerate import PartialState

        from .sharding import launch_options

        state = PartialState(cpu=cfg.device == "cpu")
        rank, world = state.process_index, state.num_processes
        device = torch.device(cfg.device) if cfg.device and world == 1 else state.device
        barrier = state.wait_for_everyone
        # an FSDP2 launch: the frozen denoiser sharded over the processes (sharding.py),
        # every forward then a collective of all of them
        shard_options = launch_options(state) if world > 1 else None
    # 'auto' is resolved for this device before anything is fingerprinted, as the trainer
    # resolves it: a cache records the precision it was computed in.
    cfg = cfg.replace(mixed_precision=cfg.resolved_mixed_precision(device.type))
    dtype = dtype or rc.DEFAULT_DTYPE[cfg.mixed_precision]
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision: 'fp16' needs a CUDA device (this run is on "
                         f"{device.type}); use 'bf16' or 'no'")
    is_main = rank == 0
    out = Path(out)
    # before the lock, so a refused run leaves nothing behind; the config's own
    # reference_cache is the cache being written, not an input
    check_apart(cfg, "out", out, [f for f in INPUT_FIELDS if f != "reference_cache"])
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a directory (expected a cache directory)")

    family = cfg.family or detect_family(cfg.model)
    dataset = open_dataset(cfg.data, family=family)
    if len(dataset) == 0:
        raise ValueError(f"data: {cfg.data} holds no pairs")
    mode = pair_mode(cfg.objective, cfg.pair)
    pool = load_prompt_pool(cfg.rand_cond_prompts) if cfg.rand_cond_prompts else None
    need_text = needs_text_encoder(mode, pool is not None, dataset)
    fields = rc.fields_of(mode, pool is not None)
    shape = tuple(dataset.latent_shape)
    per_draw = rc.bytes_per_pair_draw(fields, shape, dtype)
    known = None
    if (out / rc.META_FILE).is_file():
        known = rc.read_meta(out).get("files")
    fp, files = rc.fingerprint(cfg, family, dataset, known_files=known)

    lock = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    try:
        if is_main:
            meta = _prepare_dir(out, fp, files, fields=fields, latent_shape=shape, dtype=dtype,
                                ids=dataset.ids(), pairs_per_shard=pairs_per_shard,
                                default_pps=max(1, min(len(dataset), (256 << 20) // per_draw)))
            for stray in out.glob("draw-*/.*.tmp"):  # left by a killed writer
                stray.unlink()
        barrier()
        if not is_main:
            if not (out / rc.META_FILE).is_file():
                raise ValueError(f"out: {out} has no {rc.META_FILE}; the main process "
                                 "(process_index 0) creates it, run it first")
            meta = rc.read_meta(out)
            diff = rc.mismatch(meta["fingerprint"], fp)
            if diff is not None:
                raise ValueError(f"out: {out} holds a cache made for other settings ({diff})")
        cache = rc.RefCache(out)
        pps, n_shards = cache.pairs_per_shard, cache.num_shards()
        start = min(cache.draws, draws)
        items = [(d, s) for d in range(start, draws) for s in range(n_shards)]
        mine = [it for i, it in enumerate(items) if i % world == rank]
        todo = [it for it in mine if not cache.shard_path(*it).is_file()
                or not rc.checksum_path(cache.shard_path(*it)).is_file()]
        size = lambda s: min(pps, len(dataset) - s * pps)  # noqa: E731
        if is_main and todo:
            need = sum(size(s) for _, s in todo) * per_draw * world
            free = shutil.disk_usage(out).free
            if need > free:
                raise ValueError(f"out: the cache needs about {need / 2**30:.2f} GiB more on "
                                 f"{out} and {free / 2**30:.2f} GiB are free")

        computed, seconds = 0, 0.0
        if shard_options is not None:
            computed, seconds = _precompute_sharded(
                cfg, family, mode, need_text, device, shard_options, dataset, cache, todo,
                fields, dtype, pool, size, batch_size or (32 if device.type == "cuda" else 8))
        elif todo:
            frozen, loss, one, phis, autocast = _frozen_step(cfg, family, mode, need_text,
                                                             device)
            t0 = time.perf_counter()  # the frozen networks' time, not their loading
            bs = batch_size or (32 if device.type == "cuda" else 8)
            from tqdm.auto import tqdm

            total = sum(size(s) for _, s in mine)
            bar = tqdm(total=total, initial=total - sum(size(s) for _, s in todo),
                       desc="precompute", unit="pair-draw",
                       disable=not (is_main and progress), dynamic_ncols=True)
            try:
                for d, s in todo:
                    lo, hi = s * pps, s * pps + size(s)
                    parts: dict = {f: [] for f in fields}
                    i = lo
                    while i < hi:
                        batch = collate_pairs([dataset[j] for j in range(i, min(hi, i + bs))])
                        try:
                            with torch.inference_mode(), autocast:
                                inp = make_inputs(batch, frozen.adapter, mode, one, device=device,
                                                  dtype=frozen.dtype, epoch=d, prompt_pool=pool)
                                fr = loss.frozen(frozen.reference, inp, *phis)
                        except RuntimeError as e:
                            if not (device.type == "cuda" and _is_oom(e) and bs > 1):
                                raise
                            torch.cuda.empty_cache()
                            bs //= 2  # the largest batch that fits
                            continue
                        n = inp.x_w.shape[0]
                        for f, v in _cache_fields(fr, n, fields, dtype).items():
                            parts[f].append(v)
                        bar.update(n)
                        computed += n
                        i += n
                    _write_shard(cache.shard_path(d, s),
                                 {f: torch.cat(v).contiguous() for f, v in parts.items()})
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
        barrier()
        done = draws <= cache.draws
        if (is_main or manual) and not done and not cache.missing(draws):
            meta = rc.read_meta(out)
            meta["draws"] = max(draws, meta["draws"])
            rc.write_meta(out, meta)
            done = True
    finally:
        if lock is not None:
            lock.release()
    return {"out": str(out), "pairs": len(dataset), "draws": draws, "complete": done,
            "sharded": shard_options is not None,
            "fields": fields, "dtype": dtype, "bytes_per_pair_draw": per_draw,
            "pair_draws_computed": computed, "seconds": seconds,
            "ms_per_pair_draw": (1000 * seconds / computed) if computed else None}


def _precompute_sharded(cfg, family, mode, need_text, device, shard_options, dataset, cache,
                        todo, fields, dtype, pool, size, bs) -> tuple[int, float]:
    """The shards ``todo`` of this process with the frozen denoiser sharded over every
    process. A sharded forward is a collective, so every process makes the same number of
    forwards: one that has run out of work (or had none) repeats a one-pair forward whose
    result it drops. The batch size is fixed (no halving on out-of-memory, which the
    processes would have to agree on). Returns (pair-draws computed, seconds)."""
    import torch.distributed as dist

    from ..data import collate_pairs

    pps = cache.pairs_per_shard
    plan = [(d, s, i, min(s * pps + size(s), i + bs))
            for d, s in todo for i in range(s * pps, s * pps + size(s), bs)]
    n = torch.tensor([len(plan)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    rounds = int(n.item())
    if rounds == 0:
        return 0, 0.0
    frozen, loss, one, phis, autocast = _frozen_step(cfg, family, mode, need_text, device,
                                                     shard_options)
    t0 = time.perf_counter()
    computed, parts = 0, {}
    for k in range(rounds):
        real = k < len(plan)
        d, s, i, j = plan[k] if real else (0, 0, 0, 1)
        batch = collate_pairs([dataset[x] for x in range(i, j)])
        # no_grad, not inference_mode: the sharded module's gathers run in its hooks
        with torch.no_grad(), autocast:
            inp = make_inputs(batch, frozen.adapter, mode, one, device=device,
                              dtype=frozen.dtype, epoch=d, prompt_pool=pool)
            fr = loss.frozen(frozen.reference, inp, *phis)
        if not real:
            continue
        m = inp.x_w.shape[0]
        for f, v in _cache_fields(fr, m, fields, dtype).items():
            parts.setdefault((d, s), {g: [] for g in fields})[f].append(v)
        computed += m
        if j == s * pps + size(s):  # the shard's last batch
            _write_shard(cache.shard_path(d, s),
                         {f: torch.cat(v).contiguous() for f, v in parts.pop((d, s)).items()})
    return computed, time.perf_counter() - t0
