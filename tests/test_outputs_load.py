"""Every output loads where users load it, at the trained strength: a LoRA run's file, an
exported checkpoint and DD-CPP's pair adapters, each through diffusers'
``pipe.load_lora_weights``, for every family."""

from __future__ import annotations

import json

import pytest
import torch

from _train_helpers import config, tiny_model

FAMILIES = ("sd15", "sdxl", "sd3", "sana")
#: the flow transformers added since, one tiny model per family (their variants share the
#: LoRA code path: the family adapter's save/load)
NEWER = ("flux", "sd35", "qwen_image", "flux2")


def _inputs(family: str):
    from ddspo_fast.models import load_adapter

    a = load_adapter(tiny_model(family), components=("text",), device="cpu",
                     dtype=torch.float32, text_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *a.latent_shape(), generator=g)
    t = a.sample_timesteps(2, device="cpu", generator=g)
    return a, x, t, a.encode_prompts(["a red cube", "a photo of a cat"])


def _loaded(family: str, lora_dir, **kw):
    """The denoiser of a fresh pipeline after ``pipe.load_lora_weights(lora_dir)``."""
    import diffusers

    from ddspo_fast.models.quiet import quiet_loading

    with quiet_loading():
        pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_model(family))
        pipe.load_lora_weights(str(lora_dir), **kw)
    den = getattr(pipe, "unet", None) or pipe.transformer
    return den.eval()


def _close(a, b, ref):
    # fp32 rounding of the same computation, on the scale of the LoRA's own effect
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES + NEWER)
def test_lora_rank4_alpha8_loads_at_trained_strength(family, tmp_path):
    """A rank-4 / alpha-8 LoRA (scale 2), saved at the end of a run and exported from its
    checkpoint, reproduces the trained policy's output when loaded with
    ``load_lora_weights`` (before the fix it loaded at scale 1: half the effect)."""
    from ddspo_fast.train import Trainer
    from ddspo_fast.train.export import LORA_FILE, export

    run = tmp_path / "run"
    cfg = config(family, run, lora_rank=4, lora_alpha=8, max_steps=1, learning_rate=5e-2,
                 save_final=True, checkpoint_every=1, objective="dpo")
    with Trainer(cfg) as tr:
        tr.train()
        a, x, t, cond = _inputs(family)
        policy = tr.policy.eval()
        with torch.no_grad():
            want = a.predict(policy, x, t, cond)
            policy.disable_adapters()
            base = a.predict(policy, x, t, cond)
    effect = want - base
    assert effect.abs().max() > 1e-4  # the LoRA changes the output
    meta = _file_metadata(run / LORA_FILE)
    assert meta is not None and any(k.endswith("lora_alpha") and v == 8 for k, v in meta.items())

    with torch.no_grad():
        got = a.predict(_loaded(family, run), x, t, cond)
    assert _close(got, want, effect), (got - want).abs().max()

    out = tmp_path / "exported"
    info = export(run / "checkpoints" / "checkpoint-1", out)
    assert info["kind"] == "lora" and (out / LORA_FILE).is_file()
    with torch.no_grad():
        got = a.predict(_loaded(family, out), x, t, cond)
    assert _close(got, want, effect), (got - want).abs().max()


def _file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else None


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_adapters_load_with_load_lora_weights(family, tmp_path):
    """DD-CPP's pos/neg adapters hold a diffusers LoRA file beside the peft files (which
    stay), and ``load_lora_weights`` on each folder gives that adapter's output; an
    exported train-pair checkpoint writes the same two folders."""
    from ddspo_fast.train.export import export
    from ddspo_fast.train.pair_policies import PairTrainConfig, PairTrainer

    from _train_helpers import tiny_data

    out = tmp_path / "pair"
    cfg = PairTrainConfig(model=tiny_model(family), data=tiny_data(family), output_dir=str(out),
                          max_steps=1, batch_size=2, lora_rank=4, lora_alpha=8,
                          learning_rate=5e-2, mixed_precision="no", checkpoint_every=1,
                          progress=False, device="cpu")
    tr = PairTrainer(cfg)
    try:
        tr.train()
        a, x, t, cond = _inputs(family)
        den = tr.denoiser.eval()
        tr.split.remove()
        from ddspo_fast.train.lora import LOSE, WIN, AdapterSwitch

        sw = AdapterSwitch(den)
        want = {}
        with torch.no_grad():
            for name in (WIN, LOSE):
                with sw.use([name]):
                    want[name] = a.predict(den, x, t, cond)
            with sw.use(None):
                base = a.predict(den, x, t, cond)
    finally:
        tr.close()
    exported = tmp_path / "exported"
    export(out / "checkpoints" / "checkpoint-1", exported)
    for root in (out, exported):
        for name, d in ((WIN, "pos_lora_unet"), (LOSE, "neg_lora_unet")):
            assert (root / d / "adapter_config.json").is_file()  # the peft folder is kept
            with torch.no_grad():
                got = a.predict(_loaded(family, root / d), x, t, cond)
            assert _close(got, want[name], want[name] - base), (root, d)


def test_full_finetune_checkpoint_exports_as_a_pipeline(tmp_path):
    """A full fine-tune's checkpoint becomes a pipeline folder whose denoiser holds the
    trained weights (bit for bit: fp32 in, fp32 out)."""
    import diffusers

    from ddspo_fast.train import Trainer
    from ddspo_fast.train.export import export, loadable

    run = tmp_path / "run"
    with Trainer(config("sd15", run, max_steps=1, checkpoint_every=1, learning_rate=1e-2)) as tr:
        tr.train()
        want = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
    info = export(run, tmp_path / "out")
    assert info["kind"] == "pipeline" and info["step"] == 1
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    got = dict(pipe.unet.named_parameters())
    assert all(torch.equal(got[n], w) for n, w in want.items())
    assert loadable(tmp_path / "out", tmp_path / "scratch").kind == "pipeline"
