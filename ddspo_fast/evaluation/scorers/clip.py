"""CLIP score (Hessel et al. 2021; the definition torchmetrics' ``CLIPScore`` uses):
``100 * max(cos(E_image(x), E_text(c)), 0)`` with a transformers CLIP model folder
(e.g. openai/clip-vit-large-patch14)."""

from __future__ import annotations

from .base import clip_embeddings, load_clip

WHAT = "a CLIP model folder (transformers CLIPModel, e.g. openai/clip-vit-large-patch14)"


class ClipScore:
    name = "clip"
    higher_is_better = True

    def __init__(self, path, device="cpu"):
        self.device = device
        self.model, self.tokenizer, self.processor = load_clip("clip", path, device, WHAT)

    def cosines(self, images, prompts) -> list[float]:
        t, v = clip_embeddings(self.model, self.tokenizer, self.processor, images, prompts,
                               self.device)
        return (t * v).sum(-1).tolist()

    def score(self, images, prompts) -> list[float]:
        return [100.0 * max(c, 0.0) for c in self.cosines(images, prompts)]
