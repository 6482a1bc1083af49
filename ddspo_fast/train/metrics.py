"""Training metrics accumulated on the device; read back (one host sync) per log.

Everything is derived from what the loss returns (its value and its ``stats``: per-row
errors and per-pair margins); the per-pair loss math lives in the loss package only, so
the noise-level buckets report the mean margin and the implicit accuracy.

Early signs of a collapsing run (users report DPO diverging on large flow models) are
logged beside them: ``saturated_frac`` (pairs whose logistic weight sigmoid(-z) fell
under 1%, i.e. z > log 99: the implicit accuracy saturating, those pairs no longer
train), ``margin_max`` (the largest margin of the window: margin growth shows in the tail
before the mean) and ``drift_w`` / ``drift_l`` (the policy's MSE minus the reference's on
the same rows, in the target's units: 0 at the start of a LoRA run; both rising together
is the policy drifting away from the reference, not only ranking the pair)."""

from __future__ import annotations

import json
import math
import resource
import sys
import warnings
from pathlib import Path

import torch

from ..fsio import atomic_write_text, iter_jsonl

N_BUCKETS = 4  # noise-level buckets: [0, .25), [.25, .5), [.5, .75), [.75, 1]
_SCALARS = ("loss", "implicit_acc", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l",
            "margin", "mixed_frac", "saturated_frac")
SATURATED_MARGIN = math.log(99.0)  # sigmoid(-z) < 1%: the pair's gradient has all but gone


class MetricsAccumulator:
    def __init__(self, device):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = z(len(_SCALARS))
        self.draws = 0  # pair-draws, counted on the host (no device traffic)
        self.bucket = z(3 * N_BUCKETS)  # margin, correct, count per bucket
        self.margin_max = torch.full((1,), -math.inf, dtype=torch.float64, device=self.device)
        self.pairs = 0  # host-side count of dataset pairs, no sync needed

    @torch.no_grad()
    def add(self, loss, stats: dict, tau: torch.Tensor, mixed, n_pairs: int) -> None:
        z = stats["margin"].double()
        n = z.shape[0]
        mm, rm = stats["model_mse"].double(), stats["ref_mse"].double()
        correct = (z > 0).double()
        mix = mixed.double().mean() if mixed is not None else torch.zeros((), device=z.device,
                                                                            dtype=torch.float64)
        vals = torch.stack([loss.detach().double() * n, correct.sum(), mm[:n].sum(), mm[n:].sum(),
                            rm[:n].sum(), rm[n:].sum(), z.sum(), mix * n,
                            (z > SATURATED_MARGIN).double().sum()])
        self.sums += vals
        self.margin_max = torch.maximum(self.margin_max, z.max().reshape(1))
        self.draws += n
        b = (tau.detach().double().clamp(0, 1 - 1e-9) * N_BUCKETS).long()
        self.bucket.index_add_(0, b, z)
        self.bucket.index_add_(0, b + N_BUCKETS, correct)
        self.bucket.index_add_(0, b + 2 * N_BUCKETS, torch.ones_like(z))
        self.pairs += n_pairs

    def collect(self, accelerator) -> dict:
        draws = torch.tensor([float(self.draws)], dtype=torch.float64, device=self.device)
        packed = torch.cat([self.sums, draws, self.bucket])
        top = self.margin_max
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
            top = accelerator.gather(top)
        vals = packed.tolist()
        top = float(top.max())
        k = len(_SCALARS)
        sums, draws, bucket = vals[:k], vals[k], vals[k + 1:]
        out = {name: (s / draws if draws else float("nan")) for name, s in zip(_SCALARS, sums)}
        out["margin_max"] = top if draws else float("nan")
        for side in ("w", "l"):
            out[f"drift_{side}"] = out[f"model_mse_{side}"] - out[f"ref_mse_{side}"]
        for i in range(N_BUCKETS):
            c = bucket[2 * N_BUCKETS + i]
            lo, hi = i / N_BUCKETS, (i + 1) / N_BUCKETS
            key = f"t{lo:.2f}-{hi:.2f}"
            out[f"bucket_margin/{key}"] = bucket[i] / c if c else None
            out[f"bucket_acc/{key}"] = bucket[N_BUCKETS + i] / c if c else None
        return out


class LossSums:
    """Per-pair means of a few named scalars over a log window (the adapter trainer's
    loss and per-half MSEs), on the device until ``collect``."""

    def __init__(self, device, names):
        self.device, self.names = torch.device(device), tuple(names)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.pairs = 0  # host-side count of dataset pairs, no sync needed

    @torch.no_grad()
    def add(self, values, n_pairs: int) -> None:
        self.sums += torch.stack([v.detach() for v in values]).double() * n_pairs
        self.pairs += n_pairs

    def collect(self, accelerator) -> dict:
        packed = torch.cat([self.sums, torch.tensor([float(self.pairs)], dtype=torch.float64,
                                                    device=self.device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        s = packed.tolist()  # the one host sync per log
        pairs = s[-1]
        return {k: (v / pairs if pairs else None) for k, v in zip(self.names, s)}


def peak_memory(device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


_warned_tensorboard = False


def _tensorboard_writer(logdir):
    """A SummaryWriter, or None with one warning per process when tensorboard is missing."""
    global _warned_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_tensorboard:
            _warned_tensorboard = True
            warnings.warn("tensorboard=True but the tensorboard package is not installed: "
                          "metrics go to metrics.jsonl only. pip install tensorboard (or set "
                          "tensorboard=False to silence this).", UserWarning, stacklevel=3)
        return None
    return SummaryWriter(str(logdir))


class MetricsWriter:
    """metrics.jsonl (strict JSON, one record per log step) always; TensorBoard when
    asked for and installed."""

    def __init__(self, output_dir, tensorboard: bool, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop lines past the checkpoint we resume from: they will be logged again.
            keep = [raw.rstrip("\n") for _, raw, rec in iter_jsonl(self.path)
                    if isinstance(rec, dict) and rec.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = _tensorboard_writer(Path(output_dir) / "logs") if tensorboard else None

    def write(self, record: dict) -> None:
        record = json_safe(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
