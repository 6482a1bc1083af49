"""Every family trains; each objective sends exactly its rows per pair to the denoiser
(5 TF-CPP, 4 Diffusion-DPO, 6 DD-CPP), in one stacked call per role; final outputs load."""

import importlib.util
import json
import math

import pytest
import torch

from _train_helpers import config, count_rows, tiny_model, trainable_snapshot

from ddspo_fast.train import Trainer

ALL = ["sd15", "sdxl", "sd3", "sana"]


def _changed(before, trainer):
    now = dict(trainer.policy.named_parameters())
    return sum(not torch.equal(v, now[n].detach()) for n, v in before.items())


@pytest.mark.parametrize("family", ALL)
def test_tf_cpp_trains_every_family(family, tmp_path):
    # UNets fully fine-tuned, DiTs as LoRA: both training modes across the families.
    # Also spread a few options over the families: checkpointing, K draws per pair.
    lora = 4 if family in ("sd3", "sana") else None
    k = 2 if family == "sana" else 1
    tr = Trainer(config(family, tmp_path, lora_rank=lora, max_steps=2, timesteps_per_pair=k,
                        gradient_checkpointing=family in ("sdxl", "sd3")))
    before = trainable_snapshot(tr)
    with count_rows(family) as calls:
        out = tr.train_step(next(tr.batches()))
    # reference once on 3B rows (first: a lower peak), then the policy on 2B rows
    assert calls == [6 * k, 4 * k]
    assert math.isfinite(out["loss"].item())
    assert out["margin"].shape == (2 * k,)
    summary = tr.train()
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    assert _changed(before, tr) >= 0.9 * len(before)
    if lora:
        assert tr.reference is tr.policy  # no second copy of the weights
        assert all(".ddspo." in n for n in before)


def test_dpo_uses_four_rows_and_noise_target(tmp_path):
    tr = Trainer(config("sd15", tmp_path, objective="dpo"))
    before = trainable_snapshot(tr)
    with count_rows("sd15") as calls:
        out = tr.train_step(next(tr.batches()))
    assert calls == [4, 4]
    assert math.isfinite(out["loss"].item()) and _changed(before, tr) > 0
    # at step 0 policy == reference, so the margin is exactly 0 and the loss log(2)
    assert torch.allclose(out["margin"], torch.zeros(2), atol=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_flow_target_is_velocity(tmp_path):
    tr = Trainer(config("sana", tmp_path, objective="dpo", lora_rank=4))
    inp = tr.make_inputs(next(tr.batches()))
    want = inp.noise - inp.x_w
    torch.testing.assert_close(tr.adapter.dpo_target(inp.x_w, inp.noise, inp.t), want)


def _write_pair_lora(family, root, peft_format_for_lose=True):
    """Winning / losing LoRAs with random non-zero weights: win/ as a diffusers LoRA
    file, lose/ as a peft adapter dir (both formats the trainer accepts)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ddspo_fast.models import load_adapter

    a = load_adapter(tiny_model(family), components=("denoiser",))
    den = a.denoiser
    for name, seed in (("w", 1), ("l", 2)):
        cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"])
        den.add_adapter(cfg, adapter_name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in den.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    win = get_peft_model_state_dict(den, adapter_name="w")
    a.save_lora(win, str(root / "win"))
    lose = get_peft_model_state_dict(den, adapter_name="l")
    (root / "lose").mkdir(parents=True)
    LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]).save_pretrained(root / "lose")
    save_file({"base_model.model." + k: v.contiguous() for k, v in lose.items()},
              str(root / "lose" / "adapter_model.safetensors"))
    return str(root)


def test_dd_cpp_lora_six_rows_one_base(tmp_path):
    pair = _write_pair_lora("sd15", tmp_path / "pair")
    tr = Trainer(config("sd15", tmp_path / "out", pair="lora", pair_lora=pair, lora_rank=4))
    before = trainable_snapshot(tr)
    with count_rows("sd15") as calls:
        out = tr.train_step(next(tr.batches()))
    # the frozen networks first (reference 2B, phi_w B, phi_l B), then the policy 2B:
    # 6 rows per pair
    assert calls == [4, 2, 2, 4]
    # all four calls run on one module: one base copy carrying the three adapters
    assert len(set(calls.modules)) == 1 and tr.reference is tr.policy
    base = [n for n, _ in tr.policy.named_parameters() if "lora" not in n]
    ref_numel = sum(p.numel() for p in tiny_unet_params())
    assert sum(dict(tr.policy.named_parameters())[n].numel() for n in base) == ref_numel
    # the pair adapters are frozen, only the policy adapter trains
    assert all(".ddspo." in n for n in before)
    assert math.isfinite(out["loss"].item()) and _changed(before, tr) > 0
    # targets really come from the adapters: phi_w != reference on the same rows
    inp = tr.make_inputs(next(tr.batches()))
    with torch.no_grad():
        r = tr._reference_fn(inp.x_w, inp.t, inp.cond)
        w = tr._phi("win")(inp.x_w, inp.t, inp.cond)
        lo = tr._phi("lose")(inp.x_w, inp.t, inp.cond)
    assert not torch.allclose(r, w) and not torch.allclose(w, lo)


def tiny_unet_params():
    from diffusers import UNet2DConditionModel

    return list(UNet2DConditionModel.from_pretrained(tiny_model("sd15"),
                                                     subfolder="unet").parameters())


def test_dd_cpp_full_finetune_keeps_adapters_on_reference(tmp_path):
    pair = _write_pair_lora("sd15", tmp_path / "pair")
    mix = tmp_path / "mix.jsonl"
    mix.write_text(json.dumps({"prompt": "a red car", "neg_prompts": ["a car"]}) + "\n")
    tr = Trainer(config("sd15", tmp_path / "out", pair="lora", pair_lora=pair,
                        rand_cond_prompts=str(mix), rand_cond_schedule="constant"))
    encoded = []
    orig = tr.adapter.encode_prompts
    tr.adapter.encode_prompts = lambda ps: encoded.append(list(ps)) or orig(ps)
    with count_rows("sd15") as calls:
        tr.train_step(next(tr.batches()))
    assert calls == [4, 2, 2, 4]  # mixing changes the prompts, not the rows
    assert encoded == [["a red car", "a red car"]]  # DD-CPP never needs c-
    assert tr.reference is not tr.policy
    assert not any("lora" in n for n, _ in tr.policy.named_parameters())
    assert all(not p.requires_grad for p in tr.reference.parameters())


def test_full_finetune_saves_loadable_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    tr = Trainer(config("sd15", tmp_path, save_final=True, max_steps=2, tensorboard=True))
    tr.train()
    assert (tmp_path / "unet" / "config.json").is_file()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("loss", "implicit_acc", "model_mse_w", "ref_mse_l", "margin", "lr",
                "pairs_per_s", "peak_rss_gb", "bucket_margin/t0.00-0.25", "bucket_acc/t0.75-1.00"):
        assert key in recs[-1], key
    assert math.isfinite(recs[-1]["loss"]) and recs[-1]["lr"] > 0
    if importlib.util.find_spec("tensorboard") is not None:  # optional dependency
        assert any(p.name.startswith("events.") for p in (tmp_path / "logs").iterdir())
    else:
        assert not (tmp_path / "logs").exists()
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path))
    saved = dict(pipe.unet.named_parameters())
    for n, p in tr.policy.named_parameters():
        torch.testing.assert_close(saved[n], p.detach().float(), rtol=0, atol=0)  # a copy


def test_lora_saves_weights_loadable_with_load_lora_weights(tmp_path):
    from diffusers import DiffusionPipeline

    tr = Trainer(config("sd3", tmp_path, lora_rank=4, save_final=True, max_steps=2))
    tr.train()
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(tiny_model("sd3"))
    inp = tr.make_inputs(next(tr.batches()))
    x, t, c = inp.x_w, inp.t, inp.cond
    with torch.no_grad():
        base = tr.adapter.predict(pipe.transformer, x, t, c)
        pipe.load_lora_weights(str(tmp_path))
        loaded = tr.adapter.predict(pipe.transformer, x, t, c)
        trained = tr.adapter.predict(tr.policy, x, t, c)
    assert not torch.allclose(base, trained)
    # The same weights loaded by diffusers: equal up to fp32 forward rounding, about
    # sqrt(layers * longest accumulation) * 2^-24 relative (tests/_tolerance.py).
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
