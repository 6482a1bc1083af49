"""Paired statistics of a run against its base over prompts.

For one metric, ``d_k = run_k - base_k`` per prompt k (each the mean over that prompt's
images). Reported: both means, the mean difference with a percentile-bootstrap 95%
interval (prompts resampled with replacement), and the win rate, the share of prompts
where the run scores better (a tie counts one half), with its interval from the same
resamples. The resampling draws come from a fixed seed, so a rerun gives the same
intervals."""

from __future__ import annotations

from typing import Sequence


def paired_summary(run: Sequence[float], base: Sequence[float], *, higher_is_better: bool = True,
                   resamples: int = 10_000, seed: int = 0) -> dict:
    import numpy as np

    r, b = np.asarray(run, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if r.shape != b.shape or r.ndim != 1 or r.size == 0:
        raise ValueError("paired_summary: expected two equal-length, non-empty score lists")
    d = r - b
    better = d if higher_is_better else -d
    wins = np.where(better > 0, 1.0, np.where(better == 0, 0.5, 0.0))
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    boot_d, boot_w = d[idx].mean(axis=1), wins[idx].mean(axis=1)
    lo, hi = 2.5, 97.5
    return {"run_mean": float(r.mean()), "base_mean": float(b.mean()),
            "mean_diff": float(d.mean()),
            "diff_ci95": [float(np.percentile(boot_d, lo)), float(np.percentile(boot_d, hi))],
            "win_rate": float(wins.mean()),
            "win_rate_ci95": [float(np.percentile(boot_w, lo)), float(np.percentile(boot_w, hi))],
            "prompts": int(d.size), "higher_is_better": bool(higher_is_better),
            "bootstrap_resamples": int(resamples)}
