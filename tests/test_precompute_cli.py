"""`ddspo-fast precompute`'s flags: generated from TrainConfig (as train's), one for every
setting the cache depends on, read from the code rather than listed by hand."""

import ast
import inspect
import textwrap

import pytest

from ddspo_fast import cli
from ddspo_fast.cli import precompute as precompute_cmd
from ddspo_fast.cli._config_args import config_from_args
from ddspo_fast.train import TrainConfig
from ddspo_fast.train import precompute as precompute_mod
from ddspo_fast.train import refcache

from _cli_helpers import assert_one_line_error

FIELDS = set(TrainConfig.__dataclass_fields__)

# TrainConfig fields the precompute reads that do not change what it stores, and why
# (it replaces timesteps_per_pair and reference_cache, reading neither)
NOT_STORED = {
    "beta": "given to the loss object, whose frozen pass stores no loss",
    "backend": "given to the loss object, whose frozen pass stores no loss",
    "loss_type": "given to the loss object, whose frozen pass stores no loss",
}


def _cfg_reads(fn) -> set:
    """The TrainConfig fields ``fn`` reads as ``cfg.<field>``, and those read by the
    functions of its module that it hands ``cfg`` to (transitively)."""
    module = inspect.getmodule(fn)
    seen, todo, reads = set(), [fn.__name__], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(module, name))))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "cfg" and node.attr in FIELDS:
                reads.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and callable(getattr(module, node.func.id, None)) \
                    and any(isinstance(a, ast.Name) and a.id == "cfg" for a in node.args):
                todo.append(node.func.id)
    return reads


def _module_cfg_reads(module) -> set:
    tree = ast.parse(inspect.getsource(module))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "cfg" and node.attr in FIELDS}


def _flags() -> set:
    return {a.dest for a in cli.command_parser("precompute")._actions}


def test_every_setting_the_cache_depends_on_is_a_flag():
    fingerprinted = _cfg_reads(refcache.fingerprint)
    # the derivation itself: the fingerprint records the draws and the precision
    assert {"seed", "mixed_precision", "timestep_sampling", "mode_scale", "flow_shift",
            "logit_mean", "text_encoder_dtype"} <= fingerprinted, fingerprinted
    run = _module_cfg_reads(precompute_mod)  # how the frozen networks are built and run
    assert not fingerprinted & set(NOT_STORED)
    assert set(NOT_STORED) <= run, "a NOT_STORED entry the precompute no longer reads"
    needed = (fingerprinted | run) - set(NOT_STORED)
    assert needed <= _flags(), f"settings without a precompute flag: {needed - _flags()}"
    assert needed <= set(precompute_cmd.CONFIG_FIELDS)


def test_flags_are_generated_from_the_dataclass_in_both_spellings(capsys):
    assert cli.main(["precompute", "--help"]) == 0
    out = capsys.readouterr().out
    for name in precompute_cmd.CONFIG_FIELDS:
        assert f"--{name}" in out and "--" + name.replace("_", "-") in out, name
    # help text comes from the field
    assert TrainConfig.fields_help()["mode_scale"]["help"].split()[0] in out


def _parse(argv):
    return cli.command_parser("precompute").parse_args(["--out", "o", "--draws", "1", *argv])


def test_the_new_flags_reach_the_config():
    args = _parse(["--model", "m", "--data", "d", "--timestep-sampling", "mode",
                   "--mode_scale", "1.5", "--flow-shift", "3", "--text-encoder-dtype", "run",
                   "--no-channels-last", "--batch-size", "2"])
    cfg = config_from_args(args, TrainConfig, precompute_cmd.CONFIG_FIELDS)
    assert (cfg.timestep_sampling, cfg.mode_scale, cfg.flow_shift) == ("mode", 1.5, 3.0)
    assert cfg.text_encoder_dtype == "run" and cfg.channels_last is False
    assert cfg.batch_size == TrainConfig().batch_size  # --batch-size is precompute's own
    assert args.batch_size == 2


def test_flags_override_the_run_file_and_errors_name_the_flag(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: m\ndata: d\nflow_shift: 2.0\nbeta: 100\nreference_cache: cache\n")
    cfg = config_from_args(_parse(["--config", str(run), "--flow-shift", "4"]), TrainConfig,
                           precompute_cmd.CONFIG_FIELDS)
    assert cfg.flow_shift == 4.0 and cfg.beta == 100.0  # the file's other settings are read
    assert cli.main(["precompute", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                     "--draws", "1", "--flow-shift", "-1"]) == 1
    assert_one_line_error(capsys.readouterr().err, "argument --flow_shift/--flow-shift: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", sorted(precompute_cmd.OWN_FLAGS.values()))
def test_own_flags_are_not_config_fields(flag):
    """precompute's own flags (what it writes, how it batches) never set the run's config."""
    args = _parse(["--model", "m", "--data", "d"])
    cfg = config_from_args(args, TrainConfig, precompute_cmd.CONFIG_FIELDS)
    dest = flag.lstrip("-").replace("-", "_")
    assert dest not in precompute_cmd.CONFIG_FIELDS
    if dest in FIELDS:
        assert getattr(cfg, dest) == getattr(TrainConfig(), dest)
