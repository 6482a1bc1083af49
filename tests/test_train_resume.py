"""Checkpoints: a run killed after a checkpoint and resumed with resume='latest' ends
with the same weights as one uninterrupted run (also from a checkpoint of the earlier,
pickled format, with trust_checkpoint); checkpoints are atomic and hold no pickle."""

import json
import shutil

import pytest
import torch

from _tolerance import assert_adam_runs_agree
from _train_helpers import Killed, config, die_mid_step, tiny_data

from ddspo_fast.train import Trainer
from ddspo_fast.safeload import read_state
from ddspo_fast.train import checkpoint as ckpt
from ddspo_fast.train.errors import UntrustedCheckpointError


def _weights(tr):
    return {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}


def _to_earlier_format(path):
    """Rewrite a checkpoint as earlier versions wrote it: torch.save pickles."""
    for new, old in ((ckpt.OPTIMIZER_FILE, ckpt.LEGACY_OPTIMIZER_FILE),
                     (ckpt.SCHEDULER_FILE, ckpt.LEGACY_SCHEDULER_FILE),
                     (ckpt.rng_file(0), ckpt.rng_file(0, legacy=True))):
        torch.save(read_state(path / new), path / old)
        (path / new).unlink()
    ckpt.write_manifest(path)


def test_resume_latest_equals_uninterrupted(tmp_path):
    mix = tmp_path / "mix.jsonl"
    mix.write_text("".join(json.dumps({"prompt": p, "neg_prompts": [n]}) + "\n" for p, n in
                           [("a red car", "a car"), ("a blue sky", "a sky"), ("a dog", "dog")]))
    # Everything that carries state across steps: grad accumulation, K draws per pair,
    # a warm-up + cosine LR schedule, Adam moments, random-condition mixing, epochs.
    kw = dict(lora_rank=4, grad_accum=2, batch_size=1, timesteps_per_pair=2, lr_scheduler="cosine",
              lr_warmup_steps=1, max_steps=4, checkpoint_every=2, data=tiny_data("sd15", 6),
              rand_cond_prompts=str(mix), rand_cond_schedule="sigmoid", rand_cond_lambda=5.0)
    full = Trainer(config("sd15", tmp_path / "a", **kw))
    full.train()
    want = _weights(full)

    part = Trainer(config("sd15", tmp_path / "b", **kw))
    die_mid_step(part, 3)  # after checkpoint 2
    with pytest.raises(Killed):
        part.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2]
    assert _weights(part).keys() == want.keys()
    old = tmp_path / "old"  # the same checkpoint in the earlier, pickled format
    shutil.copytree(tmp_path / "b", old, ignore=shutil.ignore_patterns(".lock"))
    _to_earlier_format(ckpt.latest(old))

    resumed = Trainer(config("sd15", tmp_path / "b", resume="latest", **kw))
    assert resumed.global_step == 2 and resumed.micro_step == 4  # 4 of 6 batches: mid-epoch
    summary = resumed.train()
    assert summary["steps"] == 4
    # Same ops on the same inputs, but not bit-equal by guarantee: the resumed run's
    # buffers lie elsewhere and BLAS may round differently by alignment. Steps 3 and 4
    # after the checkpoint: AdamW's bound (tests/_tolerance.py) at the peak rate.
    assert_adam_runs_agree(_weights(resumed), want, [full.config.learning_rate] * 2,
                           first_step=3)
    # metrics were logged once per step, without duplicates from the killed run
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl")
             .read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # the earlier format resumes only when trusted, and then exactly as well
    pickled = ckpt.latest(old) / ckpt.LEGACY_OPTIMIZER_FILE
    with pytest.raises(UntrustedCheckpointError, match=f"^resume: {pickled} is a pickle .*"
                                                       "--trust-checkpoint") as e:
        Trainer(config("sd15", old, resume="latest", **kw))
    assert e.value.file == str(pickled) and "\n" not in str(e.value)
    trusted = Trainer(config("sd15", old, resume="latest", trust_checkpoint=True, **kw))
    trusted.train()
    got = _weights(trusted)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_resume_without_checkpoint_starts_fresh_and_bad_path_raises(tmp_path):
    tr = Trainer(config("sd15", tmp_path, resume="latest", lora_rank=2))
    assert tr.global_step == 0
    tr.close()  # the output_dir lock: one trainer at a time
    (tmp_path / "not-a-ckpt").mkdir()
    with pytest.raises(ValueError, match="resume"):
        Trainer(config("sd15", tmp_path, resume=str(tmp_path / "not-a-ckpt"), lora_rank=2))


def test_checkpoint_is_atomic_and_complete(tmp_path):
    tr = Trainer(config("sd15", tmp_path, lora_rank=2, max_steps=1, checkpoint_every=1,
                        checkpoints_keep=1))
    tr.train()
    # a killed writer's leftover temp dir is never taken for a checkpoint
    ckpt.begin(tmp_path, 7)
    (ckpt.tmp_path(tmp_path, 7) / "trainer_state.json").write_text("{}")
    assert ckpt.latest(tmp_path).name == "checkpoint-1"
    files = {p.name for p in ckpt.latest(tmp_path).iterdir()}
    assert files == {"trainable.safetensors", "optimizer.safetensors", "scheduler.json",
                     "trainer_state.json", "rng-rank0.safetensors", "manifest.json"}
    tr.save_checkpoint()  # same step again: replaced in place, still one checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]


def test_checkpoint_without_manifest_needs_trust(tmp_path):
    kw = dict(lora_rank=2, max_steps=1, checkpoint_every=1)
    Trainer(config("sd15", tmp_path / "run", **kw)).train()
    one = ckpt.latest(tmp_path / "run")
    (one / ckpt.MANIFEST_FILE).unlink()
    kw["max_steps"] = 2
    with pytest.raises(UntrustedCheckpointError, match=f"^resume: {one / ckpt.MANIFEST_FILE} "
                                                       "does not exist.*--trust-checkpoint"):
        Trainer(config("sd15", tmp_path / "run", resume=str(one), **kw))
    with pytest.raises(UntrustedCheckpointError):  # latest does not fall back past it
        Trainer(config("sd15", tmp_path / "run", resume="latest", **kw))
    tr = Trainer(config("sd15", tmp_path / "run", resume="latest", trust_checkpoint=True, **kw))
    assert tr.global_step == 1
