"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, UNet, epsilon (or v) prediction."""

from __future__ import annotations

import torch

from .base import Cond, FamilyAdapter


class SD15Adapter(FamilyAdapter):
    name = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    flow = False
    default_steps = 25
    default_cfg = 7.5
    cond_keys = ("prompt_embeds",)
    text_components = ("text_encoder", "tokenizer")
    # sharding units: each ResNet and transformer block (the granularity diffusers
    # checkpoints at); the down / up blocks would make ~1 B-parameter units in SDXL
    wrap_blocks = ("ResnetBlock2D", "BasicTransformerBlock")
    denoiser_memory_format = torch.channels_last  # convolutions run faster so (on GPUs)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        return_dict=False)[0]
