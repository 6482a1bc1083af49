"""LoRA on the denoiser: the trained adapter, DD-CPP's pair adapters (loaded, or trained
and written by ``train-pair``), adapter switching.

Every adapter lives on one base module. Switching which adapters are active only flips
two attributes on each peft layer (no weight copies, no ``requires_grad`` changes, which
peft's own ``set_adapter`` would do and which would disturb DDP and the optimizer).
``SplitAdapters`` runs two adapters in one stacked forward, one per half of the rows.

Adapter folders are written as peft's ``PeftModel.save_pretrained`` writes them
(``pos_lora_unet/`` and ``neg_lora_unet/``: the official script's names, kept for every
family), each also holding the diffusers LoRA file ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from ..models.quiet import multiple_adapters
from .errors import NonFiniteError

POLICY = "ddspo"
WIN, LOSE = "win", "lose"
WIN_DIR, LOSE_DIR = "pos_lora_unet", "neg_lora_unet"  # the official script's names
PAIR_DIRS = ((WIN, LOSE), ("winning", "losing"), (WIN_DIR, LOSE_DIR), ("pos", "neg"))
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # key prefix of PeftModel.save_pretrained


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


# ====================================================================== DD-CPP's pair adapters
class SplitAdapters:
    """One stacked forward, two adapters: rows [0:n) of every LoRA layer's input go
    through ``names[0]``, rows [n:2n) through ``names[1]`` (n = half the rows).

    While installed the layers' own adapter path is off (they return the base output)
    and a forward hook adds each half's ``B(A(dropout(x))) * scaling`` in place on that
    half's rows (views, no gather, no index tensors). The base runs once on all rows.
    """

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        from peft.tuners.lora import LoraLayer

        self.names = tuple(names)
        self.layers = [m for m in module.modules()
                       if isinstance(m, LoraLayer) and all(n in m.lora_A for n in self.names)]
        if not self.layers:
            raise ValueError(f"lora_targets: no LoRA layer holds adapters {self.names}")
        for m in self.layers:
            if any(m.use_dora.get(n, False) for n in self.names):
                raise ValueError("lora: DoRA adapters cannot be trained as a pair")
        self._handles: list = []
        self._saved = None

    def _hook(self, layer, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        k = len(self.names)
        if x.shape[0] % k:
            raise ValueError(f"SplitAdapters: {x.shape[0]} rows do not split into {k} equal parts")
        n = x.shape[0] // k
        for i, name in enumerate(self.names):
            a = layer.lora_A[name]
            rows = x[i * n:(i + 1) * n].to(a.weight.dtype)
            delta = layer.lora_B[name](a(layer.lora_dropout[name](rows))) * layer.scaling[name]
            output[i * n:(i + 1) * n] += delta.to(output.dtype)
        return output

    def install(self) -> "SplitAdapters":
        if not self._handles:
            self._saved = [(m._active_adapter, m._disable_adapters) for m in self.layers]
            for m in self.layers:
                m._disable_adapters = True
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None:
            for m, (a, d) in zip(self.layers, self._saved):
                m._active_adapter, m._disable_adapters = a, d
            self._saved = None

    def __enter__(self) -> "SplitAdapters":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def add_pair_adapters(module, rank: int, alpha: float, targets, dropout: float,
                      seed: int) -> None:
    """The winning and losing adapters on ``module``, initialised as peft's default
    (A Kaiming-uniform, B zero: both start as the base), from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with multiple_adapters():  # two adapters on one module is the point here
            for name in (WIN, LOSE):
                add_adapter_named(module, pair_lora_config(rank, alpha, targets, dropout),
                                  name, targets)
    finally:
        torch.random.set_rng_state(state)


def pair_lora_config(rank: int, alpha: float, targets, dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                      lora_dropout=dropout)


def adapter_state(module, name: str) -> dict:
    """peft keys (no adapter name) -> fp32 CPU tensors."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module, adapter_name=name).items()}


def write_adapter_dir(directory, state: dict, lora_config, extra=None) -> None:
    """A peft adapter dir as ``PeftModel.save_pretrained`` writes it (``adapter_config.json``
    + ``adapter_model.safetensors`` with ``base_model.model.`` keys), atomically, with
    the umask's modes (safetensors creates its file 0600, so the mode is set here)."""
    from safetensors.torch import save_file

    from ..fsio import atomic_dir, file_mode

    with atomic_dir(directory) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        if extra is not None:  # more files in the same folder (the diffusers LoRA file)
            extra(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, file_mode())


def write_pair_adapters(out, denoiser, pipeline_cls, denoiser_name: str) -> None:
    """``out/pos_lora_unet/`` and ``out/neg_lora_unet/`` from the two adapters on
    ``denoiser``, each a peft folder (what the official scripts and ``train --pair lora``
    read) that also holds the diffusers LoRA file ``pipe.load_lora_weights`` reads, at the
    trained alpha. A non-finite weight writes nothing."""
    from .export import write_lora

    states = {name: adapter_state(denoiser, name) for name in (WIN, LOSE)}
    for name in (WIN, LOSE):
        bad = [k for k, v in states[name].items() if not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(f"loss: adapter weight {bad[0]} is NaN/inf; "
                                 "nothing was written")
    out = Path(out)
    for name, d in ((LOSE, LOSE_DIR), (WIN, WIN_DIR)):
        lcfg = denoiser.peft_config[name]
        write_adapter_dir(out / d, states[name], lcfg,
                          extra=lambda tmp, n=name, c=lcfg: write_lora(
                              tmp, pipeline_cls, denoiser_name, states[n], c))
