"""Qwen-Image, FLUX.2 [dev] and FLUX.2 [klein] from the command line on tiny models:
degrade -> prepare -> train -> export (DDSPO and Diffusion-DPO, LoRA and full) -> load the output in
the family's own pipeline -> one image; and a precomputed reference cache trains exactly
as the live reference does."""

import json

import diffusers
import pytest

from _family_cli import cache_trains_as_live, degrade, encode_args, one_image, train, \
    train_export_generate
from _train_helpers import tiny_data, tiny_model

from ddspo_fast import cli
from ddspo_fast.data import open_dataset
from ddspo_fast.models import load_adapter

if not all(hasattr(diffusers, n) for n in ("QwenImagePipeline", "Flux2Pipeline",
                                          "Flux2KleinPipeline")):
    pytest.skip(f"diffusers {diffusers.__version__} has no Qwen-Image / FLUX.2 pipelines",
                allow_module_level=True)

# tiny model -> (pipeline class, stored text tokens, the two runs: (objective, LoRA rank))
CASES = {
    "qwen_image": ("QwenImagePipeline", 512, (("ddspo", 4), ("dpo", None))),
    "flux2": ("Flux2Pipeline", 512, (("dpo", 4), ("ddspo", None))),
    "flux2-klein": ("Flux2KleinPipeline", 512, (("ddspo", 4), ("dpo", None))),
}


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    return degrade(tmp_path_factory.mktemp("prompts"), 2)


@pytest.mark.parametrize("name", list(CASES))
def test_degrade_prepare_train_load_generate(name, degraded, tmp_path, capsys):
    pipe_cls, tokens, runs = CASES[name]
    model = tiny_model(name)
    ds = tmp_path / "pairs"
    if name == "qwen_image":  # one step would stretch a single sigma to the terminal: NaN
        assert cli.main(["prepare", "--model", model, "--prompts", str(degraded), "--out",
                         str(tmp_path / "one"), "--steps", "1", "--device", "cpu",
                         "--no-progress"]) != 0
        assert "needs at least 2 sampling steps" in capsys.readouterr().err
    assert cli.main(["prepare", "--model", model, "--prompts", str(degraded), "--out", str(ds),
                     "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    a = load_adapter(model, components=("denoiser",))
    data = open_dataset(ds, validate=True)
    assert len(data) == 2 and tuple(data.latent_shape) == tuple(a.latent_shape())
    assert data[0]["cond"]["prompt_embeds"].shape[0] == tokens
    train_export_generate(model, ds, data, a, runs, pipe_cls, tmp_path, capsys,
                          lambda pipe: one_image(pipe, 2))


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_precomputed_cache_trains_as_the_live_reference(name, tmp_path):
    cache_trains_as_live(tiny_model(name), tiny_data(name), tmp_path)


@pytest.mark.parametrize("name", ["qwen_image", "flux2-klein"])
def test_encoded_image_pairs_train(name, tmp_path, capsys):
    """encode: the video VAE takes one frame (Qwen-Image), FLUX.2 stores patchified,
    batch-norm-normalised latents; sides must be multiples of twice the VAE's downscale."""
    model = tiny_model(name)
    base = encode_args(model, tmp_path)
    assert cli.main(base + ["--out", str(tmp_path / "bad"), "--resolution", "18"]) != 0
    assert "multiples of 4" in capsys.readouterr().err
    ds = tmp_path / "ds"
    assert cli.main(base + ["--out", str(ds)]) == 0
    data = open_dataset(ds, validate=True)
    a = load_adapter(model, components=("vae",))
    assert tuple(data.latent_shape) == tuple(a.latent_shape())
    assert a.native_resolution() == (16, 16)
    # the latents are those of the script: a seeded posterior sample for Qwen-Image, the
    # posterior mean for FLUX.2 (its scripts take latent_dist.mode())
    assert json.loads((ds / "info.json").read_text())["latent"] == \
        ("mean" if name.startswith("flux2") else "sample")
    metrics = train(model, ds, tmp_path / "run", "ddspo", 4, "--max-steps", "1")
    assert metrics[-1]["step"] == 1
