"""The recipe options of TrainConfig reach the step: loss_type, timestep_sampling,
mode_scale and flow_shift (the options of the public training scripts), and a family
refuses a scheme it lacks."""

import pytest
import torch

from _train_helpers import config

from ddspo_fast.loss import LOSS_TYPES
from ddspo_fast.loss.eager import pair_terms
from ddspo_fast.train import Trainer
from ddspo_fast.train import config as train_config


def test_config_lists_the_loss_types_of_the_loss_package():
    assert train_config.LOSS_TYPES == tuple(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_loss_type_reaches_the_loss(tmp_path, loss_type):
    tr = Trainer(config("sd15", tmp_path, loss_type=loss_type, max_steps=1, beta=50.0))
    batch = next(iter(tr.batches()))
    loss, stats = tr.compute_loss(batch)[:2]
    # the step's loss is the mean of this loss type's per-pair terms of its own margins
    want = pair_terms(stats["margin"].double(), 50.0, loss_type).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    sig = pair_terms(stats["margin"].double(), 50.0, "sigmoid").mean()
    assert float(loss.detach()) != pytest.approx(float(sig), rel=1e-3)


def test_timestep_sampling_reaches_the_draws(tmp_path, monkeypatch):
    seen = []
    tr = Trainer(config("sd3", tmp_path, timestep_sampling="mode", mode_scale=0.5,
                        flow_shift=2.0, max_steps=1))
    orig = type(tr.adapter).sample_timesteps

    def spy(self, n, **kw):
        seen.append(kw)
        return orig(self, n, **kw)

    monkeypatch.setattr(type(tr.adapter), "sample_timesteps", spy)
    tr.make_inputs(next(iter(tr.batches())))
    assert seen and all(k["scheme"] == "mode" and k["mode_scale"] == 0.5 and k["shift"] == 2.0
                        for k in seen)


def test_a_family_refuses_a_scheme_it_lacks(tmp_path):
    with pytest.raises(ValueError, match="timestep_sampling"):
        Trainer(config("sd15", tmp_path, timestep_sampling="logit_normal"))
    with pytest.raises(ValueError, match="flow_shift"):
        Trainer(config("sd15", tmp_path / "b", flow_shift=3.0))
    with pytest.raises(ValueError, match="loss_type"):
        config("sd15", tmp_path / "c", loss_type="softmax")
