"""Encode an existing image-pair preference dataset (the Diffusion-DPO workflow) into the
library's packed pair dataset, trainable unchanged.

    from ddspo_fast.data.encode import encode_pairs
    result = encode_pairs("/models/sd15", "pickapic_v2_train-00000.parquet", "/data/pap")
    print(result.summary())

Sources are read by :mod:`.pair_sources` (JSONL of image paths, or Pick-a-Pic v2 Parquet),
images preprocessed and VAE-encoded by :mod:`.images`, prompts encoded by the family
adapter exactly as ``prepare`` stores them, and everything written through ``PairWriter``
by :func:`.parallel.fill_dataset`: resumable after a kill (ids already written are
skipped), several processes with ``accelerate launch``, one writer, atomic shards, a lock
on the output directory.

Pairs come with no degraded prompt unless the JSONL gives one (``neg_prompt``) or
``degrade`` names a method: Diffusion-DPO needs none, DDSPO with the reference policy
pair (TF-CPP) needs c-, so pass ``degrade="random"`` (or ``"structural"``) for DDSPO.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .parallel import (Problem, Produced, fill_dataset, process_device,
                       store_dtype as _store_dtype, to_store)
from .validate import same_condition_problem

log = logging.getLogger(__name__)

ON_BAD = ("skip", "fail")


@dataclass
class EncodeResult:
    """``pairs``: pairs in the dataset now (earlier runs included); ``encoded``: pairs this
    call wrote; ``problems``: inputs left out (file and line/row, id, reason);
    ``ties_dropped``: Pick-a-Pic ties left out by ``ties="drop"``."""

    out: str
    pairs: int = 0
    encoded: int = 0
    problems: List[Problem] = field(default_factory=list)
    ties_dropped: int = 0

    def summary(self) -> str:
        s = f"encoded {self.encoded} pairs ({self.pairs} in {self.out})"
        if self.ties_dropped:
            s += f"; dropped {self.ties_dropped} ties"
        if self.problems:
            s += f"; left out {len(self.problems)} bad pairs"
        return s


def _pair_seed(seed: int, pair_id: str, side: str) -> int:
    from .prepare import stable_int

    return stable_int("vae", seed, pair_id, side)


def _resolution(value, adapter) -> Tuple[int, int]:
    from .images import family_resolution

    if value is None:
        return family_resolution(adapter)
    if isinstance(value, int) and not isinstance(value, bool):
        hw = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        hw = tuple(value)
    else:
        raise ValueError(f"resolution: expected an int or (height, width), got {value!r}")
    f = adapter.pixel_multiple
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % f == 0 for v in hw):
        raise ValueError(f"resolution: expected positive multiples of {f} (the VAE's downsampling "
                         f"factor{' x the 2x2 packing' if f != adapter.vae_scale_factor else ''}), "
                         f"got {value!r}")
    nh, nw = family_resolution(adapter)
    if hw[0] > MAX_SCALE * nh or hw[1] > MAX_SCALE * nw:
        raise ValueError(f"resolution: {hw[0]}x{hw[1]} is beyond what this model can use: at most "
                         f"{MAX_SCALE}x its native {nh}x{nw} per side ({MAX_SCALE * nh}x"
                         f"{MAX_SCALE * nw})")
    return int(hw[0]), int(hw[1])


#: the largest resolution, per side, as a multiple of the family's native one: the
#: denoisers are trained at their native size, and beyond twice it a latent is no longer
#: what they have seen (and the VAE's memory grows with the square of the area).
MAX_SCALE = 2
#: margin applied to the VAE activation estimate (see vae_memory_estimate)
ESTIMATE_MARGIN = 2.0


def vae_memory_estimate(adapter, size: Tuple[int, int], images: int, dtype: torch.dtype) -> int:
    """An estimate (not a measurement; within about ``ESTIMATE_MARGIN`` x, on the high
    side by design) of the bytes the VAE encoder needs for ``images`` images of ``size``
    pixels: its full-resolution activations (first block's channels, a few live at once)
    plus its mid-block self-attention over the latent grid, which the CPU's math path
    holds as a full (h*w)^2 matrix. Checked against the measured peak of an SD1.x VAE on
    the CPU (benchmarks/vae_memory.py, benchmarks/results/vae-memory-cpu.json: 1.5x and
    1.8x the measurement at 256 and 512 pixels); on a GPU, whose attention kernels do not
    hold that matrix, it is higher still."""
    cfg = getattr(getattr(adapter.pipe, "vae", None), "config", {}) or {}
    blocks = cfg.get("block_out_channels") or [128]
    ch = int(blocks[0])
    es = torch.finfo(dtype).bits // 8
    h, w = size
    f = adapter.vae_scale_factor
    tokens = (h // f) * (w // f)
    per_image = 4 * h * w * ch * es + tokens * tokens * es
    return int(images * per_image * ESTIMATE_MARGIN)


def _available_bytes(device: torch.device) -> Optional[int]:
    import os

    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no estimate possible: do not refuse
            return None
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_vae_memory(adapter, size, batch_size: int, device, dtype) -> None:
    """Refuse, before allocating, a batch whose estimated VAE memory exceeds what the
    device has free, naming resolution and batch_size."""
    device = torch.device(device)
    need = vae_memory_estimate(adapter, size, 2 * batch_size, dtype)
    free = _available_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"resolution: {size[0]}x{size[1]} with batch_size {batch_size} needs an "
                         f"estimated {need / 2**30:.1f} GiB for the VAE (an estimate, up to "
                         f"{ESTIMATE_MARGIN:g}x high), {free / 2**30:.1f} GiB free on {device}; "
                         f"lower --resolution or --batch-size")


def _degraded(pairs: List[dict], method: Optional[str], seed: int, window) -> List[Problem]:
    """Fill ``neg_prompt`` of pairs without one by degrading the prompt; problems for
    prompts that cannot be degraded (those pairs are removed from ``pairs``)."""
    from .degrade import CannotDegrade, degrade_prompt

    problems, kept = [], []
    for p in pairs:
        if p["neg_prompt"] is None and method is not None:
            try:
                p["neg_prompt"] = degrade_prompt(p["prompt"], method=method, variants=1, seed=seed,
                                                 window=window)[0]
            except CannotDegrade as e:
                problems.append(Problem(p["where"], p["id"], f"cannot degrade the prompt: {e}"))
                continue
        kept.append(p)
    pairs[:] = kept
    return problems


def _encode_batch(adapter, images, batch: List[dict], *, size, mode: str, seed: int, store,
                  with_neg: bool) -> Produced:
    from .images import BadImage, image_pixels, vae_encode

    out = Produced()
    good, pixels = [], []
    for pair in batch:
        pix = []
        for side in ("image_w", "image_l"):
            src = pair[side]
            label = f"{side} {src}" if isinstance(src, str) else f"{src[3]}"
            try:
                data = images.get(src) if isinstance(src, tuple) else src
                pix.append(image_pixels(data, size))
            except BadImage as e:
                out.problems.append(Problem(pair["where"], pair["id"], f"{label}: {e}"))
                break
        else:
            good.append(pair)
            pixels.extend(pix)
    if not good:
        return out
    gens = [torch.Generator().manual_seed(_pair_seed(seed, p["id"], side))
            for p in good for side in ("w", "l")]
    lat = vae_encode(adapter, torch.stack(pixels), mode=mode, generators=gens)
    prompts = [p["prompt"] for p in good]
    negs = [p["neg_prompt"] for p in good] if with_neg else []
    cond = adapter.encode_prompts(prompts + negs)
    n = len(good)
    for i, pair in enumerate(good):
        row = {"id": pair["id"], "prompt": pair["prompt"], "neg_prompt": pair["neg_prompt"],
               "seed": _pair_seed(seed, pair["id"], "w") if mode == "sample" else None,
               "latent_w": to_store(lat[2 * i], store), "latent_l": to_store(lat[2 * i + 1], store),
               "cond": {k: to_store(v[i], store) for k, v in cond.items()}, "neg_cond": None}
        if with_neg:
            row["neg_cond"] = {k: to_store(v[n + i], store) for k, v in cond.items()}
            reason = same_condition_problem(row["cond"], row["neg_cond"])
            if reason is not None:
                out.problems.append(Problem(pair["where"], pair["id"], reason))
                continue
        if not (torch.isfinite(row["latent_w"]).all() and torch.isfinite(row["latent_l"]).all()):
            out.problems.append(Problem(pair["where"], pair["id"],
                                        "the VAE gave non-finite latents (try a float32 VAE)"))
            continue
        out.rows.append(row)
    return out


def encode_pairs(model, pairs, out, *, resolution: Union[int, Sequence[int], None] = None,
                 batch_size: int = 8, ties: str = "drop", on_bad: str = "skip",
                 latent: Optional[str] = None, degrade: Optional[str] = None, seed: int = 0,
                 family: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None,
                 vae_dtype: torch.dtype = torch.float32, store_dtype: str = "float16",
                 shard_size: int = 64, progress: bool = True,
                 on_problem: Optional[Callable[[Problem], None]] = None,
                 on_batch: Optional[Callable[[int], None]] = None) -> EncodeResult:
    """Encode the image pairs listed in ``pairs`` into the pair dataset ``out``.

    Args:
        model: local diffusers pipeline dir (or cached hub id) whose VAE and text
            encoders are used; its family decides resolution, latent scaling and the
            stored condition.
        pairs: a ``.jsonl`` (``{"prompt", "image_w", "image_l"}`` per line, paths relative
            to the file) or Pick-a-Pic v2 ``.parquet`` file (see :mod:`.pair_sources`).
        out: dataset directory; an existing one is resumed (ids already written skipped).
        resolution: pixel size images are resized and centre-cropped to: an int (square)
            or (height, width); default the family's native resolution.
        batch_size: pairs per VAE / text-encoder call (2 * batch_size images).
        ties: Pick-a-Pic ties (``label_0 == 0.5``): ``"drop"`` (default) or ``"keep"``
            (then ``jpg_0`` is the preferred image).
        on_bad: a pair whose image is missing or cannot be decoded, or whose line/row is
            malformed: ``"skip"`` it (reported in the result and the log) or ``"fail"``:
            stop with a ``ValueError`` naming the file and line/row (pairs written so far
            are kept, and a rerun resumes).
        latent: ``"sample"`` a VAE posterior sample (as the Diffusion-DPO script; seeded
            per pair from ``seed``, so reruns give the same latents) or its ``"mean"``;
            None = the family's training script's choice (``vae_latent_mode``: the mean
            for FLUX.2, a sample for the others).
        degrade: ``None``, ``"random"`` or ``"structural"``: write a degraded prompt c- and
            its condition for DDSPO's TF-CPP (a JSONL ``neg_prompt`` takes precedence).
        dtype: text-encoder dtype (default fp16 on CUDA, fp32 elsewhere, as ``prepare``).
        vae_dtype: VAE dtype (default fp32: SDXL's VAE overflows in fp16).
        store_dtype, shard_size, device, family, progress, on_batch: as ``prepare``.
        on_problem: called (main process) for each pair left out; the default logs it.
    """
    from ..models import detect_family, load_adapter
    from . import PairWriter
    from .degrade import RULE_METHODS
    from .pair_sources import ParquetImages, read_pair_source
    from .prepare import check_dataset_out
    from .provenance import INFO_KEY, encoder_fingerprint

    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad: expected one of {ON_BAD}, got {on_bad!r}")
    if latent not in (None, "sample", "mean"):
        raise ValueError(f"latent: expected 'sample' or 'mean', got {latent!r}")
    if degrade is not None and degrade not in RULE_METHODS:
        raise ValueError(f"degrade: expected None or one of {RULE_METHODS}, got {degrade!r}")
    store = _store_dtype(store_dtype)
    if out is None or str(out) == "":
        raise ValueError("out: expected an output directory")
    check_dataset_out(out, model=model, pairs=pairs)
    source = read_pair_source(pairs, ties=ties)

    result = EncodeResult(out=str(out), ties_dropped=source.ties_dropped)

    def fatal(p: Problem) -> ValueError:
        return ValueError(f"{p} (pass on_bad='skip' / --on-bad skip to leave such pairs out)")

    def report(p: Problem) -> None:
        if on_bad == "fail":
            raise fatal(p)
        result.problems.append(p)
        if on_problem is not None:
            on_problem(p)
        else:
            log.warning("encode: left out %s", p)

    state, dev = process_device(device)
    fam = family or detect_family(str(model))
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    adapter = load_adapter(str(model), fam, components=("text", "vae"), device=dev, dtype=dtype,
                           text_dtype=vae_dtype)
    latent = latent or adapter.vae_latent_mode
    if dtype != vae_dtype:  # loaded in the VAE's dtype (casting a VAE down and up loses bits)
        for name in adapter.text_components:
            comp = getattr(adapter.pipe, name, None)
            if isinstance(comp, torch.nn.Module):
                comp.to(dtype=dtype)
    size = _resolution(resolution, adapter)
    check_vae_memory(adapter, size, batch_size, dev, vae_dtype)

    window = None
    if degrade is not None:
        from .token_window import TokenWindow

        window = TokenWindow.from_pipeline(adapter.pipe, adapter)
    early = list(source.problems) + _degraded(source.pairs, degrade, seed, window)
    with_neg = any(p["neg_prompt"] is not None for p in source.pairs)
    if with_neg:
        for p in [p for p in source.pairs if p["neg_prompt"] is None]:
            early.append(Problem(p["where"], p["id"], "no 'neg_prompt' while other pairs have one "
                                 "(a dataset's pairs all have c- or none do)"))
        source.pairs = [p for p in source.pairs if p["neg_prompt"] is not None]
    if early and on_bad == "fail":
        raise fatal(early[0])  # every process found the same: all stop here, together
    if state.is_main_process:
        for p in early:
            report(p)
    if not source.pairs:
        raise ValueError(f"pairs: no usable pair in {pairs}"
                         + (f" ({len(early)} bad, first: {early[0]})" if early else ""))

    images = ParquetImages()
    info = {"source": f"image pairs ({source.kind})", "resolution": list(size), "ties": ties,
            "latent": latent, "seed": seed, "degrade": degrade,
            INFO_KEY: encoder_fingerprint(model, fam, vae=True)}

    def open_writer():
        return PairWriter(str(out), family=fam, model=str(model), shard_size=shard_size, info=info)

    already, result.pairs = fill_dataset(
        state, open_writer, source.pairs,
        lambda batch: _encode_batch(adapter, images, batch, size=size, mode=latent, seed=seed,
                                    store=store, with_neg=with_neg),
        batch_size=batch_size, desc="encode", progress=progress, on_batch=on_batch,
        on_problem=report)
    result.encoded = result.pairs - already
    return result
