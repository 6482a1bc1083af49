"""Nothing a command reads is unpickled: a pickle that writes a marker file when loaded is
planted in every file slot a command reads (checkpoint files, pair adapters, reference
cache, dataset files, export and model inputs), as someone who can write the folder
would (manifests and checksums recomputed); the command refuses it in one line naming the
file, and the marker never appears."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from _cli_helpers import assert_one_line_error
from _train_helpers import tiny_data, tiny_model

from ddspo_fast import cli, safeload
from ddspo_fast.fsio import sha256_file
from ddspo_fast.train import checkpoint as ckpt
from ddspo_fast.train import refcache as rc

TRAIN = ["--mixed-precision", "no", "--device", "cpu", "--no-progress", "--no-tensorboard",
         "--batch-size", "2", "--learning-rate", "1e-3", "--log-every", "1"]


class _Payload:
    """Unpickling this runs ``exec``, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch.save pickle (a zip with data.pkl) holding the payload."""
    path.unlink(missing_ok=True)
    torch.save({"state": _Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    """The control: unpickling the planted file does run its code."""
    marker = tmp_path / "MARKER"
    plant(tmp_path / "x.pt", marker)
    safeload.load_trusted_pickle(tmp_path / "x.pt")
    assert marker.read_text() == "ran"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _run(argv, capsys):
    capsys.readouterr()
    rc_ = cli.main([str(a) for a in argv])
    return rc_, capsys.readouterr().err


def _refused(argv, file: Path, marker: Path, capsys) -> None:
    code, err = _run(argv, capsys)
    assert code != 0
    assert not marker.exists(), f"the payload in {file} ran"
    assert_one_line_error(err, str(file))


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert cli.main(["train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                     "--output-dir", str(out), "--lora-rank", "2", "--max-steps", "1",
                     "--checkpoint-every", "1", "--no-save-final", *TRAIN]) == 0
    return out


def _resume_argv(out: Path, *extra):
    return ["train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
            "--output-dir", out, "--lora-rank", "2", "--max-steps", "2", "--checkpoint-every",
            "0", "--no-save-final", "--resume", ckpt.final_path(out, 1), *TRAIN, *extra]


@pytest.mark.parametrize("slot", [ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE,
                                  ckpt.rng_file(0), ckpt.STATE_FILE, ckpt.MANIFEST_FILE])
def test_checkpoint_slot(run_dir, tmp_path, capsys, slot):
    out, marker = _copy(run_dir, tmp_path / "out"), tmp_path / "MARKER"
    one = ckpt.final_path(out, 1)
    plant(one / slot, marker)
    if slot != ckpt.MANIFEST_FILE:
        ckpt.write_manifest(one)  # the checksums prove integrity, not origin
    _refused(_resume_argv(out), one / slot, marker, capsys)


def test_checkpoint_of_the_earlier_format_needs_trust(run_dir, tmp_path, capsys):
    out, marker = _copy(run_dir, tmp_path / "out"), tmp_path / "MARKER"
    one = ckpt.final_path(out, 1)
    for new, old in ((ckpt.OPTIMIZER_FILE, ckpt.LEGACY_OPTIMIZER_FILE),
                     (ckpt.SCHEDULER_FILE, ckpt.LEGACY_SCHEDULER_FILE),
                     (ckpt.rng_file(0), ckpt.rng_file(0, legacy=True))):
        (one / new).unlink()
        plant(one / old, marker)
    ckpt.write_manifest(one)
    _refused(_resume_argv(out), one / ckpt.LEGACY_OPTIMIZER_FILE, marker, capsys)
    code, err = _run(_resume_argv(out), capsys)
    assert "--trust-checkpoint" in err


def test_stray_pickles_beside_a_checkpoint_are_never_read(run_dir, tmp_path, capsys):
    out, marker = _copy(run_dir, tmp_path / "out"), tmp_path / "MARKER"
    one = ckpt.final_path(out, 1)
    for name in (ckpt.LEGACY_OPTIMIZER_FILE, ckpt.LEGACY_SCHEDULER_FILE,
                 ckpt.rng_file(0, legacy=True)):
        plant(one / name, marker)
    ckpt.write_manifest(one)
    code, err = _run(_resume_argv(out), capsys)
    assert code == 0, err
    assert not marker.exists()


def test_train_pair_checkpoint_slot(tmp_path, capsys):
    out, marker = tmp_path / "pair", tmp_path / "MARKER"
    argv = ["train-pair", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
            "--output-dir", out, *TRAIN]
    assert _run([*argv, "--max-steps", "1", "--checkpoint-every", "1"], capsys)[0] == 0
    one = ckpt.final_path(out, 1)
    plant(one / ckpt.OPTIMIZER_FILE, marker)
    ckpt.write_manifest(one)
    _refused([*argv, "--max-steps", "2", "--resume", "latest"], one / ckpt.OPTIMIZER_FILE,
             marker, capsys)


# ---------------------------------------------------------------------- pair adapters
@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    from test_train_families import _write_pair_lora

    return Path(_write_pair_lora("sd15", tmp_path_factory.mktemp("pair") / "pair"))


@pytest.mark.parametrize("slot", ["lose/adapter_model.bin", "lose/adapter_model.safetensors",
                                  "win/pytorch_lora_weights.safetensors"])
def test_pair_adapter_slot(pair_dir, tmp_path, capsys, slot):
    pair, marker = _copy(pair_dir, tmp_path / "pair"), tmp_path / "MARKER"
    if slot.endswith(".bin"):  # peft's pickle format: read only when no safetensors is there
        (pair / "lose" / "adapter_model.safetensors").unlink()
    plant(pair / slot, marker)
    _refused(["train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
              "--output-dir", tmp_path / "out", "--pair", "lora", "--pair-lora", pair,
              "--lora-rank", "2", "--max-steps", "1", *TRAIN], pair / slot, marker, capsys)


def test_upstream_pickle_refused_on_a_torch_with_known_bypasses(tmp_path, monkeypatch):
    f = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.ones(2)}, f)
    assert torch.equal(safeload.load_pickled_weights(f)["w"], torch.ones(2))
    monkeypatch.setattr(safeload, "torch_version", lambda: (2, 9))
    with pytest.raises(safeload.UnsafeFileError,
                       match=f"^{re.escape(str(f))}: .*torch {re.escape(torch.__version__)}"):
        safeload.load_pickled_weights(f)


# ---------------------------------------------------------------------- reference cache
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert cli.main(["precompute", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                     "--out", str(out), "--draws", "1", "--mixed-precision", "no",
                     "--device", "cpu", "--no-progress"]) == 0
    return out


def _cached_train(tmp_path, cache, *extra):
    return ["train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"), "--output-dir",
            tmp_path / "out", "--reference-cache", cache, "--lora-rank", "2", "--max-steps", "1",
            "--no-save-final", *TRAIN, *extra]


@pytest.mark.parametrize("slot", ["draw-00000/shard-00000.safetensors", rc.META_FILE,
                                  "draw-00000/shard-00000.sha256"])
def test_cache_slot(cache_dir, tmp_path, capsys, slot):
    cache, marker = _copy(cache_dir, tmp_path / "cache"), tmp_path / "MARKER"
    plant(cache / slot, marker)
    if slot.endswith(".safetensors"):
        rc.write_checksum(cache / slot, cache / slot)
    _refused(_cached_train(tmp_path, cache), cache / slot, marker, capsys)


def test_changed_cache_shard_is_named_and_read_once(cache_dir, tmp_path, capsys, monkeypatch):
    cache = _copy(cache_dir, tmp_path / "cache")
    shard = cache / "draw-00000" / "shard-00000.safetensors"
    r = rc.RefCache(cache)
    hashed = []
    real = rc.sha256_file
    monkeypatch.setattr(rc, "sha256_file", lambda p: hashed.append(p) or real(p))
    ids = r.ids[:2]
    first = r.read(ids, [[0]] * 2)
    r.close()  # handles closed and reopened: the shard is not hashed again
    assert all(torch.equal(first[f], v) for f, v in r.read(ids, [[0]] * 2).items())
    assert hashed == [shard]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"^reference_cache: {shard} does not match its "
                                         "checksum"):
        rc.RefCache(cache).read(ids, [[0]] * 2)
    # found on the first read, once the run started: its banner, then one error line
    code, err = _run(_cached_train(tmp_path, cache), capsys)
    assert code != 0 and "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("ddspo-fast: error:")]
    assert len(errors) == 1 and str(shard) in errors[0] and "checksum" in errors[0], err


def test_cache_of_the_earlier_version_needs_trust(cache_dir, tmp_path, capsys):
    cache = _copy(cache_dir, tmp_path / "cache")
    meta = json.loads((cache / rc.META_FILE).read_text())
    meta["version"] = 1
    (cache / rc.META_FILE).write_text(json.dumps(meta))
    for f in cache.rglob("*.sha256"):
        f.unlink()
    code, err = _run(_cached_train(tmp_path, cache), capsys)
    assert code != 0
    assert_one_line_error(err, str(cache / rc.META_FILE), "--trust-checkpoint")
    code, err = _run(_cached_train(tmp_path, cache, "--trust-checkpoint"), capsys)
    assert code == 0, err
    code, err = _run(["precompute", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                      "--out", cache, "--draws", "2", "--mixed-precision", "no", "--device",
                      "cpu", "--no-progress"], capsys)  # not extended with unverified shards
    assert code != 0
    assert_one_line_error(err, f"out: {cache} holds a cache of an earlier version")


# ---------------------------------------------------------------------- datasets
def _reseal_dataset(d: Path, shard: Path) -> None:
    recs = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
    for r in recs:
        if r["shard"] == shard.name:
            r.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize("slot", ["shard-00000.safetensors", "info.json", "index.jsonl",
                                  "manifest.jsonl"])
def test_dataset_slot_validate(tmp_path, capsys, slot):
    d, marker = _copy(Path(tiny_data("sd15")), tmp_path / "data"), tmp_path / "MARKER"
    plant(d / slot, marker)
    if slot.endswith(".safetensors"):
        _reseal_dataset(d, d / slot)
    code, err = _run(["validate", d], capsys)
    assert code != 0 and not marker.exists()
    assert str(d / slot) in err and "Traceback" not in err


def test_dataset_shard_slot_train(tmp_path, capsys):
    d, marker = _copy(Path(tiny_data("sd15")), tmp_path / "data"), tmp_path / "MARKER"
    shard = d / "shard-00000.safetensors"
    plant(shard, marker)
    _reseal_dataset(d, shard)
    _refused(["train", "--model", tiny_model("sd15"), "--data", d, "--output-dir",
              tmp_path / "out", "--lora-rank", "2", "--max-steps", "1", *TRAIN], shard, marker,
             capsys)


def test_official_layout_latent_slot(tmp_path, capsys):
    d, marker = tmp_path / "official", tmp_path / "MARKER"
    (d / "latents").mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(4, 8, 8)}, str(d / "latents" / "w.safetensors"))
    plant(d / "latents" / "l.safetensors", marker)
    (d / "metadata.jsonl").write_text(json.dumps(
        {"prompt": "a red car", "neg_prompt": "a car", "pos_file": "w.safetensors",
         "neg_file": "l.safetensors"}) + "\n")
    code, err = _run(["validate", d], capsys)
    assert code != 0 and not marker.exists()
    assert str(d / "latents" / "l.safetensors") in err and "Traceback" not in err


# ---------------------------------------------------------------------- exports and models
@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    assert cli.main(["train", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                     "--output-dir", str(out), "--lora-rank", "2", "--max-steps", "1",
                     "--checkpoint-every", "0", *TRAIN]) == 0
    return out


def test_exported_lora_slot_evaluate(lora_export, tmp_path, capsys):
    from ddspo_fast.demo.tinyclip import make_tiny_clip

    out, marker = _copy(lora_export, tmp_path / "out"), tmp_path / "MARKER"
    weights = out / "pytorch_lora_weights.safetensors"
    plant(weights, marker)
    plant(out / "pytorch_lora_weights.bin", marker)  # a pickle fallback is not taken
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    code, err = _run(["evaluate", out, "--prompts", tmp_path / "p.txt", "--clip",
                      make_tiny_clip(tmp_path / "clip"), "--steps", "1", "--device", "cpu"],
                     capsys)
    assert code != 0 and not marker.exists()
    assert_one_line_error(err, str(out))


def test_model_weights_slot(tmp_path, capsys):
    """A pipeline's pickled weights (diffusers' .bin, read when no .safetensors is there)
    are loaded by diffusers with weights_only=True, safe on the torch this library needs."""
    model, marker = _copy(Path(tiny_model("sd15")), tmp_path / "model"), tmp_path / "MARKER"
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(model / "unet" / "diffusion_pytorch_model.bin", marker)
    code, err = _run(["train", "--model", model, "--data", tiny_data("sd15"), "--output-dir",
                      tmp_path / "out", "--lora-rank", "2", "--max-steps", "1", *TRAIN], capsys)
    assert code != 0 and not marker.exists()
    # diffusers warns (one line) that it fell back from the missing .safetensors file
    errors = [x for x in err.splitlines() if x.startswith("ddspo-fast: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(model / "unet" / "diffusion_pytorch_model.bin") in errors[0]


def test_swapped_dataset_shards_refused_by_train(tmp_path, capsys):
    d = _copy(Path(tiny_data("sd15", 8)), tmp_path / "data")  # two shards of 4 pairs
    a, b = d / "shard-00000.safetensors", d / "shard-00001.safetensors"
    a.rename(d / "x")
    b.rename(a)
    (d / "x").rename(b)
    code, err = _run(["train", "--model", tiny_model("sd15"), "--data", d, "--output-dir",
                      tmp_path / "out", "--lora-rank", "2", "--max-steps", "1", *TRAIN], capsys)
    assert code != 0
    assert_one_line_error(err, f"shard file {a} holds the rows written as {b.name}")


def test_a_full_disk_while_saving_tensors_is_an_oserror(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left "
                                          "on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        safeload.save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)})
    assert e.value.errno == errno.ENOSPC


def test_trust_is_not_written_into_the_saved_config(tmp_path):
    """--trust-checkpoint allows one invocation; the run's saved YAML (the natural --config
    of a later resume, or of someone else's run) never carries it forward."""
    import yaml

    from ddspo_fast.train import TrainConfig

    cfg = TrainConfig(model="m", data="d", output_dir=str(tmp_path / "run"), trust_checkpoint=True)
    cfg.to_yaml(tmp_path / "train_config.yaml")
    saved = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    assert "trust_checkpoint" not in saved and saved["model"] == "m"
    assert TrainConfig.from_yaml(tmp_path / "train_config.yaml").trust_checkpoint is False
