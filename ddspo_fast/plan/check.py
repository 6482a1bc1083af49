"""The planner held against an allocator: the same step on real weights, on the CPU,
measured by torch.profiler's memory events, and the traced estimate of it.

On a CPU neither the CUDA autocast rules nor the 512-byte granule apply, so the
comparison traces with ``gpu_rules=False`` and ``granule=1`` in fp32: what it checks is
the tracing itself (which tensors live when), the part a GPU run would calibrate last.
"""
from __future__ import annotations

import torch

from .step import StepSetup, build, run_step


def _live_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def measured_peak(setup: StepSetup, weights_dir: str, seed: int = 0) -> int:
    """Peak bytes of the step on real weights: the resident weights plus the highest
    running sum of the CPU allocator's allocations and frees during the step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(seed)
    den, ref = build(setup, lambda p, d: p.detach().to(d).clone(), weights_dir=weights_dir)
    mods = [den] + ([ref] if ref is not None and ref is not den else [])
    resident = _live_bytes(mods)

    def make_input(shape, dtype):
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype)
        return torch.randint(0, 900, shape, dtype=dtype) if dtype == torch.int64 else torch.ones(shape, dtype=dtype)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(den, ref, setup, make_input)
    # Every allocation and free, in time order (prof.events() folds those inside ops).
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = top = 0
    for e in events:
        cur += e.nbytes()
        top = max(top, cur)
    return resident + top


def traced_peak(setup: StepSetup) -> int:
    """The planner's count of the same step (fake tensors, no GPU rules, exact bytes)."""
    from .worker import build_fake

    fm, den, ref, tracker, make_input = build_fake(setup)
    with fm, tracker:
        run_step(den, ref, setup, make_input, tracker=tracker)
    return tracker.peak
