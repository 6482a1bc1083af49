"""The paths a new user takes, as the README writes them: the reference cache with default
settings, YAML quantities, mistyped model paths, --threads everywhere, quiet commands,
the export command and the smaller messages."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch

from ddspo_fast import cli
from _cli_helpers import ROOT, assert_one_line_error, subprocess_env
from _train_helpers import tiny_data, tiny_model


def _main(*argv) -> int:
    return cli.main([str(a) for a in argv])


# ---------------------------------------------------------------------- reference cache
def test_precompute_with_defaults_then_train_from_the_cache(tmp_path, capsys):
    """precompute with only --model/--data/--out/--draws (mixed precision 'auto'), then a
    default train --reference-cache: 'auto' is resolved (fp32 on this CPU) before the
    cache is fingerprinted and before the run compares it. A cache made with an explicit
    --mixed-precision no is the same cache."""
    model, data = tiny_model("sd15"), tiny_data("sd15")
    cache = tmp_path / "cache"
    assert _main("precompute", "--model", model, "--data", data, "--out", cache, "--draws", 2,
                 "--no-progress", "--threads", 1) == 0
    from ddspo_fast.train.refcache import RefCache

    assert RefCache(cache).fingerprint["precision"] == "no"
    cache_no = tmp_path / "cache-no"
    assert _main("precompute", "--model", model, "--data", data, "--out", cache_no,
                 "--draws", 2, "--mixed-precision", "no", "--no-progress") == 0
    for c in (cache, cache_no):
        assert _main("train", "--model", model, "--data", data, "--output-dir",
                     tmp_path / f"run-{c.name}", "--reference-cache", c, "--max-steps", 2,
                     "--batch-size", 2, "--no-progress", "--no-tensorboard", "--threads", 1) == 0
        assert "trained:" in capsys.readouterr().out


def test_precompute_python_api_with_a_plain_config(tmp_path):
    from ddspo_fast.train import TrainConfig
    from ddspo_fast.train.precompute import precompute

    res = precompute(TrainConfig(model=tiny_model("sd15"), data=tiny_data("sd15")),
                     tmp_path / "c", 1, progress=False)
    assert res["complete"] and res["dtype"] == "fp32"


def test_precompute_config_ignores_the_cache_it_builds(tmp_path):
    """A run's YAML names the cache it will train from; precompute --config builds that
    cache instead of refusing it as 'not a directory'."""
    cache = tmp_path / "cache"
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tiny_model('sd15')}\ndata: {tiny_data('sd15')}\n"
                   f"reference_cache: {cache}\nlearning_rate: 1e-4\nmax_steps: 2\n")
    assert _main("precompute", "--config", run, "--out", cache, "--draws", 1,
                 "--no-progress") == 0
    assert (cache / "cache.json").is_file() or any(cache.iterdir())


# ---------------------------------------------------------------------- YAML quantities
@pytest.mark.parametrize("text, field, value", [
    ("learning_rate: 1e-4", "learning_rate", 1e-4),
    ("learning_rate: 5E-6", "learning_rate", 5e-6),
    ("learning_rate: '1e-4'", "learning_rate", 1e-4),
    ("beta: 5e3", "beta", 5000.0),
    ("max_steps: 1e3", "max_steps", 1000),
    ("max_steps: 2000.0", "max_steps", 2000),
    ("mixed_precision: no", "mixed_precision", "no"),
    ("lora_rank: null", "lora_rank", None),
    ("max_grad_norm: none", "max_grad_norm", None),
    ("progress: no", "progress", False),
    ("compile: 'true'", "compile", True),
])
def test_yaml_quantities_read_as_the_fields_type(tmp_path, text, field, value):
    from ddspo_fast.train import TrainConfig

    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    got = getattr(TrainConfig.from_yaml(p), field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, message", [
    ("learning_rate: fast", "learning_rate: expected a number, got 'fast'"),
    ("max_steps: 1.5", "max_steps: expected an integer, got 1.5"),
    ("max_steps: yes", "max_steps: expected an integer, got true"),
    ("progress: maybe", "progress: expected true or false, got 'maybe'"),
    ("lora_rank: no", "lora_rank: expected an integer or null, got false"),
])
def test_yaml_quantities_of_the_wrong_type_are_one_line_naming_field_and_type(
        tmp_path, text, message, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    assert _main("train", "--config", p, "--data", tmp_path) == 1
    assert_one_line_error(capsys.readouterr().err, message)


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("beta: 2000\nlearning_rate: 1e-4\nbeta: 5000\n")
    assert _main("train", "--config", p) == 1
    assert_one_line_error(capsys.readouterr().err, "line 3: beta: given twice")


@pytest.mark.parametrize("flags", [["--lora-alpha", "8"], ["--lora-targets", "to_q"]])
def test_lora_flags_without_a_rank_are_refused(flags, tmp_path, capsys):
    assert _main("train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                 "--output-dir", tmp_path / "r", *flags) == 1
    name = flags[0].removeprefix("--")
    assert_one_line_error(capsys.readouterr().err, "applies to a LoRA only; set lora_rank",
                          name)


# ---------------------------------------------------------------------- model paths
def test_a_mistyped_local_model_path_fails_at_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "models" / "tiny-sd15").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert _main("train", "--model", "models/tiny-sd5", "--data", tiny_data("sd15"),
                 "--output-dir", tmp_path / "r") == 1
    assert time.perf_counter() - t0 < 10  # no hub retries (~28 s before)
    assert_one_line_error(capsys.readouterr().err, "--model",
                          "models/tiny-sd5 does not exist (a local path, not a hub id)",
                          "did you mean models/tiny-sd15?")


def test_hub_ids_are_left_to_the_hub():
    from ddspo_fast.train.config import missing_local_model

    assert missing_local_model("stabilityai/stable-diffusion-xl-base-1.0") is None
    assert missing_local_model(tiny_model("sd15")) is None
    assert missing_local_model("/no/such/model") is not None


# ---------------------------------------------------------------------- --threads
@pytest.mark.parametrize("command", ["degrade", "prepare", "encode", "precompute", "train",
                                     "train-pair", "export", "bench", "demo"])
def test_every_command_that_runs_torch_takes_threads(command, capsys):
    if command in ("bench", "demo"):  # their own parsers: the flag is in their help
        assert _main(command, *(["loss"] if command == "bench" else []), "--help") == 0
        assert "--threads" in capsys.readouterr().out
        return
    parser = cli.command_parser(command)
    assert "--threads" in parser._option_string_actions
    assert _main(command, "--threads", "0") in (1, 2)  # refused (train: by its config)
    assert "--threads" in capsys.readouterr().err


def test_torch_threads_sets_and_restores():
    from ddspo_fast.cli._args import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------- noise
_NOISE = ("gemm_4bit", "kernels-community", "kept in float32", "Already found a `peft_config`",
          "publisher trust")


def test_commands_are_quiet_and_skip_bitsandbytes(tmp_path):
    """precompute in a fresh process: none of the libraries' notices on stderr, and
    bitsandbytes (a second or more of import, and a kernel lookup) never imported."""
    code = ("import sys; from ddspo_fast import cli; rc = cli.main(sys.argv[1:]); "
            "print('BNB', 'bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None); "
            "sys.exit(rc)")
    env = subprocess_env()
    env.pop("DIFFUSERS_VERBOSITY", None)
    r = subprocess.run([sys.executable, "-c", code, "precompute", "--model", tiny_model("sd15"),
                        "--data", tiny_data("sd15"), "--out", str(tmp_path / "c"),
                        "--draws", "1", "--no-progress", "--threads", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "BNB False" in r.stdout
    for n in _NOISE:
        assert n not in r.stderr, r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr  # the summary


def test_bitsandbytes_is_there_again_after_a_command():
    from ddspo_fast.cli._args import without_bitsandbytes

    had = sys.modules.get("bitsandbytes", "absent")
    with without_bitsandbytes():
        import importlib.util

        if had == "absent":
            assert importlib.util.find_spec("bitsandbytes") is None
    assert sys.modules.get("bitsandbytes", "absent") == had


def test_adding_a_second_adapter_is_silent():
    from ddspo_fast.models import load_adapter
    from ddspo_fast.train.lora import add_policy_lora
    from ddspo_fast.train.pair_policies import add_pair_adapters

    a = load_adapter(tiny_model("sd15"), components=("denoiser",), device="cpu",
                     dtype=torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        add_pair_adapters(a.denoiser, 2, 2, a.lora_targets, 0.0, 0)
        add_policy_lora(a.denoiser, 2, 4, a.lora_targets, 0)
    assert not [w for w in seen if "peft_config" in str(w.message)]


# ---------------------------------------------------------------------- export command
def test_export_command_turns_a_checkpoint_into_lora_weights(tmp_path, capsys):
    run = tmp_path / "run"
    assert _main("train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                 "--output-dir", run, "--lora-rank", 4, "--lora-alpha", 8, "--max-steps", 1,
                 "--checkpoint-every", 1, "--no-save-final", "--no-progress",
                 "--no-tensorboard", "--threads", 1) == 0
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    capsys.readouterr()
    assert _main("export", run, "--out", tmp_path / "out", "--threads", 1) == 0
    assert "LoRA weights" in capsys.readouterr().out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    # a checkpoint given directly, into a non-empty --out, only with --overwrite
    ck = run / "checkpoints" / "checkpoint-1"
    assert _main("export", ck, "--out", tmp_path / "out") == 1
    assert_one_line_error(capsys.readouterr().err, "--out", "is not empty")
    assert _main("export", ck, "--out", tmp_path / "out", "--overwrite") == 0
    # never into its own input
    assert _main("export", run, "--out", run / "x") == 1
    assert_one_line_error(capsys.readouterr().err, "--out", "input")
    assert _main("export", tmp_path / "nothing", "--out", tmp_path / "o2") == 1
    assert_one_line_error(capsys.readouterr().err, "RUN_OR_CHECKPOINT", "does not exist")


def test_loadable_turns_a_checkpoint_into_a_base_model_and_lora(tmp_path):
    """What evaluate calls: a checkpoint becomes base model + LoRA folder."""
    from _train_helpers import config

    from ddspo_fast.train import Trainer
    from ddspo_fast.train.export import loadable

    run = tmp_path / "run"
    Trainer(config("sd15", run, lora_rank=2, max_steps=1, checkpoint_every=1)).train()
    got = loadable(run / "checkpoints" / "checkpoint-1", tmp_path / "scratch")
    assert got.kind == "lora" and got.base_model == tiny_model("sd15")
    assert os.path.isfile(os.path.join(got.lora, "pytorch_lora_weights.safetensors"))


# ---------------------------------------------------------------------- smaller messages
def test_help_texts_are_whole(capsys):
    assert _main("bench", "loss", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "script-form eager loss and its torch.compile, in the same run, interleaved." in text
    assert _main("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(required). (default" not in text and "(required)" in text


def test_ddspo_without_degraded_prompts_says_what_to_do(tmp_path, capsys):
    from PIL import Image

    lines = []
    for i in range(2):
        for side, color in (("w", (200, 30, 30)), ("l", (30, 30, 200))):
            Image.new("RGB", (32, 32), color).save(tmp_path / f"{i}{side}.png")
        lines.append(f'{{"prompt": "a red square {i}", "image_w": "{i}w.png", "image_l": "{i}l.png"}}')
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    model = tiny_model("sd15")
    assert _main("encode", "--model", model, "--pairs", tmp_path / "pairs.jsonl", "--out",
                 tmp_path / "data", "--no-progress", "--threads", 1) == 0
    capsys.readouterr()
    assert _main("train", "--model", model, "--data", tmp_path / "data", "--output-dir",
                 tmp_path / "run", "--max-steps", 1, "--no-progress", "--no-tensorboard") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's banner
    assert last.startswith("ddspo-fast: error: data: ") and "Traceback" not in last
    assert "encode --degrade random" in last and "--objective dpo" in last


def test_degrade_variants_says_prepare_picks_one(tmp_path, capsys):
    p = tmp_path / "p.txt"
    p.write_text("a red car on a blue street\n")
    assert _main("degrade", p, "--out", tmp_path / "d.jsonl", "--variants", 2) == 0
    assert "one pair per prompt" in capsys.readouterr().err


def test_make_tiny_model_honours_the_umask(tmp_path):
    from ddspo_fast.testing import make_tiny_model

    old = os.umask(0o022)
    try:
        path = make_tiny_model("sd15", tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    for dirpath, dirs, files in os.walk(path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o755
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o644, f
