"""Quantized frozen bases (``base_quantization``) and fp8 matmuls (``fp8_compute``) on
tiny models, on the CPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from _tolerance import forward_rel
from _train_helpers import config, tiny_data, tiny_model

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


# The attention projections and the feed-forward output: the latter is 64 wide, so
# bitsandbytes' CPU kernel can store it as NF4 (see quantize.nf4_layer_ok) and adapters
# sit on quantized layers in every test.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


def _trainer(tmp_path, name, **kw):
    from ddspo_fast.train import Trainer

    kw.setdefault("lora_rank", 4)
    kw.setdefault("lora_targets", TARGETS)
    return Trainer(config("sd15", tmp_path / name, threads=1, **kw))


def _first_batch(tr) -> dict:
    batch = next(tr.batches())
    batch["draw_epoch"] = 0  # the same draws whenever it is used
    return batch


def _loss(tr, batch) -> float:
    with torch.no_grad():
        return float(tr.compute_loss(batch)[0])


def _quantized_layers(tr):
    return {n: m for n, m in tr.policy.named_modules()
            if type(m).__name__ in ("Linear4bit", "Int8Linear")}


def _weight_error_bound(kind: str, layer, w: torch.Tensor) -> torch.Tensor:
    """The largest error each element may have, from how the format stores it."""
    import bitsandbytes.functional as F

    if kind == "nf4":
        # Each block of 64 values is scaled by its absmax and rounded to the nearest of
        # the 16 NF4 levels: an element is off by at most half the widest gap between
        # neighbouring levels, times its block's absmax (kept in fp32).
        code = F.get_4bit_type("nf4", device="cpu").float().sort().values
        half_gap = float((code[1:] - code[:-1]).max()) / 2
        flat = w.reshape(-1)
        pad = (-flat.numel()) % 64
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks)
        bound = (absmax * half_gap).reshape(-1)[: flat.numel()].reshape(w.shape)
    else:
        # LLM.int8: the weight is cast to fp16 (relative error 2^-11), each row scaled
        # by its absmax / 127 and rounded to the nearest integer (half a step).
        # The fp16 casts of the weight and of its row absmax (the scale) each add a
        # relative 2^-11; counted twice for the products they enter.
        row_max = w.abs().amax(dim=1, keepdim=True)
        bound = 0.5 * row_max / 127 + (w.abs() + row_max) * 2.0 ** -10
    # plus fp32 rounding of the dequantization's multiply
    return bound * (1 + 2.0 ** -20) + w.abs() * 2.0 ** -23


# ---------------------------------------------------------------------- first step
@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_first_step_loss_is_the_dequantized_base_loss(tmp_path, kind):
    """The quantized base computes exactly with its dequantized weights, and those are
    within the format's rounding of the full-precision ones; the first-step loss is then
    the full-precision loss moved only by that rounding."""
    from ddspo_fast.train.quantize import dequantized_weight

    full = _trainer(tmp_path, "full")
    quant = _trainer(tmp_path, kind, base_quantization=kind)
    assert quant.reference is quant.policy  # adapters off: no second copy of the base
    layers = _quantized_layers(quant)
    from ddspo_fast.train.quantize import nf4_layer_ok

    base_linears = {n: m for n, m in full.policy.named_modules()
                    if type(m) is torch.nn.Linear and ".lora_" not in f".{n}."}
    assert set(layers) == {n for n, m in base_linears.items()
                           if kind == "int8" or nf4_layer_ok(m)}
    assert any(n.endswith("ff.net.2.base_layer") for n in layers)  # adapters on quantized layers

    batch = _first_batch(full)
    loss_full, loss_quant = _loss(full, batch), _loss(quant, batch)

    # (b) every element within the format's bound
    deq = {}
    for name, q in layers.items():
        w = base_linears[name].weight.detach().float()
        deq[name] = dequantized_weight(q)
        err = (deq[name] - w).abs()
        assert bool((err <= _weight_error_bound(kind, q, w)).all()), name
        assert float(err.max()) > 0  # it is quantized
    # (a) the same step with the dequantized weights in the full-precision model
    with torch.no_grad():
        for name, w in deq.items():
            base_linears[name].weight.copy_(w)
    loss_deq = _loss(full, batch)
    # Same weights and fp32 ops, other kernels (bitsandbytes' dequantize then a linear):
    # the two forwards differ by fp32 rounding, forward_rel of the tiny SD1.5 (83 layers,
    # longest accumulation 576 terms; tests/_tolerance.py), which the loss's beta/2
    # multiplies in the margin: held to 5x that, while a wrong weight moves it by O(1).
    rel = 5 * forward_rel(83, 576)
    assert loss_quant == pytest.approx(loss_deq, rel=rel, abs=1e-8)
    assert torch.isfinite(torch.tensor([loss_full, loss_quant])).all()


# ---------------------------------------------------------------------- training
@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_trains_and_loads_onto_the_plain_pipeline(tmp_path, kind):
    """Adam steps on one fixed batch (the same draws each step) lower its Diffusion-DPO
    loss, whose value at the start (LoRA B = 0: policy = reference) is log 2; the saved
    LoRA file loads onto the unquantized pipeline and changes its output."""
    import math

    tr = _trainer(tmp_path, kind, base_quantization=kind, objective="dpo",
                  learning_rate=1e-3, max_grad_norm=None)
    batch = _first_batch(tr)
    start = _loss(tr, batch)
    assert start == pytest.approx(math.log(2), abs=1e-6)
    for _ in range(4):
        tr.train_step(dict(batch))
    after = _loss(tr, batch)
    assert after < start - 1e-4, (start, after)
    frozen = [n for n, p in tr.policy.named_parameters()
              if not p.requires_grad and ".lora_" not in n]
    assert frozen and all(".lora_" in n for n in tr.trainable_names)

    out = tr.save_final()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model("sd15"), safety_checker=None)
    unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before = unet(x, torch.tensor([500]), emb).sample
        pipe.load_lora_weights(out)
        with_lora = unet(x, torch.tensor([500]), emb).sample
    assert type(unet.conv_in) is torch.nn.Conv2d  # a plain, unquantized pipeline
    assert not torch.allclose(before, with_lora)


@needs_bnb
def test_a_quantized_run_resumes_and_refuses_another_base(tmp_path):
    """A checkpoint holds the adapters only; it resumes over the same NF4 base, and a
    resume that changes the base is refused naming base_quantization."""
    from ddspo_fast.train import Trainer
    from ddspo_fast.train.errors import ResumeMismatchError

    kw = dict(lora_rank=2, lora_targets=TARGETS, base_quantization="nf4", max_steps=1,
              checkpoint_every=1, threads=1)
    first = Trainer(config("sd15", tmp_path / "run", **kw))
    first.train()
    lora = {n: p.detach().clone() for n, p in first.policy.named_parameters() if p.requires_grad}
    again = Trainer(config("sd15", tmp_path / "run", **{**kw, "max_steps": 2},
                           resume="latest"))
    assert again.global_step == 1
    got = dict(again.policy.named_parameters())
    assert all(torch.equal(got[n], w) for n, w in lora.items())
    again.close()
    with pytest.raises(ResumeMismatchError, match=r"^base_quantization: .*'nf4'.*'int8'"):
        Trainer(config("sd15", tmp_path / "run", **{**kw, "base_quantization": "int8"},
                       resume="latest"))


# ---------------------------------------------------------------------- cache
@needs_bnb
def test_a_cache_precomputed_on_the_quantized_base_equals_its_live_reference(tmp_path):
    """The precompute quantizes the base as the trainer does: a cached run's losses are
    the live run's (both over the NF4 base), to the rounding of batching the reference
    differently (forward_rel, as tests/test_refcache.py derives it)."""
    from ddspo_fast.train.precompute import precompute

    kw = dict(lora_rank=2, lora_targets=TARGETS, base_quantization="nf4", beta=100.0,
              learning_rate=1e-4, max_steps=2, batch_size=2)
    live_cfg = config("sd15", tmp_path / "live", threads=1, **kw)
    summary = precompute(live_cfg, tmp_path / "cache", 1, batch_size=3, pairs_per_shard=3,
                         progress=False)
    assert summary["complete"]

    def losses(cfg):
        from ddspo_fast.train import Trainer

        tr, out = Trainer(cfg), []
        batches = tr.batches()
        while tr.global_step < cfg.max_steps:
            out.append(float(tr.train_step(next(batches))["loss"]))
        return out

    want = losses(live_cfg)
    got = losses(config("sd15", tmp_path / "cached", threads=1,
                        reference_cache=str(tmp_path / "cache"), **kw))
    assert got == pytest.approx(want, rel=5 * forward_rel(83, 576), abs=1e-8)
    # and a cache of the unquantized base is refused for this run
    with pytest.raises(ValueError, match="base_quantization"):
        plain = config("sd15", tmp_path / "plain", threads=1,
                       **{**kw, "base_quantization": "none"})
        precompute(plain, tmp_path / "cache", 1, batch_size=3, pairs_per_shard=3,
                   progress=False)


def test_a_cache_from_another_base_is_not_reused():
    from ddspo_fast.data import open_dataset
    from ddspo_fast.train import refcache

    ds = open_dataset(tiny_data("sd15"), family="sd15")
    plain = config("sd15", "unused", lora_rank=4)
    fp_plain, _ = refcache.fingerprint(plain, "sd15", ds)
    fp_nf4, _ = refcache.fingerprint(plain.replace(base_quantization="nf4"), "sd15", ds)
    assert fp_plain["base_quantization"] is None  # caches from before the field still match
    problem = refcache.mismatch(fp_plain, fp_nf4)
    assert problem is not None and problem.startswith("base_quantization")


# ---------------------------------------------------------------------- refusals
def test_a_full_fine_tune_of_a_quantized_base_is_refused():
    from ddspo_fast.train import TrainConfig

    with pytest.raises(ValueError, match=r"^base_quantization: .*full fine-tune.*lora_rank"):
        TrainConfig(model="m", data="d", base_quantization="nf4")
    with pytest.raises(ValueError, match=r"^base_quantization: expected one of"):
        TrainConfig(model="m", data="d", lora_rank=4, base_quantization="nf3")
    with pytest.raises(ValueError, match=r"^fp8_compute: cannot be combined"):
        TrainConfig(model="m", data="d", lora_rank=4, base_quantization="int8", fp8_compute=True)


def test_fp8_compute_is_refused_on_a_cpu_with_the_reason():
    from ddspo_fast.train.quantize import enable_fp8_compute, fp8_compute_problem

    why = fp8_compute_problem(torch.device("cpu"))
    assert why.startswith("fp8_compute: ") and "8.9" in why and "cpu" in why
    with pytest.raises(ValueError, match=r"^fp8_compute: .*compute capability 8\.9"):
        enable_fp8_compute(torch.nn.Linear(16, 16), "cpu")


def test_fp8_compute_run_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"^fp8_compute: .*this run is on cpu"):
        _trainer(tmp_path, "fp8c", fp8_compute=True)


class _Missing:
    """A meta-path finder under which ``name`` cannot be imported."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@pytest.mark.parametrize("kind,package", [("nf4", "bitsandbytes"), ("int8", "bitsandbytes"),
                                          ("fp8", "torchao")])
def test_a_missing_library_names_what_to_install(monkeypatch, kind, package):
    from ddspo_fast.train.quantize import check_base_quantization

    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_Missing(package)] + sys.meta_path)
    with pytest.raises(ImportError, match=rf"base_quantization='{kind}' needs {package}: "
                                          rf"pip install {package}"):
        check_base_quantization(kind)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao)")
def test_fp8_base_computes_with_its_dequantized_weights():
    from ddspo_fast.train.quantize import dequantized_weight, quantize_base

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    x = torch.randn(4, 64)
    plain = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    assert quantize_base(net, "fp8", compute_dtype=torch.float32) == 2
    deq = [dequantized_weight(net[0]), dequantized_weight(net[2])]
    for w, d in zip(plain, deq):
        # e4m3 keeps 3 mantissa bits: within 2^-4 of each value, relative, once scaled
        # by its row's absmax / 448 (plus the subnormal step of that scale)
        row = w.abs().amax(dim=1, keepdim=True)
        assert bool(((d - w).abs() <= w.abs() * 2.0 ** -4 + row / 448 * 2.0 ** -9).all())
    ref = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, deq[0], net[0].bias)),
        deq[1], net[2].bias)
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)
