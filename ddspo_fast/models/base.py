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

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from .quiet import cast_module, quiet_loading
from .schedule import (DDPM_TIMESTEP_SCHEMES, FLOW_TIMESTEP_SCHEMES, DDPMSchedule,
                       DynamicFlowSchedule, FlowSchedule, NoiseSchedule, from_scheduler_config)
from .vae_norm import ChannelStats, ScaleShift

Cond = dict  # {key: Tensor (n, ...)}

COMPONENTS = ("denoiser", "text", "vae")


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
    # The denoiser's repeated blocks (class names): the units a sharded run wraps (FSDP).
    wrap_blocks: ClassVar[tuple[str, ...]] = ()
    # The memory format the denoiser runs in when the run allows it (``channels_last``:
    # UNets' convolutions); None = as loaded.
    denoiser_memory_format: ClassVar[Optional[torch.memory_format]] = None
    # What each axis of one stored latent is (``latent_shape()``), for messages.
    latent_axes: ClassVar[tuple[str, ...]] = ("channels", "height", "width")
    # Scheduler-config keys the family's training script overrides when it builds its
    # training scheduler (Qwen-Image: shift=3.0).
    train_scheduler_overrides: ClassVar[dict] = {}
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
            raise TypeError(f"{cls.__name__} (family {cls.name!r}): a flow-matching family "
                            "must define dpo_target(x0, noise, timesteps), the target in the "
                            "space its predict returns (velocity noise - x0, x0, ...)")

    def __init__(self, pipe, model: str, *, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.model = str(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self._init_schedule(dict(pipe.scheduler.config))
        self.num_train_timesteps = self.schedule.num_train_timesteps

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
            pipe = cls.pipeline_type().from_pretrained(str(model), **skip)
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
    def pipeline_type(cls):
        """The class whose ``from_pretrained`` loads this family's pipelines: diffusers'
        ``DiffusionPipeline`` (which picks the class model_index.json names), or a
        family's own pipeline class where diffusers has none."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline

    @classmethod
    def lora_pipeline_class(cls):
        """The pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` know
        this family's denoiser prefix (diffusers' class of ``pipeline_classes[0]``, or
        ``pipeline_type()`` where that is the family's own)."""
        import diffusers

        own = cls.pipeline_type()
        if own is not diffusers.DiffusionPipeline:
            return own
        return getattr(diffusers, cls.pipeline_classes[0])

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
        """Shape of one native-resolution latent as datasets store it, axes named by
        ``latent_axes``: (C, H, W) from the denoiser config's ``in_channels`` and
        ``sample_size`` here; a family with another layout (FLUX's packed channels and no
        sample size, Qwen-Image's frames) overrides this."""
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
    @classmethod
    def wrap_units(cls, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's modules of a ``wrap_blocks`` class, outermost first: what a
        sharded run wraps one by one (a unit nested in another is not listed twice)."""
        units: list[torch.nn.Module] = []
        inside: set[int] = set()
        for m in denoiser.modules():
            if id(m) in inside or type(m).__name__ not in cls.wrap_blocks:
                continue
            units.append(m)
            inside.update(id(sub) for sub in m.modules())
        return units

    @classmethod
    def memory_format(cls, channels_last: bool = True) -> Optional[torch.memory_format]:
        """The memory format the denoiser and its inputs take in a run: the family's
        ``denoiser_memory_format`` where the run allows it (``channels_last``), else None
        (as loaded)."""
        return cls.denoiser_memory_format if channels_last else None

    def prepare_denoiser(self, denoiser: torch.nn.Module, *, channels_last: bool = False) -> None:
        """Set ``denoiser`` up for this family's calls (its memory format, when allowed)."""
        fmt = self.memory_format(channels_last)
        if fmt is not None:
            denoiser.to(memory_format=fmt)

    def prepare_input(self, x: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        """Latents in the memory format ``prepare_denoiser`` chose for the denoiser."""
        fmt = self.memory_format(channels_last)
        return x if fmt is None else x.contiguous(memory_format=fmt)

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
    def vae_normalisation(self):
        """The map between VAE latents and the denoiser's space (``vae_norm.py``): the VAE
        config's per-channel ``latents_mean`` / ``latents_std`` where it has both (as
        diffusers' pipelines apply them), else its scaling and shift factors."""
        if self.vae_latents_stats is not None:
            return ChannelStats(*self.vae_latents_stats, scale=self.vae_scaling_factor)
        return ScaleShift(self.vae_scaling_factor, self.vae_shift_factor)

    @property
    def channel_axis(self) -> int:
        """The channel axis of a batch of stored latents (from ``latent_axes``)."""
        return 1 + self.latent_axes.index("channels")

    def vae_layout(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's latents -> the stored layout (FLUX.2: 2x2 patchified)."""
        return z

    def vae_unlayout(self, x: torch.Tensor) -> torch.Tensor:
        """The stored layout -> the VAE decoder's latent layout."""
        return x

    def vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE encoder output -> the denoiser's latent space (stored layout)."""
        return self.vae_normalisation().to_latents(self.vae_layout(z), self.channel_axis)

    def latents_to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's latent space -> what the VAE decoder takes."""
        return self.vae_unlayout(self.vae_normalisation().to_vae(x, self.channel_axis))

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
        self.schedule = from_scheduler_config(sched_cfg, flow=self.flow,
                                              overrides=self.train_scheduler_overrides)
        self._shifted: dict = {}
        if not self.flow:
            self.prediction_type = self.schedule.prediction_type

    def schedule_for(self, shift: Optional[float] = None) -> NoiseSchedule:
        """The schedule training draws from: the model's own (``schedule``), or for a flow
        family with ``shift`` given, its table with that static shift."""
        if shift is None:
            return self.schedule
        if not self.flow:
            raise ValueError(f"shift: {self.name} is not a flow-matching family (a timestep "
                             "shift applies to flow-matching families only)")
        s = self._shifted.get(float(shift))
        if s is None:
            s = self._shifted[float(shift)] = self.schedule.with_shift(shift)
        return s

    def noise_schedule(self, shift: Optional[float] = None) -> dict:
        """The noise-schedule strategy training uses, described (``schedule.py``).

        ``{"kind": "ddpm"}``; ``{"kind": "flow_static", "shift": s}`` (the training table
        shifted by s: SD3 3.0, SANA 1.0, or ``shift``); ``{"kind": "flow_dynamic", ...}``
        for schedulers with ``use_dynamic_shifting`` (FLUX): the sampler shifts sigmas by
        the image's token count (``dynamic_shift_mu``), while training draws from the
        unshifted table, as diffusers' DreamBooth scripts do. A ``shift`` given for a
        dynamic-shift model trains on the static shift instead."""
        return self.schedule_for(shift).describe()

    def dynamic_shift_mu(self, image_seq_len: int) -> float:
        """The sampler's shift mu for ``image_seq_len`` image tokens (dynamic-shift
        schedulers), from the scheduler config with diffusers' defaults."""
        if not isinstance(self.schedule, DynamicFlowSchedule):
            raise ValueError(f"{self.name}: the scheduler does not shift by sequence length")
        return self.schedule.mu(image_seq_len)

    def _table(self, device) -> torch.Tensor:
        """alphas_cumprod of a DDPM family on ``device``."""
        return self.schedule.alphas_cumprod(device)

    @classmethod
    def timestep_schemes(cls) -> tuple[str, ...]:
        """The values ``sample_timesteps(scheme=...)`` accepts for this family."""
        return FLOW_TIMESTEP_SCHEMES if cls.flow else DDPM_TIMESTEP_SCHEMES

    @classmethod
    def timestep_dtype(cls) -> torch.dtype:
        """The dtype of the timesteps the denoiser takes: int64 for DDPM, float32 (sigma
        * T) for flow matching, as the schedule strategy of the family draws them."""
        return (FlowSchedule if cls.flow else DDPMSchedule).timestep_dtype

    def sample_timesteps(self, n: int, *, device, generator: torch.Generator | None = None,
                         scheme: Optional[str] = None, logit_mean: float = 0.0,
                         logit_std: float = 1.0, mode_scale: float = 1.29,
                         shift: Optional[float] = None) -> torch.Tensor:
        """``n`` training timesteps in the denoiser's convention.

        ``scheme``: one of ``timestep_schemes()``; None = the family's official default
        (``timestep_sampling``: uniform for SD1.x, SDXL and SANA, logit_normal for SD3).
        ``logit_mean`` / ``logit_std`` (logit_normal) and ``mode_scale`` (mode) are the
        official scripts' defaults. Flow families only: ``shift`` replaces the training
        scheduler's shift (None = the model's own schedule).
        DDPM families return int64 in 0..T-1; flow families ``sigma * T`` floats.
        """
        scheme = self.timestep_sampling if scheme is None else scheme
        if scheme not in self.timestep_schemes():
            raise ValueError(f"timestep_sampling: expected one of {self.timestep_schemes()} "
                             f"for {self.name}, got {scheme!r}")
        return self.schedule_for(shift).sample(n, device=device, generator=generator,
                                               scheme=scheme, logit_mean=logit_mean,
                                               logit_std=logit_std, mode_scale=mode_scale)

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Timesteps -> [0, 1], 1 = pure noise (sigma for flow, t/(T-1) for DDPM)."""
        return self.schedule.noise_level(timesteps)

    def _bcast(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return self.schedule.add_noise(x0, noise, timesteps)

    def dpo_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """Diffusion-DPO regression target in ``predict``'s output space (DDPM families:
        epsilon or v from the scheduler's prediction_type; flow families define theirs)."""
        return self.schedule.target(x0, noise, timesteps)

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
    def describe_latents(self, shape: Sequence[int]) -> str:
        """``shape`` with the family's axis names: "[4, 64, 64] (channels, height, width)"."""
        return f"{list(shape)} ({', '.join(self.latent_axes)})"

    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: str) -> None:
        """Save a complete pipeline with ``denoiser`` swapped in (other parts from disk)."""
        with quiet_loading():
            pipe = self.pipeline_type().from_pretrained(self.model,
                                                        **{self.denoiser_name: denoiser})
            pipe.save_pretrained(out_dir, safe_serialization=True)

    def save_lora(self, lora_state: Mapping[str, torch.Tensor], out_dir: str) -> None:
        """Save LoRA layers (peft keys) loadable with ``pipeline.load_lora_weights``."""
        cls = type(self.pipe)
        cls.save_lora_weights(out_dir, **{f"{self.denoiser_name}_lora_layers": dict(lora_state)},
                              safe_serialization=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model={self.model!r}>"
