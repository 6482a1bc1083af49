"""Sharding a denoiser across the processes of a run (FSDP2, torch's ``fully_shard``).

For a model one GPU cannot hold: every parameter is split along its first dimension
across the N processes; a block's parameters are gathered just for its forward (and again
for its backward) and freed after, so a process holds 1/N of the weights, gradients and
optimizer state plus one block at full size.

* Units: each denoiser block is its own unit (the classes the family
  declares, ``wrap_blocks``), the whole denoiser last (it takes what no block holds: embeddings,
  in/out projections, norms). A block with gradient checkpointing recomputes inside its
  unit; the gather is repeated for the recompute.
* What is sharded: the policy (LoRA: the frozen base and its adapters in the same units;
  only the adapters train), and a full fine-tune's live reference as a second sharded
  module that never gets gradients or optimizer state. A LoRA run's reference is the
  same sharded module with adapters off, DD-CPP's pair adapters ride on the module they
  were loaded into; with a reference cache there is no frozen network at all.
* Precision: ``mixed_precision='bf16'`` gathers parameters in bf16 and reduces gradients
  in fp32 (``MixedPrecisionPolicy``); the trained weights and optimizer state stay fp32.
* Why ``fully_shard`` is called here and not through accelerate's FSDP2 plugin
  (``Accelerator.prepare``): the plugin prepares one model, together with its optimizer,
  per call and wraps by a global class list, while a run here shards two modules (the
  policy and a frozen reference without an optimizer) with the family's own blocks; and
  on a CPU accelerate drops the FSDP setting (``distributed_type`` stays MULTI_CPU), so
  the plugin path could not be tested without a GPU. The launch is still accelerate's:
  ``launch_options`` reads the settings ``accelerate launch --config_file`` passes.

Checkpoints stay pickle-free (``torch.distributed.checkpoint`` pickles its metadata):
``local_trainable`` / ``local_optimizer`` give each process's shards as plain tensors,
``checkpoint.save_sharded`` writes them as safetensors with their layout as JSON, and
``full_tensors`` puts shards back together (the export of a sharded checkpoint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

#: the optimizers whose state is per-element and shards with the parameters
SHARDABLE_OPTIMIZERS = ("adamw",)


def block_classes(family: str) -> tuple[str, ...]:
    """Class names of ``family``'s denoiser blocks (each one unit of sharding): what the
    family declares as ``wrap_blocks`` in the registry."""
    from ..models import get_family

    declared = tuple(getattr(get_family(family), "wrap_blocks", ()) or ())
    if not declared:
        raise ValueError(f"family: {family!r} declares no denoiser blocks to shard (its "
                         "adapter's wrap_blocks is empty)")
    return declared


# ---------------------------------------------------------------------- the launch
@dataclass(frozen=True)
class ShardOptions:
    """How a run shards: read from the launch (``launch_options``)."""
    reshard_after_forward: bool = True
    cpu_offload: bool = False


def _env_true(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def is_fsdp_launch(accelerator) -> bool:
    """Whether the run was launched with accelerate's FSDP config (any version)."""
    from accelerate.utils import DistributedType

    return (accelerator.distributed_type == DistributedType.FSDP
            or _env_true("ACCELERATE_USE_FSDP"))


def launch_options(accelerator) -> Optional[ShardOptions]:
    """The sharding an ``accelerate launch`` asked for, or None (DDP / one process);
    ``accelerator`` is an ``Accelerator`` or a ``PartialState``.

    On a GPU accelerate turns an FSDP config into ``distributed_type == FSDP`` with its
    plugin; on a CPU it keeps MULTI_CPU but the launcher still exports the config as
    ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables, read here the same way. FSDP1 is
    refused (this library shards with FSDP2 only)."""
    # an Accelerator, or accelerate's PartialState (the precompute), which has no plugin
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if not is_fsdp_launch(accelerator):
        return None
    version = int(getattr(plugin, "fsdp_version", None) or os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise ValueError(f"fsdp_version: {version} in the accelerate config; this trainer shards "
                         "with FSDP2 only: set fsdp_version: 2 (configs/accelerate_fsdp2.yaml)")
    if plugin is not None:
        from torch.distributed.fsdp import CPUOffloadPolicy

        reshard = plugin.reshard_after_forward
        # the plugin holds OffloadPolicy() (no offload) or CPUOffloadPolicy (FSDP2)
        offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    else:
        reshard = _env_true("FSDP_RESHARD_AFTER_FORWARD", "true")
        offload = _env_true("FSDP_OFFLOAD_PARAMS")
    if not isinstance(reshard, bool):  # FSDP1-style strategy names
        reshard = str(reshard).upper() not in ("NO_SHARD", "SHARD_GRAD_OP", "FALSE")
    if offload:
        raise ValueError("fsdp_offload_params: true in the accelerate config is not supported "
                         "by this trainer yet; set it to false")
    return ShardOptions(reshard_after_forward=reshard, cpu_offload=offload)


def check_config(cfg, mixed_precision: str) -> None:
    """Settings a sharded run cannot take, refused naming the setting."""
    if cfg.optimizer not in SHARDABLE_OPTIMIZERS:
        raise ValueError(f"optimizer: {cfg.optimizer!r} with a sharded (FSDP2) launch is not "
                         f"supported; use {' or '.join(map(repr, SHARDABLE_OPTIMIZERS))}")
    if mixed_precision == "fp16":
        raise ValueError("mixed_precision: 'fp16' with a sharded (FSDP2) launch is not "
                         "supported (its loss scaler does not know sharded gradients); use 'bf16'")
    if cfg.compile:
        raise ValueError("compile: a sharded (FSDP2) launch does not compile the denoiser yet; "
                         "set compile to false")


def device_mesh(device: torch.device):
    """A 1-D mesh over every process of the run, on ``device``'s type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError("sharding needs a process group: launch with accelerate launch "
                         "--config_file configs/accelerate_fsdp2.yaml")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


# ---------------------------------------------------------------------- sharding
def shard(module: torch.nn.Module, family: str, mesh, *, mixed_precision: str = "no",
          options: ShardOptions = ShardOptions()) -> torch.nn.Module:
    """Shard ``module`` in place over ``mesh``: each block of ``family`` one unit, the
    module itself last. Parameters move to the mesh's device shard by shard (a module
    loaded on the CPU never exists whole on the accelerator). Returns ``module``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models import get_family

    names = set(block_classes(family))
    units = [m for m in get_family(family).wrap_units(module) if m is not module]
    if not units:
        raise ValueError(f"family: no block of {sorted(names)} in the "
                         f"{type(module).__name__}; cannot shard it by blocks")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
    # FSDP2 shards contiguous tensors only (a UNet's channels_last weights are not)
    for p in module.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    for m in reversed(units):  # innermost first, should a family nest blocks
        fully_shard(m, **kw)
    fully_shard(module, **kw)
    return module


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def held_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(elements of ``module``'s parameters this process holds, elements in all): a
    sharded module holds about 1/N of them."""
    held = sum(_local(p).numel() for p in module.parameters())
    return held, sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- gradients
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a sharded run to the global norm ``max_norm``; returns the
    norm before clipping (like ``torch.nn.utils.clip_grad_norm_``)."""
    from .nonfinite import grad_norm  # reduced over the shards' mesh

    params = list(params)
    norm = grad_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every (sharded) tensor is finite on every process (one
    collective, so every process reaches the same verdict)."""
    import torch.distributed as dist

    tensors = [_local(t.detach()) for t in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        if t.numel():
            bad = bad + (~torch.isfinite(t)).any().float()
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bool(bad == 0)


# ---------------------------------------------------------------------- shards <-> files
def _placements(t) -> list[str]:
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in t.placements:
        if isinstance(p, Shard):
            out.append(f"shard{p.dim}")
        elif isinstance(p, Replicate):
            out.append("replicate")
        else:
            raise ValueError(f"cannot save a tensor placed as {p!r}")
    return out


def local_trainable(module: torch.nn.Module, names: Iterable[str]) -> tuple[dict, dict]:
    """This process's shards of the parameters ``names`` (CPU copies) and their layout
    ``{name: {"shape": global shape, "placements": [...]}}`` (JSON)."""
    named = dict(module.named_parameters())
    tensors, layout = {}, {}
    for n in names:
        p = named[n].detach()
        tensors[n] = _local(p).to("cpu").contiguous()
        layout[n] = {"shape": list(p.shape),
                     "placements": _placements(p) if hasattr(p, "placements") else []}
    return tensors, layout


def _like(param, local: torch.Tensor):
    """``local`` (this process's shard of a tensor shaped like ``param``, in its own
    dtype) laid out like ``param``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local.to(param.device)
    mine = param.to_local()
    if tuple(local.shape) != tuple(mine.shape):
        raise ValueError(f"holds a shard of shape {list(local.shape)}, this process's shard "
                         f"is {list(mine.shape)}")
    return DTensor.from_local(local.to(mine.device), param.device_mesh,
                              param.placements, shape=param.shape, stride=param.stride(),
                              run_check=False)


def load_local_trainable(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                         names: Iterable[str]) -> None:
    """Copy this process's saved shards into the parameters ``names``."""
    named = dict(module.named_parameters())
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"holds no shard of {missing[0]!r} (another model or config?)")
    with torch.no_grad():
        for n in names:
            p, v = named[n], tensors[n]
            mine = _local(p)
            if tuple(v.shape) != tuple(mine.shape):
                raise ValueError(f"holds a shard of {n!r} of shape {list(v.shape)}, this "
                                 f"process's shard is {list(mine.shape)}")
            mine.copy_(v.to(mine.device, mine.dtype))


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


def local_optimizer(module: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state with parameters named (not numbered) and every sharded
    tensor as this process's shard: ``{"state", "param_groups", "sharded": [[name, key]]}``
    (what ``safeload.write_state`` stores)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    osd = get_optimizer_state_dict(module, _raw(optimizer),
                                   options=StateDictOptions(full_state_dict=False))
    state, sharded = {}, []
    for name, entry in osd["state"].items():
        state[name] = {}
        for k, v in entry.items():
            if isinstance(v, DTensor):
                sharded.append([name, k])
                v = v.to_local()
            state[name][k] = v.detach().to("cpu").clone() if torch.is_tensor(v) else v
    return {"state": state, "param_groups": osd["param_groups"], "sharded": sharded}


def load_local_optimizer(module: torch.nn.Module, optimizer, saved: dict) -> None:
    """Put what ``local_optimizer`` returned back into ``optimizer`` (same world size)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = dict(module.named_parameters())
    state = {n: dict(e) for n, e in saved["state"].items()}
    for name, key in saved.get("sharded", []):
        if name not in named or name not in state or key not in state[name]:
            raise ValueError(f"names optimizer state {name!r}.{key} this model does not have")
        param = named[name]
        try:
            state[name][key] = _like(param, state[name][key])
        except ValueError as e:
            raise ValueError(f"optimizer state {name!r}.{key} {e}") from None
    set_optimizer_state_dict(module, _raw(optimizer),
                             {"state": state, "param_groups": saved["param_groups"]},
                             options=StateDictOptions(full_state_dict=False))


def full_state(module: torch.nn.Module, *, trainable_only: bool = True) -> dict:
    """The whole (unsharded) parameters of ``module`` (only those that train, unless
    ``trainable_only`` is False), gathered onto the main process's CPU; the other processes
    get ``{}``. Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))


def full_tensors(per_rank: list[tuple[Mapping[str, torch.Tensor], Mapping[str, dict]]]) -> dict:
    """Whole tensors from every process's saved shards and layout (in rank order): a
    tensor sharded on dim d is the concatenation of its shards along d (``fully_shard``
    gives process i the i-th chunk)."""
    if not per_rank:
        return {}
    tensors0, layout0 = per_rank[0]
    out = {}
    for name, meta in layout0.items():
        placements = meta.get("placements") or []
        parts = [t[name] for t, _ in per_rank]
        if not placements or placements == ["replicate"]:
            full = parts[0]
        elif len(placements) == 1 and placements[0].startswith("shard"):
            full = torch.cat(parts, dim=int(placements[0][len("shard"):]))
        else:
            raise ValueError(f"{name}: cannot put shards placed as {placements} together")
        if list(full.shape) != list(meta["shape"]):
            raise ValueError(f"{name}: its shards make a tensor of shape {list(full.shape)}, "
                             f"{meta['shape']} was saved")
        out[name] = full
    return out
