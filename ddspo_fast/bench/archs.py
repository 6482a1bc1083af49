"""The architectures the step benchmark trains, and how they are materialised.

`REAL` holds the released denoisers' diffusers configs (SD1.5 at 512 px, SDXL, SD3-medium
and SANA-600M at 1024 px; FLUX.1 [dev], SD3.5, Qwen-Image, FLUX.2 [dev] and [klein] 4B),
`TINY` small versions with the same structure for CPU runs.
Weights are random: `write_model` initialises a denoiser and saves it as a pipeline
directory holding only the denoiser, the scheduler and the VAE config, which the library
loads like any model. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

@dataclass
class Spec:
    """One denoiser to benchmark: its class and config, and the tensors a step feeds it."""
    family: str
    denoiser_cls: str
    config: dict
    latent_shape: tuple
    cond: dict                      # key -> (shape per row, dtype)
    scheduler: dict                 # scheduler_config.json (with _class_name)
    vae: dict                       # vae/config.json (with _class_name)
    pipeline_cls: str
    default_batch: int = 1
    notes: str = ""
    # Rank where the family's official recipe trains a LoRA (SD3, SANA): the official
    # 128 for the real models, scaled down with the tiny ones.
    lora_rank: int = 128


_DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
         "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
         "clip_sample": False, "steps_offset": 1}  # steps_offset: SD's own value (no warning)
_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
           "latent_channels": 4, "scaling_factor": 0.18215}
_SDXL_VAE = dict(_SD_VAE, scaling_factor=0.13025)
_SD3_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
            "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
_DCAE = {"_class_name": "AutoencoderDC", "latent_channels": 32, "scaling_factor": 0.41407,
         "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024]}  # f32: 2^(6-1)
# FLUX.1's scheduler shifts by resolution when sampling; training uses the unshifted table.
_FLUX_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
              "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
              "base_image_seq_len": 256, "max_image_seq_len": 4096}
_FLUX_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
             "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
             "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
# Qwen-Image: the scheduler shifts dynamically (exponential) when sampling; its video VAE
# downscales 8x (three temporal-downsample entries). The per-channel latent statistics are
# left out: the step consumes stored latents and never normalises.
_QWEN_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
              "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
              "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
              "time_shift_type": "exponential"}
_QWEN_VAE = {"_class_name": "AutoencoderKLQwenImage", "z_dim": 16,
             "temperal_downsample": [False, True, True]}
# FLUX.2: 32-channel VAE, 8x (patchified 2x2 to 128 channels for the transformer).
_FLUX2_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
               "shift": 3.0, "use_dynamic_shifting": True}
_FLUX2_VAE = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512],
              "latent_channels": 32, "sample_size": 1024}
_F16, _I64 = torch.float16, torch.int64

# Published architectures (diffusers configs of the released checkpoints).
REAL = {
    "sd15": Spec("sd15", "UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        (4, 64, 64), {"prompt_embeds": ((77, 768), _F16)}, _DDPM, _SD_VAE,
        "StableDiffusionPipeline", default_batch=8, notes="SD1.5 UNet, 512 px, 0.86 B params"),
    "sdxl": Spec("sdxl", "UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32),
        (4, 128, 128), {"prompt_embeds": ((77, 2048), _F16), "pooled_prompt_embeds": ((1280,), _F16)},
        _DDPM, _SDXL_VAE, "StableDiffusionXLPipeline", default_batch=2,
        notes="SDXL UNet, 1024 px, 2.57 B params"),
    "sd3": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        (16, 128, 128), {"prompt_embeds": ((154, 4096), _F16), "pooled_prompt_embeds": ((2048,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=2,
        notes="SD3-medium MMDiT, 1024 px, 2.03 B params, 77 CLIP + 77 T5 tokens"),
    "sana": Spec("sana", "SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32,
        num_layers=28, num_cross_attention_heads=16, cross_attention_head_dim=72,
        cross_attention_dim=1152, caption_channels=2304, mlp_ratio=2.5, dropout=0.0,
        attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
        norm_eps=1e-6),
        (32, 32, 32), {"prompt_embeds": ((300, 2304), _F16), "prompt_attention_mask": ((300,), _I64)},
        _FLOW, _DCAE, "SanaPipeline", default_batch=4,
        notes="SANA-600M linear-attention DiT, 1024 px (DC-AE f32), 0.59 B params"),
    "flux": Spec("flux", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        (16, 128, 128), {"prompt_embeds": ((512, 4096), _F16), "pooled_prompt_embeds": ((768,), _F16)},
        _FLUX_FLOW, _FLUX_VAE, "FluxPipeline", default_batch=1,
        notes="FLUX.1 [dev] MMDiT, 19 double + 38 single blocks, 1024 px, 512 T5 tokens"),
    "sd35-large": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
        qk_norm="rms_norm"),
        (16, 128, 128), {"prompt_embeds": ((154, 4096), _F16), "pooled_prompt_embeds": ((2048,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=1,
        notes="SD3.5-large MMDiT (qk RMS norm), 1024 px, 77 CLIP + 77 T5 tokens"),
    "sd35-medium": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        (16, 128, 128), {"prompt_embeds": ((154, 4096), _F16), "pooled_prompt_embeds": ((2048,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=2,
        notes="SD3.5-medium MMDiT-X (dual attention in blocks 0-12), 1024 px, 77 CLIP + 77 T5 "
              "tokens"),
    "qwen_image": Spec("qwen_image", "QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56)),
        (16, 1, 128, 128), {"prompt_embeds": ((512, 3584), _F16),
                            "prompt_embeds_mask": ((512,), _I64)},
        _QWEN_FLOW, _QWEN_VAE, "QwenImagePipeline", default_batch=1,
        notes="Qwen-Image MMDiT, 60 blocks, 1024 px (5-D video-VAE latents), 512 Qwen2.5-VL "
              "tokens"),
    # FLUX.2 [dev]: Flux2Transformer2DModel's defaults are its config.
    "flux2": Spec("flux2", "Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
        attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=True),
        (128, 64, 64), {"prompt_embeds": ((512, 15360), _F16)},
        _FLUX2_FLOW, _FLUX2_VAE, "Flux2Pipeline", default_batch=1,
        notes="FLUX.2 [dev] MMDiT, 8 double + 48 single blocks, 1024 px, 512 Mistral-3 tokens "
              "(3 layers stacked)"),
    "flux2-klein": Spec("flux2", "Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False),
        (128, 64, 64), {"prompt_embeds": ((512, 7680), _F16)},
        _FLUX2_FLOW, _FLUX2_VAE, "Flux2KleinPipeline", default_batch=2,
        notes="FLUX.2 [klein] 4B MMDiT, 5 double + 20 single blocks, 1024 px, 512 Qwen3-4B "
              "tokens (3 layers stacked)"),
}

# Small versions with the same structure. Batch 8 keeps a CPU step compute-bound: at
# batch 4 fixed per-call costs hid part of the reference-row saving (SANA tiny measured
# 0.99x-1.11x at batch 4 on a shared 2-core CPU, 1.12x at batch 8).
TINY = {
    "sd15": Spec("sd15", "UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16)}, _DDPM, _SD_VAE,
        "StableDiffusionPipeline", default_batch=8),
    "sdxl": Spec("sdxl", "UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(4, 8), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=16),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "pooled_prompt_embeds": ((16,), _F16)},
        _DDPM, _SDXL_VAE, "StableDiffusionXLPipeline", default_batch=8),
    "sd3": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=32),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "pooled_prompt_embeds": ((32,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=8, lora_rank=8),
    "sana": Spec("sana", "SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
        num_layers=2, num_cross_attention_heads=4, cross_attention_head_dim=16,
        cross_attention_dim=64, caption_channels=32, mlp_ratio=2.5, sample_size=16, patch_size=1),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "prompt_attention_mask": ((16,), _I64)},
        _FLOW, _DCAE, "SanaPipeline", default_batch=8, lora_rank=8),
    "flux": Spec("flux", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "pooled_prompt_embeds": ((32,), _F16)},
        _FLUX_FLOW, dict(_FLUX_VAE, latent_channels=4, sample_size=128), "FluxPipeline",
        default_batch=8, lora_rank=8),
    "sd35-large": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=32,
        qk_norm="rms_norm"),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "pooled_prompt_embeds": ((32,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=8, lora_rank=8),
    "sd35-medium": Spec("sd3", "SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=(0,)),
        (4, 16, 16), {"prompt_embeds": ((16, 32), _F16), "pooled_prompt_embeds": ((32,), _F16)},
        _FLOW, _SD3_VAE, "StableDiffusion3Pipeline", default_batch=8, lora_rank=8),
    "qwen_image": Spec("qwen_image", "QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)),
        (4, 1, 16, 16), {"prompt_embeds": ((16, 32), _F16), "prompt_embeds_mask": ((16,), _I64)},
        _QWEN_FLOW, dict(_QWEN_VAE, z_dim=4, sample_size=128), "QwenImagePipeline",
        default_batch=8, lora_rank=8),
    "flux2": Spec("flux2", "Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=48, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
        (16, 8, 8), {"prompt_embeds": ((16, 48), _F16)},
        _FLUX2_FLOW, dict(_FLUX2_VAE, latent_channels=4, sample_size=128), "Flux2Pipeline",
        default_batch=8, lora_rank=8),
    "flux2-klein": Spec("flux2", "Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=48, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        (16, 8, 8), {"prompt_embeds": ((16, 48), _F16)},
        _FLUX2_FLOW, dict(_FLUX2_VAE, latent_channels=4, sample_size=128), "Flux2KleinPipeline",
        default_batch=8, lora_rank=8),
}


# ------------------------------------------------------------ materialise a model
def write_model(spec: Spec, root: Path, device: torch.device) -> Path:
    """A pipeline dir with only the denoiser (random), scheduler and VAE config.

    Text encoders and VAE weights are left out: the step consumes stored embeddings
    and latents, and the library loads only the denoiser for such data.
    """
    import diffusers

    from ..models import get_family

    name = get_family(spec.family).denoiser_name
    path = root / f"{spec.family}-{'x'.join(map(str, spec.latent_shape))}"
    if (path / name / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cls = getattr(diffusers, spec.denoiser_cls)
    torch.manual_seed(0)
    # Initialise on the target device: a 2.6 B-parameter random init on CPU takes minutes.
    with torch.device(device):
        den = cls(**spec.config)
    den.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(
        path / name, safe_serialization=True)
    del den
    index = {"_class_name": spec.pipeline_cls, "_diffusers_version": diffusers.__version__,
             name: ["diffusers", spec.denoiser_cls],
             "scheduler": ["diffusers", spec.scheduler["_class_name"]],
             "vae": ["diffusers", spec.vae["_class_name"]]}
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    for sub, cfg in (("scheduler", spec.scheduler), ("vae", spec.vae)):
        (path / sub).mkdir(exist_ok=True)
        fname = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (path / sub / fname).write_text(json.dumps(cfg, indent=1))
    return path


def _cond(spec: Spec, n: int, g: torch.Generator, device) -> dict:
    out = {}
    for key, (shape, dtype) in spec.cond.items():
        if dtype == _I64:
            out[key] = torch.ones((n, *shape), dtype=dtype)
        else:
            out[key] = torch.randn((n, *shape), generator=g).to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def make_batch(spec: Spec, n: int, device, seed: int = 0) -> dict:
    """A collated batch of n pairs, in the layout `ddspo_fast.data.collate_pairs` returns."""
    g = torch.Generator().manual_seed(seed)
    lat = lambda: torch.randn((n, *spec.latent_shape), generator=g).to(_F16).to(device)  # noqa
    return {"id": [f"b{i}" for i in range(n)], "prompt": ["p"] * n, "neg_prompt": ["q"] * n,
            "seed": list(range(n)), "latent_w": lat(), "latent_l": lat(),
            "cond": _cond(spec, n, g, device), "neg_cond": _cond(spec, n, g, device)}


def write_dataset(spec: Spec, model_dir: Path, root: Path, batch: dict) -> Path:
    """The benchmark's batch stored as a pair dataset (same ids, same fp16 tensors): the
    Trainer rows need a dataset to start, and the reference cache is precomputed over it,
    so the cached row looks up exactly the pairs it is timed on."""
    from ..data import PairWriter

    n = len(batch["id"])
    path = root / f"data-{model_dir.name}-{n}"
    if (path / "index.jsonl").is_file():
        return path
    cpu = lambda v: v.detach().to("cpu")  # noqa: E731
    with PairWriter(str(path), family=spec.family, model=str(model_dir), shard_size=n) as w:
        for i in range(n):
            w.add(id=str(batch["id"][i]), prompt=batch["prompt"][i],
                  neg_prompt=batch["neg_prompt"][i], seed=int(batch["seed"][i]),
                  latent_w=cpu(batch["latent_w"][i]), latent_l=cpu(batch["latent_l"][i]),
                  cond={k: cpu(v[i]) for k, v in batch["cond"].items()},
                  neg_cond={k: cpu(v[i]) for k, v in batch["neg_cond"].items()})
    return path
