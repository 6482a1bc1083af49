"""Measure one step in this process: ``python -m ddspo_fast.plan.worker`` reads a
``StepSetup`` as JSON on stdin and writes the measurement as JSON on stdout.

The GPU rules (``gpu_rules.py``) change the process's dispatcher for good, so each
estimate runs here, in a process of its own.
"""
from __future__ import annotations

import json
import sys

import torch

from .step import StepSetup, build, run_step
from .tracker import MemoryTracker


def _bytes(module, pred, granule) -> int:
    return sum((p.untyped_storage().nbytes() + granule - 1) // granule * granule
               for p in module.parameters() if pred(p))


def _frozen_linears(den) -> list:
    """(out, in) of each frozen nn.Linear weight (what a quantized base stores in 4/8 bit)."""
    return [list(m.weight.shape) for m in den.modules()
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]


def _largest_unit(den, granule, family=None) -> int:
    """Bytes of the largest unit a sharded run gathers whole at a time: the family's
    ``wrap_units`` (what train/sharding.py wraps one by one), each less the units nested
    in it; without a family, the model's ``_no_split_modules`` classes, or the blocks of
    its ModuleLists where it names none."""
    if family is not None:
        from ..models import get_family

        units = get_family(family).wrap_units(den)
    else:
        names = set(getattr(den, "_no_split_modules", None) or ())
        units = [m for m in den.modules() if type(m).__name__ in names]
    if not units:
        units = [u for ml in den.modules() if isinstance(ml, torch.nn.ModuleList) for u in ml]
    unit_ids = {id(u) for u in units}
    best = 0
    for u in units:
        nested = {id(p) for m in u.modules() if m is not u and id(m) in unit_ids
                  for p in m.parameters()}
        own = sum((p.untyped_storage().nbytes() + granule - 1) // granule * granule
                  for p in u.parameters() if id(p) not in nested)
        best = max(best, own)
    return best


def summary(den, ref, tracker: MemoryTracker, family=None) -> dict:
    g = tracker.granule
    trainable = [p for p in den.parameters() if p.requires_grad]
    return {
        "peak": tracker.peak,
        "phases": tracker.phase_peak,
        "saved": tracker.saved_total,
        "flops": dict(tracker.flops),
        "trainable_shapes": [list(p.shape) for p in trainable],
        "trainable_bytes": _bytes(den, lambda p: p.requires_grad, g),
        "policy_frozen_bytes": _bytes(den, lambda p: not p.requires_grad, g),
        "reference_bytes": (_bytes(ref, lambda p: True, g)
                            if ref is not None and ref is not den else 0),
        "frozen_linear_shapes": _frozen_linears(den),
        "largest_unit_bytes": _largest_unit(den, g, family),
        "params": sum(p.numel() for p in den.parameters()),
    }


def build_fake(setup: StepSetup):
    """The step's networks on fake tensors, under a tracker that counts their weights:
    ``(fake mode, denoiser, reference or None, tracker, make_input)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fm = FakeTensorMode()

    def make(p, dtype):
        with fm:
            return torch.empty(p.shape, dtype=dtype)

    def make_input(shape, dtype):
        with fm:
            return torch.zeros(shape, dtype=dtype)

    den, ref = build(setup, make)
    tracker = MemoryTracker(setup.granule)
    tracker.add_module(den)
    if ref is not None and ref is not den:
        tracker.add_module(ref)
    return fm, den, ref, tracker, make_input


def measure(setup: StepSetup) -> dict:
    """The tracked step on fake tensors: peak bytes per phase and category, FLOPs."""
    from .gpu_rules import cuda_autocast_rules

    torch.set_num_threads(1)
    if setup.gpu_rules:
        cuda_autocast_rules()
    fm, den, ref, tracker, make_input = build_fake(setup)
    tracker.watch_grads([p for p in den.parameters() if p.requires_grad])
    with fm, tracker:
        run_step(den, ref, setup, make_input, tracker=tracker)
    return summary(den, ref, tracker, setup.family)


def main() -> int:
    """One setup (a JSON object) or several (a list: one process, imports paid once)."""
    doc = json.loads(sys.stdin.read())
    if isinstance(doc, list):
        out = [measure(StepSetup(**d)) for d in doc]
    else:
        out = measure(StepSetup(**doc))
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
