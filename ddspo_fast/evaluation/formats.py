"""Image folders in the layouts benchmark scorers read, so their own evaluation scripts
run on them with no conversion.

* GenEval (djghosh13/geneval, README "Image generation"): one folder per prompt of its
  ``evaluation_metadata.jsonl``, numbered in file order::

      OUT/00000/metadata.jsonl     the prompt's metadata line (one JSON object)
      OUT/00000/samples/0000.png   image 0 of that prompt, 0001.png, ...

  Its ``evaluation/evaluate_images.py OUT`` then scores the folder.
* T2I-CompBench (Karine-Huang/T2I-CompBench, README "Evaluation"): every image in one
  folder, named by its prompt and a 6-digit index that runs on across prompts (its own
  ``GORS_finetune/inference_eval.py`` counts images globally, and its BLIP-VQA script
  takes that index as the question id, so it must be unique)::

      OUT/samples/<prompt 0>_000000.png, <prompt 0>_000001.png, <prompt 1>_000002.png, ...

  Its BLIP-VQA / UniDet / CLIP scripts read ``OUT/samples`` (prompts from its
  ``examples/dataset/*.txt`` files, one per line).

The seed rule is the one of ``generate``; generation is resumable in both layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsio import atomic_write_text, iter_jsonl

FORMATS = ("geneval", "t2i-compbench")


def read_geneval_metadata(path) -> list[dict]:
    """The records of GenEval's evaluation_metadata.jsonl (each with a ``prompt``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompts: {p} does not exist (expected GenEval's evaluation_metadata.jsonl)")
    out = []
    for lineno, _raw, obj in iter_jsonl(p):
        if isinstance(obj, Exception) or not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"prompts: {p}:{lineno}: expected a JSON object with a 'prompt' "
                             "string (a line of GenEval's evaluation_metadata.jsonl)")
        out.append(obj)
    if not out:
        raise ValueError(f"prompts: no prompts in {p}")
    return out


def geneval_paths(out: Path, records: list[dict]):
    """Write each prompt's metadata.jsonl; return ``path_of(i, j)`` for its samples."""
    for i, rec in enumerate(records):
        f = out / f"{i:05d}" / "metadata.jsonl"
        text = json.dumps(rec, ensure_ascii=False)
        if not f.is_file() or f.read_text(encoding="utf-8") != text:
            atomic_write_text(f, text)
    return lambda i, j: out / f"{i:05d}" / "samples" / f"{j:04d}.png"


def t2i_compbench_paths(out: Path, prompts: list[str], per_prompt: int):
    """``path_of(i, j)`` in T2I-CompBench's ``samples/<prompt>_<index:06d>.png`` layout,
    ``index = i * per_prompt + j`` (one running count over the whole folder)."""
    for k, p in enumerate(prompts):
        if "/" in p or "\0" in p or len(p.encode("utf-8")) > 230:
            raise ValueError(f"prompts: prompt {k + 1} cannot be a file name in T2I-CompBench's "
                             "layout (it names the image file: no '/', at most 230 bytes)")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts: a prompt appears twice; T2I-CompBench's layout names images "
                         "by prompt, so each must be unique")
    return lambda i, j: out / "samples" / f"{prompts[i]}_{i * per_prompt + j:06d}.png"
