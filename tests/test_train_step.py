"""The step builder has no side effects: it builds a real-size step on the meta device
(no weights read, no file written, no lock) and that step runs forward and backward."""

import os

import pytest
import torch

from ddspo_fast.bench.archs import REAL
from ddspo_fast.train import TrainConfig
from ddspo_fast.train.pairs import PairInputs
from ddspo_fast.train.step import adapter_without_weights, build_step


def _meta_adapter(spec):
    import diffusers

    with torch.device("meta"):
        den = getattr(diffusers, spec.denoiser_cls)(**spec.config)
    return adapter_without_weights(spec.family, den, spec.scheduler, spec.vae)


def _inputs(spec, n, device="meta"):
    lat = lambda: torch.empty((n, *spec.latent_shape), device=device)  # noqa: E731
    cond = {k: torch.empty((n, *shape), dtype=torch.float32 if dt.is_floating_point else dt,
                           device=device)
            for k, (shape, dt) in spec.cond.items()}
    return PairInputs(x_w=lat(), x_l=lat(), noise=lat(),
                      t=torch.zeros((n,), dtype=torch.long, device=device),
                      cond=cond, neg_cond=dict(cond))


@pytest.mark.parametrize("lora_rank", [None])  # the frozen copy; LoRA's switch: tiny tests
def test_a_real_size_sdxl_tf_cpp_step_builds_and_runs_without_weights(tmp_path, lora_rank):
    spec = REAL["sdxl"]
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tmp_path / "no-such-model"), data=str(tmp_path / "no-data"),
                      output_dir=str(out), objective="ddspo", pair="reference",
                      lora_rank=lora_rank, mixed_precision="no", backend="torch")
    step = build_step(cfg, _meta_adapter(spec))
    nets = step.networks
    params = sum(p.numel() for p in nets.policy.parameters())
    assert params > 2.5e9  # the released SDXL UNet, not a tiny stand-in
    assert all(p.device.type == "meta" for p in nets.policy.parameters())
    if lora_rank is None:  # a frozen copy, prepared for evaluation
        ref = nets.reference_module
        assert ref is not nets.policy and not ref.training
        assert not any(p.requires_grad for p in ref.parameters())
        with nets.reference() as called:  # the one way a frozen network is called
            assert called is ref and not torch.is_grad_enabled()
        assert len(step.trainable) == len(list(nets.policy.parameters()))
    else:  # the policy's own module, adapters off
        assert nets.reference_module is nets.policy
        assert step.trainable and all(".ddspo." in n for n in nets.trainable_names)
    loss, stats = step.loss(_inputs(spec, 1))
    assert loss.shape == () and stats["margin"].shape == (1,)
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in step.trainable)
    opt = torch.optim.AdamW(step.trainable, lr=1e-5, foreach=False)
    opt.step()  # one optimizer step on the meta device
    assert os.listdir(tmp_path) == []  # no output_dir, no lock, nothing written
