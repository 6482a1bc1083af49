"""Checkpoints: what is saved to continue a run exactly, and how it is written and read.

Atomic: a checkpoint is written under a temp name, then renamed, so a reader never sees a
half-written one: ``checkpoint-N`` exists only once every file in it is complete, and
``latest()`` ignores leftovers of killed writers.

Layout of ``<output_dir>/checkpoints/checkpoint-N/``: ``trainable.safetensors`` (the
trained parameters, fp32), ``optimizer.safetensors`` (the optimizer's state: its tensors,
with the rest of its ``state_dict`` as JSON in the header), ``scheduler.json`` (the LR
schedule's state), ``rng-rank<i>.safetensors`` (every random stream of process i),
``trainer_state.json`` (step counters, last metrics, the config) and ``manifest.json``
(the sha256 of every other file). Nothing in it is a pickle, so resuming from a
checkpoint someone else wrote cannot run code (``safeload.py``). ``load`` verifies the
checksums first, so a truncated or bit-flipped file is named instead of loaded;
``find_intact`` walks back from the newest checkpoint to the newest one that verifies.

Checkpoints of earlier versions (pickled ``optimizer.pt``, ``scheduler.pt``,
``rng-rank<i>.pt``) and checkpoints without a manifest are read only with ``trust=True``
(``--trust-checkpoint``); without it they are refused naming the file and the flag.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fsio import (DiskFullError, atomic_write_json, atomic_write_text, explain_disk_full,
                    file_mode, publish_dir, sha256_file)
from ..safeload import load_trusted_pickle, read_state as read_state_file, save_tensors, write_state
from .errors import CorruptCheckpointError, UntrustedCheckpointError

log = logging.getLogger("ddspo_fast.train")

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
MANIFEST_FILE = "manifest.json"
# what earlier versions wrote: pickles, read only when the user trusts the checkpoint
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
LEGACY_SCHEDULER_FILE = "scheduler.pt"
TRUST_FLAG = "--trust-checkpoint"


def rng_file(rank: int, legacy: bool = False) -> str:
    return f"rng-rank{rank}.pt" if legacy else f"rng-rank{rank}.safetensors"


# ---------------------------------------------------------------------- locations
def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    d = checkpoints_dir(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def tmp_path(output_dir, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"{TMP_PREFIX}{step}"


def final_path(output_dir, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"checkpoint-{step}"


# ---------------------------------------------------------------------- atomic directory
def begin(output_dir, step: int) -> Path:
    """Create a fresh temp dir for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_path(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(output_dir, step: int) -> Path:
    """Flush every file, then rename the temp dir into place (replacing an older
    checkpoint of the same step only once the new one is complete)."""
    tmp, dst = tmp_path(output_dir, step), final_path(output_dir, step)
    mode = file_mode()
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        # safetensors (0.8) creates its files 0600; give every file the umask's mode
        os.chmod(f, mode)
    publish_dir(tmp, dst)
    return dst


def prune(output_dir, keep: int | None) -> None:
    if not keep:
        return
    for _, p in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoints_dir(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------- RNG state
def capture_rng(generator: torch.Generator, prompt_sampler=None) -> dict:
    """Every random stream a step draws from (this process)."""
    st = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if prompt_sampler is not None:
        st["prompt_sampler"] = prompt_sampler.rng.getstate()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return st


def restore_rng(st: dict, generator: torch.Generator, prompt_sampler=None) -> None:
    generator.set_state(st["generator"])
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if prompt_sampler is not None and "prompt_sampler" in st:
        prompt_sampler.rng.setstate(st["prompt_sampler"])


# ---------------------------------------------------------------------- save / load
def save(output_dir, step: int, accelerator, *, trainable: Callable[[], dict],
         optimizer, scheduler, state: dict, rng: dict, keep: int | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically; collective (every process calls it).

    ``trainable`` is called on the main process only (it copies the weights to the CPU);
    every process saves its own ``rng``.
    """
    is_main = accelerator.is_main_process
    tmp, dst = tmp_path(output_dir, step), final_path(output_dir, step)
    try:
        if is_main:
            begin(output_dir, step)
        accelerator.wait_for_everyone()
        with explain_disk_full(tmp / rng_file(accelerator.process_index)):
            write_state(tmp / rng_file(accelerator.process_index), rng)
        accelerator.wait_for_everyone()
        if is_main:
            with explain_disk_full(tmp / TRAINABLE_FILE):
                save_tensors(tmp / TRAINABLE_FILE, trainable())
            with explain_disk_full(tmp / OPTIMIZER_FILE):
                write_state(tmp / OPTIMIZER_FILE, optimizer.state_dict())
            _publish(tmp, dst, output_dir, step, keep, scheduler, state)
    except DiskFullError:
        # free what the half-written checkpoint took; the earlier ones stay as they were
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return dst


def _publish(tmp: Path, dst: Path, output_dir, step: int, keep, scheduler, state: dict) -> None:
    """The main process's last writes into a checkpoint's temporary directory (schedule,
    trainer state, manifest), then its atomic rename into place and the pruning."""
    with explain_disk_full(tmp / SCHEDULER_FILE):
        write_state(tmp / SCHEDULER_FILE, scheduler.state_dict())
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, default=str, allow_nan=False))
    write_manifest(tmp)
    with explain_disk_full(dst):
        commit(output_dir, step)
    prune(output_dir, keep)


# ---------------------------------------------------------------------- checksums
def write_manifest(directory) -> None:
    """``manifest.json``: the sha256 and size of every file of the checkpoint."""
    d = Path(directory)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    atomic_write_json(d / MANIFEST_FILE, {"format": 1, "files": files})


def untrusted(file, why: str) -> UntrustedCheckpointError:
    """The refusal of a checkpoint file that is read only with ``--trust-checkpoint``."""
    return UntrustedCheckpointError(
        f"resume: {file} {why}; pass {TRUST_FLAG} to resume from it anyway, only if you "
        "trust where it came from", file=str(file))


def is_legacy(path) -> bool:
    """Whether checkpoint ``path`` was written by an earlier version (pickled states)."""
    path = Path(path)
    return not (path / OPTIMIZER_FILE).is_file() and (path / LEGACY_OPTIMIZER_FILE).is_file()


def verify(path, *, trust: bool = False) -> None:
    """Raise ``CorruptCheckpointError`` naming the first file of checkpoint ``path`` that is
    missing, truncated or whose contents changed. A checkpoint without a manifest cannot
    be verified: refused (``UntrustedCheckpointError``) unless ``trust``, then only
    checked for its files being there and non-empty."""
    path = Path(path)
    mf = path / MANIFEST_FILE

    def bad(name: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"resume: checkpoint {path} is damaged: {path / name} "
                                      f"{why}", file=str(path / name))

    if not mf.is_file():
        if not trust:
            raise untrusted(mf, "does not exist, so the checkpoint's files cannot be verified")
        log.warning("resume: %s has no %s (written by an older version); its files cannot be "
                    "verified (%s)", path, MANIFEST_FILE, TRUST_FLAG)
        legacy = is_legacy(path)
        for name in (STATE_FILE, TRAINABLE_FILE,
                     LEGACY_OPTIMIZER_FILE if legacy else OPTIMIZER_FILE,
                     LEGACY_SCHEDULER_FILE if legacy else SCHEDULER_FILE):
            if not (path / name).is_file() or (path / name).stat().st_size == 0:
                raise bad(name, "is missing or empty")
        return
    try:
        files = json.loads(mf.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict) or STATE_FILE not in files:
            raise ValueError("no file list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise bad(MANIFEST_FILE, f"is unreadable ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise bad(name, "is missing")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise bad(name, f"has {size} bytes, {meta.get('bytes')} were written (truncated?)")
        if sha256_file(f) != meta.get("sha256"):
            raise bad(name, "does not match its checksum (the file changed after it was "
                      "written)")


def find_intact(output_dir, *, trust: bool = False) -> Path | None:
    """The newest checkpoint of ``output_dir`` that verifies, warning about each newer one
    that does not; None when there is none at all. Raises the newest checkpoint's
    ``CorruptCheckpointError`` when checkpoints exist but none verifies, and an
    ``UntrustedCheckpointError`` (no fall-back) for one that needs ``trust``."""
    first_error = None
    for _, p in reversed(list_checkpoints(output_dir)):
        try:
            verify(p, trust=trust)
        except CorruptCheckpointError as e:
            log.warning("%s; trying the checkpoint before it", e)
            first_error = first_error or e
            continue
        if first_error is not None:
            log.warning("resume: continuing from %s, the newest intact checkpoint", p)
        return p
    if first_error is not None:
        raise CorruptCheckpointError(f"{first_error} (and no older checkpoint in "
                                     f"{checkpoints_dir(output_dir)} is intact)",
                                     file=first_error.file)
    return None


@dataclass
class Loaded:
    state: dict                # trainer_state.json
    trainable: dict            # name -> tensor (CPU)
    optimizer: dict            # optimizer state_dict
    scheduler: dict            # scheduler state_dict
    rng: Optional[dict]        # this process's RNG state (None if the file is absent)


def _read_named(file: Path, how):
    """``how(file)``; any parse error of any format becomes one error naming the file."""
    try:
        return how(file)
    except Exception as e:
        raise _unreadable(file, e) from e


def _unreadable(path: Path, e: Exception) -> CorruptCheckpointError:
    first = str(e).splitlines()[0] if str(e) else ""
    return CorruptCheckpointError(f"resume: cannot read {path}: {type(e).__name__}: {first}",
                                  file=str(path))


def read_state(path) -> dict:
    """``trainer_state.json`` of checkpoint ``path``."""
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "global_step" not in state:
            raise ValueError("not a trainer state (no global_step)")
        return state
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _unreadable(f, e) from e


def load(path, process_index: int, *, verified: bool = False,
         state: dict | None = None, trust: bool = False) -> Loaded:
    """Verify (unless ``verified``) and read a checkpoint directory, every tensor on the
    CPU. Any file that cannot be read raises ``CorruptCheckpointError`` naming it; a
    pickled file of an earlier version raises ``UntrustedCheckpointError`` unless
    ``trust`` (then it is unpickled, which can run code stored in it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not verified:
        verify(path, trust=trust)

    def read(name: str, how):
        return _read_named(path / name, how)

    if state is None:
        state = read_state(path)
    trainable = read(TRAINABLE_FILE, lambda f: load_file(str(f)))
    legacy = is_legacy(path)
    if legacy and not trust:
        raise untrusted(path / LEGACY_OPTIMIZER_FILE,
                        "is a pickle (a checkpoint of an earlier ddspo_fast); unpickling it "
                        "can run code stored in it")
    how = load_trusted_pickle if legacy else read_state_file
    of, sf = ((LEGACY_OPTIMIZER_FILE, LEGACY_SCHEDULER_FILE) if legacy
              else (OPTIMIZER_FILE, SCHEDULER_FILE))
    optimizer, scheduler = read(of, how), read(sf, how)
    rf = rng_file(process_index, legacy)
    rng = read(rf, how) if (path / rf).is_file() else None
    for name, got, kind in ((of, optimizer, dict), (sf, scheduler, dict),
                            (rf, rng, (dict, type(None)))):
        if not isinstance(got, kind):
            raise _unreadable(path / name, ValueError(f"holds a {type(got).__name__}, not "
                                                      "a state dict"))
    return Loaded(state=state, trainable=trainable, optimizer=optimizer, scheduler=scheduler,
                  rng=rng)


# ---------------------------------------------------------------------- sharded (FSDP2)
# A sharded run's checkpoint holds, instead of trainable/optimizer.safetensors, one pair of
# files per process: ``trainable-rank<i>.safetensors`` (its shards of the trained
# parameters, their whole shapes and placements as JSON in the header) and
# ``optimizer-rank<i>.safetensors`` (its shards of the optimizer state, parameters named),
# and ``sharding.json`` (how many processes wrote it). Same atomic publish and manifest.
SHARDING_FILE = "sharding.json"
SHARD_LAYOUT_KEY = "ddspo_fast.shard_layout"


def trainable_shard_file(rank: int) -> str:
    return f"trainable-rank{rank}.safetensors"


def optimizer_shard_file(rank: int) -> str:
    return f"optimizer-rank{rank}.safetensors"


def is_sharded(path) -> bool:
    """Whether checkpoint ``path`` was written by a sharded (FSDP2) run."""
    return (Path(path) / SHARDING_FILE).is_file()


def sharded_world_size(path) -> int:
    """How many processes wrote sharded checkpoint ``path``."""
    f = Path(path) / SHARDING_FILE
    try:
        n = json.loads(f.read_text(encoding="utf-8"))["world_size"]
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"world_size {n!r} is not a positive int")
        return n
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise _unreadable(f, e) from e


def save_sharded(output_dir, step: int, accelerator, *, shards: Callable[[], tuple],
                 optimizer: Callable[[], dict], scheduler, state: dict, rng: dict,
                 keep: int | None = None) -> Path:
    """``save`` for a sharded run; collective. Every process writes its own shards:
    ``shards()`` gives ``(tensors, layout)`` (``sharding.local_trainable``) and
    ``optimizer()`` its optimizer state (``sharding.local_optimizer``); the main process
    writes the rest, the manifest over every file, and publishes the directory."""
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    tmp, dst = tmp_path(output_dir, step), final_path(output_dir, step)
    failed = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    try:
        if is_main:
            begin(output_dir, step)
        accelerator.wait_for_everyone()
        try:
            tensors, layout = shards()
            opt = optimizer()
            for f, write in ((rng_file(rank), lambda p: write_state(p, rng)),
                             (trainable_shard_file(rank), lambda p: save_tensors(
                                 p, tensors, {SHARD_LAYOUT_KEY: json.dumps(layout)})),
                             (optimizer_shard_file(rank), lambda p: write_state(p, opt))):
                with explain_disk_full(tmp / f):
                    write(tmp / f)
        except Exception:
            failed += 1
            raise
        finally:
            # every process learns whether one failed before the main one publishes
            failed = accelerator.reduce(failed, reduction="sum")
        if float(failed) > 0:
            raise RuntimeError(f"another process failed to write its shards into {tmp}; "
                               "the checkpoint was not published (see that process's error)")
        if is_main:
            atomic_write_json(tmp / SHARDING_FILE, {"format": 1, "strategy": "fsdp2",
                                                    "world_size": accelerator.num_processes})
            _publish(tmp, dst, output_dir, step, keep, scheduler, state)
    except DiskFullError:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return dst


@dataclass
class LoadedShards:
    state: dict                # trainer_state.json
    trainable: dict            # this process's shards: name -> tensor (CPU)
    optimizer: dict            # this process's optimizer state (sharding.local_optimizer)
    scheduler: dict
    rng: Optional[dict]


def load_sharded(path, process_index: int, num_processes: int, *, verified: bool = False,
                 state: dict | None = None) -> LoadedShards:
    """Verify (unless ``verified``) and read this process's part of sharded checkpoint
    ``path``. Another number of processes than wrote it is refused, naming both."""
    from safetensors.torch import load_file

    path = Path(path)
    if not verified:
        verify(path)
    world = sharded_world_size(path)
    if world != num_processes:
        raise ValueError(f"resume: {path} was written sharded over {world} processes, this run "
                         f"has {num_processes}; resume it with {world} processes (or export it "
                         "with ddspo-fast export and start a new run from the export)")

    def read(name: str, how):
        return _read_named(path / name, how)

    if state is None:
        state = read_state(path)
    trainable = read(trainable_shard_file(process_index), lambda f: load_file(str(f)))
    optimizer = read(optimizer_shard_file(process_index), read_state_file)
    scheduler = read(SCHEDULER_FILE, read_state_file)
    rf = rng_file(process_index)
    rng = read(rf, read_state_file) if (path / rf).is_file() else None
    for name, got, kind in ((optimizer_shard_file(process_index), optimizer, dict),
                            (SCHEDULER_FILE, scheduler, dict), (rf, rng, (dict, type(None)))):
        if not isinstance(got, kind):
            raise _unreadable(path / name, ValueError(f"holds a {type(got).__name__}, not "
                                                      "a state dict"))
    return LoadedShards(state=state, trainable=trainable, optimizer=optimizer,
                        scheduler=scheduler, rng=rng)


def read_shard_layouts(path) -> list[tuple[dict, dict]]:
    """Every process's ``(tensors, layout)`` of sharded checkpoint ``path``, in rank order
    (``sharding.full_tensors`` puts them together)."""
    from safetensors import safe_open

    path = Path(path)
    out = []
    for rank in range(sharded_world_size(path)):
        f = path / trainable_shard_file(rank)
        try:
            with safe_open(str(f), framework="pt") as fh:
                layout = json.loads((fh.metadata() or {})[SHARD_LAYOUT_KEY])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            if not isinstance(layout, dict) or set(layout) != set(tensors):
                raise ValueError("its layout does not name its tensors")
        except Exception as e:  # noqa: BLE001 - any parse error: name the file
            raise _unreadable(f, e) from e
        out.append((tensors, layout))
    return out
