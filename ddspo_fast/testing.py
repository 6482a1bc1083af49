"""Tiny, randomly initialised models and datasets for tests and examples.

Everything here is built locally from real diffusers / transformers classes with
tiny configs: tokenizers get a hand-written vocabulary, weights are random, and
nothing is ever downloaded. A tiny pipeline loads with the ordinary
``DiffusionPipeline.from_pretrained(path)`` and runs on a CPU in well under a second.

    from ddspo_fast.testing import make_tiny_model, make_tiny_dataset
    model = make_tiny_model("sd15", "/tmp/tiny-sd15")
    data = make_tiny_dataset(model, "/tmp/tiny-data", n_pairs=8, seed=0)

``TINY_MODELS`` names every tiny model: one per family (its name) and one per further
variant ("flux" is FLUX.1 [dev], "flux-schnell"; "sd35" is SD3.5-medium's structure,
"sd35-large"; "flux2" is FLUX.2 [dev], "flux2-klein"). A family registered from outside
the library adds its own with ``register_tiny_model(name, family, build)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .models import family_names

# A few words so tokenizers have merges that actually fire on test prompts.
_WORDS = ("a", "the", "photo", "of", "cat", "dog", "red", "blue", "on", "in", "with",
          "house", "tree", "car", "sky", "blurry", "green", "small", "large", "man")


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 / CLIP reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_merges(words, suffix: str = "", prefix: str = "") -> tuple[list[str], list[str]]:
    """Left-to-right merges that build each word from its characters."""
    merges, tokens = [], []
    for w in words:
        pieces = [prefix + w[0]] + list(w[1:])
        if suffix:
            pieces[-1] = pieces[-1] + suffix
        cur = pieces[0]
        for p in pieces[1:]:
            m = f"{cur} {p}"
            cur = cur + p
            if m not in merges:
                merges.append(m)
                tokens.append(cur)
    return merges, tokens


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges, tokens = _word_merges(_WORDS, suffix="</w>")
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = max_length
    return tok


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -6.0) for c in range(ord("0"), ord("9") + 1)]
    pieces += [(p, -6.0) for p in ",.!?'-:;()"]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def _gemma_tokenizer():
    from transformers import GemmaTokenizerFast

    vocab: dict[str, int] = {}
    for special in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                    "<start_of_turn>", "<end_of_turn>"):
        vocab[special] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in [chr(c) for c in range(ord("a"), ord("z") + 1)] \
            + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list(",.!?'-:;()0123456789"):
        vocab.setdefault(c, len(vocab))
    merges, tokens = _word_merges(_WORDS, prefix="▁")
    merges = [f"▁ {w[0]}" for w in _WORDS if w] + merges
    for w in _WORDS:
        vocab.setdefault("▁" + w[0], len(vocab))
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    merges = list(dict.fromkeys(merges))
    tok = GemmaTokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = 2048
    return tok


def _clip_text(cls_name: str, vocab_size: int, hidden: int, projection: int, seed: int):
    import transformers
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=projection, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return getattr(transformers, cls_name)(cfg)


def _sd_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         sample_size=16, **extra)


def _ddpm_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         num_train_timesteps=1000, prediction_type="epsilon")


def _build_sd15():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = _clip_tokenizer()
    te = _clip_text("CLIPTextModel", len(tok), 32, 32, seed=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(2)
    return StableDiffusionPipeline(vae=_sd_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_ddpm_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = _clip_tokenizer(), _clip_tokenizer()
    te = _clip_text("CLIPTextModel", len(tok), 16, 16, seed=1)
    te2 = _clip_text("CLIPTextModelWithProjection", len(tok2), 16, 16, seed=3)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(4, 8), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8)
    torch.manual_seed(2)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon", num_train_timesteps=1000)
    return StableDiffusionXLPipeline(vae=_sd_vae(), text_encoder=te, text_encoder_2=te2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)


def _build_sd3():
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel

    tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    te = _clip_text("CLIPTextModelWithProjection", len(tok), 16, 16, seed=1)
    te2 = _clip_text("CLIPTextModelWithProjection", len(tok2), 16, 16, seed=3)
    torch.manual_seed(4)
    te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=32, d_kv=8, d_ff=64,
                                  num_layers=2, num_heads=4, decoder_start_token_id=0,
                                  relative_attention_num_buckets=8))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    torch.manual_seed(2)
    vae = _sd_vae(scaling_factor=1.5305, shift_factor=0.0609)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae,
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)


def _build_sd35(medium: bool):
    pipe = _build_sd3()
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    # SD3.5: RMS-normalised q/k; medium adds a second (image-only) attention to its
    # first blocks (dual_attention_layers).
    pipe.transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
        qk_norm="rms_norm", dual_attention_layers=(0,) if medium else ())
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def _build_flux(dev: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    te = _clip_text("CLIPTextModel", len(tok), 32, 32, seed=1)
    torch.manual_seed(4)
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64,
                                  num_layers=2, num_heads=4, decoder_start_token_id=0,
                                  relative_attention_num_buckets=8))
    torch.manual_seed(0)
    # 4 latent channels packed 2x2 -> 16; rope axes sum to the head dim (FLUX: 16+56+56).
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=dev, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(2)
    # FLUX's VAE: shift and scaling factor, no quant convs.
    vae = _sd_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                  use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)


def _build_sana():
    from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline,
                           SanaTransformer2DModel)
    from transformers import Gemma2Config, Gemma2Model

    tok = _gemma_tokenizer()
    torch.manual_seed(1)
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=2))
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=16, mlp_ratio=2.5, sample_size=16, patch_size=1)
    torch.manual_seed(2)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                        scheduler=sched)


# A chat template in the shape of Qwen's (ChatML): the FLUX.2 pipelines build their prompts
# with apply_chat_template (content as a string or as a list of text parts; [klein] asks
# for no thinking block), Qwen-Image formats its own template.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def _qwen_tokenizer(max_length: int = 1024):
    """A byte-level BPE tokenizer of Qwen2's class (used by Qwen2.5-VL, Qwen3 and, for
    the tiny FLUX.2 [dev], in place of Mistral's processor: the pipeline only calls its
    apply_chat_template)."""
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges, tokens = _word_merges(["\u0120" + w for w in _WORDS])
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                             unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>",
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = _CHAT_TEMPLATE
    tok.model_max_length = max_length
    return tok


def _build_qwen_image():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    n = len(tok)
    torch.manual_seed(1)
    te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": n + 4,
                     "bos_token_id": None, "eos_token_id": tok.eos_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                      "type": "default"}, "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=n + 4, vision_start_token_id=n, vision_end_token_id=n + 1,
        vision_token_id=n + 2, image_token_id=n + 3, video_token_id=n + 3)).eval()
    torch.manual_seed(0)
    # 4 latent channels packed 2x2 -> 16; rope axes sum to the head dim.
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4))
    torch.manual_seed(2)
    # The video VAE: one temporal-downsample entry = a 2x downscale; per-channel latent
    # statistics that are not the identity, so the normalisation is exercised.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.05, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    vae.register_to_config(sample_size=16)  # the native size the adapter reads
    # Qwen-Image's scheduler: dynamic (exponential) shift at sampling time.
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential")
    return QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                             transformer=transformer)


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(2)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                             up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                             block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                             sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    # Batch-norm statistics that are not the identity, so the normalisation is exercised.
    g = torch.Generator().manual_seed(5)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.2)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae


def _flux2_transformer(text_dim: int, guidance: bool):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    # 4 latent channels patchified 2x2 -> 16 per token; 4 rope axes (T, H, W, L).
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=text_dim, timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance)


def _build_flux2_dev():
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = _qwen_tokenizer()
    n = len(tok)
    torch.manual_seed(1)
    # 31 layers: the pipeline stacks hidden states 10, 20 and 30.
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": n + 2, "hidden_size": 8,
                     "intermediate_size": 16, "max_position_embeddings": 1024,
                     "num_attention_heads": 2, "num_hidden_layers": 31,
                     "num_key_value_heads": 1, "head_dim": 4, "sliding_window": None,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 16, "image_size": 30,
                       "patch_size": 6, "num_channels": 3},
        image_token_index=n, pad_token_id=tok.pad_token_id, image_seq_length=4,
        vision_feature_layer=-1)).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                            use_dynamic_shifting=True)
    return Flux2Pipeline(scheduler=sched, vae=_flux2_vae(), text_encoder=te, tokenizer=tok,
                         transformer=_flux2_transformer(3 * 8, guidance=True))


def _build_flux2_klein():
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _qwen_tokenizer()
    torch.manual_seed(1)
    # 28 layers: the pipeline stacks hidden states 9, 18 and 27.
    te = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id)).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                            use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=sched, vae=_flux2_vae(), text_encoder=te,
                              tokenizer=tok, transformer=_flux2_transformer(3 * 8, guidance=False))


# tiny model name -> (family, builder)
TINY_MODELS = {
    "sd15": ("sd15", _build_sd15), "sdxl": ("sdxl", _build_sdxl), "sd3": ("sd3", _build_sd3),
    "sana": ("sana", _build_sana),
    "flux": ("flux", lambda: _build_flux(dev=True)),
    "flux-schnell": ("flux", lambda: _build_flux(dev=False)),
    "sd35": ("sd3", lambda: _build_sd35(medium=True)),
    "sd35-large": ("sd3", lambda: _build_sd35(medium=False)),
    "qwen_image": ("qwen_image", _build_qwen_image),
    "flux2": ("flux2", _build_flux2_dev),
    "flux2-klein": ("flux2", _build_flux2_klein),
}


def register_tiny_model(name: str, family: str, build) -> None:
    """Add tiny model ``name`` of the registered ``family``: ``build()`` returns the
    diffusers pipeline object ``make_tiny_model`` saves (fixed seeds inside)."""
    if family not in family_names():
        raise ValueError(f"family: {family!r} is not a registered family "
                         f"(register_family first; registered: {', '.join(family_names())})")
    if name in TINY_MODELS and TINY_MODELS[name] != (family, build):
        raise ValueError(f"name: a tiny model {name!r} is already registered")
    TINY_MODELS[name] = (family, build)


def make_tiny_model(family: str, path: str | os.PathLike) -> str:
    """Write the tiny randomly initialised diffusers pipeline ``family`` (a name of
    ``TINY_MODELS``: a family, or a variant such as "flux-schnell") to ``path``.

    Deterministic (fixed seeds), written atomically (temp dir, then rename; an
    existing complete pipeline at ``path`` is reused). Returns ``str(path)``.
    """
    if family not in TINY_MODELS:
        raise ValueError(f"family: expected one of {sorted(TINY_MODELS)}, got {family!r}")
    path = Path(path)
    if (path / "model_index.json").is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .models.quiet import quiet_loading

    state = torch.random.get_rng_state()
    try:
        with quiet_loading():  # no shard-writing bars, no torchvision notice
            pipe = TINY_MODELS[family][1]()
    finally:
        torch.random.set_rng_state(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with quiet_loading():
            pipe.save_pretrained(tmp)
        _umask_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _umask_modes(root: Path) -> None:
    """The modes ``mkdir`` / ``open`` give under the umask (mkdtemp makes 0700 and
    safetensors writes 0600, so a model shared with another user would be unreadable)."""
    from .fsio import dir_mode, file_mode

    os.chmod(root, dir_mode())
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), dir_mode())
        for f in files:
            os.chmod(os.path.join(dirpath, f), file_mode())


_TINY_PROMPTS = ("a photo of a cat", "a red car on the street", "a dog in the house",
                 "a blue sky with a tree", "a small green house", "a man with a large dog",
                 "the cat on the car", "a photo of the sky")


def tiny_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` degraded-prompt records (``{"id", "prompt", "neg_prompts"}``) for tests."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = _TINY_PROMPTS[(i + seed) % len(_TINY_PROMPTS)]
        words = p.split()
        drop = rng.randrange(len(words))
        neg = " ".join(w for j, w in enumerate(words) if j != drop)
        out.append({"id": f"p{i:05d}", "prompt": p, "neg_prompts": [neg, "a blurry photo"]})
    return out


def make_tiny_dataset(model_path: str | os.PathLike, path: str | os.PathLike, n_pairs: int = 8,
                      seed: int = 0, *, shard_size: int = 4) -> str:
    """Write a small valid pair dataset for the tiny model at ``model_path``.

    Latents are random with the model's latent shape; ``cond`` / ``neg_cond`` come from
    the model's own text encoders, so the data is exactly what ``prepare`` would store
    (minus the sampling, which would only slow tests down). Returns ``str(path)``.
    """
    if int(n_pairs) < 1:
        raise ValueError(f"n_pairs: expected a positive int, got {n_pairs!r}")
    from .data import PairWriter
    from .models import load_adapter

    # fp32 text encoders for every family (SANA's default is bf16 Gemma): the stored
    # embeddings then equal what the trainer encodes itself in fp32 tests.
    adapter = load_adapter(str(model_path), components=("text",), device="cpu",
                           dtype=torch.float32, text_dtype=torch.float32)
    records = tiny_prompts(int(n_pairs), seed)
    shape = adapter.latent_shape()
    g = torch.Generator().manual_seed(int(seed))
    with PairWriter(str(path), family=adapter.name, model=str(model_path),
                    shard_size=shard_size) as w:
        done = set(w.done_ids())
        for i, rec in enumerate(records):
            # Draw before skipping so a resumed write yields the same latents.
            lw = torch.randn(shape, generator=g).to(torch.float16)
            ll = torch.randn(shape, generator=g).to(torch.float16)
            if rec["id"] in done:
                continue
            neg = rec["neg_prompts"][0]
            cond = adapter.encode_prompts([rec["prompt"], neg])
            w.add(id=rec["id"], prompt=rec["prompt"], neg_prompt=neg, seed=int(seed) * 100003 + i,
                  latent_w=lw, latent_l=ll,
                  cond={k: v[0] for k, v in cond.items()},
                  neg_cond={k: v[1] for k, v in cond.items()})
    return str(path)
