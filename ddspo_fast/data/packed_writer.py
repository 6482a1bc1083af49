"""Writer of the packed ``ddspo_fast.pairs`` format (layout in :mod:`.layout`):
append pairs, safe to kill and resume."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch

from ..fsio import (LOCK_NAME, TMP_SUFFIX, DirLock, atomic_write, atomic_write_json,
                    atomic_write_text, fsync_dir, sha256_file)
from .layout import (FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, INFO_FILE, MANIFEST_FILE,
                     SHARD_PATTERN, SHARD_RE, manifest_line, read_info)
from .validate import dtype_name, finite_problem, latent_pair_problem, prompt_problem, same_condition_problem


class PairWriter:
    """Append preference pairs to a packed dataset; safe to kill and resume.

    Rows are buffered and written ``shard_size`` at a time. Each shard goes to a
    temporary file that is fsynced and renamed into place, then its name, size and
    sha256 are appended to ``manifest.jsonl``, and only then are its index lines
    appended (and fsynced): after a crash every indexed id is complete
    and ``done_ids()`` on a new writer over the same directory tells the generator
    what to skip. ``info`` holds extra settings (e.g. steps, cfg) stored in
    info.json; resuming with different values for the same keys is refused.
    """

    def __init__(
        self,
        out_dir,
        *,
        family: Optional[str] = None,
        model: Optional[str] = None,
        shard_size: int = 64,
        info: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"out_dir {self.out_dir} exists and is not a directory")
        self.shard_size = shard_size
        self._buffer: List[dict] = []
        self._done: Set[str] = set()
        self._next_shard = 0
        self._closed = False
        self._info: Dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": family,
            "model": None if model is None else str(model),
            "latent_shape": None,
            "latent_dtype": None,
            "cond_keys": None,
            "neg_cond_keys": None,
        }
        extra = dict(info or {})
        for k in list(extra):
            if k in self._info:
                raise ValueError(f"info: key {k!r} is reserved; pass it as its own argument")
        self._info.update(extra)
        self._info_written = False
        self._cond_shapes: Dict[str, Tuple[List[int], str]] = {}

        info_path = self.out_dir / INFO_FILE
        if not info_path.exists() and self.out_dir.exists() and any(
            p.name not in (INDEX_FILE, MANIFEST_FILE, LOCK_NAME) and not p.name.endswith(TMP_SUFFIX)
            for p in self.out_dir.iterdir()
        ):
            raise ValueError(f"out_dir {self.out_dir} is not empty and holds no {INFO_FILE}; refusing to write into it")
        # One writer per dataset: a second one (another process, or a second writer in
        # this one) would interleave shards and index lines. The lock is taken before the
        # resume below touches anything, and dropped by close() or when this object dies.
        self._lock = DirLock(self.out_dir, "dataset").acquire()
        self._unlock = weakref.finalize(self, self._lock.release)
        try:
            if info_path.exists():
                self._resume(read_info(self.out_dir), family, model, extra)
            self._index_path = self.out_dir / INDEX_FILE
            self._manifest_path = self.out_dir / MANIFEST_FILE
            if not info_path.exists():
                # A fresh dataset: any index from an interrupted start before info.json
                # existed references no shard we can trust.
                for stale in (self._index_path, self._manifest_path):
                    if stale.exists():
                        stale.unlink()
        except BaseException:
            self._unlock()
            raise

    # -- resume
    def _resume(self, info: dict, family, model, extra: dict) -> None:
        for name, given in (("family", family), ("model", None if model is None else str(model))):
            if given is not None and info.get(name) is not None and info[name] != given:
                raise ValueError(f"{name}: {self.out_dir} was written with {name}={info[name]!r}, cannot resume with {given!r}")
        for k, v in extra.items():
            if k in info and info[k] != v:
                raise ValueError(f"info: {self.out_dir} was written with {k}={info[k]!r}, cannot resume with {k}={v!r}")
        merged = dict(info)
        merged.update({k: v for k, v in self._info.items() if merged.get(k) is None})
        self._info = merged
        self._info_written = merged == info

        index_path = self.out_dir / INDEX_FILE
        used: Set[str] = set()
        if index_path.exists():
            good_bytes = 0
            with open(index_path, "rb") as f:
                data = f.read()
            for raw in data.splitlines(keepends=True):
                # A writer killed mid-append can leave one partial last line: drop it
                # (its shard rows are re-generated). A bad line elsewhere is corruption.
                complete = raw.endswith(b"\n")
                try:
                    obj = json.loads(raw) if raw.strip() else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    obj = Exception
                if obj is Exception or not complete:
                    if good_bytes + len(raw) == len(data):
                        break
                    raise ValueError(f"{index_path}: corrupt line at byte {good_bytes}; cannot resume")
                good_bytes += len(raw)
                if isinstance(obj, dict):
                    self._done.add(str(obj.get("id")))
                    used.add(str(obj.get("shard")))
            if good_bytes != len(data):
                with open(index_path, "r+b") as f:
                    f.truncate(good_bytes)
                    os.fsync(f.fileno())
        numbers = [-1]
        for p in self.out_dir.iterdir():
            m = SHARD_RE.match(p.name)
            if m and p.name not in used:
                # renamed into place but never indexed: its rows will be written again
                p.unlink()
            elif m:
                numbers.append(int(m.group(1)))
            elif p.name.endswith(TMP_SUFFIX):
                p.unlink()
        self._next_shard = max(numbers) + 1
        self._resume_manifest(used)
        for k, spec in (self._info.get("cond_shapes") or {}).items():
            self._cond_shapes[k] = (list(spec[0]), spec[1])

    def _resume_manifest(self, used: Set[str]) -> None:
        """Keep the manifest records of the indexed shards (a killed writer may have left a
        partial last line, or the record of a shard it never indexed); a dataset of an
        earlier version gets records of its shards now."""
        records: Dict[str, str] = {}
        path = self.out_dir / MANIFEST_FILE
        if path.exists():
            for raw in path.read_bytes().splitlines(keepends=True):
                try:
                    rec = json.loads(raw) if raw.endswith(b"\n") else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rec = None
                if isinstance(rec, dict) and rec.get("shard") in used:
                    records[rec["shard"]] = raw.decode("utf-8")
        for name in sorted(used - set(records)):
            shard = self.out_dir / name
            if shard.is_file():
                from safetensors import safe_open

                with safe_open(str(shard), framework="pt") as f:
                    rows = f.get_slice("latent_w").get_shape()[0]
                records[name] = manifest_line(name, sha256_file(shard), shard.stat().st_size, rows)
        text = "".join(records[k] for k in sorted(records))
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)

    # -- public API
    def done_ids(self) -> Set[str]:
        """Ids already written (or buffered) in this dataset: skip them when resuming."""
        return set(self._done)

    def __len__(self) -> int:
        return len(self._done)

    def add(
        self,
        *,
        id,
        prompt: str,
        neg_prompt: Optional[str],
        latent_w: torch.Tensor,
        latent_l: torch.Tensor,
        seed: Optional[int] = None,
        cond: Optional[Mapping[str, torch.Tensor]] = None,
        neg_cond: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        if self._closed:
            raise ValueError("PairWriter is closed")
        if isinstance(id, bool) or not isinstance(id, (str, int)) or str(id) == "":
            raise ValueError(f"id must be a non-empty str (or int), got {id!r}")
        sid = str(id)
        if sid in self._done:
            raise ValueError(f"id {sid!r} is already in {self.out_dir} (check done_ids() before adding)")
        reason = prompt_problem(prompt, neg_prompt)
        if reason:
            raise ValueError(f"prompt/neg_prompt for id {sid!r}: {reason}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        for name, t in (("latent_w", latent_w), ("latent_l", latent_l)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        latent_w = latent_w.detach().to("cpu").contiguous()
        latent_l = latent_l.detach().to("cpu").contiguous()
        reason = latent_pair_problem(
            latent_w.shape, dtype_name(latent_w.dtype), latent_l.shape, dtype_name(latent_l.dtype),
            expected_shape=self._info.get("latent_shape"), expected_dtype=self._info.get("latent_dtype"),
        )
        if reason:
            raise ValueError(f"latent_w/latent_l for id {sid!r}: {reason}")
        groups = {}
        for gname, group in (("cond", cond), ("neg_cond", neg_cond)):
            keys_name = f"{gname}_keys"
            given = sorted(group) if group else []
            expected = self._info.get(keys_name)
            if expected is not None and given != sorted(expected):
                raise ValueError(f"{gname} for id {sid!r}: keys {given} differ from the dataset's {sorted(expected)}")
            tensors = {}
            for k in given:
                t = group[k]
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{gname}[{k!r}] for id {sid!r} must be a torch.Tensor")
                t = t.detach().to("cpu").contiguous()
                spec = (list(t.shape), dtype_name(t.dtype))
                full = f"{gname}.{k}"
                if full in self._cond_shapes and self._cond_shapes[full] != spec:
                    raise ValueError(
                        f"{gname}[{k!r}] for id {sid!r}: shape/dtype {spec} differs from earlier rows {self._cond_shapes[full]}"
                    )
                tensors[k] = t
            groups[gname] = tensors
        reason = finite_problem({"latent_w": latent_w, "latent_l": latent_l,
                                 **{f"{g}.{k}": t for g, ts in groups.items() for k, t in ts.items()}})
        if reason is None and groups["cond"] and groups["neg_cond"]:
            reason = same_condition_problem(groups["cond"], groups["neg_cond"])
        if reason:
            raise ValueError(f"id {sid!r}: {reason}")

        # First row fixes the dataset's shapes, dtypes and cond keys.
        if self._info.get("latent_shape") is None:
            self._info["latent_shape"] = list(latent_w.shape)
            self._info["latent_dtype"] = dtype_name(latent_w.dtype)
        for gname, tensors in groups.items():
            if self._info.get(f"{gname}_keys") is None:
                self._info[f"{gname}_keys"] = sorted(tensors)
            for k, t in tensors.items():
                self._cond_shapes.setdefault(f"{gname}.{k}", (list(t.shape), dtype_name(t.dtype)))
        self._buffer.append({
            "id": sid, "prompt": prompt, "neg_prompt": neg_prompt, "seed": seed,
            "latent_w": latent_w, "latent_l": latent_l, "cond": groups["cond"], "neg_cond": groups["neg_cond"],
        })
        self._done.add(sid)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard (temp + rename), then index them."""
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        self._write_info()
        tensors: Dict[str, torch.Tensor] = {
            "latent_w": torch.stack([r["latent_w"] for r in rows]),
            "latent_l": torch.stack([r["latent_l"] for r in rows]),
        }
        for gname in ("cond", "neg_cond"):
            for k in self._info.get(f"{gname}_keys") or []:
                tensors[f"{gname}.{k}"] = torch.stack([r[gname][k] for r in rows])
        name = SHARD_PATTERN.format(self._next_shard)
        self._next_shard += 1

        def _save(tmp: Path) -> None:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "rows": str(len(rows)),
                                                   "shard": name})

        atomic_write(self.out_dir / name, _save)
        shard = self.out_dir / name
        self._append(self._manifest_path,
                     manifest_line(name, sha256_file(shard), shard.stat().st_size, len(rows)))
        lines = "".join(
            json.dumps({"id": r["id"], "prompt": r["prompt"], "neg_prompt": r["neg_prompt"], "seed": r["seed"],
                        "shard": name, "row": i}, ensure_ascii=False) + "\n"
            for i, r in enumerate(rows)
        )
        self._append(self._index_path, lines)

    def _append(self, path: Path, text: str) -> None:
        new_file = not path.exists()
        with open(path, "a", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            fsync_dir(self.out_dir)

    def _write_info(self) -> None:
        if self._info.get("cond_keys") is None:
            self._info["cond_keys"] = []
        if self._info.get("neg_cond_keys") is None:
            self._info["neg_cond_keys"] = []
        self._info["cond_shapes"] = {k: [v[0], v[1]] for k, v in sorted(self._cond_shapes.items())}
        if self._info_written:
            return
        atomic_write_json(self.out_dir / INFO_FILE, self._info)
        self._info_written = True

    @property
    def info(self) -> Dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        """Flush the last partial shard; leave a valid (possibly empty) dataset."""
        if self._closed:
            return
        try:
            self.flush()
            self._write_info()
            for path in (self._index_path, self._manifest_path):
                if not path.exists():
                    path.touch()
        finally:
            self._closed = True
            self._unlock()

    def __enter__(self) -> "PairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Rows already buffered are complete samples: keep them even if the caller
        # failed later (e.g. Ctrl-C), unless writing them fails too.
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise

