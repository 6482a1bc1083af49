"""Runs that go wrong never lose work and never lie: a used output_dir is refused,
a non-finite loss stops the run before anything non-finite is saved, one trainer per
output_dir, a full disk names the path and keeps the earlier results, resume refuses a
changed run and applies changed settings, damaged checkpoints are named (and skipped by
resume='latest'), devices and latent shapes that do not fit are refused."""

import errno
import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _train_helpers import config, tiny_data

from ddspo_fast import fsio
from ddspo_fast.train import Trainer, TrainConfig
from ddspo_fast.train import checkpoint as ckpt
from ddspo_fast.train.errors import (CorruptCheckpointError, NonFiniteError,
                                     OutputDirNotEmptyError, ResumeMismatchError)

LORA = dict(lora_rank=2)


def _strict_json_lines(path):
    def no_constant(name):
        raise AssertionError(f"{path}: non-JSON constant {name}")

    return [json.loads(line, parse_constant=no_constant)
            for line in path.read_text().splitlines()]


def _poison(tr, at_step: int):
    """The loss of every micro-batch of optimizer step ``at_step`` (1-based) becomes NaN."""
    orig = tr.compute_loss

    def compute_loss(batch):
        loss, stats, inp = orig(batch)
        if tr.global_step + 1 == at_step:
            loss = loss * float("nan")
        return loss, stats, inp

    tr.compute_loss = compute_loss


# ------------------------------------------------------------------ 1. used output_dir
def test_non_empty_output_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    Trainer(config("sd15", out, max_steps=2, checkpoint_every=2, save_final=True,
                   **LORA)).train()
    weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(OutputDirNotEmptyError, match=r"^output_dir: .*--resume latest.*"
                                                     r"new output_dir.*--overwrite"):
        Trainer(config("sd15", out, max_steps=1, **LORA))
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert (out / "metrics.jsonl").read_text() == metrics
    # overwrite: the old checkpoints cannot outrank (and prune) the new ones
    summary = Trainer(config("sd15", out, max_steps=1, checkpoint_every=1, checkpoints_keep=1,
                             overwrite=True, **LORA)).train()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert os.path.isdir(summary["last_checkpoint"])
    assert [r["step"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1]


def test_resume_latest_without_checkpoint_keeps_a_finished_run(tmp_path):
    Trainer(config("sd15", tmp_path, max_steps=1, save_final=True, **LORA)).train()
    with pytest.raises(OutputDirNotEmptyError, match="no checkpoint to resume from"):
        Trainer(config("sd15", tmp_path, resume="latest", **LORA))
    with pytest.raises(ValueError, match="^overwrite: cannot be combined with resume"):
        TrainConfig(model="m", data="d", resume="latest", overwrite=True)


# ------------------------------------------------------------------ 2. non-finite loss
def test_nan_stops_at_the_check_and_keeps_finite_checkpoints(tmp_path):
    tr = Trainer(config("sd15", tmp_path, max_steps=6, log_every=2, checkpoint_every=1,
                        checkpoints_keep=1, save_final=True, **LORA))
    _poison(tr, at_step=2)
    checks = []
    first_bad = tr.guard.first_bad_step
    tr.guard.first_bad_step = lambda *a: checks.append(tr.global_step) or first_bad(*a)
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at optimizer step 2") \
            as e:
        tr.train()
    assert e.value.step == 2
    # the checkpoint of step 1 is the newest and intact; step 2's was never written
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert e.value.checkpoint.endswith("checkpoint-1")
    saved = load_file(str(ckpt.latest(tmp_path) / ckpt.TRAINABLE_FILE))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    # strict JSON, the bad window logged as null
    recs = _strict_json_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2] and recs[0]["loss"] is None
    # checked only where the loop syncs anyway: the checkpoint step 1, then step 2's log
    assert checks == [1, 2]
    assert not tr._lock  # the lock is released for the next run


def test_nan_between_checks_is_named_by_its_step(tmp_path):
    tr = Trainer(config("sd15", tmp_path, max_steps=4, log_every=3, **LORA))
    _poison(tr, at_step=1)
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    assert e.value.step == 1 and "found at step 3" in str(e.value)


def test_skip_policy_skips_the_bad_update_and_finishes(tmp_path):
    tr = Trainer(config("sd15", tmp_path, max_steps=3, save_final=True, on_nonfinite="skip",
                        **LORA))
    _poison(tr, at_step=2)
    summary = tr.train()
    assert summary["skipped_steps"] == [2] and summary["steps"] == 3
    assert all(torch.isfinite(p).all() for p in tr.trainable)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    recs = _strict_json_lines(tmp_path / "metrics.jsonl")
    assert recs[1]["loss"] is None and recs[2]["skipped_steps"] == 1


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    tr = Trainer(config("sd15", tmp_path, max_steps=1, checkpoint_every=1, **LORA))
    tr.train()
    with torch.no_grad():
        tr.trainable[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        tr.save_checkpoint()
    saved = load_file(str(ckpt.latest(tmp_path) / ckpt.TRAINABLE_FILE))
    assert all(torch.isfinite(v).all() for v in saved.values())


# ------------------------------------------------------------------ 3. one writer
def test_second_trainer_on_the_same_output_dir_fails_at_once(tmp_path):
    first = Trainer(config("sd15", tmp_path, **LORA))
    with pytest.raises(fsio.LockedError, match=f"output_dir .* is in use by pid {os.getpid()}"):
        Trainer(config("sd15", tmp_path, resume="latest", **LORA))
    first.train()  # releases the lock when done
    Trainer(config("sd15", tmp_path, resume="latest", **LORA)).close()


# ------------------------------------------------------------------ 4. full disk
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_export_keeps_the_earlier_export(tmp_path, monkeypatch):
    from ddspo_fast.train import trainer as trainer_module

    Trainer(config("sd15", tmp_path, max_steps=1, save_final=True, **LORA)).train()
    before = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    tr = Trainer(config("sd15", tmp_path, max_steps=1, save_final=True, overwrite=True, **LORA))
    orig = trainer_module.write_lora

    def half_then_full(*args, **kwargs):
        orig(*args, **kwargs)  # writes the file, then the disk fills up
        _enospc()

    monkeypatch.setattr(trainer_module, "write_lora", half_then_full)
    with pytest.raises(fsio.DiskFullError,
                       match=f"no space left on device while writing {tmp_path}"):
        tr.train()
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_disk_full_during_a_checkpoint_names_it_and_keeps_the_earlier_one(tmp_path,
                                                                           monkeypatch):
    tr = Trainer(config("sd15", tmp_path, max_steps=2, checkpoint_every=1, **LORA))
    real_save = ckpt.write_state

    def save(f, obj):
        if tr.global_step == 2 and str(f).endswith(ckpt.OPTIMIZER_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, obj)

    monkeypatch.setattr(ckpt, "write_state", save)
    with pytest.raises(fsio.DiskFullError, match="no space left on device while writing "
                                                 f".*{ckpt.OPTIMIZER_FILE}"):
        tr.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    ckpt.verify(ckpt.latest(tmp_path))
    assert not list(ckpt.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    tr = Trainer(config("sd15", tmp_path, max_steps=1, checkpoint_every=1, **LORA))
    monkeypatch.setattr(fsio, "free_bytes", lambda path: 10)
    with pytest.raises(fsio.DiskFullError, match="checkpoint-1 .*needs at least"):
        tr.train()
    assert not ckpt.checkpoints_dir(tmp_path).exists() or not any(
        ckpt.checkpoints_dir(tmp_path).iterdir())


# ------------------------------------------------------------------ 5. resume settings
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    Trainer(config("sd15", out, max_steps=2, checkpoint_every=1, lr_scheduler="constant",
                   data=tiny_data("sd15", 6), **LORA)).train()
    return out


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("field,value", [("seed", 1), ("batch_size", 1), ("beta", 100.0),
                                          ("objective", "dpo"), ("lora_rank", 4)])
def test_resume_refuses_a_change_of_what_defines_the_run(finished_run, tmp_path, field, value):
    out = _copy_run(finished_run, tmp_path / "run")
    kw = dict(max_steps=3, lr_scheduler="constant", data=tiny_data("sd15", 6), **LORA)
    kw[field] = value
    with pytest.raises(ResumeMismatchError, match=rf"^{field}: the checkpoint .* was trained "
                                                  rf"with {field}="):
        Trainer(config("sd15", out, resume="latest", **kw))


def test_resume_applies_and_logs_changed_settings(finished_run, tmp_path, caplog):
    out = _copy_run(finished_run, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="ddspo_fast.train"):
        tr = Trainer(config("sd15", out, resume="latest", max_steps=3, lr_scheduler="constant",
                            learning_rate=5e-4, weight_decay=0.0, data=tiny_data("sd15", 6),
                            **LORA))
    assert tr.global_step == 2
    assert "learning_rate changed from 0.001 to 0.0005 (applied)" in caplog.text
    assert "weight_decay" in caplog.text
    for g in tr.optimizer.param_groups:
        assert g["lr"] == 5e-4 and g["weight_decay"] == 0.0
    summary = tr.train()
    assert summary["trained_steps"] == 1
    assert _strict_json_lines(out / "metrics.jsonl")[-1]["lr"] == 5e-4


def test_resume_that_trains_nothing_says_so(finished_run, tmp_path, caplog):
    out = _copy_run(finished_run, tmp_path / "run")
    one = ckpt.final_path(out, 2)
    with caplog.at_level(logging.WARNING, logger="ddspo_fast.train"):
        summary = Trainer(config("sd15", out, resume=str(one), max_steps=1,
                                 lr_scheduler="constant", data=tiny_data("sd15", 6),
                                 **LORA)).train()
    assert summary["trained_steps"] == 0 and summary["steps"] == 2
    assert "nothing to train" in caplog.text


# ------------------------------------------------------------------ 6. damaged checkpoints
def _flip_byte(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_optimizer", "truncate_weights", "empty_rng",
                                    "truncate_state"])
def test_damaged_checkpoint_is_named_and_latest_falls_back(finished_run, tmp_path, caplog,
                                                           damage):
    out = _copy_run(finished_run, tmp_path / "run")
    newest = ckpt.final_path(out, 2)
    name = {"flip_optimizer": ckpt.OPTIMIZER_FILE, "truncate_weights": ckpt.TRAINABLE_FILE,
            "empty_rng": ckpt.rng_file(0), "truncate_state": ckpt.STATE_FILE}[damage]
    f = newest / name
    if damage == "flip_optimizer":
        _flip_byte(f)
    elif damage == "empty_rng":
        f.write_bytes(b"")
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    kw = dict(max_steps=2, lr_scheduler="constant", data=tiny_data("sd15", 6), **LORA)
    with pytest.raises(CorruptCheckpointError, match=f"damaged: {f}") as e:
        Trainer(config("sd15", out, resume=str(newest), **kw))
    assert e.value.file == str(f)
    with caplog.at_level(logging.WARNING, logger="ddspo_fast.train"):
        tr = Trainer(config("sd15", out, resume="latest", **kw))
    assert tr.global_step == 1 and tr.last_checkpoint.endswith("checkpoint-1")
    assert name in caplog.text and "newest intact checkpoint" in caplog.text


def test_all_checkpoints_damaged_is_an_error(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path / "run")
    for _, p in ckpt.list_checkpoints(out):
        _flip_byte(p / ckpt.TRAINABLE_FILE)
    with pytest.raises(CorruptCheckpointError, match="no older checkpoint .* is intact"):
        Trainer(config("sd15", out, resume="latest", max_steps=2, lr_scheduler="constant",
                       data=tiny_data("sd15", 6), **LORA))


# ------------------------------------------------------------------ 7. inputs that mean nothing
@pytest.mark.parametrize("device", ["gpu0", "banana", "cuda0", "CPU", ""])
def test_malformed_device_is_refused(device):
    with pytest.raises(ValueError, match="^device: expected"):
        TrainConfig(model="m", data="d", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^device: 'cuda' asked for, but"):
        Trainer(config("sd15", tmp_path, device="cuda"))


def test_latents_of_another_shape_are_refused_before_training(tmp_path):
    d = tmp_path / "official"
    (d / "latents").mkdir(parents=True)
    lines = []
    for i in range(2):
        for kind in ("pos", "neg"):
            save_file({"latents": torch.randn(1, 4, 16, 16)},
                      str(d / "latents" / f"{i}_{kind}.safetensors"))
        lines.append(json.dumps({"id": str(i), "prompt": f"a cat {i}", "neg_prompt": "a cat",
                                 "pos_file": f"{i}_pos.safetensors",
                                 "neg_file": f"{i}_neg.safetensors"}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"^data: .* holds latents of shape \[4, 16, 16\] but "
                                         r"the model .* takes \[4, 8, 8\]"):
        Trainer(config("sd15", tmp_path / "out", data=str(d)))


def test_yaml_no_is_fp32():
    assert TrainConfig(model="m", data="d", mixed_precision=False).mixed_precision == "no"
    assert math.isfinite(TrainConfig(model="m", data="d").beta)


def test_prompt_pool_errors_name_file_and_line(tmp_path):
    from ddspo_fast.train.randcond import load_prompt_pool

    f = tmp_path / "mix.jsonl"
    f.write_bytes(b'{"prompt": "a", "neg_prompts": ["b"]}\n{"prompt": "caf\xe9", '
                  b'"neg_prompts": ["b"]}\n')
    with pytest.raises(ValueError, match=f"^rand_cond_prompts: {f} line 2: not UTF-8"):
        load_prompt_pool(f)
    f.write_text('{"prompt": "a", "neg_prompts": ["b"]}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=f"^rand_cond_prompts: {f} line 3 is not JSON"):
        load_prompt_pool(f)
