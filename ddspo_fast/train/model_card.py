"""The model card written beside exported weights (a finished run, ``ddspo-fast export``):
a README.md the Hugging Face Hub reads (YAML metadata: base_model, licence, tags, library
and pipeline tag) with the training settings that matter, as diffusers' training scripts
write one; ``evaluate --against`` (``ddspo_fast.evaluation.model_card``) later fills its
evaluation section with the score table and the grid, so one ``huggingface-cli upload``
publishes a complete model page.

Only the section between the ``EVAL_BEGIN`` / ``EVAL_END`` markers is ever rewritten, and
only in a card this library wrote (tag ``ddspo-fast``): a card someone edited keeps the
rest of its text."""

from __future__ import annotations

import re
from pathlib import Path

from ..fsio import atomic_write_text

CARD = "README.md"
TAG = "ddspo-fast"
GRID = "evaluation_grid.png"
EVAL_BEGIN, EVAL_END = "<!-- ddspo-fast:evaluation -->", "<!-- /ddspo-fast:evaluation -->"
SETTINGS = ("objective", "beta", "learning_rate", "lr_scheduler", "batch_size",
            "gradient_accumulation_steps", "max_steps", "lora_rank", "lora_alpha",
            "mixed_precision", "resolution", "seed", "data")


def base_license(base_model) -> str | None:
    """The licence in a local base model's own card, if it has one."""
    card = Path(str(base_model)) / CARD
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card we cannot parse simply names no licence
        return None


def write_model_card(out_dir, *, base_model: str, train_config: dict | None = None,
                     license: str | None = None, objective: str | None = None,
                     tags=()) -> Path:
    """Write ``out_dir/README.md``: Hub metadata (base_model; the licence given, else the
    base's own; tags) and the training settings found in ``train_config``."""
    from huggingface_hub import ModelCardData

    cfg = dict(train_config or {})
    objective = objective or cfg.get("objective") or "ddspo"
    lic = license or base_license(base_model)
    lora = bool(cfg.get("lora_rank"))
    all_tags = [TAG, objective, "text-to-image", "diffusers", "diffusers-training"]
    all_tags += ["lora"] if lora else []
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(base_model=str(base_model), license=lic, tags=all_tags,
                         library_name="diffusers", pipeline_tag="text-to-image",
                         inference=True)
    rows = [f"| {k} | `{cfg[k]}` |" for k in SETTINGS if cfg.get(k) is not None]
    kind = "LoRA weights" if lora else "weights"
    lines = ["---", data.to_yaml(), "---", "",
             f"# {objective.upper()} fine-tune of {Path(str(base_model)).name}", "",
             f"{kind.capitalize()} for `{base_model}`, preference-tuned with "
             f"{'DDSPO (arXiv 2512.23426)' if objective == 'ddspo' else objective} with "
             "ddspo_fast.", "",
             "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
             f'pipe = DiffusionPipeline.from_pretrained("{base_model}")' if lora else
             'pipe = DiffusionPipeline.from_pretrained("THIS_REPO")',
             'pipe.load_lora_weights("THIS_REPO")' if lora else "",
             'image = pipe("a photo of a cat").images[0]', "```", ""]
    if rows:
        lines += ["## Training settings", "", "| setting | value |", "| --- | --- |", *rows, ""]
    lines += [EVAL_BEGIN, EVAL_END, ""]
    path = Path(out_dir) / CARD
    atomic_write_text(path, "\n".join(l for l in lines if l is not None) + "\n")
    return path


def is_ours(text: str) -> bool:
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return bool(m) and re.search(rf"^\s*-\s*{re.escape(TAG)}\s*$", m.group(1), re.M) is not None
