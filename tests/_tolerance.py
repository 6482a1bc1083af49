"""Bounds for tests that compare two computations of the same thing, derived from the
arithmetic rather than read off one CPU.

Two runs of the same training that differ only in fp32 rounding (the reference computed
in another batch composition, a cache instead of a live forward, another vector ISA
picking another summation order) cannot be held to bit-equality: which rounding a kernel
makes depends on the CPU's vector width (ATEN_CPU_CAPABILITY, oneDNN/MKL code paths) and
even on buffer alignment. What they can be held to:

* A forward value: a length-L accumulation in fp32 errs by about sqrt(L)*u relative with
  high probability (probabilistic rounding analysis, Higham & Mary 2019; the worst case
  L*u is never approached by independent roundings), and a network of N such layers by
  about sqrt(N*L)*u. That is `forward_rel`.
* An AdamW weight: each step moves an element by lr * |m_hat| / (sqrt(v_hat) + eps),
  which Cauchy-Schwarz bounds by lr * c_t (c_t below, 1.00 to 1.01 for t <= 10 at the
  default betas) whatever the gradients are. Where an element's gradient is itself at
  rounding level, the two runs may move it in opposite directions, so the only bound
  that holds on every CPU is 2 * sum(lr_t * c_t), plus the rounding of the weight update.
  Everywhere else Adam's normalised step is insensitive to a relative gradient change
  of rounding size; `assert_adam_runs_agree` therefore also holds all but a small share
  of the elements to a tenth of one step: a wrong learning rate, draw, target, moment
  or schedule moves every element by O(lr) and fails that.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

U = 2.0 ** -24          # fp32 unit roundoff


def forward_rel(layers: int, longest: int) -> float:
    """Relative rounding of a forward of `layers` layers whose longest accumulation has
    `longest` terms, as two batchings of it may differ (probabilistic bound)."""
    return math.sqrt(layers * longest) * U


def adam_step_factor(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """max |m_hat_t| / sqrt(v_hat_t) over all gradient sequences (Cauchy-Schwarz):
    (1-b1)/sqrt(1-b2) * sqrt(sum_j (b1^2/b2)^j) * sqrt(1-b2^t)/(1-b1^t)."""
    r = beta1 * beta1 / beta2
    s = sum(r ** j for j in range(t))
    return ((1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(s)
            * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))


def adam_drift(lrs: Sequence[float], first_step: int = 1, beta1: float = 0.9,
               beta2: float = 0.999) -> float:
    """The most two AdamW runs differing only by rounding can part on one element after
    steps first_step.. with learning rates `lrs`: each may take a full step either way."""
    return 2.0 * sum(lr * adam_step_factor(first_step + i, beta1, beta2)
                     for i, lr in enumerate(lrs))


def assert_adam_runs_agree(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                           lrs: Sequence[float], first_step: int = 1,
                           max_share: float = 0.01) -> None:
    """`got` and `want` (name -> fp32 weights) are the ends of two AdamW runs that differ
    only in fp32 rounding, over steps with learning rates `lrs` (from step first_step).

    Every element within adam_drift (+ one fp32 ulp of the weight per step); all but
    `max_share` of the elements within a tenth of the smallest step: rounding can only
    turn elements whose gradient is at rounding level, a vanishing share of them."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    drift = adam_drift(lrs, first_step)
    tight = 0.1 * min(lrs)
    worst, loose, total = 0.0, 0, 0
    for n, w in want.items():
        d = (got[n].detach().float() - w.detach().float()).abs()
        ulp = len(lrs) * 2 * U * w.detach().float().abs()
        excess = (d - ulp - drift).max().item() if d.numel() else 0.0
        assert excess <= 0, f"{n}: differs by {d.max().item():.3g} > {drift:.3g} (Adam bound)"
        worst = max(worst, d.max().item() if d.numel() else 0.0)
        loose += int((d > tight + ulp).sum())
        total += d.numel()
    assert loose <= max_share * total, (
        f"{loose} of {total} elements differ by more than {tight:.3g} (a tenth of a step); "
        f"rounding alone turns only elements with a rounding-level gradient (worst {worst:.3g})")
