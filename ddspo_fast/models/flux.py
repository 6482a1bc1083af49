"""FLUX.1 [dev] and [schnell]: MMDiT over 2x2-packed latent tokens, flow matching, velocity.

Training follows diffusers' ``train_dreambooth_lora_flux.py``: latents normalised with the
VAE's shift and scaling factor and stored unpacked (C, H, W); noise x_t = (1 - s) x0 + s eps
with s = t / 1000 from the scheduler's training table (FLUX's scheduler shifts dynamically
at sampling time, so the table is unshifted); the denoiser takes x_t packed into 2x2
patches as tokens, latent image ids (row, column) and all-zero text ids, the timestep as
t / 1000, CLIP's pooled and T5's token embeddings, and for the guidance-distilled [dev]
the guidance value (the script's default 3.5); its output is unpacked and compared with
the velocity eps - x0. Timesteps are drawn uniformly (the script's weighting_scheme
"none"); LoRA targets are the script's default list.

The variant is read from the transformer's config: ``guidance_embeds`` = [dev]. Sampling
(``prepare``) uses the pipeline's defaults for [dev] (28 steps, guidance 3.5, T5 512) and
the recommended settings for [schnell] (4 steps, no guidance, T5 256).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import Cond, FamilyAdapter

DEV, SCHNELL = "flux-dev", "flux-schnell"
# Sampling defaults and T5 length per variant: FluxPipeline.__call__'s own for [dev];
# diffusers' FLUX documentation / the model card for [schnell] (its T5 takes 256 tokens).
VARIANT_DEFAULTS = {DEV: {"steps": 28, "cfg": 3.5, "max_sequence_length": 512},
                    SCHNELL: {"steps": 4, "cfg": 0.0, "max_sequence_length": 256}}
DEFAULT_TRAIN_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale


class FluxAdapter(FamilyAdapter):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"
    flow = True
    default_steps = VARIANT_DEFAULTS[DEV]["steps"]
    default_cfg = VARIANT_DEFAULTS[DEV]["cfg"]
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    # train_dreambooth_lora_flux.py's default --lora_layers: attention of the double
    # blocks (both streams) and, by suffix, the q/k/v of the single blocks, plus the
    # double blocks' feed-forwards. The single blocks' proj_mlp / proj_out are not in it.
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    wrap_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    timestep_sampling = "uniform"  # the script's --weighting_scheme none
    max_sequence_length = VARIANT_DEFAULTS[DEV]["max_sequence_length"]

    def __init__(self, pipe, model, *, device, dtype):
        super().__init__(pipe, model, device=device, dtype=dtype)
        d = VARIANT_DEFAULTS[self.variant]
        self.default_steps, self.default_cfg = d["steps"], d["cfg"]
        self.max_sequence_length = d["max_sequence_length"]
        self.train_guidance = self.default_train_guidance(self.denoiser_config())
        self._ids: dict = {}

    @classmethod
    def variant_of(cls, denoiser_config: Mapping) -> str:
        return DEV if denoiser_config.get("guidance_embeds") else SCHNELL

    @classmethod
    def default_train_guidance(cls, denoiser_config):
        return DEFAULT_TRAIN_GUIDANCE if cls.variant_of(denoiser_config) == DEV else None

    def describe(self) -> str:
        return f"flux (FLUX.1 [{self.variant.split('-')[1]}])"

    # ------------------------------------------------------------------ layout
    def latent_shape(self) -> tuple[int, int, int]:
        # The transformer reports packed channels (16 x 2 x 2 = 64) and no sample size:
        # the native size is the VAE's (FLUX: 1024 px, the pipeline's default too).
        cfg = self.denoiser_config()
        px = int(self.vae_sample_size or 1024)
        side = px // self.vae_scale_factor
        return int(cfg.get("in_channels", 64)) // 4, side, side

    @property
    def pixel_multiple(self) -> int:
        return 2 * self.vae_scale_factor

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channel-major."""
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latents: FLUX packs 2x2 patches; height and width must be even, "
                             f"got {h}x{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack_latents(self, x: torch.Tensor, like_shape) -> torch.Tensor:
        b, c, h, w = like_shape
        x = x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def image_ids(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """(H/2 * W/2, 3) token positions: (0, row, column) of each 2x2 patch."""
        key = (h, w, str(device), dtype)
        ids = self._ids.get(key)
        if ids is None:
            rows = torch.arange(h // 2).repeat_interleave(w // 2)
            cols = torch.arange(w // 2).repeat(h // 2)
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
            ids = self._ids[key] = ids.to(device=device, dtype=dtype)
        return ids

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------ training
    def dpo_target(self, x0, noise, timesteps):
        return noise - x0

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        b, _, h, w = x_t.shape
        txt = cond["prompt_embeds"]
        guidance = self.guidance(b, x_t.device)
        out = denoiser(hidden_states=self.pack_latents(x_t),
                       timestep=self.noise_level(timesteps), guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"],
                       encoder_hidden_states=txt,
                       txt_ids=self._text_ids(txt.shape[1], x_t.device, x_t.dtype),
                       img_ids=self.image_ids(h, w, x_t.device, x_t.dtype),
                       return_dict=False)[0]
        return self.unpack_latents(out, x_t.shape)

    def _text_ids(self, n: int, device, dtype) -> torch.Tensor:
        key = ("txt", n, str(device), dtype)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = torch.zeros(n, 3, device=device, dtype=dtype)
        return ids

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_latents(self, prompts, seeds, *, steps=None, cfg=None) -> torch.Tensor:
        packed = super().generate_latents(prompts, seeds, steps=steps, cfg=cfg)
        return self.unpack_latents(packed, (packed.shape[0], *self.latent_shape()))
