"""The step benchmark's rows: one JSON row per rung (and the Trainer row) from the
measurements, the definitions written into the JSON, and the printed table."""

from __future__ import annotations

import math
from typing import Optional

from . import ladder as lad
from .archs import Spec
from .device import quantiles, sig

TRAINER_ROW = "ddspo_fast"             # Trainer.train_step, live reference
CACHED_ROW = "ddspo_fast+refcache"      # the same step reading a precomputed reference cache
TRAINER_MIRRORS = "fused_loss"          # the rung whose settings both library rows use
DEFINITIONS = {
    "step_ms": "wall time of one optimizer step (forward, backward, clip, optimizer), each "
               "ended by a device sync; p20/p50/p80 over the timed steps",
    "pairs_per_s": "batch / step_ms p50",
    "denoiser_rows_per_pair": "rows the denoiser modules' forward calls received in one "
                              "step (counted by a forward pre-hook), / batch",
    "tflop_useful_per_step": "FLOPs the TF-CPP objective needs: policy forward + backward on "
                             "2 rows per pair and one reference forward on 3 rows per pair, "
                             "no recompute (counted with torch.utils.flop_counter)",
    "tflop_hardware_per_step": "FLOPs the step executed (counted the same way): includes a "
                               "4th reference row and gradient checkpointing's recompute",
    "mfu_useful": "tflop_useful_per_step / step_ms p50 / the device's dense bf16 peak (null "
                  "for the cached row: its reference work was done by the precompute)",
    "mfu_hardware": "tflop_hardware_per_step / step_ms p50 / the same peak",
    "vs_official": "official rung's step_ms p50 / this row's",
    "first_loss, loss": "the loss of the first step a row took (a warm-up step) and of its "
                        "last timed step; rows differ in their draws (ladder vs library "
                        "rows) and in precision, so only the two library rows, which take "
                        "the same steps, are comparable",
    "vs_previous": "step_ms p50 of the rung this one changes (base_rung) / this row's, when "
                   "both were measured",
    "vs_same_settings": "library rows: step_ms p50 of the rung whose settings they use "
                        "(fused_loss) / this row's",
    "vs_live": f"{CACHED_ROW}: step_ms p50 of the {TRAINER_ROW} row / this row's (the "
               "speed-up of reading the reference from the cache)",
    "live_reference_ms_per_pair": f"{CACHED_ROW}: ({TRAINER_ROW} step_ms p50 - this row's) / "
                                  "batch: the frozen networks' share of a live step, per pair",
    "precompute": f"{CACHED_ROW}: what `ddspo-fast precompute` of the cache cost: "
                  "ms_per_pair_draw times the frozen networks' forward passes only (one "
                  "pair-draw = what one pair needs for one step); wall_seconds includes "
                  "loading and hashing the weights",
}


def build_rows(spec: Spec, rungs, entries: dict, useful, batch: int, peak) -> list[dict]:
    def timing(m):
        if m.error or not m.times:
            return {"pairs_per_s": None, "step_ms": None, "timed_steps": len(m.times)}
        q = quantiles([t * 1e3 for t in m.times])
        return {"pairs_per_s": sig(batch / (q["p50"] * 1e-3)),
                "step_ms": {k: sig(v) for k, v in q.items()}, "timed_steps": len(m.times)}

    def flops(m, p50_ms, useful):
        out = {"denoiser_rows_per_pair": (m.rows / batch) if m.rows is not None else None,
               "tflop_useful_per_step": sig(useful / 1e12) if useful else None,
               "tflop_hardware_per_step": sig(m.flops / 1e12) if m.flops else None,
               "mfu_useful": None, "mfu_hardware": None}
        if p50_ms and peak:
            if useful:
                out["mfu_useful"] = sig(useful / (p50_ms * 1e-3) / (peak * 1e12))
            if m.flops:
                out["mfu_hardware"] = sig(m.flops / (p50_ms * 1e-3) / (peak * 1e12))
        return out

    def described(config: lad.StepConfig) -> dict:
        return {"batch": batch, "precision": lad.PRECISIONS[config.precision],
                "optimizer": lad.OPTIMIZERS[config.optimizer],
                "loss_form": lad.LOSSES[config.loss], "error": None}

    def measured(m, useful=useful) -> tuple[dict, Optional[float]]:
        """The measured fields of a row, and its step time p50 (ms)."""
        out = timing(m)
        ms = out["step_ms"]["p50"] if out["step_ms"] else None
        out.update(flops(m, ms, useful))
        out.update(error=m.error, peak_mem_gb=sig(m.peak_mem_gb), first_loss=m.first_loss,
                   loss=m.loss, loss_finite=m.loss is not None and math.isfinite(m.loss),
                   skipped_optimizer_steps=m.skipped_steps,
                   conv_weights_channels_last_after_steps=m.channels_last_after)
        return out, ms

    p50 = {}
    rows = []
    for r in rungs:
        row = {"family": spec.family, **r.to_dict(), **described(r.config)}
        e = entries.get(r.name)
        if r.skipped or e is None:
            rows.append(row)
            continue
        fields, ms = measured(e.m)
        row.update(fields)
        if ms:
            p50[r.index] = ms
            if 0 in p50:
                row["vs_official"] = sig(p50[0] / ms)
            if r.base is not None and r.base in p50:
                row["vs_previous"] = sig(p50[r.base] / ms)
        rows.append(row)
    mirror = next((r for r in rungs if r.name == TRAINER_MIRRORS), None)
    live_ms = None
    for name in (TRAINER_ROW, CACHED_ROW):
        e = entries.get(name)
        if e is None or mirror is None:
            continue
        cached = name == CACHED_ROW
        adds = (f"ddspo_fast.Trainer.train_step with the settings of rung '{TRAINER_MIRRORS}' "
                "(what `ddspo-fast train` runs)")
        if cached:
            adds = (f"the {TRAINER_ROW} row's step with TrainConfig.reference_cache: the frozen "
                    "networks' outputs read from a precomputed cache, the policy alone runs")
        row = {"family": spec.family, "rung": None, "name": name, "adds": adds,
               "changes": "reference_cache" if cached else None,
               "config": dict(mirror.config.to_dict(), reference_cache=cached),
               "skipped": None, **described(mirror.config)}
        # the cached step does the reference's share of the objective ahead of time:
        # "useful" FLOPs (and MFU) would count work it did not do, so only executed ones
        fields, ms = measured(e.m, None if cached else useful)
        row.update(fields)
        if ms and 0 in p50:
            row["vs_official"] = sig(p50[0] / ms)
        if ms and mirror.index in p50:
            row["vs_same_settings"] = sig(p50[mirror.index] / ms)
        if not cached:
            live_ms = ms
        else:
            row["precompute"] = _precompute_fields(e.precompute)
            if ms and live_ms:
                row["vs_live"] = sig(live_ms / ms)
                row["live_reference_ms_per_pair"] = sig((live_ms - ms) / batch)
        rows.append(row)
    return rows


def _precompute_fields(summary: Optional[dict]) -> Optional[dict]:
    """What a row keeps of `train.precompute.precompute`'s summary."""
    if summary is None:
        return None
    keep = ("pairs", "draws", "dtype", "fields", "bytes_per_pair_draw", "pair_draws_computed",
            "seconds", "ms_per_pair_draw", "wall_seconds")
    out = {k: summary.get(k) for k in keep}
    for k in ("seconds", "ms_per_pair_draw", "wall_seconds"):
        out[k] = sig(out[k])
    return out


def format_table(rows) -> str:
    head = ["family", "#", "rung", "batch", "pairs/s", "p20 ms", "p50 ms", "p80 ms", "rows/pair",
            "peak GB", "MFU useful", "MFU hw", "vs prev", "vs official"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = []
    for r in rows:
        q = r.get("step_ms") or {}
        status = r.get("skipped") or r.get("error")
        if status and len(status) > 60:
            status = status[:57] + "..."
        body.append([r["family"], "-" if r["rung"] is None else str(r["rung"]), r["name"],
                     str(r["batch"]), fmt(r.get("pairs_per_s"), ".2f"),
                     fmt(q.get("p20"), ".1f"), fmt(q.get("p50"), ".1f"), fmt(q.get("p80"), ".1f"),
                     fmt(r.get("denoiser_rows_per_pair"), ".0f"), fmt(r.get("peak_mem_gb"), ".1f"),
                     fmt(r.get("mfu_useful"), ".3f"), fmt(r.get("mfu_hardware"), ".3f"),
                     fmt(r.get("vs_previous") or r.get("vs_live") or r.get("vs_same_settings"), ".2f"),
                     fmt(r.get("vs_official"), ".2f") + (f"  ({status})" if status else "")])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in body])
