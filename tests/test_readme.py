"""The README is executable: every shell and Python block of README.md (and of the docs/
pages that show commands) runs here, as written, on tiny models, and a block that fails
fails this test.

Which blocks run
    Fenced blocks tagged ``bash``, ``sh``, ``shell``, ``console`` or ``python``, and
    indented (4-space) blocks whose first line is a command (``ddspo-fast``, ``python``,
    ``make``, ``pip``, ``accelerate``, ``cmake``, ``bash``). Other blocks (``diff``,
    directory trees, API sketches) are prose. A shell line that starts with ``$ `` has the
    prompt stripped.

Marks (an HTML comment on the line right before a block, invisible on GitHub)
    ``<!-- readme-test: skip REASON -->``  the block needs a GPU, a network, a large model
        or many minutes; it is listed, with its reason, as skipped (keep that list short:
        put such a command in a block of its own so the rest of its section still runs).
    ``<!-- readme-test: setup NAME -->``  run the prelude ``NAME`` of ``PRELUDES`` below
        first: Python code put before the block's (a snippet that shows only a call needs
        its inputs made up), or a function that prepares the sandbox (a finished run).

How a block runs
    In a fresh sandbox directory (the working directory), one block after the other in the
    order of the page, each on its own. The sandbox holds what the README takes as given:
    tiny models at ``sd15``, ``sdxl``, ``sd3``, ``sana``, a tiny CLIP at ``clip-vit-l-14``,
    ``prompts.txt`` and ``test_prompts.txt``, ``run.yaml`` (a run of the tiny SD1.5 on
    ``./pairs``, 2 steps), and, unless the block writes it itself, a tiny SD1.5 pair
    dataset at ``pairs/`` and one per family at ``data/<family>-pairs``. ``ddspo-fast``
    and ``python -m ddspo_fast`` lines run in-process (``ddspo_fast.cli.main``); any other
    command runs with bash. Python blocks are executed in a fresh namespace.

Substitutions (``SUBSTITUTIONS``), applied to the block's text before it runs
    model names: hub ids and ``/models/<family>`` paths of each family -> the tiny model
    of that family; ``path/to/clip-vit-large-patch14`` -> the tiny CLIP; sizes a tiny run
    cannot use (``(4, 64, 64)`` latents -> the tiny model's); and lengths (``--max-steps
    N`` / ``max_steps=N`` -> 2, ``--steps N`` -> 2, ``--num-images-per-prompt N`` -> 1,
    ``--checkpoint-every N`` -> 1):
    the README shows real settings, the test runs the same commands short.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _cli_helpers import ROOT, subprocess_env
from _train_helpers import _ROOT as TINY_ROOT
from _train_helpers import tiny_data, tiny_model

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FAMILIES = ("sd15", "sdxl", "sd3", "sana")
SHELL_TAGS = ("bash", "sh", "shell", "console")
COMMAND_WORDS = ("ddspo-fast", "python", "python3", "make", "pip", "accelerate", "cmake", "bash")
MARK = re.compile(r"<!--\s*readme-test:\s*(skip|setup)\s*(.*?)\s*-->")
MAX_SKIPPED = 14

# Hub ids / absolute paths -> family (the tiny model of that family replaces them).
MODEL_NAMES = {
    "sd15": ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
             "/models/sd15"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "/models/sdxl"),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "/models/sd3"),
    "sana": ("Efficient-Large-Model/Sana_600M_1024px_diffusers", "/models/sana"),
}
SPEED = [  # (regex, replacement): the same commands, short
    (r"--max-steps \d+", "--max-steps 2"), (r"max_steps=\d+", "max_steps=2"),
    (r"--max_steps \d+", "--max_steps 2"), (r"--steps \d+", "--steps 2"),
    (r"--num-images-per-prompt \d+", "--num-images-per-prompt 1"),
    (r"--checkpoint-every \d+", "--checkpoint-every 1"),
    (r"num_images_per_prompt=\d+", "num_images_per_prompt=1"),
]

def _tiny_run(out: str, **kw):
    """A finished tiny SD1.5 run at ``out`` in the sandbox (the run a snippet loads)."""

    def make(sandbox: Path) -> str:
        from ddspo_fast.train import TrainConfig, Trainer

        Trainer(TrainConfig(model=tiny_model("sd15"), data=tiny_data("sd15", n_pairs=8),
                            output_dir=str(sandbox / out), max_steps=1, checkpoint_every=0,
                            progress=False, tensorboard=False, **kw)).train()
        return ""

    return make


def _benchmark_prompts(sandbox: Path) -> str:
    """A finished tiny LoRA run at ``ddspo-output`` and one-prompt copies of GenEval's
    ``evaluation_metadata.jsonl`` and a T2I-CompBench prompt file (the README tells the
    user to bring their own)."""
    _tiny_run("ddspo-output", lora_rank=4, lora_alpha=8)(sandbox)
    (sandbox / "evaluation_metadata.jsonl").write_text(
        '{"tag": "single_object", "include": [{"class": "cube", "count": 1}], '
        '"prompt": "a photo of a cube"}\n')
    (sandbox / "color_val.txt").write_text("a red cube\n")
    return ""


PRELUDES = {
    # the loss section shows calls on a training step's tensors
    "loss-tensors": (
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "B, S = 2, (4, 8, 8)\n"
        "model_pred = torch.randn(2 * B, *S, generator=g, requires_grad=True)\n"
        "ref_pred = torch.randn(2 * B, *S, generator=g)\n"
        "target = torch.randn(2 * B, *S, generator=g)\n"
        "ref_out = torch.randn(3 * B, *S, generator=g)\n"),
    "torch": "import torch\n",
    "sd15-run": _tiny_run("runs/sd15-ddspo"),
    "sd15-lora-run": _tiny_run("ddspo-output", lora_rank=4, lora_alpha=8),
    "benchmark-prompts": _benchmark_prompts,
}


@dataclass
class Block:
    page: Path
    line: int
    lang: str        # 'shell' | 'python'
    text: str
    skip: str | None = None
    setup: list = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, marks, i = [], [], 0

    def take_marks(b: Block) -> Block:
        for kind, arg in marks:
            if kind == "skip":
                b.skip = arg or "marked skip"
            else:
                b.setup.append(arg)
        return b

    while i < len(lines):
        line = lines[i]
        m = MARK.search(line)
        if m:
            marks.append((m.group(1), m.group(2)))
            i += 1
            continue
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            tag, start = fence.group(3).lower(), i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence.group(2)):
                body.append(lines[i])
                i += 1
            i += 1
            lang = "shell" if tag in SHELL_TAGS else "python" if tag == "python" else None
            if lang:
                blocks.append(take_marks(Block(page, start + 1, lang, "\n".join(body) + "\n")))
            marks = []
            continue
        prev_blank = i == 0 or not lines[i - 1].strip() or MARK.search(lines[i - 1])
        if prev_blank and line.startswith("    ") and line.strip():
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            first = body[0].split()[0] if body and body[0].split() else ""
            if first in COMMAND_WORDS:
                blocks.append(take_marks(Block(page, start + 1, "shell", "\n".join(body) + "\n")))
            marks = []
            continue
        if line.strip():
            marks = []  # a mark belongs to the block right after it
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in extract(page)]


# ---------------------------------------------------------------------- the sandbox
def _tiny_clip() -> str:
    from ddspo_fast.demo.tinyclip import make_tiny_clip

    return make_tiny_clip(TINY_ROOT / "models" / "clip")


def latent_shape(family: str = "sd15") -> tuple:
    from ddspo_fast.data import open_dataset

    return tuple(open_dataset(tiny_data(family, n_pairs=8)).latent_shape)


def substitute(text: str) -> str:
    names = {n: family for family, ns in MODEL_NAMES.items() for n in ns}
    pattern = r"(?<![\w./-])(" + "|".join(map(re.escape, names)) + r")(?![\w.-])"
    text = re.sub(pattern, lambda m: tiny_model(names[m.group(1)]), text)
    if "path/to/clip-vit-large-patch14" in text:
        text = text.replace("path/to/clip-vit-large-patch14", _tiny_clip())
    if "(4, 64, 64)" in text or "4 64 64" in text:
        shape = latent_shape("sd15")
        text = text.replace("(4, 64, 64)", repr(shape))
        text = text.replace("4 64 64", " ".join(map(str, shape)))
    for pattern, repl in SPEED:
        text = re.sub(pattern, repl, text)
    return text


_PROMPTS = ["a red car on a blue street", "a small green house with a tree",
            "a man with a large dog"]


def stage(sandbox: Path, block: Block) -> None:
    """What the README takes as given, in the block's working directory."""
    for family in FAMILIES:  # a relative path or a bare name (not /models/<family>)
        if re.search(rf"(?:^|(?<=[\s\"'=])|(?<=\./)){family}(?![\w-])", block.text, re.M):
            (sandbox / family).symlink_to(tiny_model(family))
    if "clip-vit-l-14" in block.text:
        (sandbox / "clip-vit-l-14").symlink_to(_tiny_clip())
    (sandbox / "prompts.txt").write_text("\n".join(_PROMPTS) + "\n")
    (sandbox / "test_prompts.txt").write_text("\n".join(_PROMPTS[:2]) + "\n")
    (sandbox / "run.yaml").write_text(
        "model: ./sd15\ndata: ./pairs\noutput_dir: ./run\nmax_steps: 2\nbatch_size: 2\n"
        "learning_rate: 1e-4\ncheckpoint_every: 0\ntensorboard: false\nprogress: false\n")
    if "run.yaml" in block.text and not (sandbox / "sd15").exists():
        (sandbox / "sd15").symlink_to(tiny_model("sd15"))
    writes_pairs = re.search(r"--out\s+(\./)?pairs\b", block.text)
    reads_pairs = "run.yaml" in block.text or re.search(r"(?<![\w-])(\./)?pairs\b", block.text)
    if not writes_pairs and reads_pairs:
        shutil.copytree(tiny_data("sd15", n_pairs=8), sandbox / "pairs")
    for family in FAMILIES:
        if f"data/{family}-pairs" in block.text:
            shutil.copytree(tiny_data(family, n_pairs=8), sandbox / "data" / f"{family}-pairs")
    if "pickapic_v2-train-00000.parquet" in block.text:
        _pickapic(sandbox / "pickapic_v2-train-00000.parquet")


def _pickapic(path: Path) -> None:
    import io

    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq
    from PIL import Image

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), color).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"caption": ["a red car", "a green tree"],
                             "jpg_0": [png((200, 0, 0)), png((0, 200, 0))],
                             "jpg_1": [png((0, 0, 200)), png((90, 90, 90))],
                             "label_0": [1.0, 0.0]}), str(path))


# ---------------------------------------------------------------------- running
def shell_commands(text: str) -> list[str]:
    """One string per command: continuation lines joined, prompts and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


def run_shell(block: Block, sandbox: Path) -> None:
    from ddspo_fast import cli

    for name in block.setup:  # a shell block's prelude prepares the sandbox
        prelude = PRELUDES[name]
        assert callable(prelude), f"{block.where}: prelude {name!r} is Python code, not a sandbox set-up"
        prelude(sandbox)
    for command in shell_commands(substitute(block.text)):
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        if argv[0] == "ddspo-fast":
            args = argv[1:]
        elif argv[:3] in (["python", "-m", "ddspo_fast"], ["python3", "-m", "ddspo_fast"]):
            args = argv[3:]
        else:
            shim = sandbox / ".bin"
            shim.mkdir(exist_ok=True)
            for name in ("python", "python3"):
                if not (shim / name).exists():
                    (shim / name).symlink_to(sys.executable)
            env = subprocess_env(PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}")
            r = subprocess.run(["bash", "-c", command], cwd=sandbox, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"{block.where}: `{command}` exited {r.returncode}:\n{r.stderr[-3000:]}"
            continue
        rc = cli.main(args)
        assert rc == 0, f"{block.where}: `{command}` exited {rc}"


def run_python(block: Block, sandbox: Path) -> None:
    code = "".join(p if isinstance(p, str) else p(sandbox)
                   for p in (PRELUDES[name] for name in block.setup)) + substitute(block.text)
    ns = {"__name__": "__readme__"}
    exec(compile(code, block.where, "exec"), ns)  # noqa: S102 - the README's own code


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    unknown = [s for s in block.setup if s not in PRELUDES]
    assert not unknown, f"{block.where}: no prelude {unknown[0]!r} in tests/test_readme.py"
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    stage(sandbox, block)
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if block.lang == "shell":
        run_shell(block, sandbox)
    else:
        run_python(block, sandbox)


def test_the_skip_list_is_short_and_printed(capsys):
    skipped = [b for b in BLOCKS if b.skip]
    with capsys.disabled():
        print(f"\nREADME blocks not run here ({len(skipped)} of {len(BLOCKS)}):")
        for b in skipped:
            print(f"  {b.where}: {b.skip}")
    assert len(skipped) <= MAX_SKIPPED
    assert len(BLOCKS) - len(skipped) >= 6  # the extraction found the README's blocks


def test_extraction_follows_the_convention(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- readme-test: skip needs a GPU -->\n```bash\nmake gpu-check\n```\n\n"
                    "<!-- readme-test: setup torch -->\n```python\nx = torch.ones(1)\n```\n\n"
                    "    ddspo-fast --help\n\n    DATASET/\n      info.json\n\n```diff\n+x\n```\n")
    bs = extract(page)
    assert [(b.lang, b.skip, b.setup) for b in bs] == [
        ("shell", "needs a GPU", []), ("python", None, ["torch"]), ("shell", None, [])]
    assert shell_commands("a \\\n  b  # c\n$ d\n\n# e\n") == ["a b  # c", "d"]
