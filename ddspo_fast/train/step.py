"""The step of a preference run, built without side effects.

``build_step(config, adapter)`` builds what one optimizer step of ``Trainer`` runs — the
policy and the frozen networks (``networks.py``), the loss (``pairs.PairLoss``) and the
trainable parameters — from a family adapter that is already loaded. It takes no lock,
creates no directory and reads no file (DD-CPP's pair adapters are read only when a
loader is given), so it works as well on a meta-device or fake-tensor denoiser: the
planner measures a step this way, and ``Trainer`` composes the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .lora import LOSE, WIN
from .networks import Networks, build_preference_networks
from .pairs import PairInputs, PairLoss, pair_mode
from .precision import Precision


def check_family_settings(cfg, adapter) -> None:
    """Settings the config accepts for some family but not for ``adapter``'s."""
    family = adapter.name
    if cfg.timestep_sampling is not None and cfg.timestep_sampling not in adapter.timestep_schemes():
        raise ValueError(f"timestep_sampling: expected one of {adapter.timestep_schemes()} for "
                         f"{family}, got {cfg.timestep_sampling!r}")
    if getattr(cfg, "flow_shift", None) is not None and not adapter.flow:
        from ..models import family_names, get_family

        flows = ", ".join(f for f in family_names() if get_family(f).flow)
        raise ValueError(f"flow_shift: {family} is not a flow-matching family (a shift "
                         f"applies to the flow-matching families only: {flows})")


@dataclass
class Step:
    """What one micro-batch of a preference run calls: the loss over the networks."""
    adapter: object
    networks: Networks
    pair_loss: PairLoss
    precision: Precision
    mode: str

    @property
    def trainable(self) -> list:
        return self.networks.trainable

    def policy_fn(self, x, t, c):
        return self.adapter.predict(self.networks.step_module, x, t, c)

    def reference_fn(self, x, t, c):
        with self.networks.reference() as ref:
            return self.adapter.predict(ref, x, t, c)

    def phi(self, name: str) -> Callable:
        """DD-CPP's target network: the base with pair adapter ``name``."""
        def run(x, t, c):
            with self.networks.reference([name]) as module:
                return self.adapter.predict(module, x, t, c)
        return run

    def loss(self, inp: PairInputs):
        """``(loss, stats)`` with the frozen networks run live."""
        phi = (self.phi(WIN), self.phi(LOSE)) if self.mode == "dd_cpp" else (None, None)
        return self.pair_loss(self.policy_fn, self.reference_fn, inp, *phi)

    def cached_loss(self, inp: PairInputs, frozen):
        """``(loss, stats)`` with the frozen outputs (``FrozenOutputs``) read from a
        reference cache."""
        return self.pair_loss.cached_loss(self.policy_fn, inp, frozen)


def build_step(config, adapter, precision: Optional[Precision] = None, *,
               cached: bool = False,
               pair_adapters: Optional[Callable[[torch.nn.Module], None]] = None) -> Step:
    """The step of a ``TrainConfig`` run on ``adapter`` (loaded, or built on the meta
    device): LoRA or the whole denoiser made trainable, the frozen networks beside it
    (none when ``cached``), the loss. DD-CPP without ``cached`` needs ``pair_adapters``,
    the function that adds the winning and losing adapters to a module."""
    cfg = config
    if precision is None:
        precision = Precision.from_config(cfg, adapter.denoiser.device.type)
    check_family_settings(cfg, adapter)
    adapter.set_train_guidance(cfg.guidance_scale)
    mode = pair_mode(cfg.objective, cfg.pair)
    if mode == "dd_cpp" and not cached and pair_adapters is None:
        raise ValueError("pair_lora: DD-CPP's step needs its winning and losing adapters "
                         "(pair_adapters) unless the frozen outputs are cached")
    pair_loss = PairLoss(adapter, cfg.objective, cfg.pair, cfg.beta, cfg.backend,
                         loss_type=cfg.loss_type)
    nets = build_preference_networks(adapter, cfg, precision, mode=mode, cached=cached,
                                     pair_adapters=pair_adapters)
    return Step(adapter, nets, pair_loss, precision, mode)


def adapter_without_weights(family: str, denoiser: torch.nn.Module, scheduler_config: dict,
                            vae_config: Optional[dict] = None):
    """A family adapter around ``denoiser`` (e.g. built on the meta device) with the
    scheduler and VAE of the configs given: nothing is read from disk, no text encoder
    or VAE exists. For building a step without weights (``build_step``)."""
    from types import SimpleNamespace

    from ..models import get_family

    cls = get_family(family)
    pipe = SimpleNamespace(scheduler=SimpleNamespace(config=dict(scheduler_config)),
                           vae=SimpleNamespace(config=dict(vae_config or {})),
                           **{cls.denoiser_name: denoiser})
    param = next(denoiser.parameters())
    adapter = cls(pipe, "", device=param.device, dtype=param.dtype)
    adapter._configure()
    adapter._read_vae_scale("")  # from pipe.vae.config: no file is read
    return adapter
