"""Reading files a user may have been given, without ever running code stored in them.

A pickle (``torch.save``'s format, ``numpy``'s object arrays) can run any code when it is
loaded, and checkpoints, adapters, caches and datasets are passed between people. So
everything the library writes is safetensors (tensors) and JSON (everything else), and
this module is the one place of the library that may call ``torch.load`` at all
(``tests/test_layout.py`` checks it):

- :func:`write_state` / :func:`read_state`: a nested state (an optimizer's or LR
  scheduler's ``state_dict``, RNG states) as a safetensors file whose header holds the
  structure as JSON, or as a JSON file when it holds no tensor. Reading it builds only
  dicts, lists, tuples, numbers, strings, tensors and numeric numpy arrays; a state
  round-trips bit for bit.
- :func:`load_pickled_weights`: an upstream pickle format (a peft ``adapter_model.bin``)
  read with ``torch.load(weights_only=True)``, and only on a torch without known ways
  around it.
- :func:`load_trusted_pickle`: a full unpickling, for files written by earlier versions
  of this library, called only when the user passed ``--trust-checkpoint``.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Any

from .fsio import atomic_write, atomic_write_text

# weights_only=True had published bypasses before this torch (CVE-2025-32434 up to 2.5.1,
# CVE-2026-24747 before 2.10); the library's torch floor is the same.
SAFE_TORCH = (2, 10)
STATE_FORMAT = "ddspo_fast.state"
STATE_VERSION = 1
_TREE_KEY = "tree"
_NUMPY_KINDS = "biuf"  # bool, int, uint, float: the numpy dtypes a state may hold


class UnsafeFileError(ValueError):
    """A file could only be read by unpickling it, which is not allowed here. ``file``
    names it."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def weights_only_is_safe() -> bool:
    """Whether this torch's ``weights_only=True`` loading has no published bypass."""
    return torch_version() >= SAFE_TORCH


def load_pickled_weights(path, unwrap: str | None = None) -> dict:
    """A pickled tensor file of an upstream format (e.g. peft's ``adapter_model.bin``, a
    scorer's ``.pt`` checkpoint), loaded with ``weights_only=True`` (tensors and plain
    containers only) on the CPU. ``unwrap``: a key under which some upstream files nest
    their state dict (``{"state_dict": {...}, "epoch": 3}``); taken when present.
    Refused, naming the file and the torch version, on a torch with known bypasses."""
    import torch

    path = Path(path)
    if not weights_only_is_safe():
        raise UnsafeFileError(
            f"{path}: a pickle file cannot be read safely with torch {torch.__version__} "
            f"(weights_only loading has known bypasses before "
            f"{SAFE_TORCH[0]}.{SAFE_TORCH[1]}); upgrade torch or convert it to safetensors",
            file=str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the unpickler: name the file
        first = (str(e).strip().splitlines() or [""])[0]
        raise UnsafeFileError(f"{path}: not a plain tensor file, refused ({type(e).__name__}: "
                              f"{first[:200]})", file=str(path)) from None
    if unwrap is not None and isinstance(sd, dict) and isinstance(sd.get(unwrap), dict):
        sd = sd[unwrap]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise UnsafeFileError(f"{path}: not a state dict of named tensors", file=str(path))
    return sd


def load_trusted_pickle(path) -> Any:
    """Unpickle ``path`` completely. It can run code stored in the file: call it only for a
    file the user said they trust (``--trust-checkpoint``)."""
    import torch

    return torch.load(Path(path), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- state files
def _encode(obj, tensors: dict, where: str, allow_tensors: bool):
    import torch

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if not allow_tensors:
            raise TypeError(f"{where}: a tensor cannot be stored in a JSON state file")
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        np = None
    if np is not None and isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMPY_KINDS:
            raise TypeError(f"{where}: numpy arrays of dtype {obj.dtype} cannot be stored")
        if not allow_tensors:
            raise TypeError(f"{where}: an array cannot be stored in a JSON state file")
        key = str(len(tensors))
        raw = np.ascontiguousarray(obj).view(np.uint8).reshape(-1)
        tensors[key] = torch.from_numpy(raw.copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if np is not None and isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where, allow_tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]", allow_tensors)
                              for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]", allow_tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]", allow_tensors)
                    for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where}: dict key {k!r} is neither a str nor an int")
        return {"__dict__": [[k, _encode(v, tensors, f"{where}[{k!r}]", allow_tensors)]
                             for k, v in obj.items()]}
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a state file")


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tags = [k for k in node if k.startswith("__")]
    if not tags:
        return {k: _decode(v, tensors) for k, v in node.items()}
    tag = tags[0]
    if tag == "__tensor__" and set(node) == {tag}:
        return _tensor(tensors, node[tag])
    if tag == "__tuple__" and set(node) == {tag} and isinstance(node[tag], list):
        return tuple(_decode(v, tensors) for v in node[tag])
    if tag == "__dict__" and set(node) == {tag} and isinstance(node[tag], list):
        out = {}
        for pair in node[tag]:
            if (not isinstance(pair, list) or len(pair) != 2
                    or not isinstance(pair[0], (str, int)) or isinstance(pair[0], bool)):
                raise ValueError("a __dict__ entry is not a [key, value] pair")
            out[pair[0]] = _decode(pair[1], tensors)
        return out
    if tag == "__float__" and set(node) == {tag} and node[tag] in ("inf", "-inf", "nan"):
        return float(node[tag])
    if tag == "__ndarray__" and set(node) == {tag, "dtype", "shape"}:
        import numpy as np

        dtype = np.dtype(str(node["dtype"]))
        if dtype.kind not in _NUMPY_KINDS:
            raise ValueError(f"numpy dtype {dtype} is not allowed")
        raw = _tensor(tensors, node[tag]).numpy().tobytes()
        return np.frombuffer(raw, dtype=dtype).reshape([int(s) for s in node["shape"]]).copy()
    raise ValueError(f"unknown entry {sorted(node)}")


def _tensor(tensors: dict, key):
    if not isinstance(key, str) or key not in tensors:
        raise ValueError(f"tensor {key!r} is not in the file")
    return tensors[key]


def write_state(path, obj) -> None:
    """Write ``obj`` (nested dicts / lists / tuples of numbers, strings, tensors, numeric
    numpy arrays) atomically: ``*.json`` for a state without tensors, else a safetensors
    file whose header holds the structure. Anything else raises ``TypeError`` naming it."""
    path = Path(path)
    tensors: dict = {}
    as_json = path.suffix == ".json"
    tree = _encode(obj, tensors, path.name, allow_tensors=not as_json)
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, _TREE_KEY: tree}
    if as_json:
        atomic_write_text(path, json.dumps(doc, allow_nan=False) + "\n")
        return
    meta = {"format": STATE_FORMAT, "version": str(STATE_VERSION),
            _TREE_KEY: json.dumps(tree, allow_nan=False)}
    atomic_write(path, lambda tmp: save_tensors(tmp, tensors, meta))


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, with a full disk reported as the ``OSError`` it is
    (safetensors raises its own error class, which ``fsio.explain_disk_full`` would miss)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001
        text = str(e).lower()
        if "os error 28" in text or "no space left" in text:
            raise OSError(errno.ENOSPC, str(e)) from None
        raise


def read_state(path) -> Any:
    """What :func:`write_state` wrote. Raises ``ValueError`` (with the reason) on anything
    that is not such a file; never unpickles."""
    path = Path(path)
    if path.suffix == ".json":
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        tree, tensors = doc.get(_TREE_KEY), {}
    else:
        from safetensors.torch import load_file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT or _TREE_KEY not in meta:
            raise ValueError(f"not a {STATE_FORMAT} file (its header has no state structure)")
        tree, tensors = json.loads(meta[_TREE_KEY]), load_file(str(path))
    version = doc.get("version") if path.suffix == ".json" else meta.get("version")
    if str(version) != str(STATE_VERSION):
        raise ValueError(f"unsupported state version {version!r} (this library reads "
                         f"{STATE_VERSION})")
    return _decode(tree, tensors)
