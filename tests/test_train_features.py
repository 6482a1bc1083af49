"""Trainer features: 8-bit AdamW, clear errors for missing extras, bf16 on CPU, linear
weighting, random-condition mixing on flow timesteps, data without text embeddings,
K timesteps per pair sharing one text encoding."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from _train_helpers import config, tiny_model

from ddspo_fast.train import Trainer, TrainConfig
from ddspo_fast.train.optim import build_optimizer


def test_adamw8bit_state_is_uint8(tmp_path):
    tr = Trainer(config("sd15", tmp_path, optimizer="adamw8bit", max_steps=1))
    tr.train()
    opt = tr.optimizer.optimizer
    assert type(opt).__name__ == "AdamW8bit"
    dtypes = [v.dtype for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    # large tensors keep both Adam moments in 8 bits (bitsandbytes leaves tiny ones fp32)
    assert dtypes.count(torch.uint8) >= 2


def test_missing_bitsandbytes_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = TrainConfig(model="m", data="d", optimizer="adamw8bit")
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)


def test_missing_xformers_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    with pytest.raises(ImportError, match="pip install xformers"):
        Trainer(config("sd15", tmp_path, attention="xformers"))


def test_bf16_autocast_on_cpu_and_linear_weighting(tmp_path):
    tr = Trainer(config("sana", tmp_path, mixed_precision="bf16", lora_rank=2,
                        loss_weighting="linear", max_steps=1))
    # frozen base in bf16, trained LoRA in fp32
    dt = {p.dtype for n, p in tr.policy.named_parameters() if p.requires_grad}
    assert dt == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in tr.policy.parameters())
    out = tr.train_step(next(tr.batches()))
    assert math.isfinite(out["loss"].item()) and out["loss"].dtype == torch.float32
    # linear weights = noise level: the loss is the weighted mean of softplus(-margin)
    w = out["tau"].float()
    want = (torch.nn.functional.softplus(-out["margin"]) * w).mean()
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def _mix_file(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps({"prompt": "a red car", "neg_prompts": ["a car"]}) + "\n")
    return str(f)


def test_random_condition_mixing_follows_flow_noise_level(tmp_path):
    tr = Trainer(config("sd3", tmp_path / "out", lora_rank=2, batch_size=4, timesteps_per_pair=8,
                        rand_cond_prompts=_mix_file(tmp_path),
                        rand_cond_schedule="sigmoid", rand_cond_lambda=1e4))
    inp = tr.make_inputs(next(tr.batches()))
    tau = tr.adapter.noise_level(inp.t)
    # a step function at tau = 0.7 of the *drawn* flow sigma
    assert torch.equal(inp.mixed, tau > 0.7)
    assert inp.mixed.any() and (~inp.mixed).any()
    enc = tr.adapter.encode_prompts(["a red car", "a car"])
    for i in range(len(tau)):
        c = inp.cond["prompt_embeds"][i]
        if inp.mixed[i]:
            torch.testing.assert_close(c, enc["prompt_embeds"][0])
            torch.testing.assert_close(inp.neg_cond["prompt_embeds"][i], enc["prompt_embeds"][1])
        else:
            assert not torch.allclose(c, enc["prompt_embeds"][0])


def test_dpo_with_mixing_takes_reference_targets_on_mixed_rows(tmp_path):
    from _train_helpers import count_rows

    tr = Trainer(config("sd15", tmp_path / "out", objective="dpo", rand_cond_prompts=_mix_file(tmp_path),
                        rand_cond_schedule="constant"))
    with count_rows("sd15") as calls:
        out = tr.train_step(next(tr.batches()))
    assert calls == [6, 4]  # every pair mixed: the TF-CPP reference layout, then the policy
    assert math.isfinite(out["loss"].item())
    assert out["ref_mse"][:2].abs().max() == 0  # target_w = ref(x_w, c'): r_w == 0


def test_official_layout_without_embeddings_encodes_once_per_step(tmp_path):
    # the official DDSPO layout: metadata.jsonl + latents/, no text embeddings
    d = tmp_path / "official"
    (d / "latents").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, (p, n) in enumerate([("a photo of a cat", "a photo"), ("a red car", "a car"),
                                ("a dog in the house", "a dog"), ("a tree", "a blurry tree")]):
        for kind in ("pos", "neg"):
            save_file({"latents": torch.randn(1, 4, 8, 8, generator=g)},
                      str(d / "latents" / f"{i}_{kind}.safetensors"))
        lines.append(json.dumps({"id": str(i), "prompt": p, "neg_prompt": n,
                                 "pos_file": f"{i}_pos.safetensors",
                                 "neg_file": f"{i}_neg.safetensors"}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    tr = Trainer(config("sd15", tmp_path / "out", data=str(d), timesteps_per_pair=3))
    assert tr.need_text
    enc_calls = []
    orig = tr.adapter.encode_prompts
    tr.adapter.encode_prompts = lambda ps: enc_calls.append(list(ps)) or orig(ps)
    from _train_helpers import count_rows

    with count_rows("sd15") as calls:
        out = tr.train_step(next(tr.batches()))
    # one text-encoder call per step on [c ; c-] of the 2 pairs, shared by K=3 draws
    assert len(enc_calls) == 1 and len(enc_calls[0]) == 4
    # the frozen reference first (3 rows per pair; it lowers the step's peak memory), then
    # the policy (2 rows per pair)
    assert calls == [3 * 2 * 3, 2 * 2 * 3]
    assert out["margin"].shape == (6,) and math.isfinite(out["loss"].item())


def test_family_mismatch_is_reported(tmp_path):
    from _train_helpers import tiny_data

    with pytest.raises(ValueError, match="family"):
        Trainer(config("sd15", tmp_path, data=tiny_data("sdxl")))
    assert tiny_model("sd15")


def test_fp16_on_cpu_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="^mixed_precision: 'fp16' needs a CUDA device"):
        Trainer(config("sd15", tmp_path, mixed_precision="fp16"))
