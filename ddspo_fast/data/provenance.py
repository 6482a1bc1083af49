"""What encoded a dataset: a fingerprint of the text encoders (and, for image pairs, the
VAE) that produced its stored embeddings and latents, and the check that a training run's
model is the one that did.

A dataset stores the prompts' text embeddings (and ``encode``'s VAE latents); training
reads them instead of running those networks. Embeddings from another text encoder of the
same family have the same shapes, so nothing downstream would notice: the fine-tuned
denoiser would learn conditions its own text encoder never produces. ``prepare`` and
``encode`` record ``info.json["encoders"]``; ``train`` / ``train-pair`` compare it with
their ``model`` and refuse a mismatch (or, with ``allow_encoder_mismatch``, warn).

The fingerprint is cheap by design (it runs at every training start): per component
folder, every file's relative path and size, config files whole, and each weight file's
first and last MiB (other weights differ there as everywhere) in one sha256. It tells
weights apart; it is not a proof of byte-equality of the middle of a file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

INFO_KEY = "encoders"
_EDGE = 1 << 20  # bytes read from each end of a weight file
_WHOLE = (".json", ".txt", ".model")  # small files read whole (configs, tokenizer files)
_FLAG = "allow_encoder_mismatch"


def _model_root(model) -> Optional[Path]:
    p = Path(str(model)).expanduser()
    if p.is_dir():
        return p
    try:  # a hub id: its local snapshot only, nothing is downloaded
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # noqa: BLE001 - not a local model: nothing to fingerprint
        return None


def _digest(root: Path, components: Iterable[str]) -> Optional[str]:
    h = hashlib.sha256()
    seen = False
    for name in components:
        d = root / name
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            rel = p.relative_to(root)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            seen = True
            size = p.stat().st_size
            h.update(f"{rel.as_posix()}\0{size}\0".encode())
            with open(p, "rb") as f:
                if p.suffix in _WHOLE or size <= 2 * _EDGE:
                    h.update(f.read())
                else:
                    h.update(f.read(_EDGE))
                    f.seek(size - _EDGE)
                    h.update(f.read(_EDGE))
    return h.hexdigest() if seen else None


def encoder_fingerprint(model, family: str, vae: bool = False) -> Optional[dict]:
    """``{"text_encoders": digest, "vae": digest?}`` of a local model (None when its files
    are not on this machine)."""
    from ..models import get_family

    root = _model_root(model)
    if root is None:
        return None
    text = [c for c in get_family(family).text_components if c.startswith("text_encoder")]
    fp = {"text_encoders": _digest(root, text)}
    if vae:
        fp["vae"] = _digest(root, ["vae"])
    return fp


def check_encoders(dataset, model, family: str, allow_mismatch: bool = False) -> None:
    """Refuse (ValueError naming data and model) a dataset whose recorded encoders differ
    from ``model``'s, or warn with ``allow_mismatch``. Datasets that recorded nothing
    (older ones, the official layout) and models not on this machine are not checked."""
    info = getattr(dataset, "info", None)
    recorded = info.get(INFO_KEY) if isinstance(info, dict) else None
    if not isinstance(recorded, dict):
        return
    current = encoder_fingerprint(model, family, vae="vae" in recorded)
    if current is None:
        return
    for key, what in (("text_encoders", "text encoder"), ("vae", "VAE")):
        have, want = recorded.get(key), current.get(key)
        if key not in recorded or have is None or want is None or have == want:
            continue
        made_by = info.get("model") or "another model"
        msg = (f"data: {dataset.path} was encoded with another {what} ({made_by}, "
               f"{have[:12]}...) than model {model} ({want[:12]}...): its stored "
               f"{'embeddings' if key == 'text_encoders' else 'latents'} do not match this "
               f"model; re-encode the data with this model, or set {_FLAG} "
               f"(--{_FLAG.replace('_', '-')}) to train anyway")
        if not allow_mismatch:
            raise ValueError(msg)
        log.warning("%s (allowed by %s)", msg.split(": re-encode")[0], _FLAG)
