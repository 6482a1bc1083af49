"""PickScore (Kirstain et al. 2023, yuvalkirstain/PickScore_v1): a CLIP-H fine-tuned on
Pick-a-Pic preferences; the score of image x for prompt c is
``exp(logit_scale) * cos(E_image(x), E_text(c))``, as the PickScore_v1 model card computes
it (its processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, 224 px, CLIP normalisation).

The folder is PickScore_v1 as the hub stores it (config.json + weights); the tokenizer
and preprocessor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K must sit beside them
(copy them in when the snapshot lacks them)."""

from __future__ import annotations

import math

from .base import clip_embeddings, load_clip

WHAT = ("the PickScore_v1 folder (a transformers CLIPModel with the CLIP-ViT-H-14 tokenizer "
        "and preprocessor files beside it)")


class PickScore:
    name = "pickscore"
    higher_is_better = True

    def __init__(self, path, device="cpu"):
        self.device = device
        self.model, self.tokenizer, self.processor = load_clip("pickscore", path, device, WHAT)
        self.scale = math.exp(float(self.model.logit_scale.detach().float()))

    def score(self, images, prompts) -> list[float]:
        t, v = clip_embeddings(self.model, self.tokenizer, self.processor, images, prompts,
                               self.device)
        return (self.scale * (t * v).sum(-1)).tolist()
