"""FLUX.1 [dev] / [schnell] and SD3.5 medium / large from the command line on tiny models:
degrade -> prepare -> train -> export (DDSPO and Diffusion-DPO, LoRA and full) -> load the output in
the family's own pipeline -> one image; and a precomputed reference cache trains exactly
as the live reference does."""

import pytest

from _family_cli import TRAIN, cache_trains_as_live, degrade, encode_args, one_image, train, \
    train_export_generate
from _train_helpers import tiny_data, tiny_model

from ddspo_fast import cli
from ddspo_fast.data import open_dataset
from ddspo_fast.models import load_adapter

# tiny model -> (pipeline class, T5 tokens stored, the two runs: (objective, LoRA rank))
CASES = {
    "flux": ("FluxPipeline", 512, (("ddspo", 4), ("dpo", None))),
    "flux-schnell": ("FluxPipeline", 256, (("dpo", 4), ("ddspo", None))),
    "sd35": ("StableDiffusion3Pipeline", 154, (("ddspo", 4), ("dpo", None))),
    "sd35-large": ("StableDiffusion3Pipeline", 154, (("dpo", 4), ("ddspo", None))),
}


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    return degrade(tmp_path_factory.mktemp("prompts"), 4)


def _generate(pipe):
    kw = {"max_sequence_length": 77} if type(pipe).__name__ != "FluxPipeline" else {}
    one_image(pipe, 1, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_degrade_prepare_train_load_generate(name, degraded, tmp_path, capsys):
    pipe_cls, t5_tokens, runs = CASES[name]
    model = tiny_model(name)
    ds = tmp_path / "pairs"
    assert cli.main(["prepare", "--model", model, "--prompts", str(degraded), "--out", str(ds),
                     "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    a = load_adapter(model, components=("denoiser",))
    data = open_dataset(ds, validate=True)
    assert len(data) == 4 and tuple(data.latent_shape) == tuple(a.latent_shape())
    assert data[0]["cond"]["prompt_embeds"].shape[0] == t5_tokens
    train_export_generate(model, ds, data, a, runs, pipe_cls, tmp_path, capsys, _generate)


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_precomputed_cache_trains_as_the_live_reference(name, tmp_path, capsys):
    model, data = tiny_model(name), tiny_data(name)
    cache = cache_trains_as_live(model, data, tmp_path)
    # a cache written with another guidance is refused, naming the setting
    if name == "flux":
        assert cli.main(["train", "--model", model, "--data", data, "--output-dir",
                         str(tmp_path / "other"), *TRAIN, "--lora-rank", "4",
                         "--guidance-scale", "1.0", "--reference-cache", str(cache)]) != 0
        assert "guidance_scale differs" in capsys.readouterr().err


def test_encoded_image_pairs_train_flux(tmp_path, capsys):
    model = tiny_model("flux")
    base = encode_args(model, tmp_path)
    # FLUX packs 2x2 latents: sides must be multiples of twice the VAE's downscale
    assert cli.main(base + ["--out", str(tmp_path / "bad"), "--resolution", "18"]) != 0
    assert "multiples of 4" in capsys.readouterr().err
    ds = tmp_path / "ds"
    assert cli.main(base + ["--out", str(ds)]) == 0
    data = open_dataset(ds, validate=True)
    assert tuple(data.latent_shape) == tuple(load_adapter(model, components=()).latent_shape())
    metrics = train(model, ds, tmp_path / "run", "ddspo", 4, "--max-steps", "1")
    assert metrics[-1]["step"] == 1
