"""FLUX.1 [dev] / [schnell] and SD3.5 large / medium: one training step of the Trainer held
against the recipe of diffusers' DreamBooth LoRA scripts, written out here in script form
(train_dreambooth_lora_flux.py, train_dreambooth_lora_sd3.py) on the same draws: prompt
embeddings, timestep table and density, noisy input, what the transformer is given
(packing, ids, t / 1000, guidance), its prediction and the regression target."""

import pytest
import torch

from _train_helpers import config, tiny_data, tiny_model

import ddspo_fast.train.pairs as pairs_mod
from ddspo_fast.models import detect_family, load_adapter
from ddspo_fast.train import Trainer

VARIANTS = {  # tiny model -> (family, variant, T5 tokens, training guidance, script scheme)
    "flux": ("flux", "flux-dev", 512, 3.5, "none"),
    "flux-schnell": ("flux", "flux-schnell", 256, None, "none"),
    "sd35": ("sd3", "sd3.5-medium", 77, None, "logit_normal"),
    "sd35-large": ("sd3", "sd3.5-large", 77, None, "logit_normal"),
}


def _capture_step(tr, batch, monkeypatch):
    """The Trainer's forward on ``batch``: its inputs, the kwargs of the first call of its
    policy transformer (with LoRA the adapters-off reference's, on the same rows), and the
    prediction / target rows handed to the loss."""
    seen = {}
    den = tr.policy

    def pre_hook(module, args, kwargs):
        seen.setdefault("call", dict(kwargs))

    handle = den.register_forward_pre_hook(pre_hook, with_kwargs=True)
    inner = pairs_mod.ddspo_loss_from_ref_mse

    def loss(model_pred, target, ref_mse, *a, **kw):  # target: (target_w, target_l)
        seen.update(pred=model_pred.detach(), target=torch.cat(target).detach())
        return inner(model_pred, target, ref_mse, *a, **kw)

    monkeypatch.setattr(pairs_mod, "ddspo_loss_from_ref_mse", loss)
    try:
        with torch.no_grad():
            _, _, inp = tr.compute_loss(batch)
    finally:
        handle.remove()
    return inp, seen


def _script_flux(path, x0, noise, timesteps, cond, guidance_scale):
    """train_dreambooth_lora_flux.py's step, on the given latents, noise and timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    vae_scale_factor = 2  # the tiny VAE: two blocks
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    b, c, h, w = x0.shape
    packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c,
                                        height=h, width=w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
    text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, dtype=x0.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale]).expand(b)
    with torch.no_grad():
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_prompt_embeds"],
                           encoder_hidden_states=cond["prompt_embeds"], txt_ids=text_ids,
                           img_ids=img_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, height=h * vae_scale_factor,
                                        width=w * vae_scale_factor,
                                        vae_scale_factor=vae_scale_factor)
    return {"hidden_states": packed, "timestep": timesteps / 1000, "guidance": guidance,
            "img_ids": img_ids, "txt_ids": text_ids, "pred": pred, "target": noise - x0}


def _script_sd3(path, x0, noise, timesteps, cond):
    """train_dreambooth_lora_sd3.py's step (precondition_outputs on, as DDSPO's SD3 code)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    with torch.no_grad():
        pred = transformer(hidden_states=noisy, timestep=timesteps,
                           encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    pred = pred * (-sigmas) + noisy
    return {"hidden_states": noisy, "timestep": timesteps, "pred": pred, "target": x0}


def _script_prompt_embeds(path, family, prompts, t5_len):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, transformer=None, vae=None)
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                               max_sequence_length=t5_len)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=t5_len)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_matches_the_diffusers_script(name, tmp_path, monkeypatch):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    family, variant, t5_len, guidance, scheme = VARIANTS[name]
    path = tiny_model(name)
    assert detect_family(path) == family
    tr = Trainer(config(name, tmp_path, objective="dpo", data=tiny_data(name)))
    a = tr.adapter
    assert a.variant == variant and variant.split("-")[-1] in a.describe()
    assert a.train_guidance == guidance
    batch = next(tr.batches())
    inp, seen = _capture_step(tr, batch, monkeypatch)

    # prompt embeddings as the script encodes them (CLIP pooled + T5 at the variant's length)
    want = _script_prompt_embeds(path, family, list(batch["prompt"]), t5_len)
    for k, v in want.items():
        torch.testing.assert_close(inp.cond[k], v.to(inp.cond[k].dtype), atol=2e-3, rtol=2e-3)

    # the timestep density and table: u from the script's default scheme, t = table[u * T]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=256,
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=g1)
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler").timesteps
    torch.testing.assert_close(a.sample_timesteps(256, device="cpu", generator=g2),
                               table[(u * 1000).long()], rtol=0, atol=0)

    # one step on the Trainer's own draws: rows [x_w; x_l], one t and noise per pair
    x0 = torch.cat([inp.x_w, inp.x_l]).float()
    noise = torch.cat([inp.noise, inp.noise]).float()
    t = torch.cat([inp.t, inp.t]).float()
    cond = {k: torch.cat([v, v]).float() for k, v in inp.cond.items()}
    if family == "flux":
        ref = _script_flux(path, x0, noise, t, cond, 3.5)
        for k in ("img_ids", "txt_ids"):
            torch.testing.assert_close(seen["call"][k], ref[k])
        if guidance is None:
            assert seen["call"]["guidance"] is None
        else:
            torch.testing.assert_close(seen["call"]["guidance"], ref["guidance"])
    else:
        ref = _script_sd3(path, x0, noise, t, cond)
    torch.testing.assert_close(seen["call"]["hidden_states"], ref["hidden_states"])
    torch.testing.assert_close(seen["call"]["timestep"].float(), ref["timestep"])
    torch.testing.assert_close(seen["pred"], ref["pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["target"], ref["target"])


def test_guidance_setting_and_variant_targets(tmp_path):
    # [dev] trains with the guidance it is given; [schnell] and SD3.5 have none to set
    tr = Trainer(config("flux", tmp_path / "a", guidance_scale=1.0))
    assert tr.adapter.train_guidance == 1.0
    with pytest.raises(ValueError, match="guidance_scale: flux .FLUX.1 .schnell.. has no"):
        Trainer(config("flux-schnell", tmp_path / "b", guidance_scale=1.0))
    # every default LoRA target names modules of the denoiser; SD3.5-medium's reach attn2
    for name in VARIANTS:
        a = load_adapter(tiny_model(name), components=("denoiser",))
        names = [n for n, _ in a.denoiser.named_modules()]
        for target in a.lora_targets:
            assert any(n == target or n.endswith("." + target) for n in names), (name, target)
        assert any(t.startswith("attn2.") for t in a.lora_targets) == (name == "sd35")


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_dd_cpp_from_trained_pair_adapters_with_mixing_and_hinge(name, tmp_path):
    """train-pair (the winning / losing LoRAs) then DD-CPP with random-condition mixing and
    another loss type: the pieces the other families have, on FLUX.1 [dev] and SD3.5."""
    import json
    import math

    from ddspo_fast.train.pair_policies import PairTrainConfig, PairTrainer

    pair_dir = tmp_path / "pair"
    PairTrainer(PairTrainConfig(model=tiny_model(name), data=tiny_data(name),
                                output_dir=str(pair_dir), max_steps=1, batch_size=2,
                                mixed_precision="no", device="cpu", progress=False,
                                tensorboard=False, checkpoint_every=0)).train()
    mix = tmp_path / "mix.jsonl"
    mix.write_text(json.dumps({"prompt": "a red car", "neg_prompts": ["a car"]}) + "\n")
    tr = Trainer(config(name, tmp_path / "out", pair="lora", pair_lora=str(pair_dir),
                        lora_rank=4, rand_cond_prompts=str(mix), rand_cond_schedule="constant",
                        loss_type="hinge"))
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    summary = tr.train()
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    now = dict(tr.policy.named_parameters())
    assert any(not torch.equal(v, now[n].detach()) for n, v in before.items())
    with torch.no_grad():  # the pair adapters really give other targets than the base
        inp = tr.make_inputs(next(tr.batches()))
        r = tr._reference_fn(inp.x_w, inp.t, inp.cond)
        w = tr._phi("win")(inp.x_w, inp.t, inp.cond)
    assert not torch.allclose(r, w)
