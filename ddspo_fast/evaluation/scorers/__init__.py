"""Per-image scorers behind one interface (``base.Scorer``): name -> loader.

Each metric's weights are named by the flag of the same name (``--clip DIR``,
``--pickscore DIR``, ``--aesthetic FILE``, ...); ``load_scorer`` builds one scorer and
every error it raises starts with the metric's name."""

from __future__ import annotations

from .base import Scorer

METRICS = ("clip", "pickscore", "hpsv2", "imagereward", "aesthetic")


def load_scorer(name: str, weights: dict, device="cpu") -> Scorer:
    """The scorer ``name`` with the paths in ``weights`` (metric name -> file or folder)."""
    if name not in METRICS:
        raise ValueError(f"metrics: unknown metric {name!r}; expected some of {', '.join(METRICS)}")
    if name == "clip":
        from .clip import ClipScore

        return ClipScore(weights.get("clip"), device)
    if name == "pickscore":
        from .pickscore import PickScore

        return PickScore(weights.get("pickscore"), device)
    if name == "aesthetic":
        from .aesthetic import AestheticScore

        return AestheticScore(weights.get("aesthetic"), device, clip=weights.get("clip"))
    if name == "hpsv2":
        from .hpsv2 import HPSv2

        return HPSv2(weights.get("hpsv2"), device, tokenizer=weights.get("clip"))
    from .imagereward import ImageReward

    return ImageReward(weights.get("imagereward"), device)
