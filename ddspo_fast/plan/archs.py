"""What the planner knows of a model without reading its weights.

An architecture is the denoiser's class and config, the latent and conditioning shapes
one row of a step feeds it, and the pipeline's other components (text encoders, VAE) as
configs to count. It comes from a published name (the released configs of
``bench/archs.py``; FLUX.1-dev is defined here), a diffusers pipeline folder (its
``config.json`` files only) or a ``TrainConfig``'s model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

# Vae downsampling factor and the attention modules LoRA targets, per denoiser class.
_VAE_FACTOR = {"sana": 32}

# The pipeline's other components, per family (configs of the released checkpoints).
_CLIP_L = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, projection_dim=768))
_CLIP_L_PROJ = ("CLIPTextModelWithProjection", _CLIP_L[1])
_CLIP_G = ("CLIPTextModelWithProjection", dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
_T5_XXL = ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                  num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
_GEMMA2_2B = ("Gemma2Model", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                  num_hidden_layers=26, num_attention_heads=8,
                                  num_key_value_heads=4, head_dim=256))
_KL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_VAE4 = ("AutoencoderKL", dict(_KL, latent_channels=4))
_VAE16 = ("AutoencoderKL", dict(_KL, latent_channels=16))
_DCAE = ("AutoencoderDC", dict(latent_channels=32))   # diffusers' defaults: DC-AE f32c32
TEXT_ENCODERS = {
    "sd15": {"text_encoder": _CLIP_L},
    "sdxl": {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G},
    "sd3": {"text_encoder": _CLIP_L_PROJ, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL},
    "sana": {"text_encoder": _GEMMA2_2B},
    "flux": {"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
}
VAES = {"sd15": _VAE4, "sdxl": _VAE4, "sd3": _VAE16, "sana": _DCAE, "flux": _VAE16}
LORA_TARGETS = {"flux": ("to_q", "to_k", "to_v", "to_out.0")}


@dataclass
class Arch:
    family: str
    denoiser_cls: str
    config: dict
    latent_shape: tuple
    cond: dict                       # key -> (shape per row, dtype name)
    notes: str = ""
    source: str = ""
    components: dict = field(default_factory=dict)   # name -> (class, config)
    vae: Optional[tuple] = None

    @property
    def vae_factor(self) -> int:
        return _VAE_FACTOR.get(self.family, 8)

    def pixels(self) -> tuple[int, int]:
        return self.latent_shape[1] * self.vae_factor, self.latent_shape[2] * self.vae_factor

    def text_tokens(self) -> int:
        return int(self.cond["prompt_embeds"][0][0])

    def at(self, height: Optional[int] = None, width: Optional[int] = None,
           tokens: Optional[int] = None) -> "Arch":
        """The same model at another image size or text length."""
        lat = list(self.latent_shape)
        f = self.vae_factor * (2 if self.denoiser_cls == "FluxTransformer2DModel" else 1)
        for i, px, name in ((1, height, "height"), (2, width, "width")):
            if px is not None:
                if px <= 0 or px % f:
                    raise ValueError(f"{name}: expected a positive multiple of {f} for "
                                     f"{self.family}, got {px}")
                lat[i] = px // self.vae_factor
        cond = dict(self.cond)
        if tokens is not None:
            if tokens <= 0:
                raise ValueError(f"text_tokens: expected a positive number, got {tokens}")
            for k, (shape, dt) in cond.items():
                if k in ("prompt_embeds", "prompt_attention_mask"):
                    cond[k] = ((tokens, *shape[1:]), dt)
        return replace(self, latent_shape=tuple(lat), cond=cond)

    def lora_targets(self) -> tuple:
        if self.family in LORA_TARGETS:
            return LORA_TARGETS[self.family]
        from ..models import get_family
        return tuple(get_family(self.family).lora_targets)


def _dtype_name(dt) -> str:
    s = str(dt).replace("torch.", "")
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(s, s)


def arch_from_spec(spec, source: str) -> Arch:
    """The ``Arch`` of a bench/testing spec (family, denoiser class and config, latent and
    condition shapes); ``source`` says where the spec came from."""
    fam = spec.family
    return Arch(fam, spec.denoiser_cls, dict(spec.config), tuple(spec.latent_shape),
                {k: (tuple(s), _dtype_name(d)) for k, (s, d) in spec.cond.items()},
                notes=getattr(spec, "notes", ""), source=source,
                components=TEXT_ENCODERS.get(fam, {}), vae=VAES.get(fam))


NAMES = {"sd15": "sd15", "sd1.5": "sd15", "sdxl": "sdxl", "sd3": "sd3", "sd3-medium": "sd3",
         "sana": "sana", "sana-600m": "sana", "flux": "flux", "flux-dev": "flux",
         "flux.1-dev": "flux"}


def published_names() -> tuple:
    """The aliases above and every released config of ``bench/archs.py`` ``REAL``."""
    from ..bench.archs import REAL

    return tuple(dict.fromkeys(["sd15", "sdxl", "sd3", "sana", "flux-dev", *REAL]))


def by_name(name: str) -> Arch:
    from ..bench.archs import REAL

    key = NAMES.get(name.lower(), name.lower() if name.lower() in REAL else None)
    if key is None or key not in REAL:
        raise ValueError(f"model: unknown architecture {name!r} (expected a diffusers "
                         f"pipeline folder or one of {', '.join(published_names())})")
    return arch_from_spec(REAL[key], f"published config {key} (bench/archs.py)")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"model: {path} not found (expected the {what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: {path} is not readable JSON ({e})") from None


def from_folder(path: str) -> Arch:
    """A diffusers pipeline folder: the denoiser's config and the family's shapes."""
    from ..models import detect_family

    root = Path(path)
    family = detect_family(str(root))
    sub = "unet" if (root / "unet").is_dir() else "transformer"
    cfg = _read_json(root / sub / "config.json", f"{sub} config of a diffusers pipeline")
    cls = cfg.pop("_class_name", None)
    for k in [k for k in cfg if k.startswith("_")]:
        cfg.pop(k)
    base = by_name(family)
    # The released shapes, adjusted to this denoiser's channels and size.
    lat = list(base.latent_shape)
    lat[0] = int(cfg.get("in_channels", lat[0]))
    if cls == "FluxTransformer2DModel":
        lat[0] //= 4   # in_channels counts the 2x2-packed latent
    size = cfg.get("sample_size")
    if isinstance(size, int) and family != "flux":
        lat[1] = lat[2] = size
    cond = {}
    dims = ("caption_channels", "joint_attention_dim", "cross_attention_dim")  # first wins
    for k, (shape, dt) in base.cond.items():
        shape = list(shape)
        if k == "prompt_embeds":
            for key in dims:
                if cfg.get(key):
                    shape[-1] = int(cfg[key]) if not isinstance(cfg[key], (list, tuple)) else int(cfg[key][0])
                    break
        if k == "pooled_prompt_embeds":
            if cfg.get("pooled_projection_dim"):
                shape[-1] = int(cfg["pooled_projection_dim"])
            elif cfg.get("projection_class_embeddings_input_dim"):
                shape[-1] = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
                    cfg.get("addition_time_embed_dim", 256))
        cond[k] = (tuple(shape), dt)
    return Arch(family, cls or base.denoiser_cls, cfg, tuple(lat), cond,
                source=f"pipeline folder {root}", components=base.components, vae=base.vae)


def resolve(model: str) -> Arch:
    """A published name or a local pipeline folder."""
    if Path(model).is_dir():
        return from_folder(model)
    return by_name(model)
