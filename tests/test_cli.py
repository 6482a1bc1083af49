"""The ddspo-fast command line: the command registry, help, one-line errors, lazy imports,
pass-through commands, degrade / validate / prepare, and degrade -> prepare -> train ->
evaluate end to end. `train` flags: test_cli_train.py; `evaluate`: test_cli_evaluate.py."""

import argparse
import json
import subprocess
import sys
import types

import pytest
import torch

from ddspo_fast import cli
from ddspo_fast.cli import _args
from ddspo_fast.data import PairWriter, open_dataset
from ddspo_fast.testing import make_tiny_model

from _cli_helpers import assert_one_line_error, run_module, subprocess_env


# ---------------------------------------------------------------- the registry and help


def test_every_registered_command_follows_the_convention():
    assert len(set(cli.COMMANDS)) == len(cli.COMMANDS)
    for name in cli.COMMANDS:
        mod = cli.command_module(name)
        assert mod.__name__ == "ddspo_fast.cli." + name.replace("-", "_")
        assert isinstance(mod.HELP, str) and mod.HELP and "\n" not in mod.HELP, name
        assert callable(mod.add_arguments) and callable(mod.run), name
        assert isinstance(cli.command_parser(name), argparse.ArgumentParser)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ddspo-fast {command}") or command == "demo"  # the demo's own parser
    assert "usage:" in out
    if command == "degrade":
        assert "--method" in out and "--variants" in out and "structural" in out
    if command == "prepare":
        assert all(f in out for f in ("--model", "--prompts", "--out", "--steps", "--cfg", "--batch-size", "--seed"))
    if command == "evaluate":
        assert all(f in out for f in ("MODEL", "--prompts", "--clip", "--num-images-per-prompt", "--out"))
    if command == "bench":
        assert "loss" in out and "step" in out


def test_top_level_help_lists_commands_in_registry_order(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"\n  {name} ") for name in cli.COMMANDS]
    assert positions == sorted(positions)
    for name in cli.COMMANDS:
        assert cli.command_module(name).HELP in out
    assert cli.main([]) == 2  # no command: the help, on stderr
    assert "commands:" in capsys.readouterr().err


def test_adding_a_command_is_one_registry_entry(monkeypatch, capsys):
    """A module in ddspo_fast/cli/ plus its name in COMMANDS: listed, parsed, run."""
    seen = {}
    mod = types.ModuleType("ddspo_fast.cli.say_hi")
    mod.HELP = "print a greeting"
    mod.add_arguments = lambda p: p.add_argument("--name", required=True)
    mod.run = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "ddspo_fast.cli.say_hi", mod)
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("say-hi",))
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "\n  say-hi " in out and "print a greeting" in out
    assert cli.main(["say-hi", "--name", "x"]) == 0
    assert seen["args"].name == "x" and seen["args"].debug is False
    assert cli.main(["say-hi"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--name", "ddspo-fast say-hi --help")


def test_help_is_cheap_and_imports_no_heavy_library():
    """`ddspo-fast --help` and `<cmd> --help` import neither diffusers nor transformers nor
    the trainer; `train --help` needs transformers' HfArgumentParser, not diffusers.
    (One process: the modules imported only accumulate, so each check covers the ones before.)"""
    probe = """
import sys, io, contextlib
from ddspo_fast.cli import main
heavy = ('diffusers', 'transformers', 'accelerate', 'peft', 'ddspo_fast.train')
for argv in (['--help'], ['degrade', '--help'], ['prepare', '--help'], ['evaluate', '--help'],
             ['validate', '--help'], ['bench', '--help'], ['train', '--help']):
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    print(argv[0], rc, sorted({m.split('.')[0] for m in sys.modules if m.startswith(heavy)}))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(),
                       timeout=300)
    lines = r.stdout.splitlines()
    assert lines[:-1] == [f"{argv} 0 []" for argv in ("--help", "degrade", "prepare", "evaluate", "validate",
                                                         "bench")], r.stdout + r.stderr[-2000:]
    assert lines[-1].startswith("train 0 ") and "diffusers" not in lines[-1], r.stdout


def test_help_and_errors_via_python_dash_m(tmp_path):
    r = run_module("--help")
    assert r.returncode == 0 and "degrade" in r.stdout
    r = run_module("degrade", tmp_path / "missing.txt", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "PROMPTS", "missing.txt")


@pytest.mark.parametrize("argv", [["degrade", "MISSING", "--out", "o.jsonl", "--debug"],
                                  ["--debug", "degrade", "MISSING", "--out", "o.jsonl"]])
def test_debug_shows_the_traceback(argv, tmp_path, capsys):
    argv = [str(tmp_path / "missing.txt") if a == "MISSING" else a for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("ddspo-fast: error: argument PROMPTS")


def test_version_and_usage_error_exit_codes(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ddspo-fast ")
    assert cli.main(["degrade", "p.txt", "--variants", "0", "--out", "x"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--variants")


# ---------------------------------------------------------------- one-line errors (in process)


@pytest.mark.parametrize(
    "argv, code, fragments",
    [
        (["degrade", "p.txt"], 2, ["--out", "required"]),
        (["nosuch"], 2, ["invalid choice", "'nosuch'"]),
        (["--bogus"], 2, ["--bogus"]),
        (["degrade", "p.txt", "--out", "o", "--method", "bogus"], 2, ["--method"]),
        (["degrade", "p.txt", "--out", "o", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
        (["bench"], 2, ["loss or step"]),
        (["bench", "nosuch"], 2, ["unknown benchmark"]),
        (["validate", "/nonexistent/ds"], 1, ["does not exist"]),
        (["prepare", "--model", "/nonexistent/m", "--prompts", "p.jsonl", "--out", "o"], 1, ["--model"]),
        (["evaluate", "/nonexistent/m", "--prompts", "/nonexistent/p.txt", "--clip", "c"], 1, ["--prompts"]),
        (["train", "--config", "/nonexistent/c.yaml"], 1, ["--config", "does not exist"]),
        (["precompute", "--config", "/nonexistent/c.yaml", "--out", "o", "--draws", "1"], 1,
         ["--config", "does not exist"]),
        (["plan", "--config", "/nonexistent/c.yaml"], 1, ["--config", "does not exist"]),
    ],
)
def test_errors_are_one_line(argv, code, fragments, capsys):
    assert cli.main(argv) == code
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize("command", ["train", "train-pair", "precompute", "plan"])
def test_a_bad_value_in_a_config_file_names_the_file_and_key(command, tmp_path, capsys):
    """Every command that reads a run's --config YAML reads it the same way."""
    bad = tmp_path / "run.yaml"
    bad.write_text("model: m\ndata: d\nseed: many\n")
    extra = ["--out", str(tmp_path / "o"), "--draws", "1"] if command == "precompute" else []
    assert cli.main([command, "--config", str(bad), *extra]) == 1
    assert_one_line_error(capsys.readouterr().err, f"argument --config: {bad}: seed: expected")


def test_missing_optional_module_is_one_line(monkeypatch, capsys):
    real = _args.importlib.import_module

    def fake_import(name, *a, **k):
        if name.startswith(("ddspo_fast.bench", "ddspo_fast.demo")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(_args.importlib, "import_module", fake_import)
    assert cli.main(["bench", "step", "--x"]) == 1
    assert_one_line_error(capsys.readouterr().err, "step benchmark is not available", "ddspo_fast.bench.step")
    assert cli.main(["demo"]) == 1
    assert_one_line_error(capsys.readouterr().err, "demo is not available")


def test_passthrough_hands_remaining_argv(monkeypatch):
    seen = {}
    fake = types.SimpleNamespace(main=lambda argv: seen.setdefault("argv", argv) and 3)
    real = _args.importlib.import_module
    monkeypatch.setattr(_args.importlib, "import_module",
                        lambda name, *a: fake if name == "ddspo_fast.bench.loss" else real(name, *a))
    assert cli.main(["bench", "loss", "--sizes", "1", "2", "--debug"]) == 3
    assert seen["argv"] == ["--sizes", "1", "2", "--debug"]


@pytest.mark.parametrize("argv", [["bench", "loss", "--help"], ["bench", "step", "--help"], ["demo", "--help"]])
def test_passthrough_help_reaches_the_real_module(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and not out.startswith("usage: ddspo-fast bench {")


def test_unexpected_exception_is_one_line_with_hint(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli.command_module("degrade"), "run", boom)
    assert cli.main(["degrade", "p.txt", "--out", "o"]) == 1
    assert_one_line_error(capsys.readouterr().err, "RuntimeError: disk on fire second line", "--debug")


# ---------------------------------------------------------------- degrade / validate


def test_degrade_command(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("a red cube on top of a blue sphere\ncat\ntwo dogs next to a car\n")
    out = tmp_path / "neg.jsonl"
    assert cli.main(["degrade", str(src), "--out", str(out), "--method", "structural", "--variants", "3", "--seed", "4"]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 3 and all(1 <= len(r["neg_prompts"]) <= 3 for r in rows)
    assert "skipped 0" in err
    first = out.read_text()
    assert cli.main(["degrade", str(src), "--out", str(out), "--method", "structural", "--variants", "3", "--seed", "4"]) == 0
    assert out.read_text() == first  # deterministic

    assert cli.main(["degrade", str(src), "--out", str(out), "--method", "random", "--variants", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "skipped 000001: too short" in err
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["000000", "000002"]

    assert cli.main(["degrade", str(src), "--out", str(src)]) == 1
    assert_one_line_error(capsys.readouterr().err, "--out")


def test_validate_command(tmp_path, capsys):
    d = tmp_path / "ds"
    with PairWriter(d, shard_size=2) as w:
        for i in range(3):
            w.add(id=str(i), prompt=f"a cat {i}", neg_prompt="a cat", latent_w=torch.zeros(4, 2, 2),
                  latent_l=torch.ones(4, 2, 2))
    assert cli.main(["validate", str(d), "--latent-shape", "4", "2", "2"]) == 0
    assert "3 valid pairs, 0 invalid" in capsys.readouterr().out
    (d / "shard-00001.safetensors").unlink()
    assert cli.main(["validate", str(d), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] == 2 and len(report["skipped"]) == 1 and "missing shard" in report["skipped"][0]
    assert cli.main(["validate", str(d), "--latent-shape", "4", "8", "8"]) == 1
    assert_one_line_error(capsys.readouterr().err, "latent_shape")


def test_field_of_error_picks_the_earliest_longest_name():
    names = ["beta", "beta_dpo", "steps", "max_steps", "data"]
    assert _args.field_of_error("beta_dpo must be > 0", names) == "beta_dpo"
    assert _args.field_of_error("max_steps must be >= 1, got 0 steps", names) == "max_steps"
    assert _args.field_of_error("the data directory is empty", names) == "data"
    assert _args.field_of_error("something else", names) is None


# ---------------------------------------------------------------- end to end on a tiny sd15 model

KILLED_PREPARE = """
import os, sys
from ddspo_fast.data.prepare import prepare_dataset

def kill(written):
    if written >= 3:  # mid-shard: rows 0-1 are durable, row 2 only buffered
        os._exit(17)

prepare_dataset(sys.argv[1], sys.argv[2], sys.argv[3], steps=1, batch_size=1, shard_size=2,
                device="cpu", progress=False, on_batch=kill)
"""


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return make_tiny_model("sd15", tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "p.txt").write_text("a red cube on top of a blue sphere\na photo of a cat\ntwo dogs next to a car\n"
                             "a small green house\n")
    assert cli.main(["degrade", str(d / "p.txt"), "--out", str(d / "neg.jsonl"), "--method", "structural",
                     "--variants", "2"]) == 0
    return d / "neg.jsonl"


def _prepare(model, prompts, out, *extra):
    return cli.main(["prepare", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                     "--steps", "1", "--device", "cpu", "--no-progress", *extra])


def test_degrade_prepare_train_evaluate_end_to_end(tiny_sd15, degraded, tmp_path, capsys):
    from ddspo_fast.demo.tinyclip import make_tiny_clip

    ds_dir = tmp_path / "pairs"
    assert _prepare(tiny_sd15, degraded, ds_dir, "--batch-size", "2") == 0
    ds = open_dataset(ds_dir, family="sd15", validate=True)
    records = [json.loads(l) for l in degraded.read_text().splitlines()]
    assert ds.ids() == [r["id"] for r in records] and ds.has_text_embeddings
    item = ds[0]
    assert item["neg_prompt"] in records[0]["neg_prompts"] and item["latent_w"].shape == item["latent_l"].shape
    assert not torch.equal(item["latent_w"], item["latent_l"])  # c and c- sampled differently
    capsys.readouterr()

    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(tiny_sd15), "--data", str(ds_dir), "--output-dir", str(out),
                     "--max-steps", "2", "--batch_size", "2", "--mixed-precision", "no", "--no-progress",
                     "--no-tensorboard", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["loss"] > 0
    summary = [l for l in captured.out.splitlines() if l.startswith("trained: ")]
    assert len(summary) == 1 and "steps=2" in summary[0] and f"output_dir={out}" in summary[0]

    clip = make_tiny_clip(tmp_path / "clip")
    assert cli.main(["evaluate", str(out), "--prompts", str(degraded), "--clip", clip, "--steps", "1",
                     "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in result["per_prompt"]] == [r["prompt"] for r in records]
    assert 0 <= result["clip_score"] <= 100