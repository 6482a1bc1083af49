"""What a model path is, and the diffusers pipeline it samples with.

``resolve`` answers "what is this path" once, for every kind of output the library
writes; ``load_pipeline`` turns the answer into a pipeline. The kinds:

* ``pipeline``: a diffusers pipeline folder (a base model, a full fine-tune's output_dir,
  an export of one).
* ``lora``: a folder holding ``pytorch_lora_weights.safetensors`` (a LoRA run's
  output_dir or its export); its base is ``base_model`` or the ``model`` named in the
  folder's ``train_config.yaml``.
* ``checkpoint``: ``<run>/checkpoints/checkpoint-N`` or a run folder that holds only
  checkpoints (no final weights yet).
* ``pair-adapters``: DD-CPP's ``pos_lora_unet/`` + ``neg_lora_unet/`` peft folders.

Checkpoints and pair adapters are sampled through their export (what ``ddspo-fast
export`` writes): ``materialise`` is the one place that turns them into a ``pipeline`` or
``lora`` source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
PAIR_DIRS = ("pos_lora_unet", "neg_lora_unet")  # DD-CPP's adapter folders
_CKPT = re.compile(r"^checkpoint-\d+$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "pipeline" | "lora" | "checkpoint" | "pair-adapters"
    path: Path
    base: str | None = None  # the base pipeline of a lora / checkpoint / pair-adapters


def read_train_model(path: Path, arg: str = "base_model") -> str | None:
    """The ``model`` a run's train_config.yaml names (None when there is no such file)."""
    cfg_file = path / "train_config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    try:
        model = (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}).get("model")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        raise ValueError(f"{arg}: cannot read the base model from {cfg_file} "
                         f"({type(e).__name__}: {e}); pass base_model=") from e
    return str(model) if model else None


def _base_of(path: Path, base_model, arg: str, what: str) -> str:
    if base_model is not None:
        return str(base_model)
    model = read_train_model(path) or read_train_model(path.parent.parent)  # checkpoint-N
    if model:
        return model
    raise ValueError(f"base_model: {path} holds {what} but no train_config.yaml naming its "
                     "base model; pass base_model= (the pipeline it was trained on)")


def resolve(path, base_model=None, arg: str = "pipeline_or_dir") -> ModelSource:
    """Classify ``path`` (see the module docstring); a path that is none of them is a
    ``ValueError`` naming ``arg`` and what was expected."""
    path = Path(path)
    if not path.exists() and _HUB_ID.match(str(path)):
        return ModelSource("pipeline", path)  # a hub id: from_pretrained reads the cache
    if not path.exists():
        raise ValueError(f"{arg}: {path} does not exist (expected a diffusers pipeline folder, "
                         "a training run's output_dir or an export)")
    if not path.is_dir():
        raise ValueError(f"{arg}: {path} is a file; expected a folder (a diffusers pipeline, "
                         "a training run's output_dir or an export)")
    if (path / "model_index.json").is_file():
        return ModelSource("pipeline", path)
    if (path / LORA_WEIGHTS).is_file():
        return ModelSource("lora", path, _base_of(path, base_model, arg, "LoRA weights"))
    if all((path / d).is_dir() for d in PAIR_DIRS):
        return ModelSource("pair-adapters", path, base_model)
    if _CKPT.match(path.name) or (path / "checkpoints").is_dir():
        return ModelSource("checkpoint", path, base_model)
    raise ValueError(f"{arg}: {path} holds neither model_index.json nor {LORA_WEIGHTS} "
                     "(expected a diffusers pipeline folder, a training run's output_dir, a "
                     "checkpoint or an export)")


def materialise(source: ModelSource, arg: str = "pipeline_or_dir", scratch=None) -> ModelSource:
    """A ``pipeline`` or ``lora`` source for ``source``. A checkpoint (or a run holding only
    checkpoints) is exported into ``scratch`` first, as ``ddspo-fast export`` writes it;
    DD-CPP pair adapters are sampled through the winning adapter (``pos_lora_unet``, a
    diffusers LoRA file with its alpha) on their base."""
    if source.kind in ("pipeline", "lora"):
        return source
    if source.kind == "pair-adapters":
        pos = source.path / PAIR_DIRS[0]
        if not (pos / LORA_WEIGHTS).is_file():
            raise ValueError(f"{arg}: {pos} has no {LORA_WEIGHTS} (pair adapters written before "
                             "ddspo_fast wrote that file): export the run's checkpoint instead")
        return ModelSource("lora", pos, _base_of(source.path, source.base, arg, "DD-CPP pair adapters"))
    if scratch is None:
        raise ValueError(f"{arg}: {source.path} holds a training checkpoint; export it first "
                         f"(ddspo-fast export {source.path} --out DIR) and evaluate DIR")
    from ..train.export import export

    info = export(source.path, Path(scratch) / "export", overwrite=True, model=source.base)
    if info["kind"] == "pair":
        return materialise(ModelSource("pair-adapters", Path(info["out"]), info["base_model"]), arg)
    if info["kind"] == "lora":
        return ModelSource("lora", Path(info["out"]), info["base_model"])
    return ModelSource("pipeline", Path(info["out"]))


def family_of(source: ModelSource) -> str | None:
    """The model family of a source, read from its (or its base's) model_index.json."""
    from ..models import detect_family

    target = source.path if source.kind == "pipeline" else source.base
    if target is None:
        return None
    try:
        return detect_family(str(target))
    except (ValueError, OSError):
        return None


def dtype_of(name: str | None, device):
    """``fp32`` / ``fp16`` / ``bf16`` (None: fp16 on CUDA, fp32 elsewhere)."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def load_pipeline(pipeline_or_dir, device, base_model=None, dtype=None,
                  arg: str = "pipeline_or_dir"):
    """A diffusers pipeline on ``device`` for a pipeline object or any path ``resolve``
    knows (loaded in ``dtype``, not cast afterwards)."""
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ddspo-fast-export-") as scratch:
            # the exported weights are read into memory before the folder goes
            return _load_path(pipeline_or_dir, device, base_model, dtype, arg, scratch)
    if hasattr(pipeline_or_dir, "components") and callable(pipeline_or_dir):
        pipe = pipeline_or_dir
    else:
        raise ValueError(f"{arg}: expected a diffusers pipeline or a directory, got "
                         f"{type(pipeline_or_dir).__name__}")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_path(pipeline_or_dir, device, base_model, dtype, arg, scratch):
    import torch

    src = materialise(resolve(pipeline_or_dir, base_model, arg), arg, scratch)
    want = dtype_of(dtype, device)
    kw = {} if want == torch.float32 else {"torch_dtype": want}  # fp32 is the default
    if src.kind == "pipeline":
        pipe = _from_pretrained(src.path.as_posix(), arg, **kw)
    else:
        pipe = _from_pretrained(src.base, "base_model", **kw)
        try:
            pipe.load_lora_weights(str(src.path))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{arg}: the LoRA in {src.path} does not load into "
                             f"{src.base} ({type(e).__name__}: {e})") from e
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(model: str, arg: str, **kw):
    from ..models.quiet import quiet_loading

    with quiet_loading():
        from diffusers import DiffusionPipeline

        try:
            return DiffusionPipeline.from_pretrained(model, **kw)
        except (OSError, ValueError) as e:  # missing files, unreadable weights, bad id
            raise ValueError(f"{arg}: cannot load a diffusers pipeline from {model} "
                             f"({type(e).__name__}: {e})") from e
