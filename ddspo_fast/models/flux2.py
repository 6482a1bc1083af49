"""FLUX.2 [dev] (Mistral-3 text encoder) and [klein] (Qwen3): MMDiT over patchified latents,
flow matching, velocity.

Training follows diffusers' ``train_dreambooth_lora_flux2.py`` and
``train_dreambooth_lora_flux2_klein.py``: the VAE's latents are patchified (2x2 -> 4x the
channels) and normalised by the VAE's batch-norm running statistics, and stored in that
layout (4C, H/2, W/2); noise x_t = (1 - s) x0 + s eps with s = t / 1000 from the
scheduler's training table (sampling shifts by an empirical mu, training does not); the
transformer takes x_t as tokens (one per latent position), 4-D position ids (T, H, W, L)
for the image (0, row, column, 0) and the text (0, 0, 0, token), the timestep as t / 1000,
the text encoder's stacked hidden states and, where it has a guidance embedding, the
guidance value (3.5, the scripts' default): always for [dev], per the transformer config
for [klein]; its output is sliced back to the image tokens and compared with the velocity
eps - x0. Timesteps are drawn uniformly (weighting_scheme "none"); LoRA targets are the
scripts' default list: the double blocks' attention, the single blocks' fused
``to_qkv_mlp_proj`` and each single block's ``attn.to_out``.

The variant is the pipeline class: ``Flux2Pipeline`` = [dev], ``Flux2KleinPipeline`` =
[klein]. Sampling (``prepare``) uses the pipelines' defaults (50 steps, guidance 4.0; a
step-distilled [klein], ``is_distilled``, 4 steps and guidance 1.0 as its model card).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import Cond, FamilyAdapter
from .vae_norm import ChannelStats

DEV, KLEIN = "flux2-dev", "flux2-klein"
DEFAULT_TRAIN_GUIDANCE = 3.5  # the FLUX.2 scripts' --guidance_scale
MAX_SEQUENCE_LENGTH = 512  # both pipelines' and scripts' default
# Text-encoder hidden states the pipelines stack (their text_encoder_out_layers default).
OUT_LAYERS = {DEV: (10, 20, 30), KLEIN: (9, 18, 27)}


class Flux2Adapter(FamilyAdapter):
    name = "flux2"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline")
    denoiser_name = "transformer"
    flow = True
    default_steps = 50
    default_cfg = 4.0
    cond_keys = ("prompt_embeds",)
    text_components = ("text_encoder", "tokenizer")
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")
    wrap_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    timestep_sampling = "uniform"
    max_sequence_length = MAX_SEQUENCE_LENGTH
    vae_latent_mode = "mean"  # the scripts encode with latent_dist.mode()

    def __init__(self, pipe, model, *, device, dtype):
        super().__init__(pipe, model, device=device, dtype=dtype)
        self._variant = KLEIN if type(pipe).__name__.startswith("Flux2Klein") else DEV
        cfg = self.denoiser_config()
        self.train_guidance = (DEFAULT_TRAIN_GUIDANCE
                               if self._variant == DEV or cfg.get("guidance_embeds") else None)
        if self._variant == KLEIN and getattr(pipe.config, "is_distilled", False):
            self.default_steps, self.default_cfg = 4, 1.0
        n_single = int(cfg.get("num_single_layers", 0))
        self.lora_targets = type(self).lora_targets + tuple(
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single))
        self._ids: dict = {}

    @classmethod
    def variant_of(cls, denoiser_config: Mapping) -> str:
        # The transformer config alone cannot tell the variants apart with certainty;
        # an adapter reads its pipeline class (see __init__). A guidance embedding is [dev]'s.
        return DEV if denoiser_config.get("guidance_embeds", True) else KLEIN

    @classmethod
    def default_train_guidance(cls, denoiser_config):
        return DEFAULT_TRAIN_GUIDANCE if denoiser_config.get("guidance_embeds", True) else None

    def describe(self) -> str:
        return f"flux2 (FLUX.2 [{self.variant.split('-')[1]}])"

    # ------------------------------------------------------------------ layout
    def latent_shape(self) -> tuple[int, int, int]:
        # Stored patchified: (4 x VAE channels = the transformer's in_channels, H/2, W/2).
        cfg = self.denoiser_config()
        side = int(self.vae_sample_size or 1024) // self.vae_scale_factor
        return int(cfg.get("in_channels", 128)), side // 2, side // 2

    @property
    def pixel_multiple(self) -> int:
        return 2 * self.vae_scale_factor

    def native_resolution(self) -> tuple[int, int]:
        h, w = self.latent_shape()[-2:]  # patchified: twice the side in VAE latents
        return 2 * h * self.vae_scale_factor, 2 * w * self.vae_scale_factor

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H * W, C): one token per (patchified) latent position."""
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack_latents(self, x: torch.Tensor, like_shape) -> torch.Tensor:
        b, c, h, w = like_shape
        return x.permute(0, 2, 1).reshape(b, c, h, w)

    def vae_normalisation(self) -> ChannelStats:
        """The VAE's batch-norm running statistics, per patchified channel."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ValueError(f"this {self.name} adapter was loaded without its VAE")
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
        return ChannelStats(vae.bn.running_mean, std)

    def vae_layout(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape  # 2x2 patchify: (C, H, W) -> (4C, H/2, W/2)
        z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * 4, h // 2, w // 2)

    def vae_unlayout(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, h * 2, w * 2)

    def image_ids(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """(B, H * W, 4) positions (T, H, W, L) = (0, row, column, 0) of the image tokens."""
        key = ("img", b, h, w, str(device))
        ids = self._ids.get(key)
        if ids is None:
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            zero = torch.zeros_like(rows)
            ids = torch.stack([zero, rows, cols, zero], dim=1).expand(b, -1, -1)
            ids = self._ids[key] = ids.to(device)
        return ids

    def text_ids(self, b: int, n: int, device) -> torch.Tensor:
        """(B, n, 4) positions (0, 0, 0, token index) of the text tokens."""
        key = ("txt", b, n, str(device))
        ids = self._ids.get(key)
        if ids is None:
            tok = torch.arange(n)
            zero = torch.zeros_like(tok)
            ids = torch.stack([zero, zero, zero, tok], dim=1).expand(b, -1, -1)
            ids = self._ids[key] = ids.to(device)
        return ids

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=OUT_LAYERS[self.variant])
        return {"prompt_embeds": embeds}

    # ------------------------------------------------------------------ training
    def dpo_target(self, x0, noise, timesteps):
        return noise - x0

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        b, _, h, w = x_t.shape
        txt = cond["prompt_embeds"]
        guidance = self.guidance(b, x_t.device)
        out = denoiser(hidden_states=self.pack_latents(x_t),
                       timestep=self.noise_level(timesteps).to(x_t.dtype), guidance=guidance,
                       encoder_hidden_states=txt,
                       txt_ids=self.text_ids(b, txt.shape[1], x_t.device),
                       img_ids=self.image_ids(b, h, w, x_t.device), return_dict=False)[0]
        return self.unpack_latents(out[:, : h * w], x_t.shape)

    # ------------------------------------------------------------------ sampling
    def _load_vae(self) -> None:
        from diffusers import AutoencoderKLFlux2

        from .quiet import cast_module, quiet_loading

        with quiet_loading():
            vae = AutoencoderKLFlux2.from_pretrained(self.model, subfolder="vae")
        vae.requires_grad_(False).eval()
        cast_module(vae, device=self.device, dtype=torch.float32)
        self.pipe.register_modules(vae=vae)

    def pipeline_call_kwargs(self) -> dict:
        h, w = self.native_resolution()
        return {"height": h, "width": w, "max_sequence_length": self.max_sequence_length,
                "text_encoder_out_layers": OUT_LAYERS[self.variant]}

    @torch.no_grad()
    def generate_latents(self, prompts, seeds, *, steps=None, cfg=None) -> torch.Tensor:
        if self.variant == KLEIN and getattr(self.pipe, "vae", None) is None:
            self._load_vae()  # [klein] denormalises with the VAE's statistics even for latents
        out = super().generate_latents(prompts, seeds, steps=steps, cfg=cfg)
        if out.dim() == 4:  # [klein] returns the VAE's own latents (its decoder's input)
            return self.vae_to_latents(out)
        return self.unpack_latents(out, (out.shape[0], *self.latent_shape()))
