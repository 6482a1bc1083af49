"""Make a CPU run of fake tensors allocate what a CUDA run would.

Two GPU behaviours differ on CPU and change the activation memory of a step:

* Autocast. CPU autocast leaves normalisations, softmax, pow, exp, sum... in the
  lower-precision dtype; CUDA autocast runs them in fp32 (SDXL's activations are about
  a quarter larger on CUDA). ``cuda_autocast_rules()`` registers, for the AutocastCPU
  dispatch key, the casts of CUDA's lists, read from torch's own autocast test lists
  (``torch/testing/_internal/autocast_test_lists.py``: the CUDA lists and the CPU lists
  side by side), so the rules follow the installed torch.
* Attention. ``attention(kernel)`` selects what scaled_dot_product_attention stores:
  on fake CPU tensors SDPA runs CPU flash attention, which keeps the output and one
  fp32 log-sum-exp per query row: what CUDA's flash and memory-efficient kernels (and
  xformers) keep. ``math`` is the attention without a fused kernel (pre-2.0 scripts,
  diffusers' AttnProcessor): the L x S score and probability matrices are stored.

The registration is process-wide and cannot be undone cleanly, which is why estimates
run in a subprocess (``estimate.py``).
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import torch

KERNELS = ("flash", "mem-efficient", "xformers", "math")
_done = False
_lib = None


def _lists(cls_name: str) -> dict[str, set[str]]:
    """Op names of each list attribute of one class in torch's autocast test lists."""
    src = Path(torch.__file__).parent / "testing" / "_internal" / "autocast_test_lists.py"
    tree = ast.parse(src.read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == cls_name):
            continue
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Assign) and len(sub.targets) == 1
                    and isinstance(sub.targets[0], ast.Attribute)
                    and isinstance(sub.value, ast.List)):
                names = set()
                for elt in sub.value.elts:
                    if (isinstance(elt, ast.Tuple) and elt.elts
                            and isinstance(elt.elts[0], ast.Constant)
                            and isinstance(elt.elts[0].value, str)):
                        names.add(elt.elts[0].value.strip("_"))
                out[sub.targets[0].attr] = names
    return out


def cuda_cpu_differences() -> tuple[set[str], set[str]]:
    """(ops CUDA autocast runs in fp32 but CPU does not, ops CUDA runs in the low
    precision dtype but CPU does not)."""
    cuda, cpu = _lists("AutocastTestLists"), _lists("AutocastCPUTestLists")
    if not cuda or not cpu:
        raise RuntimeError("torch's autocast test lists were not found in this torch install")
    cuda32 = cuda.get("torch_fp32", set()) | cuda.get("nn_fp32", set()) | cuda.get("methods_fp32", set())
    cuda16 = cuda.get("torch_fp16", set()) | cuda.get("nn_fp16", set()) | cuda.get("linalg_fp16", set())
    cpu32 = cpu.get("torch_fp32", set()) | cpu.get("nn_fp32", set())
    cpu16 = cpu.get("torch_16", set()) | cpu.get("nn_16", set())
    return cuda32 - cpu32, cuda16 - cpu16 - cuda32


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


def _kernel(op, to_fp32: bool):
    excl = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def run(*args, **kwargs):
        dtype = torch.float32 if to_fp32 else torch.get_autocast_dtype("cpu")
        args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(excl):
            return op(*args, **kwargs)
    return run


def cuda_autocast_rules() -> None:
    """Register CUDA's autocast casts for AutocastCPU (once per process)."""
    global _done, _lib
    if _done:
        return
    fp32, low = cuda_cpu_differences()
    _lib = torch.library.Library("aten", "IMPL")
    with warnings_off():
        for names, to32 in ((fp32, True), (low, False)):
            for name in sorted(names):
                packet = getattr(torch.ops.aten, name, None)
                if packet is None:
                    continue
                for overload in packet.overloads():
                    op = getattr(packet, overload)
                    if not any(a.type.isSubtypeOf(torch._C.TensorType.get())
                               for a in op._schema.arguments):
                        continue
                    if any(a.alias_info is not None and a.alias_info.is_write
                           for a in op._schema.arguments):
                        continue  # in-place and out= forms keep their dtype
                    qual = name if overload == "default" else f"{name}.{overload}"
                    _lib.impl(qual, _kernel(op, to32), "AutocastCPU")
    _done = True


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def use_attention(module: torch.nn.Module, kernel: str) -> None:
    """Route the module's attention to what ``kernel`` stores (see the module doc)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel != "math":
        return  # SDPA on fake CPU tensors: the fused kernel's storage
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor).__name__ == "AttnProcessor2_0":
            m.set_processor(AttnProcessor())
