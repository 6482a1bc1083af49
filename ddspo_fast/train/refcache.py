"""The reference cache: the frozen networks' outputs on every pair-draw, stored ahead of
training, so a step runs the policy alone (docs/internals.md §4). Format, fingerprint and
reader; ``precompute.py`` writes it.

    CACHE/
      cache.json                            format, version, fingerprint, pairs, draws
                                            (complete ones), pairs_per_shard, fields, ids
      draw-00000/shard-00000.safetensors    draw 0 of pairs [0, P); one tensor per field,
      draw-00000/shard-00000.sha256         row i = pair s * P + i (dataset order); beside
      draw-00000/shard-00001.safetensors    each shard its sha256 and size (JSON), written
      ...                                   before the shard appears

Fields, by pair mode (what the loss needs beyond the policy's output, nothing more):

=================  ==========================================  ======================
mode               stored                                      regenerated
=================  ==========================================  ======================
tf_cpp (DDSPO)     target_w, target_l (*S), r_l                eps, x_t; r_w = 0
dpo                r_w, r_l (+ target_w, target_l with mixing:  eps (the target), x_t
                   the TF-CPP targets mixed rows take)
dd_cpp (DDSPO)     target_w, target_l (*S), r_w, r_l           eps, x_t
=================  ==========================================  ======================

Targets are stored in the cache's dtype (default: the run's autocast dtype, so nothing is
lost against a live run), r_w / r_l in fp32. Shards are written atomically, one per
(draw, block of pairs), so a killed precompute resumes where it stopped and more draws
can be added to a cache later.

A reader checks a shard against its checksum the first time a process opens it (a
changed or truncated shard is refused naming it). Caches of version 1 have no checksums:
they are used only with ``trust_checkpoint`` (``--trust-checkpoint``).

The fingerprint names everything that changes the stored values: the frozen weights
(sha256 of the denoiser's files, the text encoders' when prompts are encoded, the pair
adapters' for DD-CPP), the data index, objective and pair mode, the family's schedule,
model variant and timestep density, the training guidance (FLUX.1 [dev]), the mixing pool
and schedule, the seed, the precision (and the text encoders' dtype where the family fixes
its own) and the draw scheme's version. A run whose settings differ is refused, naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from ..fsio import atomic_write_json, sha256_file
from .errors import UntrustedCheckpointError
from .draws import DRAWS_VERSION, draws_needed
from .precision import CACHE_DTYPES, Precision
from .pairs import FrozenOutputs, needs_text_encoder, pair_mode

FORMAT_NAME = "ddspo_fast.refcache"
FORMAT_VERSION = 2  # 2: every shard has its checksum file
META_FILE = "cache.json"
CHECKSUM_SUFFIX = ".sha256"
DTYPES = CACHE_DTYPES  # a cache's dtype names (precision.py)
# a cache's default dtype, by resolved mixed_precision: the run's autocast dtype
DEFAULT_DTYPE = {mp: Precision.resolve(mp, "cpu").cache for mp in ("bf16", "fp16", "no")}

# Fingerprint fields compared with a run, in the order their mismatch is reported, with
# the setting a user changes to cause it.
COMPARED = (
    ("objective", "objective"), ("pair", "pair"), ("family", "family"),
    ("model", "model (the denoiser's weights)"),
    ("text_encoders", "model (the text encoders' weights)"),
    ("pair_lora", "pair_lora (the winning / losing adapters)"),
    ("data", "data (the dataset's index: ids, prompts, shards)"),
    ("schedule", "model (the noise schedule: scheduler config)"),
    ("variant", "model (the variant: its denoiser config)"),
    ("timestep_density", "timestep_sampling / logit_mean / logit_std / mode_scale / flow_shift"),
    ("guidance", "guidance_scale"),
    ("mixing", "rand_cond_prompts / rand_cond_schedule / rand_cond_lambda"),
    ("seed", "seed"), ("precision", "mixed_precision"),
    ("base_quantization", "base_quantization (the frozen base's stored weights)"),
    ("text_dtype", "text_encoder_dtype (the dtype prompts are encoded in)"),
    ("draws_version", "draws_version"),
)


def shard_name(draw: int, shard: int) -> str:
    return f"draw-{draw:05d}/shard-{shard:05d}.safetensors"


def checksum_path(shard: Path) -> Path:
    """Where the sha256 and size of ``shard`` are kept."""
    return Path(shard).with_suffix(CHECKSUM_SUFFIX)


def write_checksum(shard: Path, written: Path) -> None:
    """Record the checksum of ``written`` (the shard's finished temp file) for ``shard``;
    called before the shard is renamed into place, so no shard is ever without one."""
    atomic_write_json(checksum_path(shard), {"sha256": sha256_file(written),
                                             "bytes": Path(written).stat().st_size})


def shard_problem(shard: Path, *, hash_it: bool = True) -> Optional[str]:
    """Why ``shard`` does not match its checksum file (None when it does); without
    ``hash_it`` only its size is compared (no data read)."""
    ck = checksum_path(shard)
    try:
        rec = json.loads(ck.read_text(encoding="utf-8"))
        want, size = rec["sha256"], rec["bytes"]
    except FileNotFoundError:
        return f"{shard} has no checksum file {ck.name}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{ck} is unreadable ({type(e).__name__}: {e})"
    if not shard.is_file():
        return f"{shard} is missing"
    if shard.stat().st_size != size:
        return f"{shard} has {shard.stat().st_size} bytes, {size} were written (truncated?)"
    if hash_it and sha256_file(shard) != want:
        return f"{shard} does not match its checksum (the file changed after it was written)"
    return None


def fields_of(mode: str, mixing: bool) -> list[str]:
    return {"tf_cpp": ["target_w", "target_l", "r_l"],
            "dpo": (["target_w", "target_l"] if mixing else []) + ["r_w", "r_l"],
            "dd_cpp": ["target_w", "target_l", "r_w", "r_l"]}[mode]


def bytes_per_pair_draw(fields, latent_shape, dtype: str) -> int:
    n = 1
    for s in latent_shape:
        n *= int(s)
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return sum(n * item if f.startswith("target") else 4 for f in fields)


# ---------------------------------------------------------------------- hashing
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def hash_files(root: Path, subdirs, known: Optional[dict] = None, files_out: Optional[dict] = None
               ) -> Optional[str]:
    """sha256 over every file under ``root/<subdir>`` (names and contents); None if there
    is none. A file whose size and mtime match its record in ``known`` keeps the recorded
    hash (nothing read), as ``git`` trusts its index; ``files_out`` gets the records."""
    known = known or {}
    lines = []
    for sub in subdirs:
        d = root / sub
        if not d.exists():
            continue
        for p in sorted(d.rglob("*")) if d.is_dir() else [d]:
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            rel = p.relative_to(root).as_posix()
            st = p.stat()
            rec = known.get(rel)
            if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
                sha = rec[2]
            else:
                sha = sha256_file(p)
            if files_out is not None:
                files_out[rel] = [st.st_size, st.st_mtime_ns, sha]
            lines.append(f"{rel}\t{sha}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest() if lines else None


def _model_root(model: str) -> Path:
    p = Path(model)
    if p.is_dir():
        return p
    try:  # a hub id: its local snapshot (nothing is downloaded here)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model: cannot find the files of {model!r} to fingerprint them "
                         f"({type(e).__name__}: {e})") from None


def _data_digest(dataset) -> str:
    h = hashlib.sha256()
    root = Path(dataset.path)
    for p in sorted(list(root.glob("*.json")) + list(root.glob("*.jsonl"))):
        if p.name.startswith("."):
            continue
        h.update(p.name.encode() + b"\0")
        data = p.read_bytes()
        if p.suffix == ".json":  # info.json: the model it was made with is a path, not data
            try:
                obj = json.loads(data)
                if isinstance(obj, dict):
                    obj.pop("model", None)
                data = json.dumps(obj, sort_keys=True).encode()
            except ValueError:
                pass
        h.update(data)
    h.update("\n".join(dataset.ids()).encode())
    return h.hexdigest()


def fingerprint(cfg, family: str, dataset, known_files: Optional[dict] = None
                ) -> tuple[dict, dict]:
    """``(fingerprint, files)`` of the frozen outputs a run with ``cfg`` would compute.
    ``files`` holds the (size, mtime, sha256) records of the hashed weight files."""
    from ..models import get_family
    from .lora import find_pair_dirs

    fam = get_family(family)
    if cfg.mixed_precision not in DEFAULT_DTYPE:  # the fingerprint holds what ran
        raise ValueError(f"mixed_precision: a reference cache fingerprints a resolved "
                         f"precision ('bf16', 'fp16' or 'no'), got {cfg.mixed_precision!r}")
    mode = pair_mode(cfg.objective, cfg.pair)
    mixing = bool(cfg.rand_cond_prompts)
    root = _model_root(cfg.model)
    files: dict = {}
    weights = hash_files(root, [fam.denoiser_name], known_files, files)
    if weights is None:
        raise ValueError(f"model: {cfg.model} holds no {fam.denoiser_name}/ weights")
    text = None
    if needs_text_encoder(mode, mixing, dataset):
        text = hash_files(root, list(fam.text_components), known_files, files)
    pair_lora = None
    if mode == "dd_cpp":
        win, lose = find_pair_dirs(cfg.pair_lora)
        pair_lora = {"win": hash_files(win.parent, [win.name]),
                     "lose": hash_files(lose.parent, [lose.name])}
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    den_file = root / fam.denoiser_name / "config.json"
    den_cfg = json.loads(den_file.read_text()) if den_file.is_file() else {}
    # Families with one variant (and SD3's first release) store None, so caches written
    # before variants were fingerprinted still match.
    variant = fam.variant_of(den_cfg)
    variant = None if variant == fam.name else variant
    guidance = fam.default_train_guidance(den_cfg)
    if guidance is not None and cfg.guidance_scale is not None:
        guidance = float(cfg.guidance_scale)
    mix = None
    if mixing:
        mix = {"prompts": hash_files(Path(cfg.rand_cond_prompts).parent,
                                     [Path(cfg.rand_cond_prompts).name]),
               "schedule": cfg.rand_cond_schedule, "lambda": float(cfg.rand_cond_lambda)}
    fp = {"objective": cfg.objective, "pair": mode, "family": family, "model": weights,
          "text_encoders": text, "pair_lora": pair_lora, "data": _data_digest(dataset),
          "schedule": _digest(sched), "variant": variant, "guidance": guidance,
          "timestep_density": {"scheme": cfg.timestep_sampling or fam.timestep_sampling,
                               "logit_mean": float(cfg.logit_mean),
                               "logit_std": float(cfg.logit_std),
                               "mode_scale": float(cfg.mode_scale),
                               "shift": None if cfg.flow_shift is None else float(cfg.flow_shift)},
          "mixing": mix, "seed": int(cfg.seed), "precision": cfg.mixed_precision,
          "text_dtype": _text_dtype(fam, cfg, text is not None),
          "draws_version": DRAWS_VERSION,
          # None for an unquantized base, so caches written before this field still match
          "base_quantization": None if cfg.base_quantization == "none" else cfg.base_quantization}
    return fp, files


def _text_dtype(fam, cfg, encodes: bool) -> Optional[str]:
    """The text encoders' dtype where it is not the run's own (SANA's bf16 Gemma-2), else
    None (so caches fingerprinted before this field existed still match)."""
    if not encodes:
        return None
    run = Precision.resolve(cfg.mixed_precision, "cpu").frozen
    dtype = fam.text_dtype_for(run, cfg.text_encoder_dtype)
    return None if dtype == run else str(dtype).replace("torch.", "")


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "..."
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return repr(v)


def mismatch(have: dict, want: dict) -> Optional[str]:
    """The first compared fingerprint field that differs, described; None if they match."""
    for key, setting in COMPARED:
        if have.get(key) != want.get(key):
            return (f"{setting} differs (cache: {_show(have.get(key))}, this run: "
                    f"{_show(want.get(key))})")
    return None


# ---------------------------------------------------------------------- format
def new_meta(fp: dict, files: dict, *, fields, latent_shape, dtype: str, ids,
             pairs_per_shard: int) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": fp,
            "files": files, "draws": 0, "pairs": len(ids),
            "pairs_per_shard": int(pairs_per_shard), "fields": list(fields),
            "latent_shape": [int(s) for s in latent_shape], "dtype": dtype, "ids": list(ids)}


def write_meta(path, meta: dict) -> None:
    atomic_write_json(Path(path) / META_FILE, meta, indent=None)


def read_meta(path) -> dict:
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{f} does not exist (not a reference cache: make one with "
                         "`ddspo-fast precompute`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{f}: not a {FORMAT_NAME} cache")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{f}: unsupported cache version {meta.get('version')!r} (this "
                         f"library reads up to {FORMAT_VERSION})")
    for key in ("fingerprint", "draws", "pairs", "pairs_per_shard", "fields", "latent_shape",
                "dtype", "ids"):
        if key not in meta:
            raise ValueError(f"{f}: {key!r} is missing")
    return meta


# ---------------------------------------------------------------------- reader
class RefCache:
    """A reference cache opened for reading. ``lookup`` returns what
    ``PairLoss.cached_loss`` takes for the rows of one micro-batch (``PairLoss.frozen``'s
    result, stored)."""

    MAX_OPEN = 64  # shard handles kept open (least recently used closed first)

    def __init__(self, path, *, trust: bool = False):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        # shards of a version-1 cache have no checksums: read unverified, when trusted
        self.verify = self.meta["version"] >= 2
        if not self.verify and not trust:
            raise UntrustedCheckpointError(
                f"{self.path / META_FILE} is a cache of an earlier version whose shards have "
                "no checksums; precompute it again, or pass --trust-checkpoint to use it "
                "unverified", file=str(self.path / META_FILE))
        self._verified: set = set()
        m = self.meta
        self.fingerprint: dict = m["fingerprint"]
        self.draws: int = int(m["draws"])
        self.pairs: int = int(m["pairs"])
        self.pairs_per_shard: int = int(m["pairs_per_shard"])
        self.fields: list = list(m["fields"])
        self.latent_shape = tuple(m["latent_shape"])
        self.dtype: str = m["dtype"]
        self.ids: list = list(m["ids"])
        self._pos = {pid: i for i, pid in enumerate(self.ids)}
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def shard_path(self, draw: int, shard: int) -> Path:
        return self.path / shard_name(draw, shard)

    def num_shards(self) -> int:
        return -(-self.pairs // self.pairs_per_shard)

    def missing(self, draws: int) -> list[Path]:
        """Shards of draws ``[0, draws)`` that are not on disk."""
        return [self.shard_path(d, s) for d in range(draws) for s in range(self.num_shards())
                if not self.shard_path(d, s).is_file()]

    def check_headers(self, draws: int) -> None:
        """Before a run: every shard of draws ``[0, draws)`` has its checksum file and size
        and a readable header (no data read; the sha256 follows on first read)."""
        from safetensors import safe_open

        for d in range(draws):
            for s in range(self.num_shards()):
                p = self.shard_path(d, s)
                problem = shard_problem(p, hash_it=False) if self.verify else None
                if problem is None:
                    try:
                        with safe_open(str(p), framework="pt") as f:
                            missing = [x for x in self.fields if x not in f.keys()]
                        if missing:
                            problem = f"{p} has no field {missing[0]!r}"
                    except Exception as e:  # noqa: BLE001 - SafetensorError is not public
                        problem = f"cannot read {p} ({e})"
                if problem:
                    raise ValueError(f"reference_cache: {problem}; rerun the precompute "
                                     "command to rewrite it (delete the shard first)")

    def _handle(self, draw: int, shard: int):
        if self._pid != os.getpid():  # a forked process opens (and checks) its own
            self._handles, self._verified, self._pid = OrderedDict(), set(), os.getpid()
        key = (draw, shard)
        h = self._handles.get(key)
        if h is not None:
            self._handles.move_to_end(key)
            return h
        from safetensors import safe_open

        p = self.shard_path(draw, shard)
        if self.verify and key not in self._verified:  # once per shard per process
            problem = shard_problem(p)
            if problem:
                raise ValueError(f"reference_cache: {problem}; rerun the precompute command "
                                 "to rewrite it (delete the shard first)")
            self._verified.add(key)
        try:
            h = safe_open(str(p), framework="pt")
        except Exception as e:  # noqa: BLE001 - SafetensorError is not public everywhere
            raise ValueError(f"reference_cache: cannot read {p} ({e}); rerun the precompute "
                             "command to rewrite it") from None
        self._handles[key] = h
        if len(self._handles) > self.MAX_OPEN:
            self._handles.popitem(last=False)
        return h

    def read(self, ids, draws_per_pair) -> dict:
        """Fields of rows ``[(id_0, draws_per_pair[0][0]), ...]`` (pair-major), on the CPU."""
        rows = {f: [] for f in self.fields}
        for pid, ds in zip(ids, draws_per_pair):
            pos = self._pos.get(str(pid))
            if pos is None:
                raise ValueError(f"reference_cache: pair {pid!r} is not in {self.path}")
            shard, row = divmod(pos, self.pairs_per_shard)
            for d in ds:
                if d >= self.draws:
                    raise ValueError(f"reference_cache: draw {d} of pair {pid!r} is past the "
                                     f"{self.draws} draws per pair in {self.path}")
                h = self._handle(d, shard)
                for f in self.fields:
                    rows[f].append(h.get_slice(f)[row])
        return {f: torch.stack(v) for f, v in rows.items()}

    def lookup(self, ids, draws, *, device) -> FrozenOutputs:
        """The stored ``FrozenOutputs`` of the pair-draws ``[(ids[0], draws[0][0]), ...]`` (a
        ``PairInputs``' ``ids`` and ``draws``), in its row order, on ``device``."""
        got = self.read(ids, draws)
        dev = torch.device(device)
        r_l = got["r_l"]
        r_w = got["r_w"] if "r_w" in got else torch.zeros_like(r_l)
        ref_mse = torch.cat([r_w, r_l]).to(dev, non_blocking=True)
        target = None
        if "target_w" in got:
            target = (got["target_w"].to(dev, non_blocking=True),
                      got["target_l"].to(dev, non_blocking=True))
        return FrozenOutputs(target, ref_mse)

    def close(self) -> None:
        self._handles = OrderedDict()

    def __repr__(self) -> str:
        return (f"RefCache({str(self.path)!r}, pairs={self.pairs}, draws={self.draws}, "
                f"fields={self.fields}, dtype={self.dtype})")


def open_for_training(cfg, family: str, dataset, batches_per_epoch: int) -> RefCache:
    """Open ``cfg.reference_cache`` for a run and check, before its first step, that it
    was made for this run and holds every draw the run will use."""
    where = cfg.reference_cache
    try:
        cache = RefCache(where, trust=cfg.trust_checkpoint)
    except UntrustedCheckpointError as e:
        raise UntrustedCheckpointError(f"reference_cache: {e}", file=e.file) from None
    except ValueError as e:
        raise ValueError(f"reference_cache: {e}") from None
    fp, _ = fingerprint(cfg, family, dataset, known_files=cache.meta.get("files"))
    diff = mismatch(cache.fingerprint, fp)
    if diff is not None:
        raise ValueError(f"reference_cache: {where} was made for another run: {diff}; "
                         "make a cache for this run with `ddspo-fast precompute` and the "
                         "same settings")
    need = draws_needed(cfg.max_steps, cfg.grad_accum, batches_per_epoch, cfg.timesteps_per_pair)
    if need > cache.draws:
        raise ValueError(
            f"reference_cache: this run needs {need} draws per pair (max_steps={cfg.max_steps} "
            f"x grad_accum={cfg.grad_accum} micro-batches over {batches_per_epoch} per epoch "
            f"x timesteps_per_pair={cfg.timesteps_per_pair}) but {where} holds {cache.draws}; "
            f"rerun the precompute with --draws {need} (the draws already there are kept)")
    missing = cache.missing(need)
    if missing:
        raise ValueError(f"reference_cache: {where} is incomplete ({missing[0]} is missing); "
                         "rerun the precompute command to finish it")
    cache.check_headers(need)
    return cache
