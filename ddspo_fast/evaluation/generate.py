"""Sampling images for evaluation: the seed rule, the file names, and generation that a
killed run resumes (images already written are kept and skipped).

Image j of prompt i uses seed ``seed + 1000 * i + j``, so two models evaluated with one
seed start from the same noise. In a folder, image (i, j) is ``{i:04d}_{j}.png``, written
atomically (a file that exists is complete); ``generation.json`` records the settings the
images were made with, so a rerun with other settings is refused instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..fsio import atomic_write, atomic_write_json

SETTINGS_FILE = "generation.json"


def seed_of(seed: int, i: int, j: int) -> int:
    return seed + 1000 * i + j


def image_name(i: int, j: int) -> str:
    return f"{i:04d}_{j}.png"


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def generation_kwargs(pipe) -> dict:
    """Native size for the family, when the library knows it (else the pipeline's default)."""
    import warnings

    from ..models import family_of_pipeline, get_family

    fam = family_of_pipeline(pipe)
    if fam is None:  # not a family this library trains: the pipeline's own defaults
        return {}
    name = getattr(pipe, "name_or_path", "") or "."
    try:
        adapter = get_family(fam)(pipe, name, device=pipe.device, dtype=pipe.dtype)
        adapter._read_vae_scale(name)
    except ValueError as e:  # e.g. a scheduler prediction type the adapter does not train
        warnings.warn(f"evaluate: sampling {fam} at the pipeline's default size ({e})",
                      stacklevel=3)
        return {}
    return adapter.pipeline_call_kwargs()


def check_settings(out: Path, settings: dict, arg: str = "out_dir",
                   name: str = SETTINGS_FILE) -> None:
    """Refuse a folder whose images were made with other settings; record them otherwise."""
    f = out / name
    if f.is_file():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{arg}: cannot read {f} ({type(e).__name__}: {e}); use another "
                             "folder") from e
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            what = ", ".join(f"{k} {old.get(k)!r} there, {settings[k]!r} now" for k in diff)
            raise ValueError(f"{arg}: {out} holds images made with other settings ({what}); "
                             "use another folder (nothing was changed)")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(f, settings)


def generate(pipe, prompts: Sequence[str], num_images_per_prompt: int, *, steps: int,
             seed: int, extra: dict, batch_size: int, out: Path | None = None,
             progress: bool = False, desc: str = "generate", path_of=None) -> dict:
    """Images for every (prompt i, image j): ``{(i, j): PIL image}``. With ``out`` the
    images already there are read back instead of generated, and each new one is written
    as soon as its batch is done, at ``path_of(i, j)`` (default ``out / image_name(i, j)``).
    ``progress`` shows a bar with the ETA on stderr."""
    import torch
    from PIL import Image

    if path_of is None and out is not None:
        path_of = lambda i, j: out / image_name(i, j)  # noqa: E731
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images_per_prompt)]
    images, todo = {}, []
    for key in jobs:
        f = path_of(*key) if path_of is not None else None
        if f is not None and f.is_file():
            try:
                with Image.open(f) as im:
                    images[key] = im.convert("RGB")
            except (OSError, ValueError) as e:  # written atomically, so damaged afterwards
                raise ValueError(f"out_dir: {f} is not a readable image ({type(e).__name__}); "
                                 "delete it and rerun to generate it again") from e
        else:
            todo.append(key)
    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        gens = [torch.Generator(device=gen_device).manual_seed(seed_of(seed, i, j))
                for i, j in chunk]
        res = pipe(prompt=[prompts[i] for i, _ in chunk], num_inference_steps=steps,
                   generator=gens, output_type="pil", **extra)
        for key, img in zip(chunk, res.images):
            img = img.convert("RGB")
            if path_of is not None:
                atomic_write(path_of(*key), lambda tmp, im=img: im.save(tmp, format="PNG"))
            images[key] = img
        bar.update(len(chunk))
    bar.close()
    return images
