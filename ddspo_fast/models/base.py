"""What every model family shares; each family module fills in the differences.

An adapter wraps one diffusers pipeline (possibly without some components) and is the
only place that knows the family's conventions: which denoiser, how prompts become the
cond dict stored in datasets, how timesteps are drawn, how latents are noised, what the
Diffusion-DPO target is, how the denoiser is called and what its default sampler is.

Conventions shared with the trainer:

* Latents are in the denoiser's space (after the VAE normalisation, ``vae_to_latents``:
  shift and scaling factor, or per-channel mean / std where the VAE config has them),
  stored unpacked with the shape ``latent_shape()`` (any rank; (C, H, W) for the image
  families here). A family whose denoiser takes another layout (FLUX: 2x2 patches as
  tokens) converts in ``pack_latents`` / ``unpack_latents`` inside ``predict``, so
  noise, targets and the loss all live in the stored layout.
* ``timesteps`` are what the denoiser takes: DDPM ints for SD, ``sigma * T`` floats for
  flow matching. ``noise_level(t)`` maps them to [0, 1] (1 = pure noise) for weighting,
  timestep buckets and random-condition mixing.
* ``predict`` returns the output in the same space as ``dpo_target`` so the loss can
  compare them directly (SD3: x0-preconditioned; SANA, FLUX: velocity; SD: epsilon).
  A flow family must define ``dpo_target`` (there is no safe default).
* The noise schedule is one of three strategies (``noise_schedule()``): DDPM; flow
  matching with a static shift; flow matching whose sampler shifts by the image
  sequence length (FLUX), which diffusers' training scripts train on the unshifted table.
* ``sample_timesteps`` draws t as the official DDSPO scripts do, per family by default
  (``FLOW_TIMESTEP_SCHEMES`` / ``DDPM_TIMESTEP_SCHEMES``); the others are options.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from .quiet import cast_module, quiet_loading

Cond = dict  # {key: Tensor (n, ...)}

COMPONENTS = ("denoiser", "text", "vae")

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


def read_model_index(model: str) -> dict:
    """``model_index.json`` of a local pipeline dir, or of a hub id already in the cache."""
    p = Path(model)
    if p.is_dir():
        f = p / "model_index.json"
        if not f.is_file():
            raise ValueError(f"model: {model} is a directory but holds no model_index.json "
                             "(expected a diffusers pipeline directory)")
        return json.loads(f.read_text())
    try:
        f = hub_file(str(model), "model_index.json")
    except _HUB_ERRORS as e:  # offline, unknown id, no network, not in the cache...
        raise ValueError(f"model: {model!r} is neither a local diffusers pipeline directory nor "
                         f"a reachable hub id ({type(e).__name__}: {e})") from e
    return json.loads(Path(f).read_text())


def _hub_errors() -> tuple[type[BaseException], ...]:
    # Hub failures: OSError (HTTP errors, offline, not cached), ValueError (bad repo id),
    # and EntryNotFoundError, which in some huggingface_hub versions is neither.
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError
    return (OSError, ValueError, EntryNotFoundError)


_HUB_ERRORS = _hub_errors()


def hub_file(model: str, filename: str) -> str:
    """The local path of ``filename`` of hub repository ``model`` (downloaded or cached)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model, filename)


class FamilyAdapter:
    """Base class; subclasses set the class attributes and the family hooks."""

    name: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "unet"
    flow: ClassVar[bool] = False
    default_steps: ClassVar[int] = 25
    default_cfg: ClassVar[float] = 7.5
    cond_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    is_unet: ClassVar[bool] = True
    # The official scripts' timestep sampling for this family (a *_TIMESTEP_SCHEMES name).
    timestep_sampling: ClassVar[str] = "uniform"
    # dtype the family's text encoders always run in when the caller gives no
    # text_dtype (SANA: Gemma-2 in bf16, as the official code loads it); None = dtype.
    text_encoder_dtype: ClassVar[Optional[torch.dtype]] = None
    # How ``encode`` takes latents from the VAE posterior by default, as the family's
    # training script does: "sample" (Diffusion-DPO, DreamBooth scripts) or "mean".
    vae_latent_mode: ClassVar[str] = "sample"
    # Per-family options accepted by ``load(..., options=...)`` (name -> allowed values
    # description); subclasses list theirs and apply them in ``_configure``.
    options: ClassVar[dict[str, str]] = {}
    # The guidance value fed to a guidance-distilled denoiser during training (FLUX.1
    # [dev]); None where the denoiser has no guidance embedding.
    train_guidance: Optional[float] = None
    #: the text encoders' token budget where the pipeline takes one (None: the pipeline's)
    max_sequence_length: Optional[int] = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # A flow family's regression target depends on what its predict returns
        # (velocity, x0...): no default could be right, so it must say.
        if cls.flow and cls.dpo_target is FamilyAdapter.dpo_target:
            raise TypeError(f"{cls.__name__}: a flow-matching family must define dpo_target")

    def __init__(self, pipe, model: str, *, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.model = str(model)
        self.device = torch.device(device)
        self.dtype = dtype
        sched_cfg = dict(pipe.scheduler.config)
        self.num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))
        self._init_schedule(sched_cfg)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str, *, components: Sequence[str] = ("denoiser", "text"),
             device="cpu", dtype: torch.dtype = torch.float32, text_dtype=None,
             options: Optional[Mapping[str, Any]] = None):
        """Load the pipeline from ``model`` keeping only ``components``.

        ``dtype`` is for the denoiser; ``text_dtype`` for the text encoders and VAE
        (default: the family's ``text_encoder_dtype`` for the text encoders when it has
        one, else ``dtype``). Components left out are not loaded at all. ``options``
        are the family's own settings (``cls.options``), e.g. SANA's ``instruction``.
        """
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise ValueError(f"components: expected a subset of {COMPONENTS}, got {bad}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(f"{k} ({v})" for k, v in cls.options.items()) or "none"
            raise ValueError(f"options: {cls.name} has no option {unknown[0]!r} "
                             f"(its options: {known})")
        skip = {}
        if "denoiser" not in components:
            skip[cls.denoiser_name] = None
        if "text" not in components:
            skip.update({n: None for n in cls.text_components})
        if "vae" not in components:
            skip["vae"] = None
        with quiet_loading():  # importing the pipeline modules is what prints the notice
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(str(model), **skip)
        if pipe.__class__.__name__ not in cls.pipeline_classes:
            raise ValueError(f"model: {model} holds a {pipe.__class__.__name__}, not a "
                             f"{cls.name} pipeline ({', '.join(cls.pipeline_classes)})")
        encoder_dtype = text_dtype or cls.text_encoder_dtype or dtype
        text_dtype = text_dtype or dtype
        encoders = {n for n in cls.text_components if n.startswith("text_encoder")}
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module):
                comp.requires_grad_(False).eval()
                want = (dtype if name == cls.denoiser_name
                        else encoder_dtype if name in encoders else text_dtype)
                cast_module(comp, device=device, dtype=want)
        pipe.set_progress_bar_config(disable=True)  # callers report their own progress
        self = cls(pipe, model, device=device, dtype=dtype)
        self._configure(**options)
        self._read_vae_scale(model)
        if getattr(pipe, "vae", None) is None:
            # Pipelines size latents by this; without a VAE they fall back to 8 (or 32).
            pipe.vae_scale_factor = self.vae_scale_factor
        return self

    @classmethod
    def text_dtype_for(cls, run_dtype: torch.dtype, policy: Optional[str] = None) -> torch.dtype:
        """The text encoders' dtype in a run whose frozen weights are ``run_dtype``:
        ``policy`` None = the family's official choice (``text_encoder_dtype`` where it
        has one: SANA's Gemma-2 in bf16), "run" = ``run_dtype`` for every family."""
        if policy not in (None, "run"):
            raise ValueError(f"text_encoder_dtype: expected None or 'run', got {policy!r}")
        return run_dtype if policy == "run" else (cls.text_encoder_dtype or run_dtype)

    def _configure(self, **options) -> None:
        """Apply the family's ``options`` (names already checked against ``cls.options``)."""

    def _read_vae_scale(self, model: str) -> None:
        vae = getattr(self.pipe, "vae", None)
        cfg = dict(vae.config) if vae is not None else None
        if cfg is None:
            p = Path(model) / "vae" / "config.json"
            try:
                cfg = json.loads((p.read_text() if p.is_file()
                                  else Path(hub_file(model, "vae/config.json")).read_text()))
            except _HUB_ERRORS as e:  # no vae/ (or offline): say what is assumed instead
                warnings.warn(
                    f"model: cannot read the VAE config of {model} ({type(e).__name__}: {e}); "
                    "assuming a VAE downscale of 8, scaling factor 1.0 and no shift. Latent "
                    "scaling and SDXL's size conditioning (time_ids) are wrong if that is not "
                    "this model's VAE: load it with its vae/ directory.", stacklevel=3)
                cfg = {}
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or [0] * 4
        self.vae_scale_factor = 2 ** (len(blocks) - 1)
        self.vae_scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.vae_shift_factor = float(cfg.get("shift_factor", 0.0) or 0.0)
        # Per-channel statistics (diffusers' latents_mean / latents_std); when both are
        # set they replace the scalar shift, as diffusers' pipelines apply them.
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        self.vae_latents_stats = ((torch.tensor(mean, dtype=torch.float32),
                                   torch.tensor(std, dtype=torch.float32))
                                  if mean is not None and std is not None else None)
        self.vae_sample_size = cfg.get("sample_size")

    # ------------------------------------------------------------------ pieces
    @property
    def denoiser(self) -> torch.nn.Module:
        d = getattr(self.pipe, self.denoiser_name, None)
        if d is None:
            raise ValueError(f"this {self.name} adapter was loaded without its denoiser")
        return d

    def denoiser_config(self) -> dict:
        d = getattr(self.pipe, self.denoiser_name, None)
        if d is not None:
            return dict(d.config)
        p = Path(self.model) / self.denoiser_name / "config.json"
        if p.is_file():
            return json.loads(p.read_text())
        return json.loads(Path(hub_file(self.model, f"{self.denoiser_name}/config.json"))
                          .read_text())

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one native-resolution latent as datasets store it ((C, H, W) here;
        a family with another layout overrides this)."""
        cfg = self.denoiser_config()
        size = cfg.get("sample_size") or 64
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.get("in_channels", 4)), int(h), int(w)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE's downscale, times any packing)."""
        return self.vae_scale_factor

    def native_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels of one native-resolution latent."""
        h, w = self.latent_shape()[-2:]
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def vae_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images (n, 3, H, W) -> what the VAE encoder takes (a video VAE: one frame)."""
        return x

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Stored layout -> the layout the denoiser takes (identity for most families)."""
        return x

    def unpack_latents(self, x: torch.Tensor, like_shape) -> torch.Tensor:
        """The denoiser's layout -> the stored layout of shape ``like_shape``."""
        return x

    # ------------------------------------------------------------------ variants
    @classmethod
    def variant_of(cls, denoiser_config: Mapping) -> str:
        """The model variant a denoiser config describes (the family name when the family
        has one variant)."""
        return cls.name

    @classmethod
    def default_train_guidance(cls, denoiser_config: Mapping) -> Optional[float]:
        """The guidance value training feeds a guidance-distilled denoiser by default;
        None where the denoiser has no guidance embedding."""
        return None

    @property
    def variant(self) -> str:
        v = self.__dict__.get("_variant")
        if v is None:
            v = self._variant = self.variant_of(self.denoiser_config())
        return v

    def describe(self) -> str:
        """The family, and the variant where it differs: "flux (FLUX.1 [schnell])"."""
        return self.name if self.variant == self.name else f"{self.name} ({self.variant})"

    # ------------------------------------------------------------------ preparing
    def prepare_denoiser(self, denoiser: torch.nn.Module, *, channels_last: bool = False) -> None:
        """Set ``denoiser`` up for this family's calls (UNets: channels_last on request)."""
        if channels_last and self.is_unet:
            denoiser.to(memory_format=torch.channels_last)

    def prepare_input(self, x: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        """Latents in the memory format ``prepare_denoiser`` chose for the denoiser."""
        if channels_last and self.is_unet:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def set_train_guidance(self, value: Optional[float]) -> None:
        """The guidance value a guidance-distilled denoiser is trained with (None: the
        family's default). Refused for a denoiser without a guidance embedding."""
        if value is None:
            return
        if self.train_guidance is None:
            raise ValueError(f"guidance_scale: {self.describe()} has no guidance embedding "
                             "(only guidance-distilled models such as FLUX.1 [dev] take one)")
        self.train_guidance = float(value)

    # ------------------------------------------------------------------ latent scaling
    def vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE encoder output -> the denoiser's latent space."""
        if self.vae_latents_stats is not None:
            mean, std = (self._bcast_channels(v, z) for v in self.vae_latents_stats)
            return (z - mean) * self.vae_scaling_factor / std
        return (z - self.vae_shift_factor) * self.vae_scaling_factor

    def latents_to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's latent space -> what the VAE decoder takes."""
        if self.vae_latents_stats is not None:
            mean, std = (self._bcast_channels(v, x) for v in self.vae_latents_stats)
            return x * std / self.vae_scaling_factor + mean
        return x / self.vae_scaling_factor + self.vae_shift_factor

    @staticmethod
    def _bcast_channels(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, like.dtype).reshape(1, -1, *([1] * (like.dim() - 2)))

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Encode prompts into the cond dict stored with datasets: {key: (n, ...)}."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a list of strings")
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        out = self._encode(list(prompts))
        return {k: v.detach() for k, v in out.items()}

    def _encode(self, prompts: list[str]) -> Cond:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ noise schedule
    def _init_schedule(self, sched_cfg: Mapping) -> None:
        self._tables: dict = {}
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            # The training scheduler exactly as the official scripts build it:
            # FlowMatchEulerDiscreteScheduler from the model's scheduler config. Keys it
            # does not know are dropped, so SANA's DPM-Solver config (whose only shift
            # key is `flow_shift`) gives shift 1.0, SD3's `shift: 3.0` gives 3.0.
            keys = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
            self._flow_cfg = {k: v for k, v in sched_cfg.items() if k in keys}
            self.train_shift = float(self._flow_scheduler(None).shift)
        else:
            from diffusers import DDPMScheduler

            ddpm = DDPMScheduler.from_config(dict(sched_cfg))
            self.prediction_type = ddpm.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"model: scheduler prediction_type {self.prediction_type!r} is "
                                 "not supported (expected 'epsilon' or 'v_prediction')")
            self._alphas_cumprod = ddpm.alphas_cumprod.to(torch.float32)

    def _flow_scheduler(self, shift: Optional[float]):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = dict(self._flow_cfg)
        if shift is not None:
            cfg.update(shift=float(shift), use_dynamic_shifting=False)
        return FlowMatchEulerDiscreteScheduler.from_config(cfg)

    def noise_schedule(self, shift: Optional[float] = None) -> dict:
        """The noise-schedule strategy training uses, described.

        ``{"kind": "ddpm"}``; ``{"kind": "flow_static", "shift": s}`` (the training table
        shifted by s: SD3 3.0, SANA 1.0, or ``shift``); ``{"kind": "flow_dynamic", ...}``
        for schedulers with ``use_dynamic_shifting`` (FLUX): the sampler shifts sigmas by
        mu = the line through (base_image_seq_len, base_shift) and (max_image_seq_len,
        max_shift) at the image's token count (``dynamic_shift_mu``), while training draws
        from the unshifted table, as diffusers' DreamBooth scripts do. A ``shift`` given
        for a dynamic-shift model trains on the static shift instead."""
        if not self.flow:
            return {"kind": "ddpm"}
        cfg = self._flow_cfg
        if cfg.get("use_dynamic_shifting") and shift is None:
            return {"kind": "flow_dynamic",
                    **{k: cfg.get(k) for k in ("base_image_seq_len", "max_image_seq_len",
                                               "base_shift", "max_shift")}}
        return {"kind": "flow_static", "shift": float(self._flow_scheduler(shift).shift)}

    def dynamic_shift_mu(self, image_seq_len: int) -> float:
        """The sampler's shift mu for ``image_seq_len`` image tokens (dynamic-shift
        schedulers), from the scheduler config with diffusers' defaults."""
        cfg = self._flow_cfg
        x0, x1 = cfg.get("base_image_seq_len") or 256, cfg.get("max_image_seq_len") or 4096
        y0, y1 = cfg.get("base_shift") or 0.5, cfg.get("max_shift") or 1.15
        return float(y0 + (y1 - y0) * (image_seq_len - x0) / (x1 - x0))

    def _cached(self, key, device, build) -> torch.Tensor:
        """A table built once per (key, device): no host-to-device copy per step."""
        k = (key, str(torch.device(device)))
        t = self._tables.get(k)
        if t is None:
            t = self._tables[k] = build().to(device)
        return t

    def _table(self, device) -> torch.Tensor:
        return self._cached("alphas_cumprod", device, lambda: self._alphas_cumprod)

    @classmethod
    def timestep_schemes(cls) -> tuple[str, ...]:
        """The values ``sample_timesteps(scheme=...)`` accepts for this family."""
        return FLOW_TIMESTEP_SCHEMES if cls.flow else DDPM_TIMESTEP_SCHEMES

    def sample_timesteps(self, n: int, *, device, generator: torch.Generator | None = None,
                         scheme: Optional[str] = None, logit_mean: float = 0.0,
                         logit_std: float = 1.0, mode_scale: float = 1.29,
                         shift: Optional[float] = None) -> torch.Tensor:
        """``n`` training timesteps in the denoiser's convention.

        ``scheme``: one of ``timestep_schemes()``; None = the family's official default
        (``timestep_sampling``: uniform for SD1.x, SDXL and SANA, logit_normal for SD3).
        ``logit_mean`` / ``logit_std`` (logit_normal) and ``mode_scale`` (mode) are the
        official scripts' defaults. Flow families only: ``shift`` replaces the training
        scheduler's shift (None = the scheduler's own, ``train_shift``).
        DDPM families return int64 in 0..T-1; flow families ``sigma * T`` floats.
        """
        scheme = self.timestep_sampling if scheme is None else scheme
        if scheme not in self.timestep_schemes():
            raise ValueError(f"timestep_sampling: expected one of {self.timestep_schemes()} "
                             f"for {self.name}, got {scheme!r}")
        T = self.num_train_timesteps
        if not self.flow:
            if shift is not None:
                raise ValueError(f"shift: {self.name} is not a flow-matching family "
                                 "(a timestep shift applies to SD3 and SANA only)")
            if scheme == "uniform":
                return torch.randint(0, T, (n,), device=device, generator=generator)
            probs = self._cached(("ddpm", scheme), device, lambda: _ddpm_density(scheme, T))
            return torch.multinomial(probs, n, replacement=True, generator=generator)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=_DIFFUSERS_SCHEME[scheme], batch_size=n, logit_mean=logit_mean,
            logit_std=logit_std, mode_scale=mode_scale, device=device, generator=generator)
        # floor(u * T) as the scripts index; u can round to exactly 1 (sigmoid) or be 1
        # (mode at v = 0), where their index would be T, one past the table.
        idx = (u * T).long().clamp_(0, T - 1)
        table = self._cached(("flow", shift), device,
                             lambda: self._flow_scheduler(shift).timesteps.float())
        return table[idx]

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Timesteps -> [0, 1], 1 = pure noise (sigma for flow, t/(T-1) for DDPM)."""
        if self.flow:
            return timesteps.float() / self.num_train_timesteps
        return timesteps.float() / (self.num_train_timesteps - 1)

    def _bcast(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        if self.flow:
            s = self._bcast(self.noise_level(timesteps), x0)
            return (1 - s) * x0 + s * noise
        ac = self._table(x0.device)[timesteps.long()]
        a, b = self._bcast(ac.sqrt(), x0), self._bcast((1 - ac).sqrt(), x0)
        return a * x0 + b * noise

    def dpo_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """Diffusion-DPO regression target in ``predict``'s output space (DDPM families:
        epsilon or v from the scheduler's prediction_type; flow families define theirs)."""
        if self.prediction_type == "v_prediction":
            ac = self._table(x0.device)[timesteps.long()]
            return self._bcast(ac.sqrt(), x0) * noise - self._bcast((1 - ac).sqrt(), x0) * x0
        return noise

    # ------------------------------------------------------------------ denoiser
    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                cond: Cond) -> torch.Tensor:
        """Run ``denoiser`` on stacked rows; output in ``dpo_target``'s space."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ sampling
    def pipeline_call_kwargs(self) -> dict:
        """Extra keyword arguments for the family's pipeline call (size, binning...)."""
        h, w = self.latent_shape()[-2:]
        kw = {"height": h * self.vae_scale_factor, "width": w * self.vae_scale_factor}
        if self.max_sequence_length is not None:  # prompts encoded as the training rows were
            kw["max_sequence_length"] = self.max_sequence_length
        return kw

    def guidance(self, batch: int, device) -> Optional[torch.Tensor]:
        """The guidance-embedding input of a guidance-distilled denoiser (one fp32 value
        per row, ``train_guidance``), or None for a model without one."""
        if self.train_guidance is None:
            return None
        return torch.full((batch,), self.train_guidance, device=device, dtype=torch.float32)

    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], seeds: Sequence[int], *,
                         steps: int | None = None, cfg: float | None = None) -> torch.Tensor:
        """Sample latents (denoiser space) for ``prompts``; row i uses ``seeds[i]``."""
        if len(prompts) != len(seeds):
            raise ValueError("seeds: expected one seed per prompt")
        gen_device = "cpu" if self.device.type == "mps" else self.device
        gens = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(prompt=list(prompts), num_inference_steps=int(steps or self.default_steps),
                        guidance_scale=float(self.default_cfg if cfg is None else cfg),
                        generator=gens, output_type="latent", **self.pipeline_call_kwargs())
        return out.images

    # ------------------------------------------------------------------ saving
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: str) -> None:
        """Save a complete pipeline with ``denoiser`` swapped in (other parts from disk)."""
        with quiet_loading():
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(self.model, **{self.denoiser_name: denoiser})
            pipe.save_pretrained(out_dir, safe_serialization=True)

    def save_lora(self, lora_state: Mapping[str, torch.Tensor], out_dir: str) -> None:
        """Save LoRA layers (peft keys) loadable with ``pipeline.load_lora_weights``."""
        cls = type(self.pipe)
        cls.save_lora_weights(out_dir, **{f"{self.denoiser_name}_lora_layers": dict(lora_state)},
                              safe_serialization=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model={self.model!r}>"



def _ddpm_density(scheme: str, T: int) -> torch.Tensor:
    """P(t), t = 0..T-1, of the official dataset's ``--timestep_sampling`` options."""
    if scheme == "linear":
        p = torch.linspace(1.0, 0.0, T)
    else:  # sigmoid
        p = 1.0 / (1.0 + torch.exp(-20 * (torch.arange(0, T) / T - 0.7)))
    return p / p.sum()
