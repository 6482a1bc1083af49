"""Qwen-Image: a 20B MMDiT over 2x2-packed video-VAE latents, Qwen2.5-VL text encoder, flow
matching, velocity.

Training follows diffusers' ``train_dreambooth_lora_qwen_image.py``: the VAE is a video
VAE, so latents are 5-D (C, frames = 1, H, W) and normalised per channel by the VAE
config's ``latents_mean`` / ``latents_std`` (stored in that layout); noise
x_t = (1 - s) x0 + s eps with s from the training scheduler, built from the model's
scheduler config with ``shift=3.0`` as the script does (Qwen-Image's scheduler shifts
dynamically at sampling time, so its training table stays unshifted); the transformer
takes x_t packed into 2x2 patches as tokens, ``img_shapes`` [(1, H/2, W/2)] per row, the
Qwen2.5-VL hidden states with their padding mask, and the timestep as t / 1000; its output
is unpacked and compared with the velocity eps - x0. Timesteps are drawn uniformly (the
script's weighting_scheme "none"); LoRA targets are the script's default list.

The prompt embeddings are stored padded to ``max_sequence_length`` (the script's 512) with
the mask marking the real tokens, so every stored row has one shape; the mask keeps the
padding out of attention, so a padded row predicts what the script's batch-trimmed row
does. Sampling (``prepare``) uses the pipeline's true classifier-free guidance
(``true_cfg_scale`` 4.0, 50 steps, negative prompt " " as in diffusers' examples).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import Cond, FamilyAdapter, hub_file

SCRIPT_TRAIN_SHIFT = 3.0  # train_dreambooth_lora_qwen_image.py builds its scheduler with shift=3.0
NEGATIVE_PROMPT = " "  # the empty negative prompt of diffusers' Qwen-Image examples


class QwenImageAdapter(FamilyAdapter):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    denoiser_name = "transformer"
    flow = True
    default_steps = 50
    default_cfg = 4.0  # QwenImagePipeline's true_cfg_scale
    cond_keys = ("prompt_embeds", "prompt_embeds_mask")
    text_components = ("text_encoder", "tokenizer")
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    wrap_blocks = ("QwenImageTransformerBlock",)
    timestep_sampling = "uniform"
    max_sequence_length = 512
    train_scheduler_overrides = {"shift": SCRIPT_TRAIN_SHIFT}
    latent_axes = ("channels", "frames", "height", "width")

    def _read_vae_scale(self, model: str) -> None:
        super()._read_vae_scale(model)
        # The video VAE downsamples once per temporal-downsample entry (Qwen-Image: 8x).
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            cfg = dict(vae.config)
        else:
            p = Path(model) / "vae" / "config.json"
            cfg = json.loads(p.read_text() if p.is_file()
                             else Path(hub_file(model, "vae/config.json")).read_text())
        self.vae_scale_factor = 2 ** len(cfg.get("temperal_downsample") or (0, 0, 0))

    # ------------------------------------------------------------------ layout
    def latent_shape(self) -> tuple[int, int, int, int]:
        # (C, frames, H, W); the transformer reports packed channels (16 x 2 x 2 = 64).
        # Native size: the VAE config's sample_size where it has one, else the
        # pipeline's default 1024 px.
        cfg = self.denoiser_config()
        side = int(self.vae_sample_size or 1024) // self.vae_scale_factor
        return int(cfg.get("in_channels", 64)) // 4, 1, side, side

    @property
    def pixel_multiple(self) -> int:
        return 2 * self.vae_scale_factor

    def vae_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2)  # the video VAE encodes (n, 3, frames = 1, H, W)

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channel-major."""
        b, c, f, h, w = x.shape
        if f != 1 or h % 2 or w % 2:
            raise ValueError(f"latents: Qwen-Image packs 2x2 patches of one frame; got "
                             f"{f} frames of {h}x{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack_latents(self, x: torch.Tensor, like_shape) -> torch.Tensor:
        b, c, f, h, w = like_shape
        x = x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, f, h, w)

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> Cond:
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        n, length, dim = embeds.shape
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        if pad > 0:
            embeds = torch.cat([embeds, embeds.new_zeros(n, pad, dim)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.to(torch.long)}

    # ------------------------------------------------------------------ training
    def dpo_target(self, x0, noise, timesteps):
        return noise - x0

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        b, _, _, h, w = x_t.shape
        out = denoiser(hidden_states=self.pack_latents(x_t),
                       encoder_hidden_states=cond["prompt_embeds"],
                       encoder_hidden_states_mask=cond["prompt_embeds_mask"],
                       timestep=self.noise_level(timesteps).to(x_t.dtype),
                       img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
        return self.unpack_latents(out, x_t.shape)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_latents(self, prompts, seeds, *, steps=None, cfg=None) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError("seeds: expected one seed per prompt")
        steps = int(steps or self.default_steps)
        if steps < 2 and self.schedule.config.get("shift_terminal"):
            # Stretching one sigma to the terminal value divides by zero: NaN latents.
            raise ValueError(f"steps: Qwen-Image's scheduler (shift_terminal) needs at least 2 "
                             f"sampling steps, got {steps}")
        gen_device = "cpu" if self.device.type == "mps" else self.device
        gens = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(prompt=list(prompts), negative_prompt=[NEGATIVE_PROMPT] * len(prompts),
                        true_cfg_scale=float(self.default_cfg if cfg is None else cfg),
                        num_inference_steps=steps, generator=gens,
                        output_type="latent", **self.pipeline_call_kwargs())
        packed = out.images
        return self.unpack_latents(packed, (packed.shape[0], *self.latent_shape()))
