"""The noise schedule a family trains on: one object per strategy.

    DDPMSchedule          SD1.x / SDXL: integer timesteps 0..T-1, alphas_cumprod noising
    FlowSchedule          flow matching on the training table shifted by a static shift
                          (SD3 3.0, SANA 1.0, or a ``flow_shift`` given for the run)
    DynamicFlowSchedule   flow matching whose sampler shifts by the image's sequence length
                          (FLUX.1, FLUX.2, Qwen-Image: ``use_dynamic_shifting``); diffusers
                          ignores ``shift`` then, and its training scripts draw from the
                          unshifted table, so training does too

Each answers the same questions: which timestep densities it takes (``schemes``), how a
timestep is drawn (``sample``), its dtype, its noise level in [0, 1] (1 = pure noise),
how latents are noised (``add_noise``), and a JSON description (``describe``).
``from_scheduler_config`` picks the strategy from a model's scheduler config.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch

# How training timesteps may be drawn, as the official DDSPO scripts offer it.
# Flow matching (SD3 / SANA scripts' ``--weighting_scheme``, through diffusers'
# ``compute_density_for_timestep_sampling``): u in [0, 1) from the scheme, then the
# FlowMatchEulerDiscrete training table's entry floor(u * T).
#   uniform       u ~ U[0, 1)                         (the scripts' "none")
#   logit_normal  u = sigmoid(N(logit_mean, logit_std))
#   mode          u = 1 - v - mode_scale * (cos(pi v / 2)^2 - 1 + v), v ~ U[0, 1)
#   cosmap        u ~ U[0, 1): diffusers draws cosmap (and sigma_sqrt) uniformly and
#                 leaves the cosmap shape to a loss weighting, which the official
#                 DDSPO code does not apply, so its cosmap runs draw uniform t
# DDPM (SD1.x / SDXL; the official dataset's ``--timestep_sampling``), t in 0..T-1:
#   uniform       t ~ U{0..T-1}                       (the scripts' default, None)
#   linear        P(t) proportional to 1 - t/(T-1)    (torch.linspace(1, 0, T))
#   sigmoid       P(t) proportional to sigmoid(20 (t/T - 0.7))
FLOW_TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode", "cosmap")
DDPM_TIMESTEP_SCHEMES = ("uniform", "linear", "sigmoid")
_DIFFUSERS_SCHEME = {"uniform": "none", "logit_normal": "logit_normal", "mode": "mode",
                     "cosmap": "cosmap"}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row value broadcast over the other axes of ``like`` (any rank)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class NoiseSchedule:
    """What every strategy shares: T, and tables built once per device."""

    kind: str = ""
    schemes: tuple[str, ...] = ()
    timestep_dtype: torch.dtype = torch.float32

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = int(num_train_timesteps)
        self._tables: dict = {}

    def _cached(self, key, device, build) -> torch.Tensor:
        """A table built once per (key, device): no host-to-device copy per step."""
        k = (key, str(torch.device(device)))
        t = self._tables.get(k)
        if t is None:
            t = self._tables[k] = build().to(device)
        return t

    def sample(self, n: int, *, device, generator: Optional[torch.Generator], scheme: str,
               logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


class DDPMSchedule(NoiseSchedule):
    """Variance-preserving DDPM noising over the scheduler's alphas_cumprod."""

    kind = "ddpm"
    schemes = DDPM_TIMESTEP_SCHEMES
    timestep_dtype = torch.int64

    def __init__(self, scheduler_config: Mapping[str, Any]):
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(dict(scheduler_config))
        super().__init__(ddpm.config.num_train_timesteps)
        self.prediction_type = ddpm.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"model: scheduler prediction_type {self.prediction_type!r} is "
                             "not supported (expected 'epsilon' or 'v_prediction')")
        self._alphas_cumprod = ddpm.alphas_cumprod.to(torch.float32)

    def alphas_cumprod(self, device) -> torch.Tensor:
        return self._cached("alphas_cumprod", device, lambda: self._alphas_cumprod)

    def sample(self, n, *, device, generator, scheme, logit_mean=0.0, logit_std=1.0,
               mode_scale=1.29):
        T = self.num_train_timesteps
        if scheme == "uniform":
            return torch.randint(0, T, (n,), device=device, generator=generator)
        probs = self._cached(("ddpm", scheme), device, lambda: _ddpm_density(scheme, T))
        return torch.multinomial(probs, n, replacement=True, generator=generator)

    def noise_level(self, timesteps):
        return timesteps.float() / (self.num_train_timesteps - 1)

    def add_noise(self, x0, noise, timesteps):
        ac = self.alphas_cumprod(x0.device)[timesteps.long()]
        return _bcast(ac.sqrt(), x0) * x0 + _bcast((1 - ac).sqrt(), x0) * noise

    def target(self, x0, noise, timesteps):
        """epsilon, or v = sqrt(ac) eps - sqrt(1 - ac) x0 for a v-prediction model."""
        if self.prediction_type == "v_prediction":
            ac = self.alphas_cumprod(x0.device)[timesteps.long()]
            return _bcast(ac.sqrt(), x0) * noise - _bcast((1 - ac).sqrt(), x0) * x0
        return noise


class FlowSchedule(NoiseSchedule):
    """Rectified flow x_t = (1 - s) x0 + s eps; t = s * T from FlowMatchEulerDiscrete's
    training table, built from ``config`` exactly as the official scripts build it."""

    kind = "flow_static"
    schemes = FLOW_TIMESTEP_SCHEMES

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)
        super().__init__(self.config.get("num_train_timesteps", 1000))

    def _scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.config)

    @property
    def shift(self) -> float:
        return float(self._scheduler().shift)

    def table(self, device) -> torch.Tensor:
        return self._cached("flow", device, lambda: self._scheduler().timesteps.float())

    def sample(self, n, *, device, generator, scheme, logit_mean=0.0, logit_std=1.0,
               mode_scale=1.29):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=_DIFFUSERS_SCHEME[scheme], batch_size=n, logit_mean=logit_mean,
            logit_std=logit_std, mode_scale=mode_scale, device=device, generator=generator)
        # floor(u * T) as the scripts index; u can round to exactly 1 (sigmoid) or be 1
        # (mode at v = 0), where their index would be T, one past the table.
        T = self.num_train_timesteps
        return self.table(device)[(u * T).long().clamp_(0, T - 1)]

    def noise_level(self, timesteps):
        return timesteps.float() / self.num_train_timesteps

    def add_noise(self, x0, noise, timesteps):
        s = _bcast(self.noise_level(timesteps), x0)
        return (1 - s) * x0 + s * noise

    def with_shift(self, shift: float) -> "FlowSchedule":
        """This schedule's table with a static ``shift`` (dynamic shifting off)."""
        return FlowSchedule({**self.config, "shift": float(shift), "use_dynamic_shifting": False})

    def describe(self) -> dict:
        return {"kind": self.kind, "shift": self.shift}


class DynamicFlowSchedule(FlowSchedule):
    """Flow matching whose sampler shifts sigmas by mu, the line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) at the image's
    token count; training draws from the unshifted table (``use_dynamic_shifting``
    leaves it so), as diffusers' DreamBooth scripts do."""

    kind = "flow_dynamic"
    _KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")

    def mu(self, image_seq_len: int) -> float:
        """The sampler's shift mu for ``image_seq_len`` image tokens (diffusers' defaults
        where the config has none)."""
        cfg = self.config
        x0, x1 = cfg.get("base_image_seq_len") or 256, cfg.get("max_image_seq_len") or 4096
        y0, y1 = cfg.get("base_shift") or 0.5, cfg.get("max_shift") or 1.15
        return float(y0 + (y1 - y0) * (image_seq_len - x0) / (x1 - x0))

    def describe(self) -> dict:
        return {"kind": self.kind, **{k: self.config.get(k) for k in self._KEYS}}


def flow_config(scheduler_config: Mapping[str, Any]) -> dict:
    """The keys of ``scheduler_config`` FlowMatchEulerDiscreteScheduler takes. The others
    are dropped, so SANA's DPM-Solver config (whose only shift key is ``flow_shift``)
    gives shift 1.0, SD3's ``shift: 3.0`` gives 3.0, as in the official scripts."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    keys = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    return {k: v for k, v in dict(scheduler_config).items() if k in keys}


def from_scheduler_config(scheduler_config: Mapping[str, Any], *, flow: bool,
                          overrides: Optional[Mapping[str, Any]] = None) -> NoiseSchedule:
    """The training schedule of a model: DDPM for a DDPM family; for a flow family, the
    dynamic-shift strategy where the config asks for ``use_dynamic_shifting``, else the
    static one. ``overrides`` replace keys of the config (a family whose script builds
    its scheduler with other values)."""
    cfg = dict(scheduler_config)
    cfg.update(overrides or {})
    if not flow:
        return DDPMSchedule(cfg)
    fcfg = flow_config(cfg)
    return DynamicFlowSchedule(fcfg) if fcfg.get("use_dynamic_shifting") else FlowSchedule(fcfg)


def _ddpm_density(scheme: str, T: int) -> torch.Tensor:
    """P(t), t = 0..T-1, of the official dataset's ``--timestep_sampling`` options."""
    if scheme == "linear":
        p = torch.linspace(1.0, 0.0, T)
    else:  # sigmoid
        p = 1.0 / (1.0 + torch.exp(-20 * (torch.arange(0, T) / T - 0.7)))
    return p / p.sum()
