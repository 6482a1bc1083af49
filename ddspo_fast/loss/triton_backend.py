"""Triton kernels for the `triton` backend: `ddspo_fast::triton_fwd` / `triton_bwd`.

Importing this module registers the kernels (for CUDA tensors, and for CPU tensors so the
test-suite can run them under `TRITON_INTERPRET=1`). Op schemas, fake kernels and
autograd live in `_ops.py`; the math is docs/internals.md section 1.

Memory traffic is the whole cost of this loss (a few FLOPs per byte), so the kernels are
built around reading each input exactly once:

* forward, kernel 1 (`_fwd_partials`): the grid is (pair, chunk). A program reads its
  chunk of the pair's two model rows, two target rows and one or two reference rows and
  writes four fp32 partial sums of squared errors. Splitting rows into chunks is what
  lets a batch of 8 SDXL/SD3 pairs (65,536 / 262,144 elements a row) fill every SM.
* forward, kernel 2 (`_fwd_finalize`): one program adds the partials in a fixed order
  (so results are bit-reproducible for a given shape and device; no float atomics) and
  does the per-pair math: margin, stable softplus, the loss, and `grad_scale`.
* backward (`_bwd`): one pass over model and targets writing the gradient once; the
  upstream gradient is read from device memory, so there is no host sync.

Cache hints follow who reads a row next: the forward keeps model and target rows in L2
(default policy) because the backward, which in a training step runs next, re-reads
them; reference rows are read once and marked evict-first; the backward is the last
reader of everything.

There is no single-pass (forward + backward in one kernel) variant. Every gradient
element needs its pair's sigmoid, i.e. all of the pair's chunks, so one kernel must either
wait for other programs (a spin barrier, which hangs when they are not co-resident, e.g.
beside another stream's kernel) or hand a whole pair's gradient to the last program to
finish (one program per pair writing while the rest of the GPU idles). Neither saves DRAM
traffic the two-pass path does not: the re-read comes from L2 only while the batch's rows
fit there, for the barrier kernel and for a backward that follows its forward alike.

Block sizes are chosen on principle (16-byte loads per thread and stream, enough bytes in
flight per SM) and await a sweep on a GPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _ops  # noqa: F401  (defines the op schemas registered below)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- device math

@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x without libdevice (which the interpreter lacks):
    # u = fl(1 + x) and log(u) * x / (u - 1) cancels the rounding of 1 + x (Goldberg).
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _pair_math(m_w, m_l, r_w, r_l, w, beta, inv_b, n):
    """Per-pair margin, weighted softplus(-z) and the unsigned gradient coefficient."""
    z = -(0.5 * beta) * ((m_w - m_l) - (r_w - r_l))
    e = tl.exp(-tl.abs(z))                       # in (0, 1]: never overflows
    # softplus(-z) = max(-z, 0) + log1p(exp(-|z|)); sigmoid(-z) from the same e.
    sp = tl.maximum(-z, 0.0) + _log1p(e)
    sig = tl.where(z >= 0.0, e / (1.0 + e), 1.0 / (1.0 + e))
    coef = ((w * inv_b) * sig) * beta / n
    return z, w * sp, coef


# --------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_partials(model_ptr, tw_ptr, tl_ptr, rw_ptr, rl_ptr, part_ptr,
                  B, N, s_m, s_tw, s_tl, s_rw, s_rl, chunk_len, n_chunks,
                  HAS_RW: tl.constexpr, HAS_RL: tl.constexpr, BLOCK: tl.constexpr,
                  ACC: tl.constexpr):
    """Sums of squared errors of one chunk of a pair's rows, stored as partials (4, B, C)
    (no reference rows when their errors are given: HAS_RL false)."""
    pid = tl.program_id(0)
    pair = pid // n_chunks
    chunk = pid % n_chunks
    p64 = pair.to(tl.int64)                      # row offsets overflow int32 at SD3 sizes
    mw_row = model_ptr + p64 * s_m
    ml_row = model_ptr + (p64 + B) * s_m
    tw_row = tw_ptr + p64 * s_tw
    tl_row = tl_ptr + p64 * s_tl
    rl_row = rl_ptr + p64 * s_rl
    rw_row = rw_ptr + p64 * s_rw
    acc_mw = tl.zeros((BLOCK,), ACC)
    acc_ml = tl.zeros((BLOCK,), ACC)
    acc_rw = tl.zeros((BLOCK,), ACC)
    acc_rl = tl.zeros((BLOCK,), ACC)
    lo = chunk * chunk_len
    hi = tl.minimum(lo + chunk_len, N)
    cols = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        offs = start + cols
        mask = offs < hi
        # Model and target rows: default policy, the backward re-reads them (from L2 when
        # the batch fits). Reference rows: read once, evict-first.
        t_w = tl.load(tw_row + offs, mask=mask, other=0.0).to(ACC)
        t_l = tl.load(tl_row + offs, mask=mask, other=0.0).to(ACC)
        d = tl.load(mw_row + offs, mask=mask, other=0.0).to(ACC) - t_w
        acc_mw += d * d
        d = tl.load(ml_row + offs, mask=mask, other=0.0).to(ACC) - t_l
        acc_ml += d * d
        if HAS_RL:
            d = tl.load(rl_row + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC) - t_l
            acc_rl += d * d
        if HAS_RW:
            d = tl.load(rw_row + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC) - t_w
            acc_rw += d * d
    # partials layout (4, B, n_chunks): finalize reads each quantity as a 2-D tile.
    base = part_ptr + p64 * n_chunks + chunk
    stride_q = B * n_chunks
    tl.store(base, tl.sum(acc_mw, axis=0))
    tl.store(base + stride_q, tl.sum(acc_ml, axis=0))
    tl.store(base + 2 * stride_q, tl.sum(acc_rw, axis=0))
    tl.store(base + 3 * stride_q, tl.sum(acc_rl, axis=0))


@triton.jit
def _fwd_finalize(part_ptr, w_ptr, rmse_in_ptr, loss_ptr, mmse_ptr, rmse_ptr, margin_ptr,
                  gs_ptr, B, N, n_chunks, beta,
                  HAS_W: tl.constexpr, GIVEN_R: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # One program: B * n_chunks is small (a few thousand at most), and a fixed summation
    # order makes the loss reproducible, which float atomics would not.
    # `+ N` rather than N.to(): Triton turns an int argument equal to 1 into a constant.
    n = tl.zeros((), ACC) + N
    inv_b = 1.0 / (tl.zeros((), ACC) + B)
    loss_acc = tl.zeros((BLOCK_B,), ACC)
    stride_q = B * n_chunks
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        s_mw = tl.zeros((BLOCK_B,), ACC)
        s_ml = tl.zeros((BLOCK_B,), ACC)
        s_rw = tl.zeros((BLOCK_B,), ACC)
        s_rl = tl.zeros((BLOCK_B,), ACC)
        for c0 in range(0, n_chunks, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cols[None, :] < n_chunks)
            p = part_ptr + rows[:, None] * n_chunks + cols[None, :]
            s_mw += tl.sum(tl.load(p, mask=m2, other=0.0), axis=1)
            s_ml += tl.sum(tl.load(p + stride_q, mask=m2, other=0.0), axis=1)
            s_rw += tl.sum(tl.load(p + 2 * stride_q, mask=m2, other=0.0), axis=1)
            s_rl += tl.sum(tl.load(p + 3 * stride_q, mask=m2, other=0.0), axis=1)
        m_w = s_mw / n
        m_l = s_ml / n
        if GIVEN_R:  # the reference's row errors, given (a reference cache)
            r_w = tl.load(rmse_in_ptr + rows, mask=rmask, other=0.0).to(ACC)
            r_l = tl.load(rmse_in_ptr + B + rows, mask=rmask, other=0.0).to(ACC)
        else:
            r_w = s_rw / n
            r_l = s_rl / n
        if HAS_W:
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
        else:
            w = tl.where(rmask, 1.0, 0.0).to(ACC)
        z, wsp, coef = _pair_math(m_w, m_l, r_w, r_l, w, beta, inv_b, n)
        loss_acc += tl.where(rmask, wsp, 0.0)
        tl.store(mmse_ptr + rows, m_w.to(tl.float32), mask=rmask)
        tl.store(mmse_ptr + B + rows, m_l.to(tl.float32), mask=rmask)
        tl.store(rmse_ptr + rows, r_w.to(tl.float32), mask=rmask)
        tl.store(rmse_ptr + B + rows, r_l.to(tl.float32), mask=rmask)
        tl.store(margin_ptr + rows, z.to(tl.float32), mask=rmask)
        # grad_scale in the accumulation dtype: fp64 inputs keep an fp64 gradient.
        tl.store(gs_ptr + rows, coef.to(gs_ptr.dtype.element_ty), mask=rmask)
        tl.store(gs_ptr + B + rows, (-coef).to(gs_ptr.dtype.element_ty), mask=rmask)
    tl.store(loss_ptr, (tl.sum(loss_acc, axis=0) * inv_b).to(tl.float32))


@triton.jit
def _bwd(gl_ptr, model_ptr, tw_ptr, tl_ptr, gs_ptr, out_ptr,
         B, N, s_m, s_tw, s_tl, tiles,
         BLOCK: tl.constexpr, ACC: tl.constexpr):
    # One program = one tile of both rows of a pair: no branch on which target to read.
    pid = tl.program_id(0)
    pair = pid // tiles
    tile = pid % tiles
    p64 = pair.to(tl.int64)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(gl_ptr).to(ACC)
    c_w = g * tl.load(gs_ptr + pair).to(ACC)
    c_l = g * tl.load(gs_ptr + B + pair).to(ACC)
    t_w = tl.load(tw_ptr + p64 * s_tw + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    m_w = tl.load(model_ptr + p64 * s_m + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    t_l = tl.load(tl_ptr + p64 * s_tl + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    m_l = tl.load(model_ptr + (p64 + B) * s_m + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + p64 * N + offs, (c_w * (m_w - t_w)).to(ty), mask=mask)
    tl.store(out_ptr + (p64 + B) * N + offs, (c_l * (m_l - t_l)).to(ty), mask=mask)


# --------------------------------------------------------------------------- host side

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(dtype: torch.dtype) -> Tuple[int, int]:
    """(elements per tile, warps): 8 warps x 32 threads x one 16-byte load per stream."""
    per_thread = 16 // torch.empty((), dtype=dtype).element_size()
    warps = 8
    return 32 * warps * per_thread, warps


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return 4 * sms                     # a few CTAs per SM hide DRAM latency
    return 4                               # interpreter: each program costs real time


def plan_chunks(b: int, n: int, block: int, device: torch.device,
                n_chunks: Optional[int] = None) -> Tuple[int, int]:
    """(chunk length, chunks per pair): enough programs to fill the device, whole tiles."""
    tiles = triton.cdiv(n, block)
    if n_chunks is None:
        n_chunks = triton.cdiv(_target_programs(device), b)
    n_chunks = max(1, min(n_chunks, tiles))
    chunk_len = triton.cdiv(tiles, n_chunks) * block
    return chunk_len, triton.cdiv(n, chunk_len)


def _check(name: str, t: torch.Tensor, rows: int, n: int, model: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != n:
        raise ValueError(f"{name}: expected shape ({rows}, {n}), got {tuple(t.shape)}")
    if t.dtype != model.dtype or t.device != model.device:
        raise ValueError(f"{name}: expected {model.dtype} on {model.device}, "
                         f"got {t.dtype} on {t.device}")
    if n > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: the last dim must have stride 1")


def _validate(model, target_w, target_l, ref_w, ref_l, weights, ref_mse):
    if model.dim() != 2 or model.shape[0] % 2 or model.shape[0] == 0:
        raise ValueError(f"model: expected (2B, N) with B >= 1, got {tuple(model.shape)}")
    if model.dtype not in _SUPPORTED:
        raise ValueError(f"model: dtype {model.dtype} not supported by the triton backend")
    if model.device.type == "cpu" and not _interpret():
        raise RuntimeError("the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    b, n = model.shape[0] // 2, model.shape[1]
    if n > 1 and model.stride(1) != 1:
        raise ValueError("model: the last dim must have stride 1")
    for name, t in (("target_w", target_w), ("target_l", target_l)):
        _check(name, t, b, n, model)
    if ref_mse is not None:
        if ref_w is not None or ref_l is not None:
            raise ValueError("ref_mse: give either the reference rows (ref_w, ref_l) or "
                             "ref_mse, not both")
        if (ref_mse.shape != (2 * b,) or ref_mse.device != model.device
                or not ref_mse.is_floating_point()):
            raise ValueError(f"ref_mse: expected floating ({2 * b},) on {model.device}, got "
                             f"{ref_mse.dtype} {tuple(ref_mse.shape)} on {ref_mse.device}")
    elif ref_l is None:
        raise ValueError("ref_l: required unless ref_mse is given")
    else:
        _check("ref_l", ref_l, b, n, model)
    if ref_w is not None:
        _check("ref_w", ref_w, b, n, model)
    if weights is not None and (weights.shape != (b,) or weights.device != model.device):
        raise ValueError(f"weights: expected ({b},) on {model.device}, got "
                         f"{tuple(weights.shape)} on {weights.device}")
    return b, n


def _on(dev: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _outputs(b: int, dev: torch.device, acc_t: torch.dtype):
    """loss, model_mse, ref_mse, margin (fp32) and grad_scale (fp32, fp64 for fp64 inputs)."""
    f32 = dict(dtype=torch.float32, device=dev)
    return (torch.empty((), **f32), torch.empty((2 * b,), **f32), torch.empty((2 * b,), **f32),
            torch.empty((b,), **f32), torch.empty((2 * b,), dtype=acc_t, device=dev))


def forward(model: torch.Tensor, target_w: torch.Tensor, target_l: torch.Tensor,
            ref_w: Optional[torch.Tensor], ref_l: Optional[torch.Tensor],
            weights: Optional[torch.Tensor], beta: float,
            ref_mse: Optional[torch.Tensor] = None, *,
            n_chunks: Optional[int] = None, block: Optional[int] = None):
    """Host side of `triton_fwd`; `n_chunks` / `block` override the plan (tests, sweeps)."""
    b, n = _validate(model, target_w, target_l, ref_w, ref_l, weights, ref_mse)
    dev = model.device
    blk, warps = _block(model.dtype)
    blk = block or blk
    chunk_len, chunks = plan_chunks(b, n, blk, dev, n_chunks)
    acc_t = _acc_torch(model.dtype)
    part = torch.empty((4, b, chunks), dtype=acc_t, device=dev)
    loss, mmse, rmse, margin, gs = _outputs(b, dev, acc_t)
    has_rw, has_rl = ref_w is not None, ref_l is not None
    rl = ref_l if has_rl else target_l         # never read when HAS_RL is False
    rw = ref_w if has_rw else rl               # never read when HAS_RW is False
    w = weights.to(acc_t).contiguous() if weights is not None else part
    r_in = ref_mse.to(acc_t).contiguous() if ref_mse is not None else part
    acc = _acc(model.dtype)
    with _on(dev):
        _fwd_partials[(b * chunks,)](
            model, target_w, target_l, rw, rl, part,
            b, n, model.stride(0), target_w.stride(0), target_l.stride(0), rw.stride(0),
            rl.stride(0), chunk_len, chunks,
            HAS_RW=has_rw, HAS_RL=has_rl, BLOCK=blk, ACC=acc, num_warps=warps)
        block_c = min(triton.next_power_of_2(chunks), 64)
        block_b = max(1, min(triton.next_power_of_2(b), 4096 // block_c))
        _fwd_finalize[(1,)](
            part, w, r_in, loss, mmse, rmse, margin, gs, b, n, chunks, float(beta),
            HAS_W=weights is not None, GIVEN_R=ref_mse is not None, BLOCK_B=block_b,
            BLOCK_C=block_c, ACC=acc, num_warps=4)
    return loss, mmse, rmse, margin, gs


def backward(grad_loss: torch.Tensor, model: torch.Tensor, target_w: torch.Tensor,
             target_l: torch.Tensor, grad_scale: torch.Tensor, *,
             block: Optional[int] = None) -> torch.Tensor:
    """Host side of `triton_bwd`: grad[j] = grad_loss * grad_scale[j] * (model[j] - target[j])."""
    b, n = model.shape[0] // 2, model.shape[1]
    if n > 1 and model.stride(1) != 1:
        raise ValueError("model: the last dim must have stride 1")
    for name, t in (("target_w", target_w), ("target_l", target_l)):
        _check(name, t, b, n, model)
    blk, warps = _block(model.dtype)
    blk = block or blk
    out = torch.empty((2 * b, n), dtype=model.dtype, device=model.device)
    tiles = triton.cdiv(n, blk)
    gl = grad_loss.reshape(()).to(torch.float32)
    gs = grad_scale.to(_acc_torch(model.dtype)).contiguous()
    with _on(model.device):
        _bwd[(b * tiles,)](gl, model, target_w, target_l, gs, out, b, n,
                           model.stride(0), target_w.stride(0), target_l.stride(0), tiles,
                           BLOCK=blk, ACC=_acc(model.dtype), num_warps=warps)
    return out


# --------------------------------------------------------------------------- registration

def _fwd_kernel(model, target_w, target_l, ref_w, ref_l, weights, beta, ref_mse=None):
    return forward(model, target_w, target_l, ref_w, ref_l, weights, beta, ref_mse)


def _bwd_kernel(grad_loss, model, target_w, target_l, grad_scale):
    return backward(grad_loss, model, target_w, target_l, grad_scale)


torch.library.register_kernel("ddspo_fast::triton_fwd", ("cpu", "cuda"), _fwd_kernel)
torch.library.register_kernel("ddspo_fast::triton_bwd", ("cpu", "cuda"), _bwd_kernel)
