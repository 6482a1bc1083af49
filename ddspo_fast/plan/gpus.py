"""Accelerator memory by name, and ``--gpu-memory`` sizes."""
from __future__ import annotations

import re

GiB = 1 << 30

# name -> memory in GiB as the driver reports it (a "24 GB" card has 24 GiB less a few MiB)
GPUS = {
    "t4": 15.0, "v100": 32.0, "v100-16gb": 16.0, "a10": 24.0, "a10g": 24.0, "l4": 24.0,
    "rtx3060": 12.0, "rtx3080": 10.0, "rtx3090": 24.0, "rtx4070": 12.0, "rtx4080": 16.0,
    "rtx4090": 24.0, "rtx5090": 32.0, "a4000": 16.0, "a5000": 24.0, "a6000": 48.0,
    "l40s": 48.0, "a100-40gb": 40.0, "a100": 80.0, "a100-80gb": 80.0, "h100": 79.6,
    "h100-80gb": 79.6, "h200": 139.8, "b200": 178.0, "mi300x": 192.0,
}


def parse_memory(text: str) -> tuple[float, str]:
    """'24GB', '24 GiB', '80g', a GPU name -> (bytes, label)."""
    key = text.strip().lower().replace(" ", "").replace("nvidia", "").replace("geforce", "")
    if key in GPUS:
        return GPUS[key] * GiB, f"{text.strip()} ({GPUS[key]:g} GiB)"
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gib|gb|g|mib|mb|m)?", key)
    if not m:
        raise ValueError(f"gpu_memory: expected a size such as 24GB or a GPU name "
                         f"({', '.join(sorted(GPUS))}), got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "gb"
    scale = GiB if unit.startswith("g") else GiB / 1024
    if value <= 0:
        raise ValueError(f"gpu_memory: expected a positive size, got {text!r}")
    return value * scale, f"{value:g} GiB"
