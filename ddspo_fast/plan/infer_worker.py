"""Trace one pipeline call in this process (see ``inference.py``):
``python -m ddspo_fast.plan.infer_worker`` reads an ``InferSetup`` as JSON on stdin."""
from __future__ import annotations

import json
import sys

import torch

from .step import DTYPES, StepSetup, call, new_denoiser, timestep_dtype
from .tracker import MemoryTracker


def _fake_module(module, fm, dtype):
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                with fm:
                    t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype)
                mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                with fm:
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return module.eval()


def _build(cls_name: str, config: dict):
    with torch.device("meta"):
        if cls_name.startswith(("CLIP", "T5", "Gemma")):
            import transformers

            prefix = next(p for p in ("CLIP", "T5", "Gemma") if cls_name.startswith(p))
            cfg_cls = {"CLIP": transformers.CLIPTextConfig, "T5": transformers.T5Config,
                       "Gemma": transformers.Gemma2Config}[prefix]
            return getattr(transformers, cls_name)(cfg_cls(**config))
        import diffusers

        return getattr(diffusers, cls_name)(**config)


def _weights(module, granule) -> int:
    return sum((p.untyped_storage().nbytes() + granule - 1) // granule * granule
               for p in module.parameters())


def _stage(fm, run, granule, module) -> int:
    """Peak bytes of the tensors a stage creates (its weights are counted apart)."""
    tracker = MemoryTracker(granule)
    tracker.add_module(module)
    base = tracker.current
    with fm, tracker, torch.no_grad():
        out = run()
    del out
    return tracker.peak - base


def measure(s: dict) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .gpu_rules import cuda_autocast_rules, use_attention

    torch.set_num_threads(1)
    cuda_autocast_rules()
    fm = FakeTensorMode()
    dtype, g, b = DTYPES[s["dtype"]], s["granule"], s["batch"]
    weights, acts = {}, {}
    # text encoders: the prompt and (with CFG) the negative prompt
    te_w = te_a = 0
    for name, (cls, cfg) in s["components"].items():
        te = _fake_module(_build(cls, cfg), fm, dtype)
        te_w += _weights(te, g)
        n_tok = s["text_tokens"].get(name, 77)

        def run(te=te, n_tok=n_tok):
            with fm:
                ids = torch.zeros((b * s["cfg_rows"], n_tok), dtype=torch.int64)
            return te(input_ids=ids)
        te_a = max(te_a, _stage(fm, run, g, te))
        del te
    weights["text encoders"], acts["text encoders"] = te_w, te_a
    setup = StepSetup(s["denoiser_cls"], s["config"], s["latent_shape"], s["cond"],
                      attention=s["attention"], precision="fp32")
    den = _fake_module(new_denoiser(setup), fm, dtype)
    use_attention(den, s["attention"])
    weights["denoiser"] = _weights(den, g)
    rows = b * s["cfg_rows"]
    ts_dtype = timestep_dtype(s.get("family"))
    c, h, w = s["latent_shape"]

    def run_den():
        with fm:
            x = torch.zeros((rows, c, h, w), dtype=dtype)
            t = torch.zeros((rows,), dtype=torch.int64 if ts_dtype == torch.int64 else dtype)
            cond = {k: torch.zeros((rows, *shape), dtype=dtype if DTYPES[dt].is_floating_point
                                   else DTYPES[dt]) for k, (shape, dt) in s["cond"].items()}
        return call(den, setup, x, t, cond)
    acts["denoiser"] = _stage(fm, run_den, g, den)
    del den
    vae_cls, vae_cfg = s["vae"]
    vae = _fake_module(_build(vae_cls, vae_cfg), fm, dtype)
    weights["vae decode"] = _weights(vae, g)

    def run_vae():
        with fm:
            z = torch.zeros((b, c, h, w), dtype=dtype)
        return vae.decode(z).sample
    acts["vae decode"] = _stage(fm, run_vae, g, vae)
    return {"weights": weights, "activations": acts}


def main() -> int:
    sys.stdout.write(json.dumps(measure(json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
