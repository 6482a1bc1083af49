"""Reader of the packed ``ddspo_fast.pairs`` format (layout in :mod:`.layout`).

Shards are memory-mapped with ``safetensors.safe_open``; a reader opens each shard
lazily, once per process, so a DataLoader's worker processes each get their own
handles instead of sharing (or pickling) the parent's. Each shard is checked against the
dataset's manifest: its name and size when the dataset is opened, its sha256 when a
process first reads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from ..fsio import iter_jsonl, sha256_file
from .base_reader import BasePairDataset, Item
from .layout import INDEX_FILE, INFO_FILE, MANIFEST_FILE, SHARD_RE, read_info, read_manifest
from .validate import ST_DTYPES, latent_pair_problem, normalize_latent_shape, prompt_problem

log = logging.getLogger(__name__)


def _shard_header(path: Path) -> Tuple[Dict[str, Tuple[List[int], str]], Dict[str, str]]:
    """{key: (shape, dtype name)} and metadata from a shard's header (no tensor data read)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"missing shard file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = {}
            for k in f.keys():
                s = f.get_slice(k)
                keys[k] = (list(s.get_shape()), ST_DTYPES.get(s.get_dtype(), s.get_dtype()))
            meta = f.metadata() or {}
    except Exception as e:  # SafetensorError is not a public class in every version
        raise ValueError(f"unreadable or truncated shard file {path} ({e})") from None
    return keys, meta


class PairDataset(BasePairDataset):
    """Reader for the packed ``ddspo_fast.pairs`` format (see module docstring)."""

    def __init__(
        self,
        path,
        *,
        family: Optional[str] = None,
        latent_shape=None,
        skip_invalid: bool = False,
        load_cond: bool = True,
    ) -> None:
        super().__init__(path, skip_invalid=skip_invalid)
        self.info = read_info(self.path)
        self.family = self.info.get("family")
        self.model = self.info.get("model")
        if family is not None and self.family is not None and family != self.family:
            raise ValueError(f"family: dataset {self.path} was made for family {self.family!r}, not {family!r}")
        info_shape = normalize_latent_shape(self.info.get("latent_shape"), f"{self.path / INFO_FILE}: latent_shape")
        want_shape = normalize_latent_shape(latent_shape)
        if want_shape is not None and info_shape is not None and want_shape != info_shape:
            raise ValueError(
                f"latent_shape: the model expects latents of shape {list(want_shape)} but dataset "
                f"{self.path} holds {list(info_shape)} (info.json)"
            )
        self.latent_shape = info_shape or want_shape
        self.latent_dtype = self.info.get("latent_dtype")
        self.cond_keys = list(self.info.get("cond_keys") or []) if load_cond else []
        self.neg_cond_keys = list(self.info.get("neg_cond_keys") or []) if load_cond else []
        self._handles: Dict[str, Any] = {}
        self._verified: Dict[str, Optional[str]] = {}  # shard -> None (good) or the problem
        self._owner_pid = os.getpid()
        self.manifest = read_manifest(self.path)
        if self.manifest is None:
            log.warning("%s has no %s (written by an earlier version): its shards cannot be "
                        "verified", self.path, MANIFEST_FILE)
        self._scan_index()
        if self.skipped:
            log.warning("%s: skipped %d invalid pairs: %s", self.path, len(self.skipped), self.skipped_summary())

    @property
    def has_text_embeddings(self) -> bool:
        return bool(self.cond_keys)

    # -- open-time checks: every index line, every shard header once
    def _scan_index(self) -> None:
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise ValueError(f"missing {index_path}")
        rows: List[Tuple[int, dict]] = []
        seen: Set[str] = set()
        for lineno, _raw, obj in iter_jsonl(index_path):
            where = f"{index_path}:{lineno}"
            if isinstance(obj, Exception):
                self._sink.report(where, None, f"invalid JSON ({getattr(obj, 'msg', obj)})")
                continue
            reason, rid = self._line_problem(obj)
            if reason is None and rid in seen:
                reason = "duplicate id"
            if reason is not None:
                self._sink.report(where, rid, reason)
                continue
            seen.add(rid)
            rows.append((lineno, obj))

        headers: Dict[str, Any] = {}
        for lineno, obj in rows:
            shard = obj["shard"]
            if shard not in headers:
                headers[shard] = self._shard_problem_or_rows(shard)
            where = f"{index_path}:{lineno}"
            hdr = headers[shard]
            if isinstance(hdr, str):
                self._sink.report(where, str(obj["id"]), hdr)
                continue
            if obj["row"] >= hdr:
                self._sink.report(where, str(obj["id"]), f"row {obj['row']} out of range: {shard} holds {hdr} rows")
                continue
            self._entries.append(
                {"id": str(obj["id"]), "prompt": obj["prompt"], "neg_prompt": obj.get("neg_prompt"),
                 "seed": obj.get("seed"), "shard": shard, "row": obj["row"], "line": lineno}
            )
        if self._entries and self.latent_shape is None:
            raise ValueError(f"{self.path / INFO_FILE}: latent_shape is missing")

    def _line_problem(self, obj) -> Tuple[Optional[str], Optional[str]]:
        if not isinstance(obj, dict):
            return "index line is not a JSON object", None
        rid = obj.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            return "missing or invalid id", None
        rid = str(rid)
        reason = prompt_problem(obj.get("prompt"), obj.get("neg_prompt"))
        if reason:
            return reason, rid
        shard = obj.get("shard")
        if not isinstance(shard, str) or not SHARD_RE.match(shard):
            return f"invalid shard name {shard!r} (expected shard-NNNNN.safetensors)", rid
        row = obj.get("row")
        if not isinstance(row, int) or isinstance(row, bool) or row < 0:
            return f"invalid row {row!r} (expected an int >= 0)", rid
        return None, rid

    def _shard_problem_or_rows(self, shard: str):
        """Number of rows in a valid shard, or the reason it is unusable (a str)."""
        path = self.path / shard
        try:
            keys, _meta = _shard_header(path)
        except ValueError as e:
            return str(e)
        for k in ("latent_w", "latent_l"):
            if k not in keys:
                return f"shard file {path} has no tensor {k!r}"
        (sw, dw), (sl, dl) = keys["latent_w"], keys["latent_l"]
        if sw[:1] != sl[:1]:
            return f"shard file {path}: latent_w has {sw[:1]} rows but latent_l {sl[:1]}"
        reason = latent_pair_problem(
            sw[1:], dw, sl[1:], dl, expected_shape=self.latent_shape, expected_dtype=self.latent_dtype
        )
        if reason:
            return f"shard file {path}: {reason}"
        n = sw[0]
        reason = self._manifest_problem(shard, path, n, _meta)
        if reason:
            return reason
        for group, names in (("cond", self.cond_keys), ("neg_cond", self.neg_cond_keys)):
            for name in names:
                key = f"{group}.{name}"
                if key not in keys:
                    return f"shard file {path} has no tensor {key!r} (listed in info.json)"
                if keys[key][0][:1] != [n]:
                    return f"shard file {path}: {key} has {keys[key][0][:1]} rows, expected [{n}]"
        return n

    def _manifest_problem(self, shard: str, path: Path, rows: int, meta: Dict[str, str]) -> Optional[str]:
        """What binds the shard to the index, checked without reading its data."""
        named = meta.get("shard")
        if named is not None and named != shard:
            return (f"shard file {path} holds the rows written as {named} (shards swapped or "
                    "renamed)")
        if self.manifest is None:
            return None
        rec = self.manifest.get(shard)
        if rec is None:
            return f"shard file {path} is not in {MANIFEST_FILE}"
        size = path.stat().st_size
        if size != rec["bytes"] or rows != rec["rows"]:
            return (f"shard file {path} has {size} bytes and {rows} rows, {MANIFEST_FILE} "
                    f"records {rec['bytes']} and {rec['rows']} (replaced or truncated?)")
        return None

    def _checksum_problem(self, shard: str) -> Optional[str]:
        """The shard's sha256 against the manifest, once per shard per process."""
        if self.manifest is None:
            return None
        if shard not in self._verified:
            path, rec = self.path / shard, self.manifest.get(shard) or {}
            ok = path.is_file() and sha256_file(path) == rec.get("sha256")
            self._verified[shard] = None if ok else (
                f"shard file {path} does not match its checksum in {MANIFEST_FILE} (the file "
                "changed after it was written)")
        return self._verified[shard]

    # -- reading
    def _handle(self, shard: str):
        # Handles are per process: a forked DataLoader worker must not reuse the
        # parent's mmap objects, and a pickled dataset (spawn) carries none.
        if self._owner_pid != os.getpid():
            self._handles = {}
            self._verified = {}
            self._owner_pid = os.getpid()
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            path = self.path / shard
            problem = self._checksum_problem(shard)
            if problem:
                raise ValueError(problem)
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:
                raise ValueError(f"{path}: cannot open shard ({e})") from None
            self._handles[shard] = h
        return h

    def _read(self, entry) -> Item:
        h = self._handle(entry["shard"])
        row = entry["row"]
        try:
            item: Item = {
                "id": entry["id"],
                "prompt": entry["prompt"],
                "neg_prompt": entry["neg_prompt"],
                "latent_w": h.get_slice("latent_w")[row],
                "latent_l": h.get_slice("latent_l")[row],
                "cond": {k: h.get_slice(f"cond.{k}")[row] for k in self.cond_keys} if self.cond_keys else None,
                "neg_cond": (
                    {k: h.get_slice(f"neg_cond.{k}")[row] for k in self.neg_cond_keys} if self.neg_cond_keys else None
                ),
            }
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{self._where(entry)} (id {entry['id']!r}): cannot read row {row} ({e})") from None
        return item

    def _where(self, entry) -> str:
        return f"{self.path / INDEX_FILE}:{entry['line']} -> {entry['shard']}[{entry['row']}]"

    def close(self) -> None:
        self._handles = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_verified"] = {}
        return state
