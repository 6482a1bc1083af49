"""A model family defined entirely in this file, joined through the public registry (the
``DDSPO_FAST_FAMILIES`` plugin variable), runs from the command line without any library
file knowing it: train (LoRA, TF-CPP), precompute a reference cache and train from it,
export a checkpoint, and the exported LoRA loads into the family's pipeline.

The family is a stand-in for a video model: a latent is rank 4, (frames, channels,
height, width), and its denoiser is an image UNet applied to every frame (the frames are
packed into the batch in ``pack_latents``), trained by flow matching on the velocity.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from _train_helpers import tiny_model

from ddspo_fast import cli
from ddspo_fast.models import FAMILIES, family_names, get_family
from ddspo_fast.models.base import Cond, FamilyAdapter

NAME = "frames_test"
FRAMES = 2


class FramesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """The family's pipeline: a VAE, a CLIP text encoder, a UNet and a flow scheduler
    (no sampling loop: training, caching and exporting never sample)."""

    _optional_components = ["vae"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              unet=unet, scheduler=scheduler)


class FramesAdapter(FamilyAdapter):
    name = NAME
    pipeline_classes = ("FramesPipeline",)
    denoiser_name = "unet"
    flow = True
    cond_keys = ("prompt_embeds",)
    text_components = ("text_encoder", "tokenizer")
    latent_axes = ("frames", "channels", "height", "width")
    wrap_blocks = ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

    @classmethod
    def pipeline_type(cls):
        return FramesPipeline

    def latent_shape(self):
        return (FRAMES, *super().latent_shape())  # (C, H, W) of one frame, from the UNet

    def pack_latents(self, x):
        return x.reshape(-1, *x.shape[2:])  # frames into the batch: (B * F, C, H, W)

    def unpack_latents(self, x, like_shape):
        return x.reshape(like_shape)

    def _encode(self, prompts: list[str]) -> Cond:
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return {"prompt_embeds": self.pipe.text_encoder(ids.to(self.device))[0]}

    def dpo_target(self, x0, noise, timesteps):
        return noise - x0  # the velocity

    def predict(self, denoiser, x_t, timesteps, cond: Cond) -> torch.Tensor:
        f = x_t.shape[1]
        out = denoiser(self.pack_latents(x_t), timesteps.repeat_interleave(f),
                       encoder_hidden_states=cond["prompt_embeds"].repeat_interleave(f, dim=0),
                       return_dict=False)[0]
        return self.unpack_latents(out, x_t.shape)


def build_tiny_pipeline():
    """The tiny SD1.5's text encoder, VAE and UNet under this family's pipeline class and a
    flow-matching scheduler with a static shift."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(tiny_model("sd15"))
    return FramesPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                          unet=sd.unet,
                          scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                    shift=2.0))


TRAIN = ["--max-steps", "2", "--batch-size", "2", "--mixed-precision", "no", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--learning-rate", "1e-3", "--seed", "1",
         "--lora-rank", "4"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The family registered as a plugin would be, and its tiny model and pairs."""
    from ddspo_fast import testing

    mp = pytest.MonkeyPatch()
    mp.setenv("DDSPO_FAST_FAMILIES", f"{__name__}:FramesAdapter")
    try:
        assert NAME in family_names() and get_family(NAME) is FramesAdapter
        testing.register_tiny_model(NAME, NAME, build_tiny_pipeline)
        root = tmp_path_factory.mktemp("frames")
        model = testing.make_tiny_model(NAME, root / "model")
        data = testing.make_tiny_dataset(model, root / "pairs", n_pairs=4, seed=0)
        yield model, data
    finally:
        mp.undo()
        FAMILIES.pop(NAME, None)
        testing.TINY_MODELS.pop(NAME, None)


def _train(model, data, out, *extra):
    assert cli.main(["train", "--model", model, "--data", data, "--output-dir", str(out),
                     *TRAIN, *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_precompute_export_from_the_cli(family, tmp_path, capsys):
    from safetensors.torch import load_file

    from ddspo_fast.data import open_dataset
    from ddspo_fast.models import detect_family, load_adapter

    model, data = family
    assert detect_family(model) == NAME
    a = load_adapter(model, components=("denoiser",))
    assert tuple(open_dataset(data).latent_shape) == a.latent_shape() == (FRAMES, 4, 8, 8)
    assert a.noise_schedule() == {"kind": "flow_static", "shift": 2.0}
    assert a.describe_latents(a.latent_shape()) == "[2, 4, 8, 8] (frames, channels, height, width)"

    # the CLI's --family choices are the registry's when the parser is built
    assert cli.main(["train", "--help"]) == 0
    assert NAME in capsys.readouterr().out

    live = _train(model, data, tmp_path / "live", "--family", NAME, "--checkpoint-every", "2")
    assert live[-1]["step"] == 2 and live[-1]["loss"] > 0
    assert f"ddspo-fast train: {NAME} ddspo" in capsys.readouterr().err

    cache = tmp_path / "cache"
    assert cli.main(["precompute", "--model", model, "--data", data, "--out", str(cache),
                     "--draws", "1", "--mixed-precision", "no", "--device", "cpu", "--seed", "1",
                     "--no-progress"]) == 0
    assert json.loads((cache / "cache.json").read_text())["latent_shape"] == [FRAMES, 4, 8, 8]
    cached = _train(model, data, tmp_path / "cached", "--reference-cache", str(cache))
    # the cached reference trains as the live one does
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], rel=1e-5)

    exported = tmp_path / "export"
    assert cli.main(["export", str(tmp_path / "live"), "--out", str(exported)]) == 0
    w_export = load_file(exported / "pytorch_lora_weights.safetensors")
    w_final = load_file(tmp_path / "live" / "pytorch_lora_weights.safetensors")
    assert w_export.keys() == w_final.keys() and w_export
    assert all(torch.equal(w_export[k], w_final[k]) for k in w_export)

    # the family's own pipeline loads the LoRA, and it changes the denoiser's output
    pipe = FramesPipeline.from_pretrained(model)
    x, t = torch.randn(1, *a.latent_shape()), torch.tensor([500.0])
    cond = {"prompt_embeds": open_dataset(data)[0]["cond"]["prompt_embeds"][None].float()}
    with torch.no_grad():
        base = a.predict(pipe.unet, x, t, cond)
        pipe.load_lora_weights(str(exported))
        tuned = a.predict(pipe.unet, x, t, cond)
    assert base.shape == x.shape and not torch.allclose(base, tuned)


def test_a_plugin_that_does_not_load_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("DDSPO_FAST_FAMILIES", "no_such_module_here:Adapter")
    assert cli.main(["train", "--help"]) != 0
    err = capsys.readouterr().err
    assert "DDSPO_FAST_FAMILIES" in err and "no_such_module_here" in err
    assert "Traceback" not in err
