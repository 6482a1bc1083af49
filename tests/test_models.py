"""Model-family adapters on tiny local pipelines: detection, cond dicts, schedules,
targets, preconditioning, micro-conditioning, sampling defaults."""

import contextlib
import dataclasses
import json

import pytest
import torch

from _train_helpers import tiny_model

from ddspo_fast.models import FAMILIES, detect_family, get_family, load_adapter

ALL = ["sd15", "sdxl", "sd3", "sana"]


@pytest.mark.parametrize("family", ALL)
def test_detect_and_cond_keys(family):
    path = tiny_model(family)
    assert detect_family(path) == family
    a = load_adapter(path, components=("denoiser", "text"))
    cond = a.encode_prompts(["a photo of a cat", "a dog"])
    assert tuple(sorted(cond)) == tuple(sorted(a.cond_keys))
    assert all(v.shape[0] == 2 for v in cond.values())
    # different prompts, different embeddings
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    c, h, w = a.latent_shape()
    x = torch.randn(2, c, h, w)
    t = a.sample_timesteps(2, device="cpu", generator=torch.Generator().manual_seed(0))
    out = a.predict(a.denoiser, a.add_noise(x, torch.randn_like(x), t), t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_get_family_and_detect_errors(tmp_path):
    assert set(FAMILIES) == set(ALL) | {"flux", "qwen_image", "flux2"}
    with pytest.raises(ValueError, match="family"):
        get_family("sd2")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="model"):
        detect_family(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family(str(tmp_path / "empty"))


def test_sampling_defaults():
    got = {f: (get_family(f).default_steps, get_family(f).default_cfg) for f in ALL}
    assert got == {"sd15": (25, 7.5), "sdxl": (25, 5.0), "sd3": (25, 5.0), "sana": (20, 4.5)}


def test_sd_noise_matches_ddpm_scheduler():
    from diffusers import DDPMScheduler

    a = load_adapter(tiny_model("sd15"), components=("denoiser",))
    sched = DDPMScheduler.from_config(a.pipe.scheduler.config)
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(a.add_noise(x, eps, t), sched.add_noise(x, eps, t))
    assert torch.equal(a.dpo_target(x, eps, t), eps)
    ts = a.sample_timesteps(1000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.int64 and ts.min() >= 0 and ts.max() <= 999


@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_flow_schedule_and_targets(family):
    from diffusers import FlowMatchEulerDiscreteScheduler

    a = load_adapter(tiny_model(family), components=("denoiser",))
    # sd3's scheduler has shift 3.0; sana's DPM-Solver config only flow_shift 3.0,
    # which FlowMatchEulerDiscreteScheduler ignores (shift 1.0, as in the official code)
    shift = {"sd3": 3.0, "sana": 1.0}[family]
    assert a.noise_schedule() == {"kind": "flow_static", "shift": shift}
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    t = a.sample_timesteps(4096, device="cpu", generator=torch.Generator().manual_seed(0))
    # every draw is a timestep of the training table (as diffusers' SD3/SANA scripts use)
    table = ref.timesteps.float()
    assert (t[:, None] - table[None]).abs().min(1).values.max() < 1e-2
    sig = a.noise_level(t)
    assert 0.3 < sig.median() < 0.9
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    tt = torch.tensor([250.0, 750.0])
    s = (tt / 1000).view(2, 1, 1, 1)
    torch.testing.assert_close(a.add_noise(x, eps, tt), (1 - s) * x + s * eps)
    want = x if family == "sd3" else eps - x
    torch.testing.assert_close(a.dpo_target(x, eps, tt), want)


def test_sd3_preconditioning_recovers_x0():
    a = load_adapter(tiny_model("sd3"), components=("denoiser",))
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300.0, 900.0])
    xt = a.add_noise(x0, eps, t)
    perfect = lambda **kw: (eps - x0,)  # a denoiser predicting the exact velocity  # noqa
    cond = {"prompt_embeds": None, "pooled_prompt_embeds": None}
    torch.testing.assert_close(a.predict(perfect, xt, t, cond), x0)


def test_sdxl_time_ids_from_latent_size():
    a = load_adapter(tiny_model("sdxl"), components=("denoiser",))
    ids = a.time_ids(torch.zeros(3, 4, 8, 12), torch.float32)
    f = a.vae_scale_factor
    assert ids.shape == (3, 6)
    assert ids[0].tolist() == [8 * f, 12 * f, 0, 0, 8 * f, 12 * f]


def test_latent_scaling_roundtrip():
    a = load_adapter(tiny_model("sd3"), components=("denoiser",))
    assert a.vae_shift_factor == pytest.approx(0.0609)
    assert a.vae_scaling_factor == pytest.approx(1.5305)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(a.latents_to_vae(a.vae_to_latents(z)), z)
    torch.testing.assert_close(a.vae_to_latents(z), (z - 0.0609) * 1.5305)


def test_generate_latents_same_seed_same_noise():
    a = load_adapter(tiny_model("sd15"), components=("denoiser", "text"))
    a.pipe.set_progress_bar_config(disable=True)
    x = a.generate_latents(["a cat", "a cat", "a dog"], [5, 5, 6], steps=2, cfg=1.0)
    assert x.shape == (3, *a.latent_shape())
    torch.testing.assert_close(x[0], x[1])
    assert not torch.allclose(x[0], x[2])


# ---------------------------------------------------------------- official parity: SANA

# sha256 of "\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION) in the official DDSPO code
# (KU-MIIL/DDSPO, ddspo/adapters/__init__.py at f8e47a5): 1056 characters ending in
# "User Prompt:" with no trailing space.
OFFICIAL_INSTRUCTION_SHA256 = "9e85abfcd9a8095a07ffae2fa495c69a99db85d93f5d9211b2565c3bb9885956"


def _official_sana_draw(model, n, seed, weighting_scheme="none", **kw):
    """t and sigma exactly as the official SANA adapter computes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    args = dict(logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    args.update(kw)
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=n,
                                              generator=torch.Generator().manual_seed(seed),
                                              **args)
    idx = (u * sched.config.num_train_timesteps).long()
    return sched.timesteps[idx], sched.sigmas[idx], sched


def test_sana_draws_t_and_sigma_as_the_official_code():
    model = tiny_model("sana")
    a = load_adapter(model, components=("denoiser",))
    n = 20000
    t_off, sig_off, sched = _official_sana_draw(model, n, seed=7)
    assert sched.shift == 1.0 and a.noise_schedule()["shift"] == 1.0  # flow_shift 3.0 unread
    t = a.sample_timesteps(n, device="cpu", generator=torch.Generator().manual_seed(7))
    assert torch.equal(t, t_off)                       # draw for draw
    torch.testing.assert_close(a.noise_level(t), sig_off, rtol=0, atol=1e-6)
    # the distribution itself: sigma uniform on {1/T, ..., 1}
    deciles = torch.histc(a.noise_level(t), bins=10, min=0.0, max=1.0) / n
    assert (deciles - 0.1).abs().max() < 0.01
    assert abs(a.noise_level(t).mean().item() - 0.5005) < 0.01


def test_sana_previous_schedule_stays_an_option():
    """shift 3 (the sampler's flow_shift) with logit-normal t: this library's former default."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    a = load_adapter(tiny_model("sana"), components=("denoiser",))
    g = torch.Generator().manual_seed(3)
    t = a.sample_timesteps(4096, device="cpu", generator=g, scheme="logit_normal", shift=3.0)
    u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(3)))
    want = FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps[(u * 1000).long()]
    torch.testing.assert_close(t, want)
    assert a.noise_level(t).median() > 0.6  # shifted towards noise


def test_sana_instruction_is_the_official_string():
    import hashlib

    from ddspo_fast.models.sana import instruction_lines

    official = "\n".join(instruction_lines("official"))
    assert hashlib.sha256(official.encode()).hexdigest() == OFFICIAL_INSTRUCTION_SHA256
    assert official.endswith("User Prompt:")
    pipeline = "\n".join(instruction_lines("pipeline"))
    assert pipeline == official + " "  # diffusers' default: the same text plus a space
    assert instruction_lines("none") is None
    with pytest.raises(ValueError, match="instruction"):
        instruction_lines("fancy")


def test_sana_encodes_with_the_official_instruction_by_default():
    a = load_adapter(tiny_model("sana"), components=("text",))
    seen = []
    real = a.pipe.encode_prompt

    def spy(*args, **kw):
        seen.append(kw["complex_human_instruction"])
        return real(*args, **kw)

    a.pipe.encode_prompt = spy
    official = a.encode_prompts(["a photo of a cat"])
    assert "\n".join(seen[-1]).endswith("User Prompt:")
    assert hashlib_of(seen[-1]) == OFFICIAL_INSTRUCTION_SHA256
    b = load_adapter(tiny_model("sana"), components=("text",),
                     options={"instruction": "pipeline"})
    other = b.encode_prompts(["a photo of a cat"])
    # the trailing space changes the tokens the prompt is encoded with
    assert not torch.equal(official["prompt_embeds"], other["prompt_embeds"])


def hashlib_of(lines) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_sana_lora_targets_and_gemma_dtype():
    assert get_family("sana").lora_targets == ("to_q", "to_k", "to_v")
    a = load_adapter(tiny_model("sana"), components=("denoiser", "text"))
    assert a.pipe.text_encoder.dtype == torch.bfloat16      # official: Gemma-2 in bf16
    assert a.denoiser.dtype == torch.float32
    # handed on in the denoiser's dtype, as the official adapter does
    assert a.encode_prompts(["a cat"])["prompt_embeds"].dtype == torch.float32
    b = load_adapter(tiny_model("sana"), components=("text",), text_dtype=torch.float16)
    assert b.pipe.text_encoder.dtype == torch.float16       # an explicit dtype wins
    # other families keep their text encoders in the dtype asked for
    c = load_adapter(tiny_model("sd15"), components=("text",))
    assert c.pipe.text_encoder.dtype == torch.float32


def test_family_options_are_checked():
    with pytest.raises(ValueError, match="options: sd15 has no option 'instruction'"):
        load_adapter(tiny_model("sd15"), components=("text",), options={"instruction": "none"})
    with pytest.raises(ValueError, match="instruction"):
        load_adapter(tiny_model("sana"), components=("text",), options={"instruction": 3})


# ---------------------------------------------------------------- timestep sampling options

@pytest.mark.parametrize("scheme,official", [
    ("uniform", "none"), ("logit_normal", "logit_normal"), ("mode", "mode"),
    ("cosmap", "cosmap")])
@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_flow_schemes_match_the_official_draws(family, scheme, official):
    model = tiny_model(family)
    a = load_adapter(model, components=("denoiser",))
    kw = dict(logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    t_off, _, _ = _official_sana_draw(model, 3000, seed=11, weighting_scheme=official, **kw)
    t = a.sample_timesteps(3000, device="cpu", generator=torch.Generator().manual_seed(11),
                           scheme=scheme, **kw)
    assert torch.equal(t, t_off)


def test_flow_scheme_shapes():
    a = load_adapter(tiny_model("sana"), components=("denoiser",))
    draw = lambda s, **kw: a.noise_level(a.sample_timesteps(  # noqa: E731
        20000, device="cpu", generator=torch.Generator().manual_seed(0), scheme=s, **kw))
    uni, ln, mode = draw("uniform"), draw("logit_normal", logit_std=0.5), draw("mode")
    # logit-normal concentrates around sigmoid(mean) = 0.5, uniform does not
    assert ((ln - 0.5).abs() < 0.25).float().mean() > 0.8
    assert abs(((uni - 0.5).abs() < 0.25).float().mean().item() - 0.5) < 0.02
    # mode with scale > 0 puts less mass at both ends than uniform does
    ends = lambda s: ((s < 0.1) | (s > 0.9)).float().mean().item()  # noqa: E731
    assert ends(mode) < ends(uni) - 0.03
    # cosmap draws as the official code draws it: uniformly (no loss weighting there)
    assert torch.equal(draw("cosmap"), uni)
    # logit_mean moves the mass; the table runs from sigma 1 down, so sigma ~ 1 - u
    assert draw("logit_normal", logit_mean=1.0).median() < 0.35


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ddpm_schemes_follow_the_official_densities(family):
    a = load_adapter(tiny_model(family), components=("denoiser",))
    T, n = 1000, 40000
    tv = torch.arange(0, T) / T
    official = {"linear": torch.linspace(1.0, 0.0, T),
                "sigmoid": 1.0 / (1.0 + torch.exp(-20 * (tv - 0.7))),
                "uniform": torch.ones(T)}
    for scheme, p in official.items():
        p = (p / p.sum()).double()
        t = a.sample_timesteps(n, device="cpu", generator=torch.Generator().manual_seed(1),
                               scheme=scheme)
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
        # mean and tail mass within 5 standard errors of the official density's
        mean = (p * torch.arange(T)).sum()
        sd = ((p * (torch.arange(T) - mean) ** 2).sum()).sqrt()
        assert abs(t.double().mean() - mean) < 5 * sd / n ** 0.5, scheme
        for cut in (250, 500, 700, 900):
            q = p[cut:].sum()
            got = (t >= cut).double().mean()
            assert abs(got - q) < 5 * (q * (1 - q) / n).sqrt() + 1e-9, (scheme, cut)
    # the default is uniform, as the official dataset's timestep_sampling=None
    d = a.sample_timesteps(64, device="cpu", generator=torch.Generator().manual_seed(2))
    u = a.sample_timesteps(64, device="cpu", generator=torch.Generator().manual_seed(2),
                           scheme="uniform")
    assert torch.equal(d, u)


def test_family_default_schemes():
    assert {f: get_family(f).timestep_sampling for f in ALL} == {
        "sd15": "uniform", "sdxl": "uniform", "sd3": "logit_normal", "sana": "uniform"}
    a = load_adapter(tiny_model("sd3"), components=("denoiser",))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(a.sample_timesteps(256, device="cpu", generator=g()),
                       a.sample_timesteps(256, device="cpu", generator=g(),
                                          scheme="logit_normal"))


def test_timestep_option_errors():
    flow = load_adapter(tiny_model("sana"), components=("denoiser",))
    ddpm = load_adapter(tiny_model("sd15"), components=("denoiser",))
    with pytest.raises(ValueError, match="timestep_sampling.*sana.*'linear'"):
        flow.sample_timesteps(2, device="cpu", scheme="linear")
    with pytest.raises(ValueError, match="timestep_sampling.*sd15.*'mode'"):
        ddpm.sample_timesteps(2, device="cpu", scheme="mode")
    with pytest.raises(ValueError, match="shift"):
        ddpm.sample_timesteps(2, device="cpu", shift=3.0)
    assert type(flow).timestep_schemes() == ("uniform", "logit_normal", "mode", "cosmap")
    assert type(ddpm).timestep_schemes() == ("uniform", "linear", "sigmoid")


# ---------------------------------------------------------------- what loading prints

def test_missing_vae_config_warns_what_it_assumes(tmp_path):
    import shutil

    src = tiny_model("sdxl")
    dst = tmp_path / "sdxl-no-vae"
    shutil.copytree(src, dst)
    a = load_adapter(str(dst), components=("denoiser",))
    scale = a.vae_scale_factor  # read from vae/config.json without loading the VAE
    assert scale == 2 and a.time_ids(torch.zeros(1, 4, 8, 8), torch.float32)[0, 0] == 16
    shutil.rmtree(dst / "vae")
    with pytest.warns(UserWarning, match="VAE config.*downscale of 8.*time_ids"):
        b = load_adapter(str(dst), components=("denoiser",))
    assert b.vae_scale_factor == 8 and b.vae_scaling_factor == 1.0


@contextlib.contextmanager
def messages_of(logger_name: str):
    """The messages logged to `logger_name` inside the block (a handler on that logger
    itself: the libraries' loggers do not all propagate to the root, caplog's)."""
    import logging

    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Grab()
    log = logging.getLogger(logger_name)
    log.addHandler(h)
    try:
        yield seen
    finally:
        log.removeHandler(h)


def test_quiet_loading_scopes_bars_and_notice():
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from ddspo_fast.models.quiet import quiet_loading

    log = logging.getLogger("transformers.utils.import_utils")
    with messages_of(log.name) as seen:
        before = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
        with quiet_loading():
            assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
            log.warning("`XImageProcessor` requires torchvision (not installed); falling back")
            log.warning("something else")
        assert (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()) == before
        log.warning("`YImageProcessor` requires torchvision (not installed); outside")
    assert seen == ["something else",
                    "`YImageProcessor` requires torchvision (not installed); outside"]


@pytest.fixture
def diffusers_warnings():
    """diffusers' warnings on (tests/conftest.py sets DIFFUSERS_VERBOSITY=error)."""
    import logging

    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.WARNING)
    yield
    log.setLevel(level)


def test_cast_module_skips_only_the_empty_fp32_warning(diffusers_warnings):
    from diffusers import UNet2DConditionModel

    from ddspo_fast.models.quiet import cast_module

    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd15"), subfolder="unet")
    with messages_of("diffusers.models.modeling_utils") as seen:
        unet._keep_in_fp32_modules = []
        cast_module(unet, dtype=torch.bfloat16)
        assert unet.dtype == torch.bfloat16 and not seen
        unet._keep_in_fp32_modules = ["time_embedding"]  # a real list: diffusers says so
        cast_module(unet, dtype=torch.float32)
        assert unet.dtype == torch.float32 and any("float32" in m for m in seen)


def test_loading_prints_no_bars_or_cast_warnings(capfd, diffusers_warnings):
    for fam in ALL:
        a = load_adapter(tiny_model(fam), components=("denoiser", "text"), dtype=torch.bfloat16)
        assert a.denoiser.dtype == torch.bfloat16
    err = capfd.readouterr().err
    for noise in ("Loading pipeline components", "Loading weights", "kept in float32",
                  "requires torchvision"):
        assert noise not in err


# ------------------------------------------------------------------ registry, variants, hooks
def test_registry_is_the_one_family_list():
    from ddspo_fast import testing
    from ddspo_fast.models import FluxAdapter, register_family
    from ddspo_fast.models.base import FamilyAdapter
    from ddspo_fast.train import TrainConfig
    from ddspo_fast.train import config as config_mod

    assert {fam for fam, _ in testing.TINY_MODELS.values()} == set(FAMILIES)
    with pytest.raises(TypeError, match="must define dpo_target"):
        type("NoTarget", (FamilyAdapter,), {"name": "nt", "flow": True})
    with pytest.raises(ValueError, match="already registered"):
        register_family(type("Other", (FluxAdapter,), {"name": "flux"}))

    class Mine(FluxAdapter):
        name = "mine"

    register_family(Mine)
    try:
        assert get_family("mine") is Mine
        assert TrainConfig(model="m", data="d", family="mine").family == "mine"
        # lists are asked of the registry when used, not copied at import
        assert "mine" in TrainConfig.fields_help()["family"]["choices"]
        assert "mine" in config_mod.field_choices(
            {f.name: f for f in dataclasses.fields(TrainConfig)}["family"])
    finally:
        del FAMILIES["mine"]
    with pytest.raises(ValueError, match="family"):
        TrainConfig(model="m", data="d", family="mine")


@pytest.mark.parametrize("name,family,described,steps_cfg", [
    ("flux", "flux", "flux (FLUX.1 [dev])", (28, 3.5)),
    ("flux-schnell", "flux", "flux (FLUX.1 [schnell])", (4, 0.0)),
    ("sd35", "sd3", "sd3 (sd3.5-medium)", (25, 5.0)),
    ("sd35-large", "sd3", "sd3 (sd3.5-large)", (25, 5.0)),
    ("sd3", "sd3", "sd3", (25, 5.0)),
])
def test_variants_are_read_from_the_denoiser_config(name, family, described, steps_cfg):
    path = tiny_model(name)
    assert detect_family(path) == family
    a = load_adapter(path, components=())  # no weights: configs only
    assert a.describe() == described and (a.default_steps, a.default_cfg) == steps_cfg


def test_flux_layout_hooks_and_schedule():
    a = load_adapter(tiny_model("flux"), components=("vae",))
    from diffusers import FluxPipeline

    x = torch.randn(2, *a.latent_shape())
    b, c, h, w = x.shape
    packed = a.pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, b, c, h, w), rtol=0, atol=0)
    assert torch.equal(a.unpack_latents(packed, x.shape), x)
    torch.testing.assert_close(a.image_ids(h, w, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                      torch.float32))
    assert a.pixel_multiple == 2 * a.vae_scale_factor
    # VAE normalisation: shift then scale, and back
    z = torch.randn(2, c, h, w)
    torch.testing.assert_close(a.vae_to_latents(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(a.latents_to_vae(a.vae_to_latents(z)), z)
    # dynamic shifting: the sampler's mu from the token count; training's table unshifted
    sched = a.noise_schedule()
    assert sched["kind"] == "flow_dynamic" and sched["max_image_seq_len"] == 4096
    assert a.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert a.dynamic_shift_mu(4096) == pytest.approx(1.15)
    t = a.sample_timesteps(4096, device="cpu", generator=torch.Generator().manual_seed(0))
    # unshifted: t = 1..1000 evenly (a shift of 3 would crowd them near 1000)
    assert (t - t.round()).abs().max() < 1e-3 and t.min() >= 0.999 and t.max() <= 1000
    assert 0.45 < (t < 500).float().mean() < 0.55
    assert a.noise_schedule(shift=3.0) == {"kind": "flow_static", "shift": 3.0}
    assert load_adapter(tiny_model("sd15"), components=()).noise_schedule() == {"kind": "ddpm"}


def test_per_channel_vae_statistics(tmp_path):
    import shutil

    src = tiny_model("sd15")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg_file = dst / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    cfg_file.write_text(json.dumps(cfg))
    a = load_adapter(str(dst), components=())
    z = torch.randn(2, 4, 8, 8)
    mean = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1)
    want = (z - mean) * cfg["scaling_factor"] / std  # as diffusers' SDXL pipelines apply them
    torch.testing.assert_close(a.vae_to_latents(z), want)
    torch.testing.assert_close(a.latents_to_vae(want), z)


def test_text_encoder_dtype_policy():
    sana, sd15 = get_family("sana"), get_family("sd15")
    assert sana.text_dtype_for(torch.float32) == torch.bfloat16  # official Gemma-2 dtype
    assert sana.text_dtype_for(torch.float32, "run") == torch.float32
    assert sd15.text_dtype_for(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="text_encoder_dtype"):
        sd15.text_dtype_for(torch.float16, "bf16")
