"""Score one model, or a run against its base, on the same prompts and seeds.

    import ddspo_fast as df
    res = df.evaluate("ddspo-output", ["a red car", "a cat on a sofa"], "/models/clip-vit-l-14",
                      num_images_per_prompt=4, steps=25, seed=0, out_dir="eval")
    res["clip_score"], res["per_prompt"][0]["clip_score"]

    from ddspo_fast.evaluation import compare
    res = compare("ddspo-output", "/models/sd15", prompts, metrics=["clip", "pickscore"],
                  weights={"clip": "/models/clip-vit-l-14", "pickscore": "/models/PickScore_v1"},
                  out_dir="eval")
    res["metrics"]["pickscore"]["mean_diff"], res["metrics"]["pickscore"]["diff_ci95"]

A model is anything ``sources.resolve`` knows (a pipeline folder, a LoRA run, ...) or a
loaded pipeline. Images are generated with ``generate.generate`` (resumable in a
folder); every scorer loads from the paths given in ``weights`` only.
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path
from typing import Sequence

from ..fsio import atomic_write_json
from . import report as rep
from .generate import check_settings, generate, generation_kwargs, prompts_digest
from .scorers import METRICS, load_scorer
from .sources import family_of, load_pipeline, resolve
from .stats import paired_summary


def _check_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


def _check_common(prompts, num_images_per_prompt, steps, seed, guidance_scale, batch_size):
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a non-empty list of strings")
    _check_int("num_images_per_prompt", num_images_per_prompt)
    _check_int("steps", steps)
    _check_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63 - 10 ** 9:
        raise ValueError(f"seed: expected an int in [0, 2**63 - 1e9), got {seed!r}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                       or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale)
                                       or not 0 <= guidance_scale <= 100):
        raise ValueError(f"guidance_scale: expected a finite number in [0, 100], got {guidance_scale!r}")


def _device(device):
    import torch

    from ..train.runtime import check_device_available

    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
        check_device_available(str(device))
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_output(out, inputs: dict, arg: str = "out_dir") -> Path:
    """``out`` must be a folder (or not exist yet) that is not, is not inside and does not
    contain any of ``inputs`` (argument name -> path)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{arg}: {out} is a file; expected a folder to write the images and "
                         "scores into")
    o = Path(os.path.realpath(out))
    for name, p in inputs.items():
        if p is None or not isinstance(p, (str, os.PathLike)) or not Path(p).exists():
            continue
        i = Path(os.path.realpath(p))
        if o == i or i in o.parents or o in i.parents:
            raise ValueError(f"{arg}: {out} overlaps the input {name} ({p}); write the "
                             "evaluation to a folder outside every input")
    return out


def _per_prompt_means(vals: Sequence[float], n_prompts: int, n: int) -> list[float]:
    return [sum(vals[i * n:(i + 1) * n]) / n for i in range(n_prompts)]


def _generate_for(model, label, prompts, n, *, device, dtype, base_model, steps, seed,
                  guidance_scale, batch_size, out, progress, arg, path_of=None):
    import torch

    pipe = load_pipeline(model, device, base_model=base_model, dtype=dtype, arg=arg)
    extra = generation_kwargs(pipe)
    if guidance_scale is not None:
        extra["guidance_scale"] = float(guidance_scale)
    try:
        return generate(pipe, prompts, n, steps=steps, seed=seed, extra=extra,
                        batch_size=batch_size, out=out, progress=progress, desc=label,
                        path_of=path_of)
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _settings(model, prompts, steps, seed, guidance_scale, dtype) -> dict:
    return {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
            "prompts_sha256": prompts_digest(prompts), "steps": steps, "seed": seed,
            "guidance_scale": guidance_scale, "dtype": dtype}


def evaluate(pipeline_or_dir, prompts: Sequence[str], clip_model_path, *,
             num_images_per_prompt: int = 1, steps: int = 25, seed: int = 0, device=None,
             out_dir=None, guidance_scale: float | None = None, batch_size: int = 4,
             base_model=None, dtype: str | None = None, progress: bool = False) -> dict:
    """Generate ``num_images_per_prompt`` images per prompt and score them with CLIP.

    Image j of prompt i uses seed ``seed + 1000 * i + j``. With ``out_dir`` the images are
    ``{i:04d}_{j}.png`` there (kept and reused by a rerun with the same settings) and the
    result is ``scores.json``. ``base_model``: the base pipeline of a LoRA output dir
    (default: its train_config.yaml). ``dtype``: fp32 / fp16 / bf16 (default fp16 on CUDA).

    Returns ``{"clip_score", "per_prompt": [{"prompt", "clip_score", "scores", "cosines",
    "images"}], "num_images", "steps", "seed", "clip_model"}``.
    """
    from .scorers.clip import ClipScore

    _check_common(prompts, num_images_per_prompt, steps, seed, guidance_scale, batch_size)
    prompts = list(prompts)
    device = _device(device)
    out = None
    if out_dir is not None:
        out = check_output(out_dir, {"pipeline_or_dir": pipeline_or_dir, "clip_model_path": clip_model_path,
                                     "base_model": base_model})
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        resolve(pipeline_or_dir, base_model)  # a bad path fails before any loading
    try:
        clip = ClipScore(clip_model_path, device)
    except ValueError as e:  # the scorer names itself "clip"; this API's argument differs
        raise ValueError(str(e).replace("clip: ", "clip_model_path: ", 1)) from e
    if out is not None:
        check_settings(out, _settings(pipeline_or_dir, prompts, steps, seed, guidance_scale, dtype))
    images = _generate_for(pipeline_or_dir, "generate", prompts, num_images_per_prompt,
                           device=device, dtype=dtype, base_model=base_model, steps=steps,
                           seed=seed, guidance_scale=guidance_scale, batch_size=batch_size,
                           out=out, progress=progress, arg="pipeline_or_dir")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images_per_prompt)]
    cosines = clip.cosines([images[k] for k in jobs], [prompts[i] for i, _ in jobs])
    by_key = dict(zip(jobs, cosines))
    per_prompt = []
    for i, p in enumerate(prompts):
        cos = [by_key[(i, j)] for j in range(num_images_per_prompt)]
        s = [100.0 * max(c, 0.0) for c in cos]
        paths = [str(out / f"{i:04d}_{j}.png") for j in range(num_images_per_prompt)] if out else []
        per_prompt.append({"prompt": p, "clip_score": sum(s) / len(s), "scores": s,
                           "cosines": cos, "images": paths})
    result = {"clip_score": sum(r["clip_score"] for r in per_prompt) / len(per_prompt),
              "per_prompt": per_prompt, "num_images": len(jobs), "steps": steps, "seed": seed,
              "clip_model": str(clip_model_path)}
    if out is not None:
        atomic_write_json(out / "scores.json", result, sort_keys=False)
    return result


def _run_dir(model) -> Path | None:
    """Where a run's metrics.jsonl is (the run folder, or the run of a checkpoint)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    p = Path(model)
    for d in (p, p.parent.parent):
        if (d / "metrics.jsonl").is_file():
            return d
    return None


def compare(run, against, prompts: Sequence[str], *, metrics: Sequence[str] = ("clip",),
            weights: dict, out_dir, num_images_per_prompt: int = 1, steps: int = 25,
            seed: int = 0, guidance_scale: float | None = None, batch_size: int = 4,
            device=None, dtype: str | None = None, base_model=None,
            against_base_model=None, progress: bool = False, resamples: int = 10_000,
            update_card: bool = True, fid_reference=None) -> dict:
    """``run`` against ``against`` (its base, or another run): the same prompts and seeds,
    each metric's per-prompt scores for both, and per metric the means, the mean difference
    with a bootstrap 95% interval and the win rate with its interval (``stats``).

    Writes into ``out_dir``: ``run/`` and ``base/`` images (a rerun generates only the
    missing ones), ``scores.json``, ``scores.csv``, ``report.md``, ``grid.png`` and, when
    the run has a ``metrics.jsonl``, ``curves.png``. With ``update_card`` a model card
    (README.md with ddspo-fast metadata) in ``run`` gets the score table and the grid.
    With ``fid_reference`` (a folder of reference images) each model's image set also gets
    its FID against it (``weights["fid"]``: the Inception weights file).
    """
    _check_common(prompts, num_images_per_prompt, steps, seed, guidance_scale, batch_size)
    prompts = list(prompts)
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ValueError("metrics: expected at least one of " + ", ".join(METRICS))
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"metrics: unknown metric {m!r}; expected some of {', '.join(METRICS)}")
    device = _device(device)
    out = check_output(out_dir, {"run": run, "against": against, "base_model": base_model,
                                 "against_base_model": against_base_model,
                                 "fid_reference": fid_reference,
                                 **{k: v for k, v in weights.items()}})
    srcs = {}
    for arg, model, base in (("run", run, base_model), ("against", against, against_base_model)):
        if isinstance(model, (str, os.PathLike)):
            srcs[arg] = resolve(model, base, arg)
    if len(srcs) == 2:
        fr, fa = family_of(srcs["run"]), family_of(srcs["against"])
        if fr and fa and fr != fa:
            raise ValueError(f"against: {against} is a {fa} model but {run} is {fr}; compare "
                             "models of one family")
    scorers = {m: load_scorer(m, weights, device) for m in metrics}  # fail before generating
    fid = None
    if fid_reference is not None:
        from .scorers.fid import FID

        fid = FID(weights.get("fid"), fid_reference, device)

    images = {}
    for label, arg, model, base in (("run", "run", run, base_model),
                                    ("base", "against", against, against_base_model)):
        folder = out / label
        check_settings(folder, _settings(model, prompts, steps, seed, guidance_scale, dtype),
                       arg="out_dir")
        images[label] = _generate_for(model, label, prompts, num_images_per_prompt,
                                      device=device, dtype=dtype, base_model=base, steps=steps,
                                      seed=seed, guidance_scale=guidance_scale,
                                      batch_size=batch_size, out=folder, progress=progress,
                                      arg=arg)

    n, k = num_images_per_prompt, len(prompts)
    jobs = [(i, j) for i in range(k) for j in range(n)]
    texts = [prompts[i] for i, _ in jobs]
    per_image = {}
    for m, sc in scorers.items():
        per_image[m] = {side: sc.score([images[side][key] for key in jobs], texts)
                        for side in ("run", "base")}
    summary, per_prompt = {}, []
    means = {m: {side: _per_prompt_means(v, k, n) for side, v in sides.items()}
             for m, sides in per_image.items()}
    for m, sc in scorers.items():
        summary[m] = paired_summary(means[m]["run"], means[m]["base"],
                                    higher_is_better=sc.higher_is_better, resamples=resamples,
                                    seed=seed)
    for i, p in enumerate(prompts):
        per_prompt.append({
            "index": i, "prompt": p,
            "images": {side: [f"{side}/{i:04d}_{j}.png" for j in range(n)] for side in ("run", "base")},
            "scores": {m: {side: means[m][side][i] for side in ("run", "base")} for m in metrics},
            "per_image": {m: {side: per_image[m][side][i * n:(i + 1) * n] for side in ("run", "base")}
                          for m in metrics}})
    result = {"run": str(run), "against": str(against), "metrics": summary,
              "per_prompt": per_prompt,
              "settings": {"num_images_per_prompt": n, "steps": steps, "seed": seed,
                           "guidance_scale": guidance_scale, "dtype": dtype,
                           "device": str(device), "prompts": k,
                           "weights": {m: str(weights.get(m)) for m in weights}},
              "files": {}}
    if fid is not None:
        all_images = {side: [images[side][key] for key in jobs] for side in ("run", "base")}
        f_run, f_base = fid.score_set(all_images["run"]), fid.score_set(all_images["base"])
        result["fid"] = {"run": f_run, "base": f_base, "diff": f_run - f_base,
                         "reference": str(fid_reference),
                         "reference_images": fid.reference_images, "higher_is_better": False}
    rep.write_csv(out / "scores.csv", result)
    rep.write_grid(out / "grid.png", result, images, metrics)
    result["files"] = {"scores": "scores.json", "csv": "scores.csv", "report": "report.md",
                       "grid": "grid.png"}
    run_dir = _run_dir(run)
    if run_dir is not None and rep.write_curves(out / "curves.png", run_dir / "metrics.jsonl"):
        result["files"]["curves"] = "curves.png"
    rep.write_report(out / "report.md", result, grid="grid.png",
                     curves=result["files"].get("curves"))
    atomic_write_json(out / "scores.json", result, sort_keys=False)
    if update_card and isinstance(run, (str, os.PathLike)):
        from .model_card import add_evaluation

        card = add_evaluation(Path(run), result, out / "grid.png")
        if card is not None:
            result["files"]["card"] = str(card)
    return result


def render_benchmark(model, fmt: str, prompts_file, out_dir, *, num_images_per_prompt: int = 4,
                     steps: int = 25, seed: int = 0, guidance_scale: float | None = None,
                     batch_size: int = 4, device=None, dtype: str | None = None,
                     base_model=None, progress: bool = False) -> dict:
    """Generate the images of a benchmark's prompt file into ``out_dir`` in the layout its
    scorer reads (``formats``): GenEval from its evaluation_metadata.jsonl, T2I-CompBench
    from one of its prompt .txt files. Resumable like ``evaluate``."""
    from ..data.degrade import prompt_texts
    from . import formats

    if fmt not in formats.FORMATS:
        raise ValueError(f"format: expected one of {', '.join(formats.FORMATS)}, got {fmt!r}")
    out = check_output(out_dir, {"pipeline_or_dir": model, "prompts": prompts_file,
                                 "base_model": base_model})
    if fmt == "geneval":
        records = formats.read_geneval_metadata(prompts_file)
        prompts = [r["prompt"] for r in records]
    else:
        prompts = prompt_texts(prompts_file)
    _check_common(prompts, num_images_per_prompt, steps, seed, guidance_scale, batch_size)
    device = _device(device)
    if isinstance(model, (str, os.PathLike)):
        resolve(model, base_model)
    path_of = formats.t2i_compbench_paths(out, prompts, num_images_per_prompt) if fmt != "geneval" else None
    check_settings(out, {**_settings(model, prompts, steps, seed, guidance_scale, dtype),
                         "format": fmt}, name=".ddspo-fast-generation.json")
    if fmt == "geneval":
        path_of = formats.geneval_paths(out, records)
    _generate_for(model, fmt, prompts, num_images_per_prompt, device=device, dtype=dtype,
                  base_model=base_model, steps=steps, seed=seed, guidance_scale=guidance_scale,
                  batch_size=batch_size, out=out, progress=progress, arg="pipeline_or_dir",
                  path_of=path_of)
    return {"format": fmt, "out": str(out), "prompts": len(prompts),
            "num_images": len(prompts) * num_images_per_prompt}
