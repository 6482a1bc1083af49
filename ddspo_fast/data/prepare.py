"""Generate a preference-pair dataset from degraded prompts (the paper's self-play data).

For each record ``{"id", "prompt", "neg_prompts": [...]}`` (as written by ``degrade``):
the preferred latent is sampled from the original prompt and the dispreferred one from
one degraded prompt, both from the same seed (same initial noise), with the family's
default sampler; the text embeddings of both prompts (cond for c, neg_cond for c-) are
stored with the latents through ``PairWriter``.

What a resumed (or multi-process) dataset promises against one uninterrupted run: the
same pairs (ids, prompts, chosen degraded prompt, sampling seed), since these depend only
on ``(seed, id)``; and the same latents and embeddings up to floating-point summation
order. Bit-identical tensors are not promised: a resumed run groups the remaining pairs
into other batches, and a different thread count (or GPU) sums in another order, so the
fp32 results differ in their last bits and, stored in fp16, by at most about one unit in
the last place of the stored dtype (tests/test_prepare.py checks exactly this).

A pair whose prompt and degraded prompt encode to the same condition (the change lies past
the text encoder's token limit) teaches nothing and is left out, with a warning; run
``degrade --model`` so degradations stay inside the encoder's window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..fsio import iter_jsonl
from .parallel import (Problem, Produced, fill_dataset, process_device,
                       store_dtype as _store_dtype, to_store)
from .validate import same_condition_problem

log = logging.getLogger(__name__)


def stable_int(*parts) -> int:
    """A 31-bit int fixed by ``parts`` alone (sha256 of their text): the same on every
    machine and Python, unlike ``hash``."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def sample_seed(seed: int, pair_id: str) -> int:
    """The sampling seed of one pair (shared by its preferred and dispreferred latents)."""
    return stable_int("seed", seed, pair_id)


def choose_negative(seed: int, pair_id: str, neg_prompts: Sequence[str]) -> str:
    return neg_prompts[stable_int("neg", seed, pair_id) % len(neg_prompts)]


def _run_degrade_first(path: Path, what: str) -> ValueError:
    return ValueError(f"prompts: {path} {what}; prepare reads degraded prompts "
                      "({'id', 'prompt', 'neg_prompts': [...]} per line): run "
                      f"'ddspo-fast degrade {path} --out degraded.jsonl' first and pass that file")


def load_prompt_records(prompts) -> list[dict]:
    """Read and check degraded-prompt records from a JSONL path or a list of dicts."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts: {path} is not a file (expected a degraded-prompts JSONL)")
        if path.suffix.lower() == ".txt":
            raise _run_degrade_first(path, "is a plain prompts file")
        recs, lines = [], []
        for lineno, _raw, obj in iter_jsonl(path):
            if isinstance(obj, json.JSONDecodeError):
                if not recs:  # a first line that is no JSON at all: plain prompts
                    raise _run_degrade_first(path, f"line {lineno} is not JSON")
                raise ValueError(f"prompts: {path} line {lineno} is not JSON ({obj.msg})")
            if isinstance(obj, Exception):
                raise ValueError(f"prompts: {path} line {lineno}: {obj}")
            if (not recs and isinstance(obj, dict) and "prompt" in obj
                    and "neg_prompts" not in obj and "neg_prompt" not in obj):
                raise _run_degrade_first(path, f"line {lineno} has a 'prompt' but no 'neg_prompts'")
            recs.append(obj)
            lines.append(lineno)
        where = lambda i: f"{path} line {lines[i]}"  # noqa: E731
    elif isinstance(prompts, Iterable) and not isinstance(prompts, (str, bytes, dict)):
        recs = list(prompts)
        where = lambda i: f"record {i}"  # noqa: E731
    else:
        raise ValueError("prompts: expected a JSONL path or a list of "
                         "{'id', 'prompt', 'neg_prompts'} dicts")
    out, seen = [], set()
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise ValueError(f"prompts: {where(i)} is not an object")
        rid = r.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            raise ValueError(f"prompts: {where(i)} has no usable 'id'")
        rid = str(rid)
        if rid in seen:
            raise ValueError(f"prompts: {where(i)} repeats id {rid!r}")
        seen.add(rid)
        p = r.get("prompt")
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: {where(i)} (id {rid!r}) has no 'prompt' string")
        negs = r.get("neg_prompts")
        if negs is None and isinstance(r.get("neg_prompt"), str):
            negs = [r["neg_prompt"]]
        if not isinstance(negs, list) or not negs or not all(
                isinstance(n, str) and n.strip() for n in negs):
            raise ValueError(f"prompts: {where(i)} (id {rid!r}) needs 'neg_prompts': a non-empty "
                             "list of strings")
        out.append({"id": rid, "prompt": p, "neg_prompts": list(negs), "where": where(i)})
    if not out:
        raise ValueError("prompts: no records")
    return out


def check_dataset_out(out, **inputs) -> None:
    """Refuse a dataset directory that is a file, or that is, contains or sits inside an
    input (``inputs``: name -> path; a non-path value, e.g. a list of records, is skipped),
    before anything is locked or written."""
    from ..fsio import check_output_apart

    check_output_apart(out, "out", [(k, v) for k, v in inputs.items()
                                    if isinstance(v, (str, os.PathLike))])
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out: {out} exists and is not a directory (expected a dataset directory)")


def _generate_batch(adapter, recs: list[dict], seed: int, steps, cfg, store) -> Produced:
    negs = [choose_negative(seed, r["id"], r["neg_prompts"]) for r in recs]
    n = len(recs)
    # Encode first: a pair the text encoder cannot tell apart is not worth sampling.
    cond = adapter.encode_prompts([r["prompt"] for r in recs] + negs)
    out = Produced()
    keep = []
    for i, r in enumerate(recs):
        c = {k: to_store(v[i], store) for k, v in cond.items()}
        nc = {k: to_store(v[n + i], store) for k, v in cond.items()}
        reason = same_condition_problem(c, nc)
        if reason is not None:
            out.problems.append(Problem(r.get("where", f"record {r['id']}"), r["id"],
                                        f"{reason}; degraded prompt {negs[i]!r}"))
            continue
        keep.append((r, negs[i], c, nc))
    if not keep:
        return out
    prompts = [k[0]["prompt"] for k in keep]
    kept_negs = [k[1] for k in keep]
    seeds = [sample_seed(seed, k[0]["id"]) for k in keep]
    # One pipeline call on [c ; c-] with each pair's seed twice: same initial noise.
    lat = adapter.generate_latents(prompts + kept_negs, seeds + seeds, steps=steps, cfg=cfg)
    m = len(keep)
    for i, (r, neg, c, nc) in enumerate(keep):
        out.rows.append({"id": r["id"], "prompt": r["prompt"], "neg_prompt": neg, "seed": seeds[i],
                         "latent_w": to_store(lat[i], store), "latent_l": to_store(lat[m + i], store),
                         "cond": c, "neg_cond": nc})
    return out


def prepare_dataset(model, prompts, out, *, steps: int | None = None, cfg: float | None = None,
                    batch_size: int = 4, seed: int = 0, family: str | None = None,
                    device=None, progress: bool = True, dtype: torch.dtype | None = None,
                    store_dtype: str = "float16", shard_size: int = 64,
                    on_batch: Callable[[int], None] | None = None) -> str:
    """Sample preferred / dispreferred latents for degraded prompts into a pair dataset.

    Args:
        model: local diffusers pipeline dir or hub id.
        prompts: degraded-prompts JSONL path or list of ``{"id", "prompt", "neg_prompts"}``.
        out: dataset directory (created; an existing one is resumed: ids already written
            are skipped, so a killed run continues where it stopped).
        steps, cfg: sampling steps and guidance scale (default: the family's: SD1.x 25 /
            7.5, SDXL Euler 25 / 5.0, SD3 and SD3.5 25 / 5.0, SANA 20 / 4.5, FLUX.1 [dev]
            28 / 3.5, FLUX.1 [schnell] 4 / 0).
        batch_size: pairs per pipeline call (each call samples 2 * batch_size images).
        seed: base seed; each pair's seed and degraded prompt derive from (seed, id).
        family: model family (detected from the model when None).
        device: default accelerate's device for this process (cuda:LOCAL_RANK or cpu).
        dtype: pipeline dtype (default fp16 on CUDA, fp32 elsewhere).
        store_dtype: dtype latents and embeddings are stored in.
        on_batch: called with the number of pairs written so far after each write.

    Multi-GPU: ``accelerate launch`` splits the batches across processes; the main
    process does all the writing. Returns ``str(out)``.
    """
    from ..models import detect_family, load_adapter
    from . import PairWriter
    from .provenance import INFO_KEY, encoder_fingerprint

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps: expected None or an int >= 1, got {steps!r}")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float))
                            or not math.isfinite(cfg) or cfg < 0):
        raise ValueError(f"cfg: expected None or a finite number >= 0, got {cfg!r}")
    store = _store_dtype(store_dtype)
    if out is None or str(out) == "":
        raise ValueError("out: expected an output directory")
    check_dataset_out(out, model=model, prompts=prompts)
    records = load_prompt_records(prompts)
    state, dev = process_device(device)
    fam = family or detect_family(str(model))
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    adapter = load_adapter(str(model), fam, components=("denoiser", "text"), device=dev,
                           dtype=dtype)
    adapter.pipe.set_progress_bar_config(disable=True)
    encoders = encoder_fingerprint(model, fam)  # what made the stored embeddings
    steps_used = int(steps or adapter.default_steps)
    cfg_used = float(adapter.default_cfg if cfg is None else cfg)

    def open_writer():
        return PairWriter(str(out), family=fam, model=str(model), shard_size=shard_size,
                          info={"steps": steps_used, "cfg": cfg_used, "seed": seed,
                                INFO_KEY: encoders})

    def report(p: Problem) -> None:
        log.warning("prepare: left out %s", p)

    fill_dataset(state, open_writer, records,
                 lambda recs: _generate_batch(adapter, recs, seed, steps_used, cfg_used, store),
                 batch_size=batch_size, desc="prepare", progress=progress, on_batch=on_batch,
                 on_problem=report)
    return str(out)
