"""`ddspo-fast evaluate`: the CLI over ddspo_fast.evaluate, with a tiny SD1.5 pipeline and a
tiny random CLIP (nothing downloaded)."""

import json

import pytest

from ddspo_fast import cli
from ddspo_fast.demo.tinyclip import make_tiny_clip
from ddspo_fast.evaluate import evaluate
from ddspo_fast.testing import make_tiny_model

from _cli_helpers import assert_one_line_error

PROMPTS = ["a photo of a cat", "a red car on the street"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return make_tiny_model("sd15", root / "sd15"), make_tiny_clip(root / "clip"), root / "p.txt"


def test_scores_match_the_python_api(assets, tmp_path, capsys):
    model, clip, prompts = assets
    argv = ["evaluate", model, "--prompts", str(prompts), "--clip", clip, "--steps", "2", "--seed", "3",
            "--num-images-per-prompt", "2", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    api = evaluate(model, PROMPTS, clip, num_images_per_prompt=2, steps=2, seed=3, device="cpu")
    assert len(lines) == 3 and lines[-1].startswith("CLIP score ") and "over 4 images" in lines[-1]
    for line, rec in zip(lines, api["per_prompt"]):
        score, prompt = line.split(None, 1)
        assert prompt == rec["prompt"] and float(score) == pytest.approx(rec["clip_score"], abs=1e-3)
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["clip_score"] == pytest.approx(api["clip_score"], abs=1e-6)
    assert len(list((tmp_path / "out").glob("*.png"))) == 4

    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clip_score"] == pytest.approx(api["clip_score"], abs=1e-6)


@pytest.mark.parametrize("change, fragments", [
    ({"--prompts": "/nonexistent/p.txt"}, ["argument --prompts:", "does not exist"]),
    ({"--clip": "/nonexistent/clip"}, ["argument --clip:", "/nonexistent/clip"]),
    ({"MODEL": "/tmp"}, ["argument MODEL:", "model_index.json"]),
])
def test_bad_arguments_are_one_line(assets, change, fragments, capsys):
    model, clip, prompts = assets
    args = {"MODEL": model, "--prompts": str(prompts), "--clip": clip, **change}
    argv = ["evaluate", args.pop("MODEL")] + [t for kv in args.items() for t in kv] + ["--device", "cpu"]
    assert cli.main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_empty_prompts_file(assets, tmp_path, capsys):
    model, clip, _ = assets
    (tmp_path / "p.txt").write_text("\n\n")
    assert cli.main(["evaluate", model, "--prompts", str(tmp_path / "p.txt"), "--clip", clip]) == 1
    assert_one_line_error(capsys.readouterr().err, "argument --prompts:", "no prompts")


def test_json_into_a_closed_pipe_exits_quietly(assets, tmp_path):
    import subprocess
    import sys

    from _cli_helpers import ROOT, subprocess_env

    model, clip, prompts = assets
    cmd = (f"{sys.executable} -m ddspo_fast evaluate {model} --prompts {prompts} --clip {clip} "
           "--steps 1 --device cpu --threads 1 --json | head -n 1")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                         cwd=ROOT, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "{\n" and "BrokenPipe" not in res.stderr and "Traceback" not in res.stderr


def _text_encoder_dir(clip, tmp_path):
    from transformers import CLIPModel

    d = tmp_path / "text_encoder"
    CLIPModel.from_pretrained(clip).text_model.save_pretrained(d)  # config model_type clip_text_model
    return d


@pytest.mark.parametrize("change, fragments", [
    (lambda m, c, t: ["--clip", m], ["argument --clip:", "diffusers pipeline folder", "CLIP model folder"]),
    (lambda m, c, t: ["--clip", str(_text_encoder_dir(c, t))], ["argument --clip:", "text encoder alone"]),
    (lambda m, c, t: ["--guidance-scale", "inf"], ["--guidance-scale", "finite"]),
    (lambda m, c, t: ["--guidance-scale", "nan"], ["--guidance-scale", "finite"]),
    (lambda m, c, t: ["--out", str(t / "file.txt")], ["argument --out:", "exists and is not a directory"]),
    (lambda m, c, t: ["--out", m], ["argument --out:", "must not be, contain or sit inside an input"]),
    (lambda m, c, t: ["--device", "cuda"], ["argument --device:", "cuda"]),
    (lambda m, c, t: ["--seed", str(2 ** 70)], ["argument --seed:"]),
    (lambda m, c, t: ["--against", m], ["argument --out:", "required"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--metrics", "pickscore"],
     ["argument --pickscore:", "needs --pickscore DIR"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--metrics", "hpsv2"],
     ["argument --hpsv2:", "needs --hpsv2 FILE"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--metrics", "imagereward"],
     ["argument --imagereward:", "needs --imagereward DIR"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--metrics", "hpsv2", "--hpsv2", c],
     ["argument --hpsv2:", "is not a file"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--metrics", "clip,fid"], ["--metrics"]),
    (lambda m, c, t: ["--pickscore", c], ["argument --pickscore:", "only used with --against"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--fid-reference", c],
     ["argument --fid-inception:", "needs --fid-inception FILE"]),
    (lambda m, c, t: ["--against", m, "--out", str(t / "o"), "--fid-reference", str(t / "nope"),
                      "--fid-inception", str(t / "file.txt")], ["argument --fid-reference:", "not a folder"]),
])
def test_more_bad_arguments_are_one_line(assets, tmp_path, change, fragments, capsys):
    import torch

    model, clip, prompts = assets
    extra = change(model, clip, tmp_path)
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "file.txt").write_text("keep")
    argv = ["evaluate", model, "--prompts", str(prompts), "--clip", clip, "--steps", "1", *extra]
    if "--device" not in extra:
        argv += ["--device", "cpu"]
    assert cli.main(argv) in (1, 2)
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert (tmp_path / "file.txt").read_text() == "keep"
    assert not (tmp_path / "o").exists()


def test_against_writes_the_report(assets, tmp_path, capsys):
    model, clip, prompts = assets
    out = tmp_path / "eval"
    argv = ["evaluate", model, "--against", model, "--prompts", str(prompts), "--clip", clip,
            "--pickscore", clip, "--metrics", "clip,pickscore", "--steps", "1", "--device", "cpu",
            "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pickscore |" in printed and "report.md" in printed
    saved = json.loads((out / "scores.json").read_text())
    # the same model on the same seeds: identical images, so every difference is 0 and
    # every prompt a tie (a win rate of one half)
    for m in ("clip", "pickscore"):
        assert saved["metrics"][m]["mean_diff"] == 0 and saved["metrics"][m]["win_rate"] == 0.5
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
