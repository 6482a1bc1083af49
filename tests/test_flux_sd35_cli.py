"""FLUX.1 [dev] / [schnell] and SD3.5 medium / large from the command line on tiny models:
degrade -> prepare -> train -> export (DDSPO and Diffusion-DPO, LoRA and full) -> load the output in
the family's own pipeline -> one image; and a precomputed reference cache trains exactly
as the live reference does."""

import json

import pytest
import torch

from _train_helpers import tiny_model

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
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--mixed-precision", "no", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--learning-rate", "1e-3", "--seed", "1"]


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "p.txt").write_text("a red car on the street\na photo of a cat\na dog in the house\n"
                             "a small green house\n")
    assert cli.main(["degrade", str(d / "p.txt"), "--out", str(d / "neg.jsonl"), "--method",
                     "structural", "--variants", "2"]) == 0
    return d / "neg.jsonl"


def _train(model, data, out, objective, rank, *extra):
    argv = ["train", "--model", model, "--data", str(data), "--output-dir", str(out),
            "--objective", objective, *TRAIN, *extra]
    if rank is not None:
        argv += ["--lora-rank", str(rank)]
    assert cli.main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_image(pipe):
    kw = {"max_sequence_length": 77} if type(pipe).__name__ != "FluxPipeline" else {}
    img = pipe("a photo of a cat", num_inference_steps=1, height=16, width=16,
               output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(img)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_degrade_prepare_train_load_generate(name, degraded, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    pipe_cls, t5_tokens, runs = CASES[name]
    model = tiny_model(name)
    ds = tmp_path / "pairs"
    assert cli.main(["prepare", "--model", model, "--prompts", str(degraded), "--out", str(ds),
                     "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    a = load_adapter(model, components=("denoiser",))
    data = open_dataset(ds, validate=True)
    assert len(data) == 4 and tuple(data.latent_shape) == tuple(a.latent_shape())
    assert data[0]["cond"]["prompt_embeds"].shape[0] == t5_tokens
    capsys.readouterr()

    for objective, rank in runs:
        out = tmp_path / f"{objective}-{rank}"
        metrics = _train(model, ds, out, objective, rank, "--checkpoint-every", "2")
        err = capsys.readouterr().err
        # what users load: the run's checkpoint exported (a model card beside the weights)
        exported = tmp_path / f"export-{objective}-{rank}"
        assert cli.main(["export", str(out), "--out", str(exported)]) == 0
        assert (exported / "README.md").is_file()
        assert f"ddspo-fast train: {a.describe()} {objective}" in err
        assert metrics[-1]["step"] == 2 and metrics[-1]["loss"] > 0
        if rank is None:  # full fine-tune: a complete pipeline
            pipe = DiffusionPipeline.from_pretrained(str(exported))
        else:  # LoRA: the family pipeline's own loader, and it changes the denoiser
            pipe = DiffusionPipeline.from_pretrained(model)
            x = torch.randn(1, *a.latent_shape())
            t = torch.tensor([500.0])
            cond = {k: v.unsqueeze(0) for k, v in data[0]["cond"].items()}
            cond = {k: (v.float() if v.is_floating_point() else v) for k, v in cond.items()}
            with torch.no_grad():
                base = a.predict(pipe.transformer, x, t, cond)
                pipe.load_lora_weights(str(exported))
                tuned = a.predict(pipe.transformer, x, t, cond)
            assert not torch.allclose(base, tuned)
        assert type(pipe).__name__ == pipe_cls
        pipe.set_progress_bar_config(disable=True)
        _one_image(pipe)


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_precomputed_cache_trains_as_the_live_reference(name, tmp_path, capsys):
    from safetensors.torch import load_file

    from _train_helpers import tiny_data

    model, data = tiny_model(name), tiny_data(name)
    live = _train(model, data, tmp_path / "live", "ddspo", 4)
    cache = tmp_path / "cache"
    assert cli.main(["precompute", "--model", model, "--data", data, "--out", str(cache),
                     "--draws", "1", "--mixed-precision", "no", "--device", "cpu", "--seed", "1",
                     "--no-progress"]) == 0
    cached = _train(model, data, tmp_path / "cached", "ddspo", 4,
                    "--reference-cache", str(cache))
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], rel=1e-5)
    w_live = load_file(tmp_path / "live" / "pytorch_lora_weights.safetensors")
    w_cached = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert w_live.keys() == w_cached.keys()
    assert max((w_live[k] - w_cached[k]).abs().max().item() for k in w_live) < 1e-5
    # a cache written with another guidance is refused, naming the setting
    if name == "flux":
        assert cli.main(["train", "--model", model, "--data", data, "--output-dir",
                         str(tmp_path / "other"), *TRAIN, "--lora-rank", "4",
                         "--guidance-scale", "1.0", "--reference-cache", str(cache)]) != 0
        assert "guidance_scale differs" in capsys.readouterr().err


def test_encoded_image_pairs_train_flux(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    model = tiny_model("flux")
    rng = np.random.default_rng(0)
    lines = []
    for i, prompt in enumerate(["a red car on the street", "a photo of a cat"]):
        for side in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / f"{i}{side}.png")
        lines.append(json.dumps({"prompt": prompt, "image_w": f"{i}w.png", "image_l": f"{i}l.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    base = ["encode", "--model", model, "--pairs", str(tmp_path / "pairs.jsonl"), "--device",
            "cpu", "--no-progress", "--degrade", "random"]
    # FLUX packs 2x2 latents: sides must be multiples of twice the VAE's downscale
    assert cli.main(base + ["--out", str(tmp_path / "bad"), "--resolution", "18"]) != 0
    assert "multiples of 4" in capsys.readouterr().err
    ds = tmp_path / "ds"
    assert cli.main(base + ["--out", str(ds)]) == 0
    data = open_dataset(ds, validate=True)
    assert tuple(data.latent_shape) == tuple(load_adapter(model, components=()).latent_shape())
    metrics = _train(model, ds, tmp_path / "run", "ddspo", 4, "--max-steps", "1")
    assert metrics[-1]["step"] == 1
