"""The reward head the LAION aesthetic predictor and ImageReward share: Linear layers
``d -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropout between the first four (an identity at
inference) and no activation; keys ``layers.{0,2,4,6,7}.{weight,bias}`` as upstream saves
them."""

from __future__ import annotations

import torch

_LINEARS = (0, 2, 4, 6, 7)
_WIDTHS = (1024, 128, 64, 16, 1)
_DROPOUT = (0.2, 0.2, 0.1)


class RewardMLP(torch.nn.Module):
    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        dims = (input_size,) + _WIDTHS
        mods = []
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(torch.nn.Linear(a, b))
            if k < 3:
                mods.append(torch.nn.Dropout(_DROPOUT[k]))
        self.layers = torch.nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x.to(self.layers[0].weight.dtype))

    @classmethod
    def from_state_dict(cls, name: str, sd: dict, prefix: str = "") -> "RewardMLP":
        key = f"{prefix}layers.0.weight"
        if key not in sd or sd[key].ndim != 2:
            raise ValueError(f"{name}: the weights hold no reward MLP (no {key}); expected "
                             "keys layers.0/2/4/6/7.weight and .bias")
        mlp = cls(int(sd[key].shape[1]))
        own = {k: v for k, v in sd.items() if k.startswith(prefix + "layers.")}
        try:
            mlp.load_state_dict({k[len(prefix):]: v.float() for k, v in own.items()})
        except RuntimeError as e:
            raise ValueError(f"{name}: the reward MLP's weights do not fit "
                             f"({' '.join(str(e).split())[:200]})") from e
        return mlp.eval()
