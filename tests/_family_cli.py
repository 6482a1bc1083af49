"""The command-line path every family's CLI test walks on its tiny model: degrade ->
prepare -> train -> export -> the family's own pipeline -> one image; a precomputed
reference cache against the live reference; image pairs -> encode -> train."""

import json

import pytest
import torch

from ddspo_fast import cli

TRAIN = ["--max-steps", "2", "--batch-size", "2", "--mixed-precision", "no", "--no-progress",
         "--no-tensorboard", "--device", "cpu", "--learning-rate", "1e-3", "--seed", "1"]
PROMPTS = ["a red car on the street", "a photo of a cat", "a dog in the house",
           "a small green house"]


def degrade(folder, n_prompts):
    """The first ``n_prompts`` prompts, degraded by the CLI: the JSONL path."""
    (folder / "p.txt").write_text("\n".join(PROMPTS[:n_prompts]) + "\n")
    assert cli.main(["degrade", str(folder / "p.txt"), "--out", str(folder / "neg.jsonl"),
                     "--method", "structural", "--variants", "2"]) == 0
    return folder / "neg.jsonl"


def train(model, data, out, objective, rank, *extra):
    """``ddspo-fast train`` (LoRA when ``rank`` is set): the run's metrics records."""
    argv = ["train", "--model", model, "--data", str(data), "--output-dir", str(out),
            "--objective", objective, *TRAIN, *extra]
    if rank is not None:
        argv += ["--lora-rank", str(rank)]
    assert cli.main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_image(pipe, steps, **kw):
    img = pipe(prompt="a photo of a cat", num_inference_steps=steps, height=16, width=16,
               output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(img)).all()


def train_export_generate(model, ds, data, adapter, runs, pipe_cls, tmp_path, capsys, generate):
    """Each ``(objective, LoRA rank)`` of ``runs`` trains on ``ds``, is exported, loads in
    the family's pipeline (``pipe_cls``; a LoRA through the pipeline's own loader, where
    it must change the denoiser) and makes one image with ``generate(pipe)``."""
    from diffusers import DiffusionPipeline

    capsys.readouterr()
    for objective, rank in runs:
        out = tmp_path / f"{objective}-{rank}"
        metrics = train(model, ds, out, objective, rank, "--checkpoint-every", "2")
        err = capsys.readouterr().err
        # what users load: the run's checkpoint exported (a model card beside the weights)
        exported = tmp_path / f"export-{objective}-{rank}"
        assert cli.main(["export", str(out), "--out", str(exported)]) == 0
        assert (exported / "README.md").is_file()
        assert f"ddspo-fast train: {adapter.describe()} {objective}" in err
        assert metrics[-1]["step"] == 2 and metrics[-1]["loss"] > 0
        # the early signs of a collapse are in every record
        assert {"saturated_frac", "margin_max", "drift_w", "drift_l"} <= set(metrics[-1])
        if rank is None:  # full fine-tune: a complete pipeline
            pipe = DiffusionPipeline.from_pretrained(str(exported))
        else:  # LoRA: the family pipeline's own loader, and it changes the denoiser
            pipe = DiffusionPipeline.from_pretrained(model)
            x = torch.randn(1, *adapter.latent_shape())
            t = torch.tensor([500.0])
            cond = {k: v.unsqueeze(0) for k, v in data[0]["cond"].items()}
            cond = {k: (v.float() if v.is_floating_point() else v) for k, v in cond.items()}
            with torch.no_grad():
                base = adapter.predict(pipe.transformer, x, t, cond)
                pipe.load_lora_weights(str(exported))
                tuned = adapter.predict(pipe.transformer, x, t, cond)
            assert not torch.allclose(base, tuned)
        assert type(pipe).__name__ == pipe_cls
        pipe.set_progress_bar_config(disable=True)
        generate(pipe)


def cache_trains_as_live(model, data, tmp_path):
    """A LoRA run from a precomputed reference cache gives the live run's losses and
    weights; returns the cache's path."""
    from safetensors.torch import load_file

    live = train(model, data, tmp_path / "live", "ddspo", 4)
    cache = tmp_path / "cache"
    assert cli.main(["precompute", "--model", model, "--data", data, "--out", str(cache),
                     "--draws", "1", "--mixed-precision", "no", "--device", "cpu", "--seed", "1",
                     "--no-progress"]) == 0
    cached = train(model, data, tmp_path / "cached", "ddspo", 4, "--reference-cache", str(cache))
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], rel=1e-5)
    w_live = load_file(tmp_path / "live" / "pytorch_lora_weights.safetensors")
    w_cached = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert w_live.keys() == w_cached.keys()
    assert max((w_live[k] - w_cached[k]).abs().max().item() for k in w_live) < 1e-5
    return cache


def encode_args(model, tmp_path):
    """Two random 20x24 image pairs and a JSONL of them: ``encode``'s arguments but --out."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i, prompt in enumerate(PROMPTS[:2]):
        for side in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / f"{i}{side}.png")
        lines.append(json.dumps({"prompt": prompt, "image_w": f"{i}w.png", "image_l": f"{i}l.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return ["encode", "--model", model, "--pairs", str(tmp_path / "pairs.jsonl"), "--device",
            "cpu", "--no-progress", "--degrade", "random"]
