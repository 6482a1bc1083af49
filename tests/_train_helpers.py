"""Shared helpers for the trainer / model / prepare tests: tiny models and datasets
built once per test session (never downloaded), and a row counter on denoisers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

_ROOT = Path(tempfile.mkdtemp(prefix="ddspo-train-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def tiny_model(family: str) -> str:
    from ddspo_fast.testing import make_tiny_model

    return make_tiny_model(family, _ROOT / "models" / family)


def tiny_data(family: str, n_pairs: int = 4, seed: int = 0) -> str:
    from ddspo_fast.testing import make_tiny_dataset

    path = _ROOT / "data" / f"{family}-{n_pairs}-{seed}"
    if not (path / "index.jsonl").is_file():
        make_tiny_dataset(tiny_model(family), path, n_pairs=n_pairs, seed=seed)
    return str(path)


def config(family: str, out, **kw):
    from ddspo_fast.train import TrainConfig

    base = dict(model=tiny_model(family), data=tiny_data(family), output_dir=str(out),
                mixed_precision="no", max_steps=2, batch_size=2, checkpoint_every=0,
                log_every=1, progress=False, tensorboard=False, save_final=False,
                learning_rate=1e-3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


DENOISERS = {"sd15": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel",
             "sd3": "SD3Transformer2DModel", "sana": "SanaTransformer2DModel"}


class _Calls(list):
    """Rows per denoiser call; ``.modules`` holds the id of the module of each call."""

    def __init__(self):
        super().__init__()
        self.modules: list[int] = []


@contextmanager
def count_rows(family: str):
    """Count the rows every call of the family's denoiser class receives."""
    import diffusers

    cls = getattr(diffusers, DENOISERS[family])
    calls = _Calls()
    orig = cls.forward

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        calls.append(int(x.shape[0]))
        calls.modules.append(id(self))
        return orig(self, *args, **kwargs)

    cls.forward = forward
    try:
        yield calls
    finally:
        cls.forward = orig


def trainable_snapshot(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters()
            if p.requires_grad}


class Killed(Exception):
    """Stands in for a kill -9 in the middle of a run."""


def die_mid_step(trainer, step: int) -> None:
    """Make ``trainer.train()`` raise `Killed` in the middle of optimizer step ``step``
    (on its second micro-batch: the tests run grad_accum=2), i.e. after the checkpoint
    of step ``step - 1`` and before anything of step ``step`` is written."""
    inner = trainer.train_step

    def dying_step(batch):
        if trainer.global_step == step - 1 and trainer.micro_step % 2 == 1:
            raise Killed()
        return inner(batch)

    trainer.train_step = dying_step
