"""Deterministic draws: each pair-draw's randomness is a pure function of
``(seed, pair id, draw index)``.

A pair-draw is one pair at one ``(t, eps)`` (docs/internals.md §4). Its timestep, noise,
random-condition decision and substitute prompt come from a CPU ``torch.Generator``
seeded with a hash of ``(seed, pair id, draw index)``, drawn in a fixed order and only
then moved to the training device. So a draw is the same on any device, world size,
batch size or batch composition, a resumed run redraws exactly what it would have drawn,
and the frozen networks' outputs on a draw can be computed ahead of training
(``refcache.py``, ``precompute.py``).

Draw index: a pair is visited once per epoch (the data order is a permutation per
epoch) with ``timesteps_per_pair = K`` draws per visit, so its ``j``-th draw in epoch
``e`` has index ``e * K + j``.

Order of the numbers drawn from one draw's generator (changing it changes every run and
invalidates every reference cache, see ``DRAWS_VERSION``): the timestep (the family's
``sample_timesteps`` on one row), the noise (the latent's shape), one uniform ``u`` for
the mixing decision (``u < p(tau)``), two integers picking the substitute prompt and its
degraded version from the pool. ``u`` and the picks are drawn whether or not mixing is
on, so a run's ``(t, eps)`` do not depend on it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .randcond import mix_probability

# Bump when the draw order or hashing changes: caches record it in their fingerprint.
DRAWS_VERSION = 1


def draw_seed(seed: int, pair_id: str, draw_index: int) -> int:
    """The 63-bit generator seed of one pair-draw."""
    key = f"{int(seed)}\x1f{pair_id}\x1f{int(draw_index)}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def draw_indices(epoch: int, k: int) -> list[int]:
    """Draw indices of one visit (epoch ``epoch``) of a pair with ``k`` draws per visit."""
    return [epoch * k + j for j in range(k)]


def batch_draws(batch: dict, epoch: int, k: int) -> tuple[list[str], list[list[int]]]:
    """A micro-batch's pair ids and each pair's draw indices at visit ``epoch`` with ``k``
    draws per visit; ``batch["draw_epoch"]``, when present, is the visit instead (a caller
    pinning the draws, e.g. the benchmark's repeated steps)."""
    ids = batch_ids(batch)
    return ids, [draw_indices(int(batch.get("draw_epoch", epoch)), k)] * len(ids)


def draws_needed(max_steps: int, grad_accum: int, batches_per_epoch: int, k: int) -> int:
    """Draws per pair a run of ``max_steps`` optimizer steps uses (micro-batches per process
    per epoch = ``batches_per_epoch``): every epoch it touches costs ``k`` draws."""
    epochs = math.ceil(max_steps * grad_accum / batches_per_epoch)
    return epochs * k


@dataclass
class Draws:
    """The draws of ``n`` rows, on the CPU (``mixed`` only when a schedule was given)."""

    t: torch.Tensor              # (n,) the denoiser's timesteps
    noise: torch.Tensor          # (n, *S) fp32
    u: torch.Tensor              # (n,) fp32 uniform, the mixing decision's draw
    pick: torch.Tensor           # (n, 2) int64, substitute prompt / its degraded version
    mixed: Optional[torch.Tensor] = None  # (n,) bool


def make_draws(adapter, ids: Sequence[str], indices: Sequence[Sequence[int]], shape, *, seed: int,
               logit_mean: float = 0.0, logit_std: float = 1.0, scheme: Optional[str] = None,
               mode_scale: float = 1.29, shift: Optional[float] = None,
               mix_schedule: Optional[str] = None, mix_lambda: float = 0.0) -> Draws:
    """Rows ``[(id_0, indices[0][0]), (id_0, indices[0][1]), ..., (id_1, indices[1][0]), ...]``
    (pair-major, the order ``repeat_interleave`` gives), each drawn from its own generator.

    ``mix_schedule`` (``rand_cond_schedule``) adds ``mixed = u < p(tau)``, decided here on
    the CPU so it is the same everywhere.
    """
    if len(ids) != len(indices):
        raise ValueError(f"indices: expected one list of draw indices per pair ({len(ids)}), "
                         f"got {len(indices)}")
    ts, noises, us, picks = [], [], [], []
    shape = tuple(int(s) for s in shape)
    for pid, idx in zip(ids, indices):
        for d in idx:
            g = torch.Generator(device="cpu").manual_seed(draw_seed(seed, str(pid), d))
            ts.append(adapter.sample_timesteps(1, device="cpu", generator=g, scheme=scheme,
                                               logit_mean=logit_mean, logit_std=logit_std,
                                               mode_scale=mode_scale, shift=shift))
            noises.append(torch.randn(shape, generator=g))
            us.append(torch.rand(1, generator=g))
            picks.append(torch.randint(0, 2 ** 31 - 1, (1, 2), generator=g))
    out = Draws(t=torch.cat(ts), noise=torch.stack(noises), u=torch.cat(us),
                pick=torch.cat(picks))
    if mix_schedule is not None:
        out.mixed = out.u < mix_probability(adapter.noise_level(out.t), mix_schedule, mix_lambda)
    return out


def pick_prompts(pool: Sequence[tuple[str, Sequence[str]]], pick: torch.Tensor
                 ) -> tuple[list[str], list[str]]:
    """Substitute prompts ``(c', c'-)`` of each row from the random-condition pool
    (``randcond.load_prompt_pool``), chosen by the rows' ``pick`` integers."""
    ps, ns = [], []
    for a, b in pick.tolist():
        p, negs = pool[a % len(pool)]
        ps.append(p)
        ns.append(negs[b % len(negs)])
    return ps, ns


def batch_ids(batch: dict) -> list[str]:
    ids = batch.get("id")
    if ids is None:
        raise ValueError("batch: has no 'id' list; draws are a function of each pair's id "
                         "(collate_pairs keeps the dataset's ids)")
    return [str(i) for i in ids]
