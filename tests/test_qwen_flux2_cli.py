"""Qwen-Image, FLUX.2 [dev] and FLUX.2 [klein] from the command line on tiny models:
degrade -> prepare -> train -> export (DDSPO and Diffusion-DPO, LoRA and full) -> load the output in
the family's own pipeline -> one image; and a precomputed reference cache trains exactly
as the live reference does."""

import json

import diffusers
import pytest
import torch

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
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--mixed-precision", "no", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--learning-rate", "1e-3", "--seed", "1"]


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "p.txt").write_text("a red car on the street\na photo of a cat\n")
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
    img = pipe(prompt="a photo of a cat", num_inference_steps=2, height=16, width=16,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(img)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_degrade_prepare_train_load_generate(name, degraded, tmp_path, capsys):
    from diffusers import DiffusionPipeline

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
        # the early signs of a collapse are in every record
        assert {"saturated_frac", "margin_max", "drift_w", "drift_l"} <= set(metrics[-1])
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


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_precomputed_cache_trains_as_the_live_reference(name, tmp_path):
    from safetensors.torch import load_file

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


@pytest.mark.parametrize("name", ["qwen_image", "flux2-klein"])
def test_encoded_image_pairs_train(name, tmp_path, capsys):
    """encode: the video VAE takes one frame (Qwen-Image), FLUX.2 stores patchified,
    batch-norm-normalised latents; sides must be multiples of twice the VAE's downscale."""
    import numpy as np
    from PIL import Image

    model = tiny_model(name)
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
    metrics = _train(model, ds, tmp_path / "run", "ddspo", 4, "--max-steps", "1")
    assert metrics[-1]["step"] == 1
