"""The step benchmark's rows: one JSON row per rung and per library row from the
measurements, the definitions written into the JSON, and the printed table.

Every row's step time charges its optimizer step per pair at the official recipe's rate
(`ladder.OFFICIAL_PAIRS_PER_UPDATE`): the once-per-update part is timed apart and
``step - update + update * batch / pairs_per_update`` is what the ratios compare. Every
ratio against the official rung says whether the two rows compute in the same
precision, and a rung whose p20-p80 range lies wholly above its base rung's is marked
slower here, in its own row and in the tuned library row that carries it.
"""

from __future__ import annotations

import math
from typing import Optional

from . import ladder as lad
from .archs import Spec
from .device import quantiles, sig

DEFAULTS_ROW = "ddspo_fast:defaults"      # Trainer.train_step, the library's defaults here
TUNED_ROW = "ddspo_fast:tuned"            # Trainer.train_step, the ladder's settings
CACHED_ROW = "ddspo_fast:defaults+refcache"   # the defaults row reading a reference cache
LIBRARY_ROWS = (DEFAULTS_ROW, TUNED_ROW, CACHED_ROW)

# The dtype a precision setting computes the denoiser's matmuls and convolutions in.
COMPUTES_IN = {"fp32": "fp32", "bf16": "bf16", "fp16-scaler": "fp16",
               "fp16-scaler-fp32-frozen": "fp16"}

DEFINITIONS = {
    "step_ms": "wall time of one micro-batch step (forward, backward) plus its share of an "
               "optimizer step at the official recipe's accumulation: step - update + "
               "update * batch / pairs_per_update, per timed step; p20/p50/p80. Each step is "
               "ended by a device sync",
    "step_ms_one_update": "the same steps with a whole optimizer step each (what was timed)",
    "update_ms": "the once-per-optimizer-step part of a step, timed apart between device "
                 "syncs: GradScaler unscale, gradient clipping, the optimizer step, zeroing "
                 "the gradients (library rows: from the clipping to the zeroing)",
    "pairs_per_update": "pairs per optimizer step in the official recipe of the family "
                        "(--train_batch_size x --gradient_accumulation_steps); null: one "
                        "optimizer step per timed step (--updates every-step)",
    "pairs_per_s": "batch / step_ms p50",
    "computes_in": "the dtype of the denoiser's forward and backward (autocast dtype, or fp32)",
    "same_precision_as_official": "whether this row computes in the official rung's dtype; "
                                  "where not, precision_note says which two its vs_official "
                                  "compares",
    "device_dependent": "rungs whose speed-up depends on the device's kernels (why): their "
                        "ratio on one device says nothing about another",
    "effect_here": "rungs: faster / slower than the base rung on this device when the two "
                   "p20-p80 ranges do not overlap, else within noise",
    "live_settings": "the settings read back from the live step objects after they were "
                     "built (autocast dtype / accelerate's mixed_precision, optimizer class, "
                     "checkpointing, layout, compilation), not from the config",
    "carries_slower_here": f"{TUNED_ROW}: the rungs in its settings that were slower than "
                           "their base rung on this device",
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
    "vs_official": "official rung's step_ms p50 / this row's (see same_precision_as_official)",
    "first_loss, loss": "the loss of the first step a row took (a warm-up step) and of its "
                        "last timed step; rows differ in their draws (ladder vs library "
                        "rows) and in precision, so only the defaults row and the cached row, "
                        "which take the same steps, are comparable",
    "vs_previous": "step_ms p50 of the rung this one changes (base_rung) / this row's, when "
                   "both were measured",
    "vs_same_settings": "library rows: step_ms p50 of the rung with the same settings "
                        "(same_settings_rung) / this row's",
    "vs_live": f"{CACHED_ROW}: step_ms p50 of the {DEFAULTS_ROW} row / this row's (the "
               "speed-up of reading the reference from the cache at the same settings)",
    "live_reference_ms_per_pair": f"{CACHED_ROW}: ({DEFAULTS_ROW} step_ms p50 - this row's) "
                                  "/ batch: the frozen networks' share of a live step, per pair",
    "precompute": f"{CACHED_ROW}: what `ddspo-fast precompute` of the cache cost: "
                  "ms_per_pair_draw times the frozen networks' forward passes only (one "
                  "pair-draw = what one pair needs for one step); wall_seconds includes "
                  "loading and hashing the weights",
}


def amortised(times: list, updates: list, batch: int,
              pairs_per_update: Optional[int]) -> list:
    """Per timed step (seconds): the step with its optimizer step charged per pair at
    `pairs_per_update` (None, or a step without an update time: as timed)."""
    if not pairs_per_update:
        return list(times)
    share = min(1.0, batch / pairs_per_update)
    return [t if u is None else t - u + u * share for t, u in zip(times, updates)]


def effect(row_q: Optional[dict], base_q: Optional[dict]) -> Optional[str]:
    """faster / slower / within noise, from two p20-p80 ranges (None if one is missing)."""
    if not row_q or not base_q:
        return None
    if row_q["p20"] > base_q["p80"]:
        return "slower"
    if row_q["p80"] < base_q["p20"]:
        return "faster"
    return "within noise"


def precision_fields(config: lad.StepConfig, official: Optional[lad.StepConfig]) -> dict:
    mine = COMPUTES_IN[config.precision]
    out = {"computes_in": mine, "official_computes_in": None,
           "same_precision_as_official": None, "precision_note": None}
    if official is not None:
        theirs = out["official_computes_in"] = COMPUTES_IN[official.precision]
        out["same_precision_as_official"] = mine == theirs
        if mine != theirs:
            out["precision_note"] = (f"vs_official compares {mine} with the official rung's "
                                     f"{theirs}")
    return out


def build_rows(spec: Spec, rungs, entries: dict, useful, batch: int, peak, *,
               pairs_per_update: Optional[int] = None,
               library: Optional[dict] = None) -> list[dict]:
    """`library`: name -> (StepConfig, same-settings rung index or None) of the library
    rows measured (`entries` holds their measurements)."""
    official_cfg = rungs[0].config

    def timing(m):
        if m.error or not m.times:
            return {"pairs_per_s": None, "step_ms": None, "step_ms_one_update": None,
                    "update_ms": None, "timed_steps": len(m.times)}
        ms = lambda xs: {k: sig(v) for k, v in quantiles([x * 1e3 for x in xs]).items()}  # noqa: E731
        ups = [u for u in m.update_times if u is not None]
        q = ms(amortised(m.times, m.update_times or [None] * len(m.times), batch,
                         pairs_per_update))
        return {"pairs_per_s": sig(batch / (q["p50"] * 1e-3)), "step_ms": q,
                "step_ms_one_update": ms(m.times), "update_ms": ms(ups) if ups else None,
                "timed_steps": len(m.times)}

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
        return {"batch": batch, "pairs_per_update": pairs_per_update,
                "precision": lad.PRECISIONS[config.precision],
                **precision_fields(config, official_cfg),
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
                   conv_weights_channels_last_after_steps=m.channels_last_after,
                   live_settings=m.live_settings)
        return out, ms

    p50, qs, effects = {}, {}, {}
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
            p50[r.index], qs[r.index] = ms, row["step_ms"]
            if 0 in p50:
                row["vs_official"] = sig(p50[0] / ms)
            if r.base is not None and r.base in p50:
                row["vs_previous"] = sig(p50[r.base] / ms)
                row["effect_here"] = effects[r.index] = effect(row["step_ms"], qs[r.base])
        rows.append(row)

    live_ms = None
    for name, (config, same) in (library or {}).items():
        e = entries.get(name)
        if e is None:
            continue
        cached = name == CACHED_ROW
        adds = {DEFAULTS_ROW: "ddspo_fast.Trainer.train_step with the library's defaults for "
                              "this device (TrainConfig defaults, mixed_precision='auto') on "
                              "the official task: what `ddspo-fast train` runs unasked",
                TUNED_ROW: "ddspo_fast.Trainer.train_step with the ladder's settings (every "
                           "change that runs here but compile)",
                CACHED_ROW: f"the {DEFAULTS_ROW} row's step with TrainConfig.reference_cache: "
                            "the frozen networks' outputs read from a precomputed cache, the "
                            "policy alone runs (the defaults' settings given explicitly, "
                            "mixed_precision as 'auto' resolves here: the precompute does "
                            "not take 'auto')"}[name]
        row = {"family": spec.family, "rung": None, "name": name, "adds": adds,
               "changes": "reference_cache" if cached else None,
               "config": dict(config.to_dict(), reference_cache=cached),
               "same_settings_rung": same, "skipped": None, **described(config)}
        if name == TUNED_ROW:
            top = lad.tuned(rungs).index
            path = [r for r in rungs[1:]
                    if r.index <= top and r.skipped in (None, lad.NOT_SELECTED)]
            row["carries_device_dependent"] = [r.name for r in path
                                               if r.name in lad.DEVICE_DEPENDENT]
            row["carries_slower_here"] = [r.name for r in path
                                          if effects.get(r.index) == "slower"]
        # the cached step does the reference's share of the objective ahead of time:
        # "useful" FLOPs (and MFU) would count work it did not do, so only executed ones
        fields, ms = measured(e.m, None if cached else useful)
        row.update(fields)
        if ms and 0 in p50:
            row["vs_official"] = sig(p50[0] / ms)
        if ms and same is not None and same in p50:
            row["vs_same_settings"] = sig(p50[same] / ms)
        if name == DEFAULTS_ROW:
            live_ms = ms
        if cached:
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


def vs_official_text(r: dict) -> str:
    """The vs-official ratio, with the two precisions named where they differ."""
    v = r.get("vs_official")
    if v is None:
        return "-"
    text = f"{v:.2f}x"
    if r.get("same_precision_as_official") is False:
        text += f" ({r['computes_in']} vs {r['official_computes_in']})"
    return text


def here_text(r: dict) -> str:
    """What the row's 'here' column says: a rung's effect on this device (and whether it is
    device-dependent); the tuned row's slower rungs."""
    bits = []
    if r.get("effect_here"):
        bits.append(r["effect_here"])
    if r.get("device_dependent"):
        bits.append("device-dependent")
    if r.get("carries_slower_here"):
        bits.append("carries slower here: " + ", ".join(r["carries_slower_here"]))
    return "; ".join(bits) or "-"


def planned_text(r: dict) -> str:
    """The row's planned peak at real size (``python -m ddspo_fast.plan.ladder`` adds it):
    the traced count and, in brackets, the reserved figure with the planner's margin."""
    p = r.get("planned_real")
    if not p:
        return "-"
    return f"{p['count_gib']:.1f} ({p['reserved_gib']:.1f}) @{p['batch']}"


def format_table(rows, *, drop_empty: bool = False) -> str:
    """The rows as a pipe table (Markdown); `drop_empty` leaves out the columns with
    nothing in any row (a CPU run's peak memory and MFU)."""
    head = ["family", "#", "row", "computes in", "rows/pair", "step ms p50 (p20-p80)",
            "update ms", "pairs/s", "peak GB", "real size GiB (est.)", "MFU useful", "MFU hw",
            "vs base", "vs official", "here"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = []
    for r in rows:
        q = r.get("step_ms") or {}
        status = r.get("skipped") or r.get("error")
        if status and len(status) > 60:
            status = status[:57] + "..."
        step = "-" if not q else f"{q['p50']:.4g} ({q['p20']:.4g}-{q['p80']:.4g})"
        up = (r.get("update_ms") or {}).get("p50")
        body.append([r["family"], "-" if r["rung"] is None else str(r["rung"]), r["name"],
                     r.get("computes_in") or "-",
                     fmt(r.get("denoiser_rows_per_pair"), ".0f"), step, fmt(up, ".4g"),
                     fmt(r.get("pairs_per_s"), ".3g"), fmt(r.get("peak_mem_gb"), ".1f"),
                     planned_text(r), fmt(r.get("mfu_useful"), ".3f"), fmt(r.get("mfu_hardware"), ".3f"),
                     fmt(r.get("vs_previous") or r.get("vs_live") or r.get("vs_same_settings"),
                         ".2f"),
                     vs_official_text(r) + (f"  ({status})" if status else ""),
                     here_text(r)])
    if drop_empty:
        keep = [i for i in range(len(head)) if any(b[i] != "-" for b in body)]
        head, body = [head[i] for i in keep], [[b[i] for i in keep] for b in body]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in body])
