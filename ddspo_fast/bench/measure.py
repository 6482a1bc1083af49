"""Measuring training steps: FLOPs (executed, and the objective's useful work), denoiser
rows counted at the modules, step times taken interleaved across configurations, and the
largest batch that fits."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .device import free_memory, is_oom, sync
from .steps import RowCounter


# ------------------------------------------------------------ FLOPs and rows
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape, **kw) -> int:
    """convolution_backward FLOPs that respect groups.

    torch's own formula (2.13) ignores `groups` for the weight gradient and so counts a
    depthwise conv's backward ~channels times too high (SANA's GLUMBConv: 29x in the
    tiny config). Each requested gradient costs exactly one forward convolution.
    """
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


@contextlib.contextmanager
def eager():
    """torch.compile'd modules run eagerly inside, so forward hooks and the FLOP counter
    see every call and every op (the FLOPs of the math do not depend on compilation)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def count_flops(fn: Callable, *args) -> float:
    """FLOPs of fn(*args) as torch.utils.flop_counter counts them (matmuls, convolutions,
    attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    fix = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        fn(*args)
    return float(fc.get_total_flops())


def count_step(step, batch) -> tuple[float, int]:
    """(executed FLOPs, denoiser rows) of one full step, run eagerly. The FLOPs include
    every reference row and any recomputation; the rows are what the denoiser modules'
    forward calls received (a forward pre-hook on each), not what the config says."""
    with eager(), RowCounter(step.denoisers()) as rc:
        flops = count_flops(step, batch)
    return flops, rc.rows


def useful_flops(step, batch) -> float:
    """FLOPs the TF-CPP objective needs per step: policy forward + backward on 2 rows per
    pair and one reference forward on 3 rows per pair, without recomputation."""
    with eager():
        return count_flops(step.objective_passes, batch)


# ------------------------------------------------------------ timing
def time_steps(step, batch, device, n: int) -> tuple[list, list, list]:
    """Wall times, optimizer-step-part times (the step's ``last_update_s``, None where it
    has none) and losses of n steps, each ended by a device sync (CPU: reading the loss);
    the losses are read after the clock stops."""
    times, updates, losses = [], [], []
    for _ in range(n):
        sync(device)
        tic = time.perf_counter()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        else:
            loss.item()
        times.append(time.perf_counter() - tic)
        updates.append(getattr(step, "last_update_s", None))
        losses.append(float(loss))
    return times, updates, losses


@dataclass
class Measured:
    times: list = field(default_factory=list)
    update_times: list = field(default_factory=list)   # the optimizer-step part of each
    flops: Optional[float] = None        # executed per step
    rows: Optional[int] = None           # denoiser rows per step, counted
    peak_mem_gb: Optional[float] = None
    loss: Optional[float] = None         # of the last step
    first_loss: Optional[float] = None   # of the first step this configuration took
    skipped_steps: int = 0
    error: Optional[str] = None
    channels_last_after: Optional[bool] = None   # conv weights' layout after the timed steps
    live_settings: Optional[dict] = None  # the step's facts() as built (what really runs)


@dataclass
class Entry:
    """One configuration to time: a key and how to build its step."""
    key: str
    build: Callable
    m: Measured = field(default_factory=Measured)
    precompute: Optional[dict] = None    # the reference cache's precompute summary, raw


def _after(e: Entry, step, accumulate: bool = False) -> None:
    """What a step object reports after its timed steps."""
    skipped = getattr(step, "skipped", 0)
    e.m.skipped_steps = e.m.skipped_steps + skipped if accumulate else skipped
    probe = getattr(step, "weights_channels_last", None)
    if probe is not None:
        e.m.channels_last_after = probe()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_interleaved(entries: list, batch: dict, device: torch.device, *, warmup: int,
                    steps: int, mode: str, rounds: int, count: bool, log) -> Optional[float]:
    """Time every entry on the same batch, interleaved; returns the objective's useful
    FLOPs per step (counted on the first ladder step built), or None.

    mode "steps": all steps live at once and alternate step by step, the order reversed
    every step (A B C C B A ...), so a burst of machine load hits all alike (CPU default).
    mode "rounds": each round builds every step in turn, warms it up, times its share of
    the steps, records its peak memory and frees it; rounds alternate the order (GPU
    default: real models do not fit side by side, and peak memory is per configuration).
    An out-of-memory error is recorded for its entry, not raised.
    """
    useful = None

    def first_touch(e: Entry, step) -> None:
        nonlocal useful
        if e.m.live_settings is None and hasattr(step, "facts"):
            e.m.live_settings = step.facts()
        for _ in range(warmup):
            loss = step(batch)
            if e.m.first_loss is None:
                e.m.first_loss = float(loss)
        sync(device)
        if count and e.m.flops is None:
            if useful is None and hasattr(step, "objective_passes"):
                useful = useful_flops(step, batch)
            flops, rows = count_step(step, batch)
            e.m.flops, e.m.rows = flops, rows

    def record(e: Entry, times: list, updates: list, losses: list) -> None:
        e.m.times += times
        e.m.update_times += updates
        if e.m.first_loss is None:
            e.m.first_loss = losses[0]
        e.m.loss = losses[-1]

    def oom(e: Entry, step) -> None:
        e.m.error = "out of memory"
        log(f"  {e.key}: out of memory")
        if step is not None:
            step.reset()

    if mode == "steps":
        live = {}
        for e in entries:
            step = None
            try:
                step = e.build()
                first_touch(e, step)
                live[e.key] = (e, step)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                oom(e, step)
                if step is not None:
                    step.close()
                free_memory(device)
        order = [live[k] for k in live]
        for i in range(steps):
            for e, step in (order if i % 2 == 0 else order[::-1]):
                record(e, *time_steps(step, batch, device, 1))
        for e, step in order:
            _after(e, step)
            step.close()
        live.clear()
        free_memory(device)
        return useful
    if mode != "rounds":
        raise ValueError(f"mode: expected 'steps' or 'rounds', got {mode!r}")
    for r, k in enumerate(_split(steps, max(1, rounds))):
        for e in (entries if r % 2 == 0 else entries[::-1]):
            if e.m.error or k == 0:
                continue
            step = None
            try:
                step = e.build()
                first_touch(e, step)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                record(e, *time_steps(step, batch, device, k))
                _after(e, step, accumulate=True)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                    e.m.peak_mem_gb = max(peak, e.m.peak_mem_gb or 0.0)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                oom(e, step)
            finally:
                if step is not None:
                    step.close()
                step = None
                free_memory(device)
    return useful


# ------------------------------------------------------------ largest batch
def find_max_batch(build: Callable, make_batch: Callable, device, cap: int) -> int:
    """Largest batch (<= cap) for which two steps run without running out of memory.

    One step object (the model loaded once), probed by doubling and then bisection;
    after an OOM the partial step's grads are dropped and the cache freed. A model that
    does not fit at all gives 0.
    """
    try:
        step = build()
    except RuntimeError as e:
        if not is_oom(e):
            raise
        free_memory(device)
        return 0

    def fits(n: int) -> bool:
        ok = True
        try:
            batch = make_batch(n)
            for _ in range(2):
                step(batch)
            sync(device)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            ok = False
        batch = None
        step.reset()
        free_memory(device)
        return ok

    try:
        lo, hi = 0, 1
        while hi <= cap and fits(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    finally:
        step.close()
        del step
        free_memory(device)
    return lo
