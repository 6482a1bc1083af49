"""The loss subsystem: DDSPO / Diffusion-DPO pair loss with interchangeable backends.

    api.py             the public functions, nothing else
    checks.py          argument checks: one clear ValueError naming the argument
    layout.py          user tensors (2B, *S) / (3B, *S) to row-block views
    compute.py         row blocks to the loss by the chosen backend (eager math or an op)
    recipes.py         what the public Diffusion-DPO / DDSPO scripts do around the loss
    eager.py           the `torch` backend: the math in plain PyTorch, ground truth for kernels
    stats.py           the result types shared by every backend
    _ops.py            torch.library schemas, fake kernels and the one autograd wiring
    dispatch.py        which backend can run where (every reason it cannot), `auto`'s choice
    cuda_arch.py       which GPUs the compiled CUDA kernels can run on
    _ext.py            loading the compiled extension `ddspo_fast._C` (C++ cpu, CUDA kernels)
    triton_backend.py  the Triton kernels, registered as `ddspo_fast::triton_*`

Nothing here imports the trainer, data, models or CLI (docs/design.md).
"""
from .api import (DDSPOLoss, ddspo_loss, ddspo_loss_from_ref_mse, ddspo_loss_from_reference,
                  dpo_loss, reference_mse)
from .checks import LOSS_TYPES
from .dispatch import BackendUnavailableError, available_backends
from .eager import pair_terms
from .recipes import CONVENTIONS

__all__ = ["ddspo_loss", "ddspo_loss_from_reference", "ddspo_loss_from_ref_mse",
           "reference_mse", "dpo_loss", "DDSPOLoss",
           "available_backends", "BackendUnavailableError", "LOSS_TYPES", "CONVENTIONS",
           "pair_terms"]
