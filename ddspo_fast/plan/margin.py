"""The stated margin between a traced count and what a GPU shows.

A tensor count cannot see cuBLAS/cuDNN workspaces, flash-attention backward scratch,
allocator fragmentation or the CUDA context. One rule per kind of figure turns the count
into what is reported: ``factor * count + constant``. The values come from
benchmarks/results/plan-vs-published.json (measured peaks people published), fitted once
for every row with no per-model correction; ``make plan-check`` recomputes that table and
fails when a row leaves its band.
"""
from __future__ import annotations

GiB = 1 << 30

# kind of figure -> (factor, constant GiB)
RULES = {
    "allocated": (1.05, 0.5),     # torch.cuda.max_memory_allocated
    "reserved": (1.10, 1.0),      # torch.cuda.max_memory_reserved, nvidia-smi, "fits in N GB"
}
BAND = 0.15  # a published figure lies within 15% of the estimate with its margin


def kind_of(figure: str) -> str:
    return "allocated" if figure == "allocated" else "reserved"


def apply(count: int, figure: str = "reserved") -> float:
    f, c = RULES[kind_of(figure)]
    return f * count + c * GiB


def statement() -> str:
    (fa, ca), (fr, cr) = RULES["allocated"], RULES["reserved"]
    return (f"margin: allocated ~ {fa:g} x count + {ca:g} GiB; reserved / nvidia-smi ~ "
            f"{fr:g} x count + {cr:g} GiB (from published measurements, "
            "benchmarks/results/plan-vs-published.json)")
