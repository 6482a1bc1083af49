"""encode: existing image-pair preference data (Pick-a-Pic Parquet, JSONL of PNG pairs) into
the packed pair dataset; preprocessing, preferred/dispreferred order, ties, bad images
reported by file and row, resume after a hard kill, the CLI module, training on the result."""

import argparse
import builtins
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _train_helpers import config, tiny_model

from ddspo_fast.data import open_dataset
from ddspo_fast.data.encode import encode_pairs
from ddspo_fast.data.images import image_pixels, resize_center_crop, vae_encode
from ddspo_fast.data.pair_sources import read_pair_source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]


def _png(seed, size=(20, 28)):
    a = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _pickapic(path, *, row_group_size=2, empty_caption=True):
    rows = {
        "caption": ["a photo of a cat", "a red car", "a dog in the house", "the blue sky", "a small tree",
                    "" if empty_caption else "a cat", "a man"],
        "jpg_0": [_png(0), _png(1), _png(2), _png(3), b"\x89PNG broken", _png(5), _png(6)],
        "jpg_1": [_png(10), _png(11), _png(12), _png(13), _png(14), _png(15), _png(16)],
        "label_0": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0],
    }
    pq.write_table(pa.table(rows), str(path), row_group_size=row_group_size)
    return rows


def _mean_latent(model, png_bytes):
    from ddspo_fast.models import load_adapter

    a = load_adapter(model, components=("vae",))
    return vae_encode(a, image_pixels(png_bytes, (16, 16))[None], mode="mean")[0]


def test_resize_center_crop_keeps_the_centre():
    # 40 wide x 20 high: left and right quarters red, centre green; a centre crop to a
    # square after resizing to height 10 must hold only green.
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :10] = a[:, 30:] = (255, 0, 0)
    a[:, 10:30] = (0, 255, 0)
    out = np.asarray(resize_center_crop(Image.fromarray(a), (10, 10)))
    assert out.shape == (10, 10, 3)
    assert (out[..., 1] > 200).all() and (out[..., 0] < 60).all()
    # upscaling a small image also ends at the exact size
    assert resize_center_crop(Image.fromarray(a[:4, :6]), (16, 16)).size == (16, 16)
    px = image_pixels(_png(1), (16, 16))
    assert px.shape == (3, 16, 16) and px.min() >= -1 and px.max() <= 1


def test_pickapic_parquet_order_ties_and_bad_rows(tmp_path):
    model = tiny_model("sd15")
    rows = _pickapic(tmp_path / "pap.parquet")
    seen = []
    res = encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "ds", batch_size=2, latent="mean",
                       device="cpu", progress=False, on_problem=seen.append)
    # row 2 is a tie (dropped), row 4's jpg_0 is not an image, row 5 has no caption
    assert res.ties_dropped == 1 and res.encoded == res.pairs == 4
    assert {p.id: p.where for p in seen} == {"00000004": f"{tmp_path / 'pap.parquet'} row 4",
                                              "00000005": f"{tmp_path / 'pap.parquet'} row 5"}
    assert "jpg_0" in str(seen[1]) or "jpg_0" in str(seen[0])
    ds = open_dataset(tmp_path / "ds", family="sd15", latent_shape=(4, 8, 8), validate=True)
    assert ds.ids() == ["00000000", "00000001", "00000003", "00000006"]
    item = {i: ds[k] for k, i in enumerate(ds.ids())}
    assert item["00000001"]["prompt"] == "a red car" and item["00000001"]["neg_prompt"] is None
    # label_0 = 1: jpg_0 preferred; label_0 = 0: jpg_1 preferred
    for rid, w, lose in (("00000000", 0, 10), ("00000001", 11, 1)):
        torch.testing.assert_close(item[rid]["latent_w"].float(), _mean_latent(model, _png(w)),
                                   rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(item[rid]["latent_l"].float(), _mean_latent(model, _png(lose)),
                                   rtol=2e-3, atol=2e-3)
    # the text embeddings are the model's, as prepare stores them
    from ddspo_fast.models import load_adapter

    enc = load_adapter(model, components=("text",)).encode_prompts([rows["caption"][3]])
    torch.testing.assert_close(item["00000003"]["cond"]["prompt_embeds"].float(), enc["prompt_embeds"][0],
                               rtol=2e-3, atol=2e-3)
    info = json.loads((tmp_path / "ds" / "info.json").read_text())
    assert info["resolution"] == [16, 16] and info["ties"] == "drop" and info["latent_shape"] == [4, 8, 8]

    kept = read_pair_source(tmp_path / "pap.parquet", ties="keep")
    tie = [p for p in kept.pairs if p["id"] == "00000002"][0]
    assert tie["image_w"][3] == "jpg_0" and kept.ties_dropped == 0


def test_bad_image_is_fatal_on_request_and_good_rows_are_kept(tmp_path):
    model = tiny_model("sd15")
    _pickapic(tmp_path / "pap.parquet")
    # a malformed row is found before any image is encoded: fatal at once
    with pytest.raises(ValueError, match=r"pap\.parquet row 5 \(id 00000005\): empty or missing caption"):
        encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "ds", on_bad="fail", device="cpu",
                     progress=False)
    _pickapic(tmp_path / "pap.parquet", empty_caption=False)
    with pytest.raises(ValueError, match=r"pap\.parquet row 4 \(id 00000004\): jpg_0: cannot decode image"):
        encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "ds", batch_size=1, on_bad="fail",
                     device="cpu", progress=False, shard_size=1)
    # the pairs encoded before the bad row are kept; a rerun with skip resumes past it
    assert open_dataset(tmp_path / "ds").ids() == ["00000000", "00000001", "00000003"]
    res = encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "ds", batch_size=1, device="cpu",
                       progress=False, shard_size=1, on_problem=lambda p: None)
    assert res.encoded == 2 and res.pairs == 5


def _jsonl_pairs(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(4):
        (img / f"w{i}.png").write_bytes(_png(100 + i, size=(24, 16)))
        (img / f"l{i}.png").write_bytes(_png(200 + i, size=(16, 24)))
    (img / "l2.png").write_bytes(_png(202)[:60])  # truncated PNG
    lines = [
        {"prompt": "a photo of a cat", "image_w": "imgs/w0.png", "image_l": "imgs/l0.png"},
        {"id": "custom", "prompt": "a red car", "image_w": "imgs/w1.png", "image_l": "imgs/l1.png"},
        {"prompt": "a dog", "image_w": "imgs/w2.png", "image_l": "imgs/l2.png"},
        {"prompt": "a tree", "image_w": "imgs/missing.png", "image_l": "imgs/l3.png"},
        {"prompt": "the sky", "image_w": "imgs/w3.png"},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(l) + "\n" for l in lines) + "{not json\n")
    return f


def test_jsonl_of_png_pairs_reports_bad_lines_by_file_and_line(tmp_path):
    model = tiny_model("sd15")
    f = _jsonl_pairs(tmp_path)
    seen = []
    res = encode_pairs(model, f, tmp_path / "ds", batch_size=3, latent="mean", device="cpu",
                       progress=False, on_problem=seen.append)
    where = {p.where: p.reason for p in seen}
    assert set(where) == {f"{f}:3", f"{f}:4", f"{f}:5", f"{f}:6"}
    assert "image_l" in where[f"{f}:3"] and "cannot decode" in where[f"{f}:3"]
    assert "missing.png" in where[f"{f}:4"] and "no such file" in where[f"{f}:4"]
    assert "'image_l'" in where[f"{f}:5"] and "invalid JSON" in where[f"{f}:6"]
    ds = open_dataset(tmp_path / "ds", validate=True)
    assert ds.ids() == ["00000001", "custom"] and res.pairs == 2
    torch.testing.assert_close(ds[1]["latent_w"].float(),
                               _mean_latent(model, (tmp_path / "imgs" / "w1.png").read_bytes()),
                               rtol=2e-3, atol=2e-3)


def test_missing_pyarrow_is_one_clear_message(tmp_path, monkeypatch):
    _pickapic(tmp_path / "pap.parquet")
    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match=r"pyarrow.*pip install 'ddspo_fast\[parquet\]'"):
        read_pair_source(tmp_path / "pap.parquet")


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="^pairs: .* is not a file"):
        read_pair_source(tmp_path / "none.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="parquet"):
        read_pair_source(tmp_path / "x.csv")
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""]}), str(tmp_path / "cols.parquet"))
    with pytest.raises(ValueError, match="lacks the column.*jpg_1.*label_0"):
        read_pair_source(tmp_path / "cols.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_pair_source(tmp_path / "junk.parquet")
    (tmp_path / "dup.jsonl").write_text(
        '{"id": "a", "prompt": "p", "image_w": "x", "image_l": "y"}\n' * 2)
    with pytest.raises(ValueError, match=r"dup.jsonl:2 repeats id 'a'"):
        read_pair_source(tmp_path / "dup.jsonl")


KILLED = textwrap.dedent("""
    import os, sys
    from ddspo_fast.data.encode import encode_pairs

    def die(n):  # hard kill (no cleanup) once 3 pairs are written: 2 durable, 1 buffered
        if n >= 3:
            os._exit(7)

    encode_pairs(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=1, shard_size=2, device="cpu",
                 progress=False, on_batch=die, on_problem=lambda p: None)
""")


def test_killed_encode_resumes_to_the_uninterrupted_result(tmp_path):
    model = tiny_model("sd15")
    _pickapic(tmp_path / "pap.parquet")
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script), model, str(tmp_path / "pap.parquet"),
                        str(tmp_path / "part")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 7, r.stderr[-2000:]
    assert open_dataset(tmp_path / "part").ids() == ["00000000", "00000001"]
    quiet = dict(device="cpu", progress=False, on_problem=lambda p: None)
    res = encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "part", batch_size=3, **quiet)
    assert res.encoded == 2 and res.pairs == 4
    encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "full", batch_size=2, **quiet)
    a, b = open_dataset(tmp_path / "full"), open_dataset(tmp_path / "part")
    assert a.ids() == b.ids()
    for i in range(len(a)):
        # VAE samples are seeded per pair, so the batch split does not matter (up to
        # summation order: one fp16 ulp)
        for k in ("latent_w", "latent_l"):
            torch.testing.assert_close(a[i][k], b[i][k], rtol=2 ** -10, atol=1e-4)


def _cli(argv):
    from ddspo_fast.cli import encode as encode_cli

    p = argparse.ArgumentParser(prog="ddspo-fast encode")
    encode_cli.add_arguments(p)
    return encode_cli.run(p.parse_args(argv))


def test_cli_module_and_training_on_the_result(tmp_path, capsys):
    from ddspo_fast.train import Trainer

    model = tiny_model("sd15")
    _pickapic(tmp_path / "pap.parquet")
    assert _cli(["--model", model, "--pairs", str(tmp_path / "pap.parquet"), "--out", str(tmp_path / "ds"),
                 "--device", "cpu", "--no-progress", "--degrade", "random"]) == 0
    err = capsys.readouterr().err
    assert f"left out {tmp_path / 'pap.parquet'} row 4" in err and "dropped 1 ties" in err
    ds = open_dataset(tmp_path / "ds", validate=True)
    assert len(ds) == 4 and all(ds[i]["neg_prompt"] and ds[i]["neg_cond"] for i in range(4))

    with pytest.raises(ValueError, match=r"pap.parquet row 5 .*empty or missing caption"):
        _cli(["--model", model, "--pairs", str(tmp_path / "pap.parquet"), "--out", str(tmp_path / "ds2"),
              "--device", "cpu", "--no-progress", "--on-bad", "fail"])
    with pytest.raises(ValueError, match=r"^argument --resolution: .*multiples of 2"):
        _cli(["--model", model, "--pairs", str(tmp_path / "pap.parquet"), "--out", str(tmp_path / "ds3"),
              "--device", "cpu", "--no-progress", "--resolution", "15"])
    with pytest.raises(ValueError, match=r"^argument --pairs: "):
        _cli(["--model", model, "--pairs", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "ds4")])

    for objective in ("dpo", "ddspo"):
        out = tmp_path / f"run-{objective}"
        Trainer(config("sd15", out, data=str(tmp_path / "ds"), objective=objective)).train()
        metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss"])


DIST = textwrap.dedent("""
    import sys
    from ddspo_fast.data.encode import encode_pairs
    model, pairs, out, on_bad = sys.argv[1:5]
    encode_pairs(model, pairs, out, batch_size=1, shard_size=2, device="cpu", progress=False,
                 on_bad=on_bad, on_problem=lambda p: None)
""")


@pytest.mark.slow
def test_two_processes_write_the_single_process_dataset_and_stop_together(tmp_path):
    model = tiny_model("sd15")
    _pickapic(tmp_path / "pap.parquet", empty_caption=False)
    script = tmp_path / "dist.py"
    script.write_text(DIST)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def launch(out, on_bad, port):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script), model, str(tmp_path / "pap.parquet"),
               str(out), on_bad]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    r = launch(tmp_path / "two", "skip", 29531)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    encode_pairs(model, tmp_path / "pap.parquet", tmp_path / "one", batch_size=1, device="cpu",
                 progress=False, on_problem=lambda p: None)
    a, b = open_dataset(tmp_path / "one"), open_dataset(tmp_path / "two")
    assert a.ids() == b.ids() == ["00000000", "00000001", "00000003", "00000005", "00000006"]
    for i in range(len(a)):
        torch.testing.assert_close(a[i]["latent_w"], b[i]["latent_w"], rtol=2 ** -10, atol=1e-4)

    # row 4 (a broken image) falls to the second process: both stop, naming the row, and
    # what the first round wrote is kept
    r = launch(tmp_path / "fail", "fail", 29532)
    assert r.returncode != 0
    assert "pap.parquet row 4 (id 00000004): jpg_0: cannot decode image" in r.stderr
    assert open_dataset(tmp_path / "fail").ids() == ["00000000", "00000001", "00000003"]


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_encode_then_train_from_the_command_line(tmp_path, capsys, source):
    """Training on existing image pairs as a user types it: image pairs -> `encode` -> `train` (dpo and
    ddspo), all through `ddspo-fast`; bad rows are named and left out."""
    from ddspo_fast import cli

    model = tiny_model("sd15")
    if source == "jsonl":
        pairs, bad = _jsonl_pairs(tmp_path), "pairs.jsonl:3"
    else:
        pairs, bad = tmp_path / "pap.parquet", "pap.parquet row 4"
        _pickapic(pairs)
    ds = tmp_path / "ds"
    assert cli.main(["encode", "--model", model, "--pairs", str(pairs), "--out", str(ds),
                     "--device", "cpu", "--no-progress", "--degrade", "random"]) == 0
    assert bad in capsys.readouterr().err
    n = len(open_dataset(ds, validate=True))
    assert n >= 2
    for objective in ("dpo", "ddspo"):
        out = tmp_path / f"run-{objective}"
        assert cli.main(["train", "--model", model, "--data", str(ds), "--output_dir", str(out),
                         "--objective", objective, "--max-steps", "2", "--batch-size", "2",
                         "--mixed-precision", "no", "--device", "cpu", "--checkpoint-every", "0",
                         "--log-every", "1", "--no-progress", "--save-final", "false"]) == 0
        assert "trained" in capsys.readouterr().out
        metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss"])
