"""The evaluation section of a model card (``ddspo_fast.train.model_card`` writes the
card): after ``compare`` (``evaluate --against``) it carries the score table and the grid.

Only the section between the ``EVAL_BEGIN`` / ``EVAL_END`` markers is ever rewritten, and
only in a card this library wrote (tag ``ddspo-fast``): a card someone edited keeps the
rest of its text."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..fsio import atomic_write, atomic_write_text
from ..train.model_card import CARD, EVAL_BEGIN, EVAL_END, GRID, is_ours, write_model_card

__all__ = ["add_evaluation", "write_model_card"]


def add_evaluation(model_dir: Path, result: dict, grid_png: Path) -> Path | None:
    """Put the score table and the grid of a paired ``result`` into ``model_dir``'s card
    (only a card this library wrote; None when there is none)."""
    from .report import score_table

    card = Path(model_dir) / CARD
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not is_ours(text):
        return None
    s = result["settings"]
    section = "\n".join([
        EVAL_BEGIN, "## Evaluation", "",
        f"Against `{result['against']}` on {s['prompts']} prompts x {s['num_images_per_prompt']} "
        f"image(s), {s['steps']} steps, the same seeds for both (ddspo-fast evaluate --against).",
        "", score_table(result), "", f"![base | this model]({GRID})", EVAL_END])
    if grid_png is not None and Path(grid_png).is_file():
        atomic_write(card.parent / GRID, lambda tmp: shutil.copyfile(grid_png, tmp))
    if EVAL_BEGIN in text and EVAL_END in text:
        head, rest = text.split(EVAL_BEGIN, 1)
        text = head + section + rest.split(EVAL_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(card, text)
    return card
