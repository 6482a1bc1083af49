"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor,
``sac+logos+ava1-l14-linearMSE.pth``): a 5-layer MLP with no activations
(768 -> 1024 -> 128 -> 64 -> 16 -> 1; dropouts, identity at inference) applied to the
L2-normalised CLIP ViT-L/14 image embedding: ``score = MLP(E_image(x) / |E_image(x)|)``,
as its simple_inference.py does. The prompt is not used.

The MLP file is read with ``torch.load(weights_only=True)`` (or ``.safetensors``); the CLIP
is the ``clip`` folder (it must be ViT-L/14, the model the MLP was trained on: its
embedding width must match the MLP's input)."""

from __future__ import annotations

from .base import image_embeddings, load_clip, load_state_dict_file, need_path
from .mlp import RewardMLP
from .clip import WHAT as CLIP_WHAT


class AestheticScore:
    name = "aesthetic"
    higher_is_better = True

    def __init__(self, path, device="cpu", clip=None):
        f = need_path("aesthetic", path, "the aesthetic MLP weights file "
                      "(sac+logos+ava1-l14-linearMSE.pth)")
        if clip is None:
            raise ValueError("aesthetic: needs the CLIP ViT-L/14 its MLP was trained on; "
                             "pass the clip folder too")
        self.device = device
        self.mlp = RewardMLP.from_state_dict("aesthetic", load_state_dict_file("aesthetic", f))
        self.model, _, self.processor = load_clip("clip", clip, device, CLIP_WHAT)
        width = self.model.config.projection_dim
        if width != self.mlp.input_size:
            raise ValueError(f"aesthetic: the MLP in {f} reads {self.mlp.input_size}-wide "
                             f"embeddings but the CLIP in {clip} gives {width} (the predictor "
                             "needs CLIP ViT-L/14)")
        self.mlp.to(device)

    def score(self, images, prompts=None) -> list[float]:
        import torch

        v = image_embeddings(self.model, self.processor, images, self.device)
        with torch.no_grad():
            return self.mlp(v).squeeze(-1).tolist()
