"""Stable Diffusion XL: two CLIP text encoders, pooled embeddings, micro-conditioning."""

from __future__ import annotations

import torch

from .base import Cond, FamilyAdapter


class SDXLAdapter(FamilyAdapter):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_name = "unet"
    flow = False
    default_steps = 25
    default_cfg = 5.0
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    # sharding units: each ResNet and transformer block (the granularity diffusers
    # checkpoints at); the down / up blocks would make ~1 B-parameter units in SDXL
    wrap_blocks = ("ResnetBlock2D", "BasicTransformerBlock")
    denoiser_memory_format = torch.channels_last  # convolutions run faster so (on GPUs)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def time_ids(self, x_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Micro-conditioning as at sampling time: original size = target size = the
        # pixel size these latents decode to, no crop. Built here, never stored.
        key = (tuple(x_t.shape[-2:]), dtype, x_t.device)
        cache = self.__dict__.setdefault("_time_ids", {})
        if key not in cache:  # built once per size: no host-to-device copy per step
            h, w = (int(s) * self.vae_scale_factor for s in x_t.shape[-2:])
            cache[key] = torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=x_t.device)
        return cache[key].expand(x_t.shape[0], 6)

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        pooled = cond["pooled_prompt_embeds"]
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x_t, pooled.dtype)}
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        added_cond_kwargs=added, return_dict=False)[0]

    def generate_latents(self, prompts, seeds, *, steps=None, cfg=None):
        # The paper's SDXL data uses Euler sampling; swap once, keep the config.
        from diffusers import EulerDiscreteScheduler

        if not isinstance(self.pipe.scheduler, EulerDiscreteScheduler):
            self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        return super().generate_latents(prompts, seeds, steps=steps, cfg=cfg)
