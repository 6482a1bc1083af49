"""The run directory: who may write it, what an earlier run left in it, and how the final
weights are published into it.

* Apart from the inputs: output_dir may not be, contain or sit inside the model, the
  data or any other input folder or file, ``overwrite`` or not (``check_apart``, before
  the lock is taken, so a refused run leaves nothing behind).
* One writer: the trainer holds ``fsio.DirLock`` on output_dir for the life of a run.
* No silent reuse: a directory holding an earlier run is refused unless the run resumes
  it (``resume``) or replaces it (``overwrite``), so a rerun never prunes or overwrites the
  earlier run's checkpoints, metrics and weights by accident.
* The final export is written like a checkpoint: into a temp dir, flushed, then renamed
  entry by entry over the earlier export (``model_index.json`` last), so a failure (a full
  disk, a kill) leaves the earlier weights as they were.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..fsio import (check_output_apart, dir_mode, explain_disk_full, file_mode, fsync_dir,
                    make_temp_dir,
                    publish_dir)
from . import checkpoint as ckpt
from .errors import OutputDirNotEmptyError

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.yaml"
LOGS_DIR = "logs"
EXPORT_TMP_PREFIX = ".tmp-final-"
# What a finished run's export leaves: a diffusers pipeline or LoRA weights.
EXPORT_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors")


def contents(out) -> list[str]:
    """Names in ``out`` other than the lock file (empty when it does not exist)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def has_export(out) -> bool:
    return any((Path(out) / m).exists() for m in EXPORT_MARKERS)


#: the config fields that name what a run reads (files or folders)
INPUT_FIELDS = ("model", "data", "reference_cache", "pair_lora", "rand_cond_prompts")


def check_apart(cfg, out_field: str = "output_dir", out=None, fields=INPUT_FIELDS) -> None:
    """ValueError when the run's output (``cfg.<out_field>``, or ``out``) is, contains or
    sits inside one of its inputs (the ``fields`` that ``cfg`` has and sets)."""
    out = getattr(cfg, out_field) if out is None else out
    inputs = [(f, getattr(cfg, f, None)) for f in fields]
    check_output_apart(out, out_field, inputs)


def check_reuse(out, resume, overwrite: bool) -> None:
    """Refuse to start in a directory holding an earlier run unless told what to do."""
    names = contents(out)
    if not names or overwrite:
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    advice = ("To continue it, resume from its newest checkpoint (resume='latest', "
              "--resume latest); to keep it, choose a new output_dir; to replace it, set "
              "overwrite=True (--overwrite).")
    if resume is None:
        raise OutputDirNotEmptyError(f"output_dir: {out} is not empty (it holds {shown}). "
                                     + advice)
    if resume == "latest" and not ckpt.list_checkpoints(out) and has_export(out):
        raise OutputDirNotEmptyError(
            f"output_dir: {out} holds the final weights of a finished run and no checkpoint "
            f"to resume from. To keep them, choose a new output_dir; to replace them, set "
            f"overwrite=True (--overwrite) instead of resume.")


def clear_run(out) -> None:
    """``overwrite``: remove what an earlier run left that the new run would mix with
    (checkpoints, metrics, logs, temp dirs). Its exported weights stay until the new
    export replaces them, so nothing is lost if the new run never gets there."""
    out = Path(out)
    for name in (ckpt.checkpoints_dir(out).name, LOGS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (METRICS_FILE,):
        if (out / name).exists():
            (out / name).unlink()
    for p in out.glob(f"{EXPORT_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _settle_tree(root: Path) -> None:
    """Flush every file of a freshly written tree and give it the mode ``open()`` would
    (the savers we call are not all umask-honest: safetensors 0.8 creates files 0600)."""
    fmode, dmode = file_mode(), dir_mode()
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(p, fmode)
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), dmode)
        fsync_dir(dirpath)


def publish_export(out, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` to export into a fresh temp dir inside ``out``, then move
    each entry over its earlier version (directories via ``fsio.publish_dir``, files by
    rename; ``model_index.json`` last). On failure nothing in ``out`` has changed and a
    full disk raises ``DiskFullError`` naming ``out``."""
    out = Path(out)
    tmp = make_temp_dir(out, EXPORT_TMP_PREFIX)
    try:
        with explain_disk_full(out):
            write(tmp)
            _settle_tree(tmp)
        entries = sorted(tmp.iterdir(), key=lambda p: (p.name == "model_index.json", p.name))
        for entry in entries:
            dst = out / entry.name
            if entry.is_dir():
                publish_dir(entry, dst)
            else:
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(entry, dst)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
