"""Stable Diffusion 3 and 3.5: MMDiT, flow matching, logit-normal timesteps, x0 preconditioning.

One family for SD3-medium, SD3.5-large (and large-turbo) and SD3.5-medium: the training
recipe (the DDSPO SD3 code and diffusers' ``train_dreambooth_lora_sd3.py``: logit-normal
timesteps, ``precondition_outputs``, the shift-3.0 training table) is the same; the
variant is read from the transformer's config (``qk_norm`` set: 3.5; a non-empty
``dual_attention_layers``: 3.5-medium) and shown in the start banner. SD3.5-medium's
dual-attention blocks carry a second, image-only attention (``attn2``); its projections
are LoRA targets too, since the script's suffix list ("attn.to_q"...) does not reach them
and those blocks would otherwise train only half their attention.
"""

from __future__ import annotations

import torch

from .base import Cond, FamilyAdapter


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    flow = True
    default_steps = 25
    default_cfg = 5.0
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3",
                       "tokenizer", "tokenizer_2", "tokenizer_3")
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    timestep_sampling = "logit_normal"  # the official SD3 script's --weighting_scheme
    # T5 tokens kept per prompt, as in the DDSPO SD3 training code (the pipeline's own
    # default is 256); data preparation and training use the same value.
    max_sequence_length = 77
    # SD3.5-medium's second attention in its dual-attention blocks (image tokens only).
    wrap_blocks = ("JointTransformerBlock",)
    dual_attention_targets = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

    def __init__(self, pipe, model, *, device, dtype):
        super().__init__(pipe, model, device=device, dtype=dtype)
        if self.variant == "sd3.5-medium":
            self.lora_targets = type(self).lora_targets + self.dual_attention_targets

    @classmethod
    def variant_of(cls, denoiser_config) -> str:
        if not denoiser_config.get("qk_norm"):
            return "sd3"
        return "sd3.5-medium" if denoiser_config.get("dual_attention_layers") else "sd3.5-large"

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def dpo_target(self, x0, noise, timesteps):
        # With preconditioned outputs the model is compared against x0 directly.
        return x0

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        v = denoiser(hidden_states=x_t, timestep=timesteps,
                     encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        sigma = self._bcast(self.noise_level(timesteps), x_t)
        return x_t - sigma * v  # x0 estimate: x_t = (1-s) x0 + s eps, v = eps - x0

