"""Qwen-Image, FLUX.2 [dev] and FLUX.2 [klein]: one training step of the Trainer held against
the recipe of diffusers' DreamBooth LoRA scripts, written out here in script form
(train_dreambooth_lora_qwen_image.py, train_dreambooth_lora_flux2.py,
train_dreambooth_lora_flux2_klein.py) on the same draws: prompt embeddings, timestep table
and density, noisy input, what the transformer is given (packing, img_shapes and the text
mask; patchified tokens, 4-D ids and guidance; t / 1000), its prediction and the target."""

import diffusers
import pytest
import torch

from _train_helpers import config, tiny_data, tiny_model

import ddspo_fast.train.pairs as pairs_mod
from ddspo_fast.models import detect_family, load_adapter
from ddspo_fast.train import Trainer

if not all(hasattr(diffusers, n) for n in ("QwenImagePipeline", "Flux2Pipeline",
                                          "Flux2KleinPipeline")):
    pytest.skip(f"diffusers {diffusers.__version__} has no Qwen-Image / FLUX.2 pipelines",
                allow_module_level=True)

VARIANTS = {  # tiny model -> (family, variant, training guidance, text encoder's stacked layers)
    "qwen_image": ("qwen_image", "qwen_image", None, None),
    "flux2": ("flux2", "flux2-dev", 3.5, (10, 20, 30)),
    "flux2-klein": ("flux2", "flux2-klein", None, (9, 18, 27)),
}


def _capture_step(tr, batch, monkeypatch):
    """The Trainer's forward on ``batch``: its inputs, the kwargs of the first call of its
    policy transformer (with LoRA the adapters-off reference's, on the same rows), and the
    prediction / target rows handed to the loss."""
    seen = {}

    def pre_hook(module, args, kwargs):
        seen.setdefault("call", dict(kwargs))

    handle = tr.policy.register_forward_pre_hook(pre_hook, with_kwargs=True)
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


def _sigmas(sched, timesteps, ndim):
    idx = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    return sched.sigmas[idx].flatten().reshape(-1, *([1] * (ndim - 1)))


def _script_qwen(path, x0, noise, timesteps, embeds, mask):
    """train_dreambooth_lora_qwen_image.py's step on the given latents, noise, timesteps and
    (batch-trimmed, as the script encodes them) prompt embeddings and mask."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                            shift=3.0)
    transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer")
    vae_scale_factor, resolution = 2, 16  # the tiny VAE: one temporal-downsample entry
    noisy = (1.0 - _sigmas(sched, timesteps, x0.ndim)) * x0 \
        + _sigmas(sched, timesteps, x0.ndim) * noise
    b, c, _, h, w = x0.shape
    img_shapes = [(1, resolution // vae_scale_factor // 2, resolution // vae_scale_factor // 2)] * b
    packed = QwenImagePipeline._pack_latents(noisy.permute(0, 2, 1, 3, 4), batch_size=b,
                                             num_channels_latents=c, height=h, width=w)
    with torch.no_grad():
        pred = transformer(hidden_states=packed, encoder_hidden_states=embeds,
                           encoder_hidden_states_mask=mask, timestep=timesteps / 1000,
                           img_shapes=img_shapes, return_dict=False)[0]
    pred = QwenImagePipeline._unpack_latents(pred, resolution, resolution, vae_scale_factor)
    return {"hidden_states": packed, "timestep": timesteps / 1000, "img_shapes": img_shapes,
            "pred": pred, "target": noise - x0, "sched": sched}


def _script_flux2(path, klein, x0, noise, timesteps, embeds, text_ids, guidance_scale):
    """train_dreambooth_lora_flux2(_klein).py's step (x0 already patchified and normalised)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer")
    sigmas = _sigmas(sched, timesteps, x0.ndim)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    ids = Flux2Pipeline._prepare_latent_ids(x0)
    packed = Flux2Pipeline._pack_latents(noisy)
    # [dev]'s script always feeds guidance; [klein]'s only where the config has the embedding
    guidance = None
    if not klein or transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale).expand(x0.shape[0])
    with torch.no_grad():
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                           encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                           return_dict=False)[0]
    pred = pred[:, : packed.size(1):]
    pred = Flux2Pipeline._unpack_latents_with_ids(pred, ids)
    return {"hidden_states": packed, "timestep": timesteps / 1000, "guidance": guidance,
            "img_ids": ids, "txt_ids": text_ids, "pred": pred, "target": noise - x0,
            "sched": sched}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_matches_the_diffusers_script(name, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    family, variant, guidance, layers = VARIANTS[name]
    path = tiny_model(name)
    assert detect_family(path) == family
    tr = Trainer(config(name, tmp_path, objective="dpo", data=tiny_data(name)))
    a = tr.adapter
    assert a.variant == variant and a.train_guidance == guidance
    batch = next(tr.batches())
    inp, seen = _capture_step(tr, batch, monkeypatch)
    prompts = list(batch["prompt"])

    # prompt embeddings as the script encodes them (max_sequence_length 512)
    pipe = DiffusionPipeline.from_pretrained(path, transformer=None, vae=None)
    if family == "qwen_image":
        embeds, mask = pipe.encode_prompt(prompt=prompts, device="cpu", max_sequence_length=512)
        n = embeds.shape[1]  # the script pads to the batch's longest; the dataset to 512
        torch.testing.assert_close(inp.cond["prompt_embeds"][:, :n], embeds, atol=2e-3,
                                   rtol=2e-3)
        assert not inp.cond["prompt_embeds"][:, n:].any()
        want_mask = mask if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long)
        assert torch.equal(inp.cond["prompt_embeds_mask"][:, :n], want_mask)
        assert not inp.cond["prompt_embeds_mask"][:, n:].any()
    else:
        embeds, text_ids = pipe.encode_prompt(prompt=prompts, device="cpu",
                                              max_sequence_length=512,
                                              text_encoder_out_layers=layers)
        torch.testing.assert_close(inp.cond["prompt_embeds"], embeds, atol=2e-3, rtol=2e-3)

    # the timestep density and table: u from the script's default scheme ("none"), t = table[u T]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=256,
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=g1)

    # one step on the Trainer's own draws: rows [x_w; x_l], one t and noise per pair
    x0 = torch.cat([inp.x_w, inp.x_l]).float()
    noise = torch.cat([inp.noise, inp.noise]).float()
    t = torch.cat([inp.t, inp.t]).float()
    cond = {k: torch.cat([v, v]) for k, v in inp.cond.items()}
    if family == "qwen_image":
        assert x0.dim() == 5 and x0.shape[2] == 1  # (B, C, frames, H, W)
        n = embeds.shape[1]
        ref = _script_qwen(path, x0, noise, t, cond["prompt_embeds"][:, :n].float(),
                           cond["prompt_embeds_mask"][:, :n])
        assert seen["call"]["img_shapes"] == ref["img_shapes"]
        torch.testing.assert_close(seen["call"]["encoder_hidden_states_mask"],
                                   cond["prompt_embeds_mask"])
    else:
        from diffusers import Flux2Pipeline

        ids = Flux2Pipeline._prepare_text_ids(cond["prompt_embeds"])
        ref = _script_flux2(path, variant.endswith("klein"), x0, noise, t,
                            cond["prompt_embeds"].float(), ids, 3.5)
        for k in ("img_ids", "txt_ids"):
            torch.testing.assert_close(seen["call"][k], ref[k], check_dtype=False)
        if guidance is None:
            assert seen["call"]["guidance"] is None
        else:
            torch.testing.assert_close(seen["call"]["guidance"], ref["guidance"])
    table = ref["sched"].timesteps
    torch.testing.assert_close(a.sample_timesteps(256, device="cpu", generator=g2),
                               table[(u * 1000).long()], rtol=0, atol=0)
    torch.testing.assert_close(seen["call"]["hidden_states"], ref["hidden_states"])
    torch.testing.assert_close(seen["call"]["timestep"].float(), ref["timestep"])
    torch.testing.assert_close(seen["pred"], ref["pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["target"], ref["target"])


def test_vae_normalisation_and_targets():
    """The stored latent space is the scripts': Qwen-Image (z - latents_mean) / latents_std
    on 5-D latents; FLUX.2 patchify, then the VAE's batch-norm statistics. Every default
    LoRA target names modules of the denoiser."""
    from diffusers import Flux2Pipeline

    for name in VARIANTS:
        a = load_adapter(tiny_model(name), components=("denoiser", "vae"))
        vae = a.pipe.vae
        torch.manual_seed(0)
        if name == "qwen_image":
            z = torch.randn(2, 4, 1, 8, 8)
            mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
            std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
            want = (z - mean) * std
        else:
            z = torch.randn(2, 4, 8, 8)
            p = Flux2Pipeline._patchify_latents(z)
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            want = (p - mean) / std
        got = a.vae_to_latents(z)
        assert tuple(got.shape[1:]) == tuple(a.latent_shape())
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(a.latents_to_vae(got), z, atol=1e-5, rtol=1e-5)
        names = [n for n, _ in a.denoiser.named_modules()]
        for target in a.lora_targets:
            assert any(n == target or n.endswith("." + target) for n in names), (name, target)


@pytest.mark.parametrize("name,params_b", [("qwen_image", 20.4), ("flux2", 32.2),
                                           ("flux2-klein", 3.88)])
def test_bench_specs(name, params_b):
    """The REAL bench specs build the released sizes (Qwen-Image 20B, FLUX.2 [dev] 32B,
    [klein] 4B); the TINY ones load through the family adapter with the stated layout."""
    import tempfile
    from pathlib import Path

    import diffusers

    from ddspo_fast.bench.archs import REAL, TINY, make_batch, write_model

    spec = REAL[name]
    with torch.device("meta"):
        m = getattr(diffusers, spec.denoiser_cls)(**spec.config)
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(params_b, rel=0.01)
    spec = TINY[name]
    with tempfile.TemporaryDirectory() as d:
        a = load_adapter(str(write_model(spec, Path(d), torch.device("cpu"))),
                         components=("denoiser",))
        assert a.name == spec.family and tuple(a.latent_shape()) == spec.latent_shape
        b = make_batch(spec, 2, "cpu")
        cond = {k: (v.float() if v.is_floating_point() else v) for k, v in b["cond"].items()}
        t = a.sample_timesteps(2, device="cpu")
        with torch.no_grad():
            out = a.predict(a.denoiser, b["latent_w"].float(), t, cond)
        assert out.shape == b["latent_w"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name,described,steps_cfg,schedule", [
    ("qwen_image", "qwen_image", (50, 4.0), "flow_dynamic"),
    ("flux2", "flux2 (FLUX.2 [dev])", (50, 4.0), "flow_dynamic"),
    ("flux2-klein", "flux2 (FLUX.2 [klein])", (50, 4.0), "flow_dynamic"),
])
def test_variants_defaults_and_schedule_from_configs_only(name, described, steps_cfg, schedule):
    a = load_adapter(tiny_model(name), components=())  # no weights: configs only
    assert a.describe() == described and (a.default_steps, a.default_cfg) == steps_cfg
    assert a.noise_schedule()["kind"] == schedule
    assert a.vae_scale_factor == 2 and a.pixel_multiple == 4
    # a static shift given for training replaces the dynamic one (as for FLUX.1)
    assert a.noise_schedule(shift=3.0) == {"kind": "flow_static", "shift": 3.0}


def test_collapse_signs_are_logged():
    """saturated_frac, margin_max and drift_w / drift_l follow from the margins and MSEs the
    loss returns: checked on hand-made stats, then present in a real run's records."""
    import math

    from ddspo_fast.train.metrics import MetricsAccumulator

    class One:
        num_processes = 1

    acc = MetricsAccumulator("cpu")
    z = torch.tensor([0.5, 6.0, -1.0, 5.0])
    mm = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    rm = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    acc.add(torch.tensor(0.3), {"margin": z, "model_mse": mm, "ref_mse": rm},
            torch.full((4,), 0.5), None, 4)
    acc.add(torch.tensor(0.3), {"margin": torch.tensor([1.0, 2.0, 3.0, 9.5]), "model_mse": rm,
                                "ref_mse": rm}, torch.full((4,), 0.5), None, 4)
    out = acc.collect(One())
    assert out["saturated_frac"] == pytest.approx(3 / 8)  # 6.0, 5.0, 9.5 exceed log 99
    assert out["margin_max"] == 9.5
    assert out["drift_w"] == pytest.approx(1.5 - 1.0) and out["drift_l"] == 0.0
    acc.reset()
    assert math.isnan(acc.collect(One())["margin_max"])


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_pair_adapters_mixing_hinge_and_resume(name, tmp_path):
    """train-pair (the winning / losing LoRAs), then DD-CPP with random-condition mixing
    (the mixing prompts encoded live, mask included for Qwen-Image) and the hinge loss; a
    run killed after its checkpoint and resumed ends where the uninterrupted one does."""
    import json
    import math

    from _train_helpers import Killed, die_mid_step

    from ddspo_fast.train.pair_policies import PairTrainConfig, PairTrainer

    pair_dir = tmp_path / "pair"
    PairTrainer(PairTrainConfig(model=tiny_model(name), data=tiny_data(name),
                                output_dir=str(pair_dir), max_steps=1, batch_size=2,
                                mixed_precision="no", device="cpu", progress=False,
                                tensorboard=False, checkpoint_every=0)).train()
    mix = tmp_path / "mix.jsonl"
    mix.write_text(json.dumps({"prompt": "a red car", "neg_prompts": ["a car"]}) + "\n")
    kw = dict(pair="lora", pair_lora=str(pair_dir), lora_rank=4, rand_cond_prompts=str(mix),
              rand_cond_schedule="constant", loss_type="hinge", checkpoint_every=1,
              batch_size=1, max_steps=2)
    full = Trainer(config(name, tmp_path / "a", **kw))
    summary = full.train()
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    want = {n: p.detach().clone() for n, p in full.policy.named_parameters() if p.requires_grad}
    part = Trainer(config(name, tmp_path / "b", **kw))
    die_mid_step(part, 2)
    with pytest.raises(Killed):
        part.train()
    resumed = Trainer(config(name, tmp_path / "b", resume="latest", **kw))
    assert resumed.global_step == 1
    resumed.train()
    got = dict(resumed.policy.named_parameters())
    for n, v in want.items():
        torch.testing.assert_close(got[n].detach(), v, rtol=0, atol=1e-6)
    with torch.no_grad():  # the pair adapters really give other targets than the base
        inp = resumed.make_inputs(next(resumed.batches()))
        r = resumed._reference_fn(inp.x_w, inp.t, inp.cond)
        w = resumed._phi("win")(inp.x_w, inp.t, inp.cond)
    assert not torch.allclose(r, w)
