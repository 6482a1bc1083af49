"""What every scorer is, and the loading rules they share.

A scorer turns images and their prompts into one number per image
(``score(images, prompts) -> list[float]``); ``higher_is_better`` says which way is
better. Weights come only from a local file or folder the user names. Upstream ``.pt``
/ ``.pth`` checkpoints are read by ``load_state_dict_file`` alone, with
``torch.load(weights_only=True)`` (tensors and plain containers, no code), or from
``.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence


class Scorer(Protocol):
    name: str
    higher_is_better: bool

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]: ...


def need_path(name: str, path, what: str) -> Path:
    if path is None:
        raise ValueError(f"{name}: no weights given; pass {what}")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{name}: {p} does not exist (expected {what})")
    return p


def load_state_dict_file(name: str, path) -> dict:
    """Tensors of a ``.safetensors`` file or of an upstream ``torch.save`` checkpoint (read
    through ``ddspo_fast.safeload``: ``weights_only=True``, on a torch without known bypasses; a ``state_dict`` entry is unwrapped, a DDP ``module.``
    prefix dropped)."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            from ddspo_fast.safeload import load_pickled_weights

            sd = load_pickled_weights(path, unwrap="state_dict")
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message naming it
        raise ValueError(f"{name}: cannot read weights from {path} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{name}: {path} holds no tensor state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def clip_folder(name: str, path, what: str) -> Path:
    """A transformers CLIP model folder, or a one-line error saying what it is instead."""
    p = need_path(name, path, what)
    if (p / "model_index.json").is_file():
        raise ValueError(f"{name}: {p} is a diffusers pipeline folder; expected {what}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{name}: {p} has no config.json; expected {what}")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{name}: cannot read {cfg} ({type(e).__name__}); expected {what}") from e
    if model_type != "clip":
        kind = {"clip_text_model": "a CLIP text encoder alone",
                "clip_vision_model": "a CLIP vision encoder alone"}.get(model_type, f"model_type {model_type!r}")
        raise ValueError(f"{name}: {p} holds {kind}; expected {what}")
    return p


def load_clip(name: str, path, device, what: str):
    """(model, tokenizer, image processor) of a CLIP folder. The processor is the slow
    ``CLIPImageProcessor`` (PIL), which needs no torchvision on any transformers."""
    p = clip_folder(name, path, what)
    from ...models.quiet import quiet_loading

    with quiet_loading():
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(p)).to(device).eval()
            tok = AutoTokenizer.from_pretrained(str(p))
            proc = CLIPImageProcessor.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise ValueError(f"{name}: cannot load {what} from {p} ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from e
    return model, tok, proc


def clip_embeddings(model, tokenizer, processor, images, texts, device, batch: int = 16):
    """L2-normalised CLIP text and image embeddings (fp32), row k for (images[k], texts[k])."""
    import torch

    max_len = getattr(tokenizer, "model_max_length", 77)
    max_len = 77 if max_len is None or max_len > 10_000 else max_len
    ts, vs = [], []
    for s in range(0, len(images), batch):
        tok = tokenizer(list(texts[s:s + batch]), padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt").to(device)
        pix = processor(images=list(images[s:s + batch]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            t = model.get_text_features(**tok)
            v = model.get_image_features(pixel_values=pix.to(device, model.dtype))
        # transformers >= 5 may return a model output instead of a tensor
        ts.append(getattr(t, "pooler_output", t).float())
        vs.append(getattr(v, "pooler_output", v).float())
    t, v = torch.cat(ts), torch.cat(vs)
    return torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(v, dim=-1)


def image_embeddings(model, processor, images, device, batch: int = 16):
    """L2-normalised CLIP image embeddings (fp32)."""
    import torch

    vs = []
    for s in range(0, len(images), batch):
        pix = processor(images=list(images[s:s + batch]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            v = model.get_image_features(pixel_values=pix.to(device, model.dtype))
        vs.append(getattr(v, "pooler_output", v).float())
    return torch.nn.functional.normalize(torch.cat(vs), dim=-1)


MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, open_clip's default
STD = (0.26862954, 0.26130258, 0.27577711)


def clip_val_transform(image, size: int):
    """CLIP's validation transform as open_clip and ImageReward apply it with torchvision:
    Resize(size, bicubic) on the shortest side, CenterCrop(size) (offsets rounded as
    torchvision rounds them), to [0, 1], normalise with OpenAI CLIP's mean / std."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
