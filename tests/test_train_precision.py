"""One precision object: every dtype of a run resolved once from its config and device."""

import pytest
import torch

from ddspo_fast.train import TrainConfig
from ddspo_fast.train.config import AdapterTrainConfig
from ddspo_fast.train.precision import Precision, nbytes, store_frozen, store_trainable


@pytest.mark.parametrize("asked, device, autocast, frozen, cache", [
    ("auto", "cuda", torch.bfloat16, torch.bfloat16, "bf16"),
    ("auto", "cpu", None, torch.float32, "fp32"),
    ("fp16", "cuda", torch.float16, torch.float16, "fp16"),
    ("no", "cuda", None, torch.float32, "fp32"),
])
def test_resolved_once_from_config_and_device(asked, device, autocast, frozen, cache):
    for cfg in (TrainConfig(mixed_precision=asked), AdapterTrainConfig(mixed_precision=asked)):
        p = Precision.from_config(cfg, device)
        assert (p.autocast, p.frozen, p.trainable, p.cache) == (autocast, frozen,
                                                                torch.float32, cache)
        assert p.mixed_precision == cfg.resolved_mixed_precision(device) != "auto"
        assert p.frozen_quantization is None
    assert ("(mixed_precision auto)" in p.label()) == (asked == "auto")


def test_casts_go_through_one_helper_each_and_sizes_follow_the_dtype():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    m[0].weight.requires_grad_(False)
    store_frozen(m, torch.bfloat16)  # a module: parameters and floating buffers
    assert m[1].running_mean.dtype == torch.bfloat16
    assert m[1].num_batches_tracked.dtype == torch.long
    store_trainable(m)  # what requires grad back to fp32, frozen weights untouched
    assert m[0].weight.dtype == torch.bfloat16 and m[0].bias.dtype == torch.float32
    assert nbytes([m[0].weight]) == 16 * 2 and nbytes([m[0].weight], torch.float32) == 16 * 4


def test_a_reference_cache_fingerprints_a_resolved_precision():
    from ddspo_fast.train.refcache import fingerprint

    with pytest.raises(ValueError, match="^mixed_precision: .*resolved"):
        fingerprint(TrainConfig(mixed_precision="auto"), "sd15", dataset=None)
