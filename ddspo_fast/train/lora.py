"""LoRA on the denoiser: the trained adapter, DD-CPP's pair adapters, adapter switching.

Every adapter lives on one base module. Switching which adapters are active only flips
two attributes on each peft layer (no weight copies, no ``requires_grad`` changes, which
peft's own ``set_adapter`` would do and which would disturb DDP and the optimizer).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..models.quiet import multiple_adapters

POLICY = "ddspo"
WIN, LOSE = "win", "lose"
PAIR_DIRS = ((WIN, LOSE), ("winning", "losing"), ("pos_lora_unet", "neg_lora_unet"),
             ("pos", "neg"))


class AdapterSwitch:
    """Fast active-adapter switching on one module holding several peft adapters."""

    def __init__(self, module: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]

    def set(self, active: list[str] | None) -> None:
        for m in self.layers:
            if active is None:
                m._disable_adapters = True
            else:
                m._active_adapter = list(active)
                m._disable_adapters = False

    def state(self):
        return [(m._active_adapter, m._disable_adapters) for m in self.layers]

    def restore(self, state) -> None:
        for m, (a, d) in zip(self.layers, state):
            m._active_adapter, m._disable_adapters = a, d

    @contextmanager
    def use(self, active: list[str] | None):
        """Within the block only ``active`` adapters run (None: the bare base)."""
        saved = self.state()
        self.set(active)
        try:
            yield
        finally:
            self.restore(saved)


def add_policy_lora(module, rank: int, alpha: float | None, targets, seed: int) -> None:
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                     target_modules=list(targets))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with multiple_adapters():  # beside DD-CPP's pair adapters
            add_adapter_named(module, cfg, POLICY, targets)
    finally:
        torch.random.set_rng_state(state)


def add_adapter_named(module, cfg, name: str, targets) -> None:
    """``module.add_adapter(cfg, adapter_name=name)``; target names the module lacks are
    a ValueError naming lora_targets and listing names it does have (peft's own message
    names neither the setting nor the choices)."""
    try:
        module.add_adapter(cfg, adapter_name=name)
    except ValueError as e:
        if "not found" not in str(e).lower() and "target" not in str(e).lower():
            raise
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                         if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        raise ValueError(f"lora_targets: {list(targets)} matches no layer of the "
                         f"{type(module).__name__}; its Linear/Conv2d layers are named e.g. "
                         f"{leaves[:12]}") from None


def find_pair_dirs(pair_lora) -> tuple[Path, Path]:
    root = Path(pair_lora)
    for w, l in PAIR_DIRS:
        if (root / w).is_dir() and (root / l).is_dir():
            return root / w, root / l
    names = ", ".join(f"{w}/ + {l}/" for w, l in PAIR_DIRS)
    raise ValueError(f"pair_lora: {root} holds no winning/losing adapter pair (expected "
                     f"subdirectories {names})")


def load_named_adapter(module, path: Path, name: str, prefix: str) -> None:
    """Load a diffusers LoRA file or a peft adapter dir into ``module`` as ``name``."""
    from ..safeload import load_pickled_weights

    def load_file(f: str) -> dict:
        from safetensors.torch import load_file as read

        try:
            return read(f)
        except Exception as e:  # noqa: BLE001 - SafetensorError is not public everywhere
            raise ValueError(f"pair_lora: {f} is not a readable safetensors file "
                             f"({type(e).__name__}: {str(e)[:200]})") from None

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import LoraConfig, set_peft_model_state_dict

        cfg = LoraConfig.from_pretrained(str(path))
        with multiple_adapters():
            module.add_adapter(cfg, adapter_name=name)
        f = path / "adapter_model.safetensors"
        if not f.is_file() and not (path / "adapter_model.bin").is_file():
            raise ValueError(f"pair_lora: {path} holds adapter_config.json but no "
                             "adapter_model.safetensors (or adapter_model.bin)")
        # peft's older pickle format only when no safetensors file is there; weights only
        sd = load_file(str(f)) if f.is_file() else load_pickled_weights(path / "adapter_model.bin")
        sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
        res = set_peft_model_state_dict(module, sd, adapter_name=name)
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"pair_lora: {path} does not fit this model (unexpected keys, "
                             f"e.g. {res.unexpected_keys[0]})")
    else:
        files = sorted(path.glob("*.safetensors"))
        preferred = path / "pytorch_lora_weights.safetensors"
        f = preferred if preferred.is_file() else (files[0] if len(files) == 1 else None)
        if f is None:
            raise ValueError(f"pair_lora: {path} holds no LoRA weights (expected "
                             "pytorch_lora_weights.safetensors or a peft adapter_config.json)")
        sd = load_file(str(f))
        if not any(k.startswith(prefix + ".") for k in sd):
            sd = {f"{prefix}.{k}": v for k, v in sd.items()}  # saved without the prefix
        with multiple_adapters():
            module.load_lora_adapter(sd, adapter_name=name, prefix=prefix,
                                     metadata=_lora_file_metadata(f, prefix))


def _lora_file_metadata(path: Path, prefix: str):
    """The adapter config diffusers stores in a LoRA file (rank, alpha, targets), keyed
    ``prefix.<field>`` as ``load_lora_adapter`` wants it, or None for a file without it
    (then diffusers takes alpha = rank, as it always did)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    meta = json.loads(raw)
    if not isinstance(meta, dict) or not meta:
        return None
    if not any(k.startswith(prefix + ".") for k in meta):  # saved without the prefix
        meta = {f"{prefix}.{k}": v for k, v in meta.items()}
    return meta


def policy_lora_state(module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module, adapter_name=POLICY).items()}
