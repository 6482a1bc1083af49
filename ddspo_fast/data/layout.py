"""The packed pair-dataset layout: file names, format id and version, and ``info.json``.

    DATASET/
      info.json                 format, version, family, model, latent_shape, latent_dtype,
                                cond_keys, neg_cond_keys, cond_shapes, plus generator settings
      index.jsonl               one line per pair: id, prompt, neg_prompt, seed, shard, row
      manifest.jsonl            one line per shard: shard, sha256, bytes, rows
      shard-00000.safetensors   "latent_w", "latent_l" (n, *latent_shape),
                                "cond.<key>", "neg_cond.<key>" (n, ...); its header's
                                metadata names the shard ("shard": "shard-00000.safetensors")

The manifest binds every shard to the index: a shard that is renamed, swapped with
another or changed after it was written is refused naming it (the name and size are
checked when the dataset is opened, the sha256 once per shard per process on first read).
Datasets of earlier versions have no manifest; they are read unverified, with a warning.

The writer (:mod:`.packed_writer`) and the reader (:mod:`.packed_reader`) both follow
what is defined here, and nothing else defines it (docs/internals.md section 2).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FORMAT_NAME = "ddspo_fast.pairs"
FORMAT_VERSION = 1
INFO_FILE = "info.json"
INDEX_FILE = "index.jsonl"
MANIFEST_FILE = "manifest.jsonl"
SHARD_PATTERN = "shard-{:05d}.safetensors"
SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")


def read_info(path: Path) -> dict:
    info_path = Path(path) / INFO_FILE
    try:
        with open(info_path, "r", encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"missing {info_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ValueError(f"{info_path}: not a {FORMAT_NAME} dataset (format={info.get('format') if isinstance(info, dict) else None!r})")
    version = info.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{info_path}: unsupported format version {version!r} (this library reads up to {FORMAT_VERSION})")
    return info



def manifest_line(shard: str, sha256: str, size: int, rows: int) -> str:
    return json.dumps({"shard": shard, "sha256": sha256, "bytes": size, "rows": rows}) + "\n"


def read_manifest(path: Path) -> dict | None:
    """``{shard name: {"sha256", "bytes", "rows"}}`` from the dataset's manifest, or None
    when it has none (a dataset of an earlier version)."""
    mf = Path(path) / MANIFEST_FILE
    if not mf.is_file():
        return None
    out: dict = {}
    with open(mf, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                ok = (isinstance(rec, dict) and isinstance(rec.get("shard"), str)
                      and SHARD_RE.match(rec["shard"]) and isinstance(rec.get("sha256"), str)
                      and isinstance(rec.get("bytes"), int) and isinstance(rec.get("rows"), int))
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise ValueError(f"{mf}:{lineno}: not a shard record (expected "
                                 '{"shard", "sha256", "bytes", "rows"})')
            out[rec["shard"]] = rec
    return out
