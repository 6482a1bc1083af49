"""HPSv2 / HPSv2.1 (Wu et al. 2023, tgxs002/HPSv2): open_clip's ViT-H-14 fine-tuned on
human preferences; the score of image x for prompt c is the cosine of the two normalised
embeddings, ``E_image(x) . E_text(c)`` with no logit scale, as its ``img_score.py``
computes ``diag(image_features @ text_features.T)`` (about 0.2-0.3 on real images).

The checkpoint file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``: an open_clip
state dict, under ``state_dict``) is read with ``torch.load(weights_only=True)`` and its
weights are placed in a transformers ``CLIPModel`` of the same shape (open_clip's
``in_proj`` split into q / k / v, projections transposed, exact GELU), so open_clip and
torchvision are not needed. Images are prepared as open_clip's validation transform does
(shortest side to the model's size, bicubic; centre crop rounded as torchvision rounds it;
OpenAI CLIP mean / std). The tokenizer is a CLIP BPE tokenizer folder (every OpenAI /
LAION CLIP shares it): the ``clip`` folder's.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import clip_val_transform, load_state_dict_file, need_path

WHAT = "the HPS checkpoint file (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)"
def _layers(sd: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return 1 + max((int(m[1]) for k in sd if (m := pat.match(k))), default=-1)


def to_transformers(sd: dict, vision_head_width: int = 80, text_head_width: int = 64):
    """A transformers ``CLIPConfig`` and state dict holding open_clip CLIP weights ``sd``."""
    import torch
    from transformers import CLIPConfig

    try:
        wv, _, patch, _ = sd["visual.conv1.weight"].shape
        n_pos = sd["visual.positional_embedding"].shape[0]
        vocab, wt = sd["token_embedding.weight"].shape
        ctx = sd["positional_embedding"].shape[0]
        embed = sd["text_projection"].shape[1]
    except KeyError as e:
        raise ValueError(f"hpsv2: not an open_clip CLIP state dict (no {e.args[0]})") from e
    grid = int(round((n_pos - 1) ** 0.5))
    cfg = CLIPConfig(
        projection_dim=embed,
        text_config=dict(vocab_size=vocab, hidden_size=wt, num_hidden_layers=_layers(sd, ""),
                         num_attention_heads=wt // text_head_width, max_position_embeddings=ctx,
                         intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed),
        vision_config=dict(hidden_size=wv, num_hidden_layers=_layers(sd, "visual."),
                           num_attention_heads=wv // vision_head_width, patch_size=patch,
                           image_size=grid * patch, hidden_act="gelu", layer_norm_eps=1e-5,
                           intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           projection_dim=embed))
    out = {"logit_scale": sd["logit_scale"].reshape(()),
           "text_projection.weight": sd["text_projection"].T,
           "visual_projection.weight": sd["visual.proj"].T,
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"]}
    for ln_old, ln_new in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"vision_model.{ln_new}.{p}"] = sd[f"visual.{ln_old}.{p}"]
    for src, dst, n in (("", "text_model", cfg.text_config.num_hidden_layers),
                        ("visual.", "vision_model", cfg.vision_config.num_hidden_layers)):
        for i in range(n):
            a, b = f"{src}transformer.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            for name, new in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                              ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                              ("attn.out_proj", "self_attn.out_proj")):
                for p in ("weight", "bias"):
                    out[f"{b}{new}.{p}"] = sd[f"{a}{name}.{p}"]
            for p in ("weight", "bias"):
                q, k, v = torch.chunk(sd[f"{a}attn.in_proj_{p}"], 3, dim=0)
                out[f"{b}self_attn.q_proj.{p}"] = q
                out[f"{b}self_attn.k_proj.{p}"] = k
                out[f"{b}self_attn.v_proj.{p}"] = v
    return cfg, out


class HPSv2:
    name = "hpsv2"
    higher_is_better = True

    def __init__(self, path, device="cpu", tokenizer=None, vision_head_width: int = 80,
                 text_head_width: int = 64):
        import torch
        from transformers import CLIPModel

        from ...models.quiet import quiet_loading

        f = need_path("hpsv2", path, WHAT)
        if f.is_dir():
            raise ValueError(f"hpsv2: {f} is a folder; expected {WHAT}")
        if tokenizer is None:
            raise ValueError("hpsv2: needs a CLIP tokenizer; pass the clip folder too (any "
                             "OpenAI / LAION CLIP folder: they share one vocabulary)")
        cfg, sd = to_transformers(load_state_dict_file("hpsv2", f), vision_head_width,
                                  text_head_width)
        with quiet_loading():
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            except (OSError, ValueError) as e:
                raise ValueError(f"hpsv2: no CLIP tokenizer in {tokenizer} ({type(e).__name__})") from e
        if len(self.tokenizer) > cfg.text_config.vocab_size:
            raise ValueError(f"hpsv2: the tokenizer in {tokenizer} has {len(self.tokenizer)} tokens "
                             f"but the model in {f} embeds {cfg.text_config.vocab_size}; pass a "
                             "CLIP folder whose tokenizer matches (e.g. openai/clip-vit-large-patch14)")
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            cfg.text_config.eos_token_id = eos
        model = CLIPModel(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"hpsv2: {f} does not fit a CLIP of its own shape (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.model = model.to(device).eval()
        self.device = device
        self.size = cfg.vision_config.image_size
        self.context = cfg.text_config.max_position_embeddings

    def score(self, images, prompts) -> list[float]:
        import torch

        out = []
        for s in range(0, len(images), 16):
            pix = torch.stack([clip_val_transform(im, self.size) for im in images[s:s + 16]])
            tok = self.tokenizer(list(prompts[s:s + 16]), padding="max_length", truncation=True,
                                 max_length=self.context, return_tensors="pt").to(self.device)
            with torch.no_grad():
                t = self.model.get_text_features(**tok)
                v = self.model.get_image_features(pixel_values=pix.to(self.device, self.model.dtype))
            t = torch.nn.functional.normalize(getattr(t, "pooler_output", t).float(), dim=-1)
            v = torch.nn.functional.normalize(getattr(v, "pooler_output", v).float(), dim=-1)
            out += (t * v).sum(-1).tolist()
        return out
