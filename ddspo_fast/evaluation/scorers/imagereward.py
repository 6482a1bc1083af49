"""ImageReward (Xu et al. 2023, THUDM/ImageReward): BLIP's ViT-L image encoder, its BERT
text encoder cross-attending to the image tokens, and a reward MLP on the text [CLS]
output, standardised: ``r = (MLP(BERT(c | ViT(x))[:, 0]) - 0.16717362830052426) /
1.0333394966054072``, as its ``ImageReward.score`` computes it (prompt tokens padded to 35,
the image prepared by CLIP's validation transform at 224 px).

The folder holds what the upstream loader reads: ``ImageReward.pt`` (read with
``torch.load(weights_only=True)``), ``med_config.json`` (BLIP's BERT settings) and the
bert-base-uncased tokenizer files (``vocab.txt`` ...), to which BLIP's ``[DEC]`` /
``[ENC]`` tokens are added as its tokenizer does. The weights are placed in transformers'
``BlipVisionModel`` and ``BlipTextModel`` (the same architecture, ported from BLIP), so
neither the image-reward package (which pins an old timm) nor torchvision is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import clip_val_transform, load_state_dict_file, need_path
from .mlp import RewardMLP

WHAT = ("an ImageReward folder (ImageReward.pt, med_config.json and the bert-base-uncased "
        "tokenizer files)")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
_VIS = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
        ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


def _weights_file(d: Path) -> Path:
    for name in ("ImageReward.pt", "ImageReward.safetensors"):
        if (d / name).is_file():
            return d / name
    found = sorted(p for p in d.iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
    if len(found) == 1:
        return found[0]
    raise ValueError(f"imagereward: {d} holds no ImageReward.pt; expected {WHAT}")


def vision_model(sd: dict, heads: int | None = None):
    """A transformers BlipVisionModel holding BLIP's ``blip.visual_encoder.*`` weights."""
    from transformers import BlipVisionConfig, BlipVisionModel

    p = "blip.visual_encoder."
    try:
        width, _, patch, _ = sd[p + "patch_embed.proj.weight"].shape
        n_pos = sd[p + "pos_embed"].shape[1]
    except KeyError as e:
        raise ValueError(f"imagereward: the weights hold no BLIP image encoder (no {e.args[0]})") from e
    depth = 1 + max(int(k[len(p) + 7:].split(".")[0]) for k in sd if k.startswith(p + "blocks."))
    cfg = BlipVisionConfig(hidden_size=width, num_hidden_layers=depth,
                           num_attention_heads=heads or width // 64, patch_size=patch,
                           image_size=int(round((n_pos - 1) ** 0.5)) * patch,
                           intermediate_size=sd[p + "blocks.0.mlp.fc1.weight"].shape[0],
                           hidden_act="gelu", layer_norm_eps=1e-6)
    new = {"embeddings.class_embedding": sd[p + "cls_token"],
           "embeddings.position_embedding": sd[p + "pos_embed"],
           "embeddings.patch_embedding.weight": sd[p + "patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": sd[p + "patch_embed.proj.bias"],
           "post_layernorm.weight": sd[p + "norm.weight"], "post_layernorm.bias": sd[p + "norm.bias"]}
    for i in range(depth):
        for old, name in _VIS:
            for w in ("weight", "bias"):
                new[f"encoder.layers.{i}.{name}.{w}"] = sd[f"{p}blocks.{i}.{old}.{w}"]
    model = BlipVisionModel(cfg)
    _load("image encoder", model, new)
    return model


def text_model(sd: dict, med_config: dict, encoder_width: int):
    """A transformers BlipTextModel (with cross-attention) holding ``blip.text_encoder.*``."""
    from transformers import BlipTextConfig, BlipTextModel

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
            "pad_token_id")
    cfg = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config},
                         encoder_hidden_size=encoder_width, is_decoder=True)  # builds cross-attention
    p = "blip.text_encoder."
    new = {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and ".pooler." not in k}
    if not new:
        raise ValueError("imagereward: the weights hold no BLIP text encoder (blip.text_encoder.*)")
    model = BlipTextModel(cfg, add_pooling_layer=False)
    _load("text encoder", model, new)
    return model


def _load(what, model, sd):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"imagereward: the {what} weights do not fit (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


class ImageReward:
    name = "imagereward"
    higher_is_better = True

    def __init__(self, path, device="cpu", vision_heads: int | None = None):
        d = need_path("imagereward", path, WHAT)
        if not d.is_dir():
            raise ValueError(f"imagereward: {d} is a file; expected {WHAT}")
        med = d / "med_config.json"
        try:
            med_config = json.loads(med.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"imagereward: cannot read {med} ({type(e).__name__}); expected {WHAT}") from e
        sd = load_state_dict_file("imagereward", _weights_file(d))
        from ...models.quiet import quiet_loading

        with quiet_loading():
            from transformers import BertTokenizer

            try:
                tok = BertTokenizer.from_pretrained(str(d))
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"imagereward: no bert-base-uncased tokenizer in {d} "
                                 f"({type(e).__name__}); expected {WHAT}") from e
            tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            self.tokenizer = tok
            self.vision = vision_model(sd, vision_heads).to(device).eval()
            self.text = text_model(sd, med_config, self.vision.config.hidden_size).to(device).eval()
        self.mlp = RewardMLP.from_state_dict("imagereward", sd, prefix="mlp.").to(device)
        self.size = self.vision.config.image_size
        self.device = device

    def score(self, images, prompts) -> list[float]:
        import torch

        out = []
        for s in range(0, len(images), 16):
            pix = torch.stack([clip_val_transform(im, self.size) for im in images[s:s + 16]])
            tok = self.tokenizer(list(prompts[s:s + 16]), padding="max_length", truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            with torch.no_grad():
                img = self.vision(pixel_values=pix.to(self.device)).last_hidden_state
                att = torch.ones(img.shape[:-1], dtype=torch.long, device=self.device)
                txt = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                encoder_hidden_states=img, encoder_attention_mask=att,
                                is_decoder=False).last_hidden_state[:, 0, :].float()
                r = (self.mlp(txt).squeeze(-1) - MEAN) / STD
            out += r.tolist()
        return out
