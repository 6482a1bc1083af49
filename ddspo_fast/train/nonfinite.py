"""Non-finite loss / gradient detection without a host sync per step.

Each micro-step ORs "the loss is not finite" into a device-side flag; each optimizer step
adds "the gradient norm is not finite" and records the first bad optimizer step in a
device-side counter. Only ``first_bad_step()`` reads it back (one sync), which the trainer
calls on steps that already sync: log steps, checkpoint steps and the end.

Under fp16 loss scaling, overflowing gradients are routine (the scaler skips those steps
itself), so only the loss is checked there.
"""

from __future__ import annotations

from typing import Iterable

import torch


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients over the whole data-parallel group (a device
    tensor; no host sync). Replicated gradients (DDP, after its all-reduce) give it
    locally; sharded ones (DTensor) are reduced over their mesh (``full_tensor``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        norm = get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                     for g in grads]))
    full = getattr(norm, "full_tensor", None)  # a DTensor: partial sums per shard
    return full() if full is not None else norm


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    def __init__(self, device, check_grads: bool = True):
        self.device = torch.device(device)
        self.check_grads = check_grads
        self._window = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # 0: none
        self.skipped: list[int] = []  # optimizer steps whose update was skipped (skip policy)

    def see_loss(self, loss: torch.Tensor) -> None:
        """Every micro-step: remember a non-finite loss until the optimizer step."""
        self._window |= ~torch.isfinite(loss.detach()).all()

    def end_step(self, step: int, norm: torch.Tensor | None) -> torch.Tensor:
        """At an optimizer step (``step``, 1-based): the device-side bool "this step saw a
        non-finite loss or gradient", also recorded as the first bad step if it is."""
        bad = self._window.clone()
        if self.check_grads and norm is not None:
            bad |= ~torch.isfinite(norm.detach().to(self.device))
        self._window.zero_()
        self._first_bad = torch.where((self._first_bad == 0) & bad,
                                      torch.full_like(self._first_bad, step), self._first_bad)
        return bad

    def first_bad_step(self, accelerator=None) -> int:
        """The first optimizer step that saw a non-finite value on any process, 0 if none
        (one sync; collective when ``accelerator`` runs several processes, so every
        process reaches the same verdict)."""
        v = self._first_bad.reshape(1)
        if accelerator is not None and accelerator.num_processes > 1:
            v = accelerator.gather(v)
        bad = [int(x) for x in v.tolist() if int(x) > 0]
        return min(bad) if bad else 0

    def forget(self) -> None:
        """After a skipped step: the run goes on, so the record is cleared."""
        self._first_bad.zero_()
