"""SANA: linear-attention DiT, Gemma-2 text encoder, flow matching, velocity target.

Defaults follow the official DDSPO SANA adapter: the training scheduler's shift is 1.0
(FlowMatchEulerDiscreteScheduler built from SANA's DPM-Solver config, see base.py),
uniform timesteps, LoRA on to_q/to_k/to_v, Gemma-2 in bf16, and its prompt-enhancement
instruction, whose last line is "User Prompt:" (diffusers' SanaPipeline default ends
in "User Prompt: ", with a space). The earlier choices of this library stay available:
``sample_timesteps(shift=3.0, scheme="logit_normal")``, ``lora_targets`` with
"to_out.0", ``text_dtype=torch.float16``, ``options={"instruction": "pipeline"}``.
"""

from __future__ import annotations

import inspect

import torch

from .base import Cond, FamilyAdapter

# The official DDSPO adapter's complex human instruction (ddspo/adapters/__init__.py,
# DEFAULT_COMPLEX_HUMAN_INSTRUCTION); SanaPipeline joins the lines with "\n" and puts
# the joined text in front of every prompt.
OFFICIAL_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual "
    "descriptions suitable for image generation. Evaluate the level of detail in the user "
    "prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, "
    "textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly "
    "without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
    "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
    "double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including "
    "any additional commentary or evaluations:",
    "User Prompt:",
)
INSTRUCTIONS = ("official", "pipeline", "none")


def _pipeline_default(name: str):
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters[name].default


def instruction_lines(instruction) -> list[str] | None:
    """The instruction lines for ``instruction``: "official" (the DDSPO adapter's),
    "pipeline" (diffusers' SanaPipeline default), "none", or a list of lines."""
    if instruction == "official":
        return list(OFFICIAL_INSTRUCTION)
    if instruction == "pipeline":
        return list(_pipeline_default("complex_human_instruction"))
    if instruction == "none":
        return None
    if (isinstance(instruction, (list, tuple)) and instruction
            and all(isinstance(s, str) for s in instruction)):
        return list(instruction)
    raise ValueError(f"instruction: expected one of {INSTRUCTIONS} or a list of lines, got "
                     f"{instruction!r}")


class SanaAdapter(FamilyAdapter):
    name = "sana"
    pipeline_classes = ("SanaPipeline",)
    denoiser_name = "transformer"
    flow = True
    default_steps = 20
    default_cfg = 4.5
    cond_keys = ("prompt_embeds", "prompt_attention_mask")
    text_components = ("text_encoder", "tokenizer")
    lora_targets = ("to_q", "to_k", "to_v")  # the official adapter's default
    timestep_sampling = "uniform"  # the official SANA script's --weighting_scheme none
    wrap_blocks = ("SanaTransformerBlock",)
    text_encoder_dtype = torch.bfloat16  # the official code always runs Gemma-2 in bf16
    options = {"instruction": "official | pipeline | none | a list of lines"}
    max_sequence_length = 300
    instruction = "official"

    def _configure(self, instruction="official") -> None:
        instruction_lines(instruction)  # validate now, not at the first prompt
        self.instruction = instruction

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=instruction_lines(self.instruction))
        # Gemma runs in bf16; its output is handed on in the denoiser's dtype, as the
        # official adapter does (embeds.to(transformer_dtype)).
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_attention_mask": mask}

    def dpo_target(self, x0, noise, timesteps):
        return noise - x0

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        return denoiser(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"],
                        timestep=timesteps, return_dict=False)[0]

    def pipeline_call_kwargs(self) -> dict:
        # Sampling (prepare, evaluate) keeps the pipeline's own instruction, as the
        # official prepare_latents.py calls the pipeline with its defaults.
        kw = super().pipeline_call_kwargs()
        kw["use_resolution_binning"] = False  # generate at exactly the native latent size
        return kw
