"""The frozen base in fewer bits, and fp8 matmuls for the policy.

A LoRA run trains small adapters over a denoiser that never changes, so that denoiser's
linear layers can be stored quantized (``base_quantization``): NF4 (4-bit NormalFloat,
QLoRA's format) or int8 (LLM.int8 weights) with bitsandbytes, fp8 (e4m3 weights with
one scale per output row) with torchao. The adapters go on the quantized layers, and the
reference of TF-CPP / Diffusion-DPO is that same module with its adapters off, so no
second copy of the base exists. ``fp8_compute`` is the other direction: the trained
denoiser's linear layers run their matmuls in fp8 (torchao's float8 training), on GPUs
that have fp8 tensor cores.

The layers are swapped in place after the pipeline is loaded (one pass, layer by layer,
so the peak is the unquantized model plus one layer): diffusers' own
``quantization_config`` (``BitsAndBytesConfig``, ``TorchAoConfig``) quantizes while
loading, but refuses to run without a GPU ("No GPU found"), and every run here, the
tests included, must work on a CPU. The layers themselves are the libraries' own
(``bnb.nn.Linear4bit`` / ``Linear8bitLt``, torchao's ``quantize_``), built as
diffusers builds them.

Bytes as stored (``stored_bytes``; the planner counts with it):

* nf4: two 4-bit codes per byte, one fp32 absmax per block of 64 values (no double
  quantization, diffusers' default), and the 16-value NF4 code book of each layer;
* int8: one byte per value and one fp32 scale per output row;
* fp8: one byte per value and one fp32 scale per output row.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import torch

QUANTIZATIONS = ("none", "nf4", "int8", "fp8")
NF4_BLOCK = 64
# What the fp8 matmuls of fp8_compute need: torch._scaled_mm runs on CUDA GPUs of compute
# capability 8.9 (Ada) and newer.
FP8_COMPUTE_CAPABILITY = (8, 9)

# Notices the libraries log on import about optional accelerated kernels they could not
# fetch or load; their portable code runs instead, so a user has nothing to do about them.
_IMPORT_NOTICES = {
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
    "kernels": ("kernels-community", "publisher trust"),
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass",),
}


def _quiet_import():
    from ..models.quiet import dropping_notices

    return dropping_notices(_IMPORT_NOTICES)


def _bitsandbytes(what: str):
    # The command line keeps bitsandbytes out of commands it expects to need no 8-bit
    # code (a None entry in sys.modules); a quantized base does need it.
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    try:
        with _quiet_import():
            import bitsandbytes
    except ImportError as e:
        raise ImportError(f"{what} needs bitsandbytes: pip install bitsandbytes "
                          "(the package's bnb extra)") from e
    return bitsandbytes


def _torchao(what: str):
    try:
        with _quiet_import():
            import torchao  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs torchao: pip install torchao "
                          "(the package's fp8 extra)") from e
    import torchao

    return torchao


def check_base_quantization(kind: str) -> None:
    """Refuse ``kind`` when it is unknown or what it needs is not installed."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"base_quantization: expected one of {', '.join(QUANTIZATIONS)}, "
                         f"got {kind!r}")
    if kind in ("nf4", "int8"):
        _bitsandbytes(f"base_quantization={kind!r}")
    elif kind == "fp8":
        _torchao("base_quantization='fp8'")


def fp8_compute_problem(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device`` (None when they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"fp8_compute: fp8 matmuls need a CUDA GPU of compute capability "
                f"{'.'.join(map(str, FP8_COMPUTE_CAPABILITY))} or newer (Ada, Hopper, "
                f"Blackwell); this run is on {device.type}")
    if not torch.cuda.is_available():
        return "fp8_compute: no CUDA device is available here"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_COMPUTE_CAPABILITY:
        return (f"fp8_compute: fp8 matmuls need compute capability "
                f"{'.'.join(map(str, FP8_COMPUTE_CAPABILITY))} or newer; "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def _linears(module: torch.nn.Module):
    """(parent, attribute name, layer) of every plain nn.Linear under ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                yield parent, name, child


def quantize_base(module: torch.nn.Module, kind: str, *, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` of the frozen ``module`` by its ``kind`` quantized form
    (in place, on the layer's device); returns how many were replaced. ``compute_dtype``
    is what the matmuls run in (the run's autocast dtype, fp32 without autocast)."""
    if kind == "none":
        return 0
    check_base_quantization(kind)
    if kind == "fp8":
        return _quantize_fp8(module)
    make = _nf4_layer if kind == "nf4" else _int8_layer
    n = 0
    for parent, name, lin in _linears(module):
        if kind == "nf4" and not nf4_layer_ok(lin):
            continue
        with torch.no_grad():
            setattr(parent, name, make(lin, compute_dtype))
        n += 1
    module.requires_grad_(False)
    return n


def nf4_layer_ok(lin: torch.nn.Linear) -> bool:
    """Whether ``lin`` can be stored as NF4 on its device. bitsandbytes 0.50's CPU kernel
    dequantizes a weight wrongly when its rows are not a whole number of 64-value blocks
    (it places blocks by row, the quantizer by the flattened tensor); such layers stay
    unquantized on a CPU while a probe finds the kernel at fault. Real models' layers
    are multiples of 64 wide; tiny test models' are not."""
    if lin.weight.device.type != "cpu" or lin.in_features % NF4_BLOCK == 0:
        return True
    return not _cpu_nf4_kernel_misplaces_blocks()


@functools.lru_cache(maxsize=None)
def _cpu_nf4_kernel_misplaces_blocks() -> bool:
    bnb = _bitsandbytes("base_quantization='nf4'")
    F = bnb.functional
    w = torch.linspace(-1, 1, 2 * 96).reshape(2, 96)
    q, state = F.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4",
                               compress_statistics=False)
    packed = q.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    levels = F.get_4bit_type("nf4", device="cpu").float()
    by_hand = (levels[codes].reshape(-1, NF4_BLOCK) * state.absmax.float().reshape(-1, 1))
    return not torch.equal(F.dequantize_4bit(q, state).float().reshape(-1),
                           by_hand.reshape(-1))


def _nf4_layer(lin: torch.nn.Linear, compute_dtype: torch.dtype):
    bnb = _bitsandbytes("base_quantization='nf4'")
    device = lin.weight.device
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=False,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False,
                                 compress_statistics=False, quant_type="nf4",
                                 blocksize=NF4_BLOCK, module=q)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.to("cpu"), requires_grad=False)
    q = q.to(device)  # bitsandbytes quantizes on this move
    # On CPUs with AVX512-BF16, bitsandbytes repacks a layer in eval mode for a bf16-only
    # kernel: the precompute (eval) would then compute another function than the
    # training forward and its adapters-off reference calls. One frozen base computes
    # one function: the portable dequantize-and-matmul path everywhere.
    q.support_avx512bf16_for_cpu = False
    return q


def _int8_layer(lin: torch.nn.Linear, compute_dtype: torch.dtype):
    bnb = _bitsandbytes("base_quantization='int8'")
    device = lin.weight.device
    q = _int8_class()(lin.in_features, lin.out_features, bias=lin.bias is not None,
                    has_fp16_weights=False, threshold=6.0, device="meta")
    q.weight = bnb.nn.Int8Params(lin.weight.data.to("cpu"), requires_grad=False,
                                 has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)


@functools.lru_cache(maxsize=None)
def _int8_class():
    bnb = _bitsandbytes("base_quantization='int8'")

    class Int8Linear(bnb.nn.Linear8bitLt):
        """LLM.int8 weights. On a CPU bitsandbytes dequantizes the weight for a layer in
        training mode and quantizes the activations too for one in eval mode; the
        frozen base runs in both (the policy forward, the precompute), so on a CPU it
        always takes the first path and computes one function."""

        def forward(self, x):
            if x.device.type != "cpu" or self.training:
                return super().forward(x)
            self.training = True
            try:
                return super().forward(x)
            finally:
                self.training = False

    return Int8Linear


def _quantize_fp8(module: torch.nn.Module) -> int:
    _torchao("base_quantization='fp8'")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    n = sum(1 for _ in _linears(module))
    quantize_(module, Float8WeightOnlyConfig(),
              filter_fn=lambda m, _name: type(m) is torch.nn.Linear)
    module.requires_grad_(False)
    return n


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, in fp32 (a plain layer's own)."""
    w = layer.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:  # bnb 4-bit
        import bitsandbytes.functional as F

        return F.dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        state = getattr(layer, "state", None)
        scb = getattr(state, "SCB", None)
    if w.dtype == torch.int8 and scb is not None:  # LLM.int8: int8 codes * row scale / 127
        return w.data.float() * (scb.float().unsqueeze(1) / 127.0)
    if hasattr(w, "dequantize"):  # torchao tensor subclasses
        return w.dequantize().float()
    return w.detach().float()


def stored_tensors(kind: str, shape) -> list[int]:
    """Bytes of each tensor a linear weight of ``shape`` (out, in) is stored as under
    ``kind`` (the layer's bias is not counted: it stays in the compute dtype)."""
    out_f = int(shape[0])
    n = math.prod(int(s) for s in shape)
    if kind == "nf4":  # packed codes, fp32 absmax per block, the 16-level code book
        return [(n + 1) // 2, 4 * math.ceil(n / NF4_BLOCK), 4 * 16]
    if kind in ("int8", "fp8"):  # one byte per value, an fp32 scale per output row
        return [n, 4 * out_f]
    raise ValueError(f"base_quantization: no stored size for {kind!r}")


def stored_bytes(kind: str, shape) -> int:
    """Bytes a linear weight of ``shape`` takes stored as ``kind`` (``stored_tensors``)."""
    return sum(stored_tensors(kind, shape))


def enable_fp8_compute(module: torch.nn.Module, device) -> int:
    """Run the matmuls of ``module``'s linear layers in fp8 (torchao float8 training:
    dynamic per-tensor scales, fp32 master weights); returns how many layers. Layers
    whose sizes fp8 kernels cannot take (dimensions not multiples of 16) stay as they
    are."""
    problem = fp8_compute_problem(device)
    if problem:
        raise ValueError(problem)
    _torchao("fp8_compute")
    from torchao.float8 import convert_to_float8_training

    def fits(m, _name):
        return (type(m) is torch.nn.Linear and m.in_features % 16 == 0
                and m.out_features % 16 == 0)

    n = sum(1 for _, _, lin in _linears(module) if fits(lin, ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert_to_float8_training(module, module_filter_fn=fits)
    return n


def apply_to_denoiser(den: torch.nn.Module, cfg, *, compute_dtype: torch.dtype, device) -> int:
    """What a run's ``base_quantization`` and ``fp8_compute`` do to its freshly loaded
    denoiser, before any adapter is added; returns how many layers changed."""
    if cfg.fp8_compute:
        return enable_fp8_compute(den, device)
    return quantize_base(den, cfg.base_quantization, compute_dtype=compute_dtype)
