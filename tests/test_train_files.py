"""What a run leaves and says: every file and directory honours the umask, the
CPU runs in fp32 by default, ``threads`` sets (and restores) torch's thread count, a start
banner says what the run is, and tensorboard=True without tensorboard warns once."""

import os
import stat
import sys

import pytest
import torch

from _train_helpers import config

from ddspo_fast.train import Trainer, TrainConfig
from ddspo_fast.train import metrics as metrics_mod


def _modes(root):
    files, dirs = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            dirs[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            files[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return files, dirs


@pytest.mark.parametrize("lora_rank", [2, None])
def test_every_output_honours_the_umask(tmp_path, lora_rank):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        Trainer(config("sd15", out, lora_rank=lora_rank, max_steps=2, checkpoint_every=1,
                       save_final=True, tensorboard=True)).train()
        # the resume path rewrites metrics.jsonl
        Trainer(config("sd15", out, lora_rank=lora_rank, max_steps=3, checkpoint_every=1,
                       resume="latest")).train()
    finally:
        os.umask(old)
    files, dirs = _modes(out)
    assert "checkpoints/checkpoint-1/manifest.json" in files and "train_config.yaml" in files
    assert ("pytorch_lora_weights.safetensors" if lora_rank else "unet/config.json") in files
    assert {k: oct(v) for k, v in files.items() if v != 0o644} == {}
    assert {k: oct(v) for k, v in dirs.items() if v != 0o755} == {}
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_cpu_default_is_fp32(tmp_path):
    cfg = config("sd15", tmp_path, lora_rank=2)
    cfg = TrainConfig(**{**cfg.to_dict(), "mixed_precision": "auto"})
    tr = Trainer(cfg)
    assert tr.mixed_precision == "no" and tr.weight_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.policy.parameters())
    assert cfg.resolved_mixed_precision("cuda") == "bf16"
    tr.close()


def test_threads_apply_while_training_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    tr = Trainer(config("sd15", tmp_path, lora_rank=2, max_steps=2, threads=want))
    seen = []
    step = tr.train_step
    tr.train_step = lambda b: seen.append(torch.get_num_threads()) or step(b)
    tr.train()
    assert seen == [want, want] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="^threads:"):
        TrainConfig(model="m", data="d", threads=0)


def test_start_banner(tmp_path, capsys):
    tr = Trainer(config("sd15", tmp_path, lora_rank=2, max_steps=3, batch_size=2))
    n_train = sum(p.numel() for p in tr.trainable)
    tr.train()
    err = capsys.readouterr().err
    assert "device cpu" in err and "fp32" in err and "LoRA rank 2" in err
    assert "4 pairs" in err and "= 2 pairs/step" in err
    assert "3 steps = 1.50 epochs" in err  # 4 pairs / 2 per step: 2 steps an epoch
    assert f"trainable {n_train / 1e3:.2f}k" in err or f"trainable {n_train}" in err


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(metrics_mod, "_warned_tensorboard", False)
    with pytest.warns(UserWarning, match="tensorboard package is not installed.*pip install "
                                         "tensorboard"):
        metrics_mod.MetricsWriter(tmp_path / "a", tensorboard=True, resume_step=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = metrics_mod.MetricsWriter(tmp_path / "b", tensorboard=True, resume_step=None)
    assert w.tb is None and not (tmp_path / "b" / "logs").exists()
