"""Count the bytes a run keeps alive, op by op, without running it on a device.

A dispatch mode sees every tensor an op creates; a storage is counted when it first
appears and released by a weakref finalizer when its last reference dies, which is the
moment a caching allocator gets the block back. Sizes round up to ``granule`` bytes
(512 for CUDA's caching allocator; 1 to compare with a CPU allocator).

It also counts the FLOPs of matrix products, convolutions and attention per phase, with
torch's FlopCounterMode formulas (that mode's own module hooks would keep tensors alive
under activation checkpointing).

Each live storage has a category (weights, autocast copies of weights, gradients, saved
activations, other activations) and the tracker keeps the per-category totals at the
peak of each phase, so a report can say what each peak is made of.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:  # the formulas of torch's FlopCounterMode, without its module hooks
    from torch.utils.flop_counter import flop_registry as _FLOPS
except ImportError:  # pragma: no cover - older torch
    _FLOPS = {}

CATEGORIES = ("weights", "autocast", "grads", "saved", "transient")
_CAST_OPS = {torch.ops.aten._to_copy.default}


_ALIAS: dict = {}


def _aliases(func) -> bool:
    hit = _ALIAS.get(func)
    if hit is None:
        hit = _ALIAS[func] = any(r.alias_info is not None for r in func._schema.returns)
    return hit


class MemoryTracker(TorchDispatchMode):
    def __init__(self, granule: int = 512):
        super().__init__()
        self.granule = granule
        self.live: dict[int, list] = {}   # storage key -> [bytes, category, phase]
        self.by_cat = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.phase_peak: dict[str, dict] = {}
        self.saved_total = 0
        self.flops: dict[str, int] = {}

    def _round(self, n: int) -> int:
        g = self.granule
        return (n + g - 1) // g * g

    # ---------------------------------------------------------------- storages
    def add(self, t: torch.Tensor, category: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = self._round(st.nbytes())
        self.live[key] = [n, category, self.phase]
        self.by_cat[category] += n
        self.current += n
        weakref.finalize(st, self._free, key)
        self._see_peak()

    def _free(self, key: int) -> None:
        rec = self.live.pop(key, None)
        if rec is not None:
            self.current -= rec[0]
            self.by_cat[rec[1]] -= rec[0]

    def recategorize(self, key: int, category: str) -> None:
        rec = self.live.get(key)
        if rec is not None and rec[1] != category:
            self.by_cat[rec[1]] -= rec[0]
            self.by_cat[category] += rec[0]
            rec[1] = category

    def add_module(self, module: torch.nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.add(t, "weights")

    def watch_grads(self, params) -> None:
        """Count each parameter's .grad as a gradient once it is accumulated."""
        def hook(p):
            if p.grad is not None:
                self.recategorize(p.grad.untyped_storage()._cdata, "grads")
        for p in params:
            p.register_post_accumulate_grad_hook(hook)

    def _see_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
        rec = self.phase_peak.get(self.phase)
        if rec is None or self.current > rec["bytes"]:
            self.phase_peak[self.phase] = {"bytes": self.current, **self.by_cat}

    # ---------------------------------------------------------------- phases
    @contextmanager
    def in_phase(self, name: str):
        prev, self.phase = self.phase, name
        self._see_peak()
        try:
            yield
        finally:
            self.phase = prev

    def keep_as_saved(self, phase: str) -> None:
        """The activations created in ``phase`` and still live are the saved ones."""
        for key, rec in list(self.live.items()):
            if rec[1] == "transient" and rec[2] == phase:
                self.recategorize(key, "saved")
        self.saved_total = self.by_cat["saved"]

    def live_bytes(self, category: str) -> int:
        return self.by_cat[category]

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOPS.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.phase] = self.flops.get(self.phase, 0) + formula(*args, **kwargs, out_val=out)
        if _aliases(func):
            return out  # a view or an in-place result: the storage of an input
        category = "transient"
        if func in _CAST_OPS and args and isinstance(args[0], torch.Tensor):
            rec = self.live.get(args[0].untyped_storage()._cdata)
            if rec is not None and rec[1] == "weights":
                category = "autocast"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, category)
        return out
