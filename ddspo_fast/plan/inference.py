"""The pipeline runs of ``prepare`` and ``evaluate``: text encoders, the denoiser with
classifier-free guidance, the VAE decode, each traced without weights like a training
step (``infer_worker.py`` in a subprocess) and combined by where the weights live.

Offloading: ``none`` keeps every component on the GPU; ``model`` (diffusers'
``enable_model_cpu_offload``) keeps one component at a time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from . import margin
from .archs import Arch
from .fresh_process import run_worker_module

GiB = 1 << 30
STAGES = ("text encoders", "denoiser", "vae decode")


@dataclass
class InferSetup:
    denoiser_cls: str
    config: dict
    latent_shape: list
    cond: dict
    components: dict                 # name -> [class, config]
    vae: list                        # [class, config]
    batch: int = 1
    cfg_rows: int = 2                # rows per image through the denoiser (CFG: 2)
    dtype: str = "bf16"
    text_tokens: dict = field(default_factory=dict)   # component -> tokens
    attention: str = "flash"
    granule: int = 512
    family: Optional[str] = None     # the registered family (its timestep dtype)


def _worker(setup: InferSetup) -> dict:
    return run_worker_module("ddspo_fast.plan.infer_worker", asdict(setup), 600,
                             "the planner's traced pipeline run")


@dataclass
class InferenceEstimate:
    arch: Arch
    task: str
    batch: int
    dtype: str
    offload: str
    height: int
    width: int
    traced: dict

    def stages(self) -> dict:
        """stage -> {'weights', 'activations', 'total'} bytes on the GPU at its peak."""
        w = self.traced["weights"]
        out = {}
        for stage in STAGES:
            act = self.traced["activations"][stage]
            if self.offload == "model":
                weights = w[stage]
            else:
                weights = sum(w.values())
            out[stage] = {"weights": weights, "activations": act, "total": weights + act}
        return out

    @property
    def peak(self) -> int:
        return max(s["total"] for s in self.stages().values())

    def to_json(self) -> dict:
        return {"model": self.arch.source, "task": self.task, "batch": self.batch,
                "dtype": self.dtype, "offload": self.offload, "height": self.height,
                "width": self.width, "stages": self.stages(), "peak_bytes": self.peak,
                "weights": self.traced["weights"],
                "reported_bytes": {"allocated": margin.apply(self.peak, "allocated"),
                                   "reserved": margin.apply(self.peak, "reserved")},
                "margin": margin.statement()}


def estimate_inference(arch: Arch, *, task: str = "evaluate", batch: int = 1,
                       height: Optional[int] = None, width: Optional[int] = None,
                       text_tokens: Optional[int] = None, precision: str = "bf16",
                       text_encoders: Optional[str] = None, offload: str = "none",
                       attention: str = "auto") -> InferenceEstimate:
    """Peak GPU memory of one pipeline call of ``batch`` images (prepare generates the
    pairs' latents, evaluate generates images): every component in ``precision`` (text
    encoders in ``text_encoders`` if given)."""
    if offload not in ("none", "model"):
        raise ValueError(f"offload: expected none or model, got {offload!r}")
    dtype = {"bf16-pure": "bf16", "fp16-pure": "fp16"}.get(precision, precision)
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision: expected fp32, bf16 or fp16 for inference, got {precision!r}")
    a = arch.at(height, width, text_tokens)
    tokens = {}
    t5 = a.text_tokens()
    for name, (cls, _) in a.components.items():
        tokens[name] = t5 if cls.startswith(("T5", "Gemma")) else 77
    kernel = attention if attention != "auto" else ("mem-efficient" if dtype == "fp32" else "flash")
    setup = InferSetup(a.denoiser_cls, a.config, list(a.latent_shape),
                       {k: [list(s), d] for k, (s, d) in a.cond.items()},
                       {k: [c, cfg] for k, (c, cfg) in a.components.items()}, list(a.vae),
                       batch=batch, cfg_rows=1 if a.family == "flux" else 2,
                       dtype=text_encoders or dtype, text_tokens=tokens, attention=kernel,
                       family=a.family)
    setup_den_dtype = dtype
    traced = _worker(setup) if (text_encoders or dtype) == dtype else None
    if traced is None:  # text encoders in another dtype: two traces, one per dtype
        traced = _worker(setup)
        other = _worker(InferSetup(**{**asdict(setup), "dtype": setup_den_dtype}))
        for stage in ("denoiser", "vae decode"):
            traced["weights"][stage] = other["weights"][stage]
            traced["activations"][stage] = other["activations"][stage]
    h, w = a.pixels()
    return InferenceEstimate(a, task, batch, dtype, offload, h, w, traced)


def render_inference(est: InferenceEstimate, *, memory=None, memory_label: str = "") -> str:
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    what = ("prepare (generating the pairs' latents)" if est.task == "prepare"
            else "evaluate (generating images)")
    lines = [f"model: {est.arch.source}",
             f"run: {what}, {est.batch} image(s) per pipeline call, {est.width}x{est.height} px, "
             f"{est.dtype} weights, offload {est.offload}", "",
             "estimated accelerator memory of one pipeline call, GiB (traced count):",
             f"{'stage':<14} {'weights':>8} {'activations':>12} {'total':>8}"]
    for name, s in est.stages().items():
        lines.append(f"{name:<14} {g(s['weights']):>8} {g(s['activations']):>12} {g(s['total']):>8}")
    lines += ["", f"peak (count): {g(est.peak)} GiB",
              f"with margin: allocated ~ {g(margin.apply(est.peak, 'allocated'))} GiB, reserved / "
              f"nvidia-smi ~ {g(margin.apply(est.peak, 'reserved'))} GiB", margin.statement()]
    if memory is not None:
        fits = margin.apply(est.peak, "reserved") <= memory
        lines.append(f"fits {memory_label}: {'yes' if fits else 'no'}")
    return "\n".join(lines)
