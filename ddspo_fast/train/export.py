"""What a pipeline loads: the final weights of a run, written from the live model at the end
of training or from any checkpoint afterwards.

* A LoRA run writes ``pytorch_lora_weights.safetensors`` with ``save_lora_weights`` of the
  family's pipeline class and the adapter's peft config as the file's LoRA metadata (as
  diffusers' own LoRA training scripts save it), so ``pipe.load_lora_weights(dir)``
  rebuilds the adapter with its rank *and* alpha and applies it at the trained strength.
* A full fine-tune writes a complete diffusers pipeline folder.
* DD-CPP's pair adapters (``train-pair``) are peft folders ``pos_lora_unet/`` and
  ``neg_lora_unet/`` that also hold the same diffusers LoRA file.

``export(source, out)`` turns a checkpoint (or a run, meaning its newest intact checkpoint)
into exactly what a finished run writes. ``loadable(path, scratch)`` is what a consumer
such as ``evaluate`` calls to get something a pipeline loads from a run, an export or a
checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from . import checkpoint as ckpt

LORA_FILE = "pytorch_lora_weights.safetensors"
PAIR_KIND = "train-pair"


# ---------------------------------------------------------------------- writing
def lora_metadata(peft_config) -> dict:
    """A peft ``LoraConfig`` as the JSON-safe dict diffusers stores beside LoRA weights."""
    d = peft_config.to_dict()
    return {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in d.items()}


def pipeline_class(family: str):
    """The pipeline class of ``family`` whose ``save_lora_weights`` / ``load_lora_weights``
    know the denoiser's key prefix (the adapter's ``lora_pipeline_class``)."""
    from ..models import get_family

    return get_family(family).lora_pipeline_class()


def write_lora(out_dir, pipeline_cls, denoiser_name: str, state: Mapping[str, torch.Tensor],
               peft_config) -> None:
    """``out_dir/pytorch_lora_weights.safetensors`` from peft-keyed LoRA ``state`` (adapter
    name stripped, as ``get_peft_model_state_dict`` returns it), with the adapter config as
    diffusers' LoRA metadata."""
    pipeline_cls.save_lora_weights(
        str(out_dir), safe_serialization=True,
        **{f"{denoiser_name}_lora_layers": dict(state),
           f"{denoiser_name}_lora_adapter_metadata": lora_metadata(peft_config)})


def model_card_hook(out_dir, info: dict) -> None:
    """Write the model card (README.md with the Hub's metadata, ``train/model_card.py``)
    beside weights just written: after every final export and every ``export``. ``info``
    holds ``kind`` ('lora' | 'pipeline' | 'pair'), ``family``, ``base_model``, ``config``
    (the run's settings, a dict) and ``step``. A card someone else wrote is kept."""
    from .model_card import CARD, is_ours, write_model_card

    card = Path(out_dir) / CARD
    if card.is_file() and not is_ours(card.read_text(encoding="utf-8", errors="replace")):
        return
    cfg = info.get("config") or {}
    write_model_card(out_dir, base_model=str(info.get("base_model") or cfg.get("model")),
                     train_config=cfg, tags=[t for t in (info.get("family"),) if t])


# ---------------------------------------------------------------------- reading sources
@dataclasses.dataclass
class Source:
    """A checkpoint to export: its directory, state and the run's config."""
    checkpoint: Path
    state: dict
    config: object  # TrainConfig | PairTrainConfig

    @property
    def kind(self) -> str:
        if self.state.get("kind") == PAIR_KIND:
            return "pair"
        return "pipeline" if self.config.lora_rank is None else "lora"


def find_checkpoint(source) -> Path:
    """``source`` itself when it is a checkpoint directory; for a run directory its newest
    intact checkpoint. ValueError naming ``source`` otherwise."""
    src = Path(source)
    if not src.exists():
        raise ValueError(f"source: {src} does not exist")
    if (src / ckpt.STATE_FILE).is_file():
        return src
    if src.is_dir() and ckpt.checkpoints_dir(src).is_dir():
        found = ckpt.find_intact(src)
        if found is not None:
            return found
    what = ("a finished run's weights (load them directly)"
            if any((src / m).exists() for m in (LORA_FILE, "model_index.json"))
            else "no checkpoint")
    raise ValueError(f"source: {src} holds {what}; expected a checkpoint directory "
                     f"(RUN/{ckpt.checkpoints_dir('.').name}/checkpoint-N) or a run with one")


def read_source(source) -> Source:
    from .config import TrainConfig

    path = find_checkpoint(source)
    ckpt.verify(path)
    state = ckpt.read_state(path)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"source: {path} records no run config (written by an older version)")
    if state.get("kind") == PAIR_KIND:
        from .pair_policies import PairTrainConfig as cls
    else:
        cls = TrainConfig
    known = {f.name for f in dataclasses.fields(cls)}
    cfg = cls.from_dict({k: v for k, v in saved.items() if k in known})
    return Source(checkpoint=path, state=state, config=cfg)


def _trainable(path: Path) -> dict:
    """The trained tensors of checkpoint ``path``, whole: a sharded run's shards are put
    back together from every process's file."""
    from safetensors.torch import load_file

    if ckpt.is_sharded(path):
        from .sharding import full_tensors

        return full_tensors(ckpt.read_shard_layouts(path))
    return load_file(str(path / ckpt.TRAINABLE_FILE))


def _load_into(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    named = dict(module.named_parameters())
    for n, v in tensors.items():
        if n not in named or named[n].shape != v.shape:
            raise ValueError(f"source: {where} does not fit the model {n!r} (another model, "
                             "lora_rank or lora_targets?)")
    with torch.no_grad():
        for n, v in tensors.items():
            named[n].copy_(v.to(named[n].dtype))


# ---------------------------------------------------------------------- export
def export(source, out, *, overwrite: bool = False, model: Optional[str] = None) -> dict:
    """Write what a finished run writes from checkpoint ``source`` (or a run's newest
    intact checkpoint) into ``out``: the LoRA file, the full pipeline, or DD-CPP's two
    adapter folders. ``model`` overrides the base model the checkpoint names (moved since).
    Returns ``{"out", "kind", "family", "base_model", "checkpoint", "step"}``."""
    from ..models import detect_family
    from .config import missing_local_model
    from .outdir import publish_export

    src = read_source(source)
    cfg = src.config
    base = str(model or cfg.model)
    problem = missing_local_model(base)
    if problem:
        raise ValueError(f"model: {problem} (the checkpoint's base model; give its new place)")
    out = Path(out)
    _check_out(out, [Path(source), src.checkpoint, Path(base)], overwrite)
    family = cfg.family or detect_family(base)
    kind = src.kind
    write = export_writer(cfg, family, base, kind, _trainable(src.checkpoint), src.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    publish_export(out, write)
    step = int(src.state.get("global_step", 0))
    info = {"out": str(out), "kind": kind, "family": family, "base_model": base,
            "checkpoint": str(src.checkpoint), "step": step}
    model_card_hook(out, {**info, "config": cfg.to_dict()})
    return info


def export_writer(cfg, family: str, base: str, kind: str, tensors: Mapping[str, torch.Tensor],
                  where) -> Callable[[Path], None]:
    """A function writing into a directory what a finished run of ``cfg`` writes, from its
    trained tensors ``tensors`` (whole, by parameter name) over the base model ``base``
    loaded on the CPU: a checkpoint's export, and a sharded run's final weights once
    gathered. ``where`` names the tensors' source in errors."""
    from ..models import load_adapter

    adapter = load_adapter(base, family, components=("denoiser",), device="cpu",
                           dtype=torch.float32)
    den = adapter.denoiser
    if kind == "pair":
        from .pair_policies import add_pair_adapters, write_pair_adapters

        targets = list(cfg.lora_targets or adapter.lora_targets)
        add_pair_adapters(den, cfg.lora_rank, cfg.lora_alpha, targets, cfg.lora_dropout, cfg.seed)
        _load_into(den, tensors, where)
        write = lambda tmp: write_pair_adapters(tmp, den, pipeline_class(family),  # noqa: E731
                                                adapter.denoiser_name)
    elif kind == "lora":
        from .lora import POLICY, add_policy_lora, policy_lora_state

        add_policy_lora(den, cfg.lora_rank, cfg.lora_alpha,
                        cfg.lora_targets or adapter.lora_targets, cfg.seed)
        _load_into(den, tensors, where)
        state = policy_lora_state(den)
        write = lambda tmp: write_lora(tmp, pipeline_class(family),  # noqa: E731
                                       adapter.denoiser_name, state, den.peft_config[POLICY])
    else:
        _load_into(den, tensors, where)
        write = lambda tmp: adapter.save_pipeline(den, str(tmp))  # noqa: E731
    return write


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_out(out: Path, inputs, overwrite: bool) -> None:
    for i in inputs:
        if i.exists() and (_inside(out, i) or _inside(i, out)):
            raise ValueError(f"out: {out} is, holds or sits inside the input {i}; export "
                             "into a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: {out} is not empty; choose a new directory or pass "
                         "overwrite (--overwrite) to replace what it holds")


# ---------------------------------------------------------------------- for consumers
@dataclasses.dataclass
class Loadable:
    """How to load weights into a pipeline: ``pipeline`` (a full pipeline folder) or
    ``base_model`` + ``lora`` (a folder with the LoRA file, for ``load_lora_weights``)."""
    kind: str                 # 'pipeline' | 'lora'
    pipeline: Optional[str]   # a folder for DiffusionPipeline.from_pretrained
    base_model: Optional[str]
    lora: Optional[str]


def loadable(path, scratch, *, base_model: Optional[str] = None,
             export_fn: Callable = export) -> Loadable:
    """What a pipeline loads for ``path``: a pipeline folder as it is; a LoRA run or
    export with its base model (``base_model``, else the run's ``train_config.yaml``);
    a checkpoint, or a run with checkpoints and no final weights, exported into
    ``scratch`` first. ValueError naming ``path`` for anything else."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return Loadable("pipeline", str(p), None, None)
    if (p / LORA_FILE).is_file():
        base = base_model or _run_base_model(p)
        if base is None:
            raise ValueError(f"{p} holds LoRA weights but names no base model (no "
                             "train_config.yaml beside them): give the base model")
        return Loadable("lora", None, base, str(p))
    info = export_fn(p, scratch, overwrite=True, model=base_model)
    if info["kind"] == "pair":
        raise ValueError(f"{p} is a train-pair checkpoint (two adapters), not one model")
    return loadable(info["out"], scratch, base_model=info["base_model"])


def _run_base_model(run: Path) -> Optional[str]:
    f = run / "train_config.yaml"
    if not f.is_file():
        return None
    import yaml

    try:
        d = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return d.get("model") if isinstance(d, dict) else None


__all__ = ["LORA_FILE", "Loadable", "export", "find_checkpoint", "loadable", "lora_metadata",
           "model_card_hook", "pipeline_class", "write_lora"]
