"""How a family's VAE latents become the denoiser's latent space, and back.

    ScaleShift     (z - shift) * scale                 SD1.x, SDXL, SD3, SANA, FLUX.1
    ChannelStats   (z - mean_c) * scale / std_c        Qwen-Image (the VAE config's
                                                       latents_mean / latents_std), FLUX.2
                                                       (its VAE's batch-norm statistics)

``FamilyAdapter.vae_normalisation()`` returns the family's; ``vae_to_latents`` /
``latents_to_vae`` (used by ``encode``, ``prepare`` and evaluation) apply it after the
family's layout change (FLUX.2's 2x2 patchify), so no caller knows which it is.
"""

from __future__ import annotations

import torch


class ScaleShift:
    """One scalar scale and shift for every channel."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        self.scale, self.shift = float(scale), float(shift)

    def to_latents(self, z: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def to_vae(self, x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        return x / self.scale + self.shift

    def __repr__(self) -> str:
        return f"ScaleShift(scale={self.scale}, shift={self.shift})"


class ChannelStats:
    """A mean and standard deviation per latent channel (on ``channel_axis`` of a batch),
    then a scalar scale."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scale: float = 1.0):
        self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)
        self.scale = float(scale)

    def _bcast(self, v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[axis] = -1
        return v.to(like.device, like.dtype).reshape(shape)

    def to_latents(self, z: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        mean, std = (self._bcast(v, z, channel_axis) for v in (self.mean, self.std))
        return (z - mean) * self.scale / std

    def to_vae(self, x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        mean, std = (self._bcast(v, x, channel_axis) for v in (self.mean, self.std))
        return x * std / self.scale + mean

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.mean.numel()}, scale={self.scale})"
