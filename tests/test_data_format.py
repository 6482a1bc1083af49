"""Packed pair-dataset format: round trip, resume, and every kind of bad input."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddspo_fast.data import PairDataset, PairWriter, collate_pairs, open_dataset, validate_dataset

SHAPE = (4, 8, 8)


def _row(i, dtype=torch.float16):
    g = torch.Generator().manual_seed(i)
    return dict(
        id=f"p{i:03d}",
        prompt=f"a red cube on a blue table number {i}",
        neg_prompt="a cube",
        seed=1000 + i,
        latent_w=torch.randn(SHAPE, generator=g).to(dtype),
        latent_l=torch.randn(SHAPE, generator=g).to(dtype),
        cond={"prompt_embeds": torch.randn(3, 6, generator=g)},
        neg_cond={"prompt_embeds": torch.randn(3, 6, generator=g)},
    )


def make_ds(path, n=5, shard_size=2, **kw):
    with PairWriter(path, family="sd15", model="tiny", shard_size=shard_size, **kw) as w:
        for i in range(n):
            w.add(**_row(i))
    return path


def _index(path):
    return [json.loads(l) for l in (path / "index.jsonl").read_text().splitlines()]


def _manifest(path, *drop):
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (path / "manifest.jsonl").read_text().splitlines()]


def _write_index(path, rows):
    (path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- round trip


def test_round_trip_values_layout_and_collate(tmp_path):
    d = make_ds(tmp_path / "ds", n=5, shard_size=2)
    info = json.loads((d / "info.json").read_text())
    assert info["format"] == "ddspo_fast.pairs" and info["version"] == 1
    assert info["latent_shape"] == list(SHAPE) and info["latent_dtype"] == "float16"
    assert info["family"] == "sd15" and info["cond_keys"] == ["prompt_embeds"]
    assert sorted(p.name for p in d.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert [r["row"] for r in _index(d)] == [0, 1, 0, 1, 0]

    ds = open_dataset(d, family="sd15", latent_shape=SHAPE)
    assert isinstance(ds, PairDataset) and len(ds) == 5 and ds.skipped == []
    for i in range(5):
        want, got = _row(i), ds[i]
        assert got["id"] == want["id"] and got["prompt"] == want["prompt"] and got["neg_prompt"] == "a cube"
        assert got["latent_w"].dtype == torch.float16
        assert torch.equal(got["latent_w"], want["latent_w"]) and torch.equal(got["latent_l"], want["latent_l"])
        assert torch.equal(got["cond"]["prompt_embeds"], want["cond"]["prompt_embeds"])
        assert torch.equal(got["neg_cond"]["prompt_embeds"], want["neg_cond"]["prompt_embeds"])
    assert ds[-1]["id"] == "p004"
    with pytest.raises(IndexError):
        ds[5]

    batch = collate_pairs([ds[0], ds[3]])
    assert batch["latent_w"].shape == (2, *SHAPE)
    assert batch["cond"]["prompt_embeds"].shape == (2, 3, 6)
    assert batch["prompt"] == [_row(0)["prompt"], _row(3)["prompt"]] and batch["id"] == ["p000", "p003"]


def test_dataset_without_text_embeddings_and_null_neg_prompt(tmp_path):
    with PairWriter(tmp_path / "ds", shard_size=4) as w:
        r = _row(0)
        w.add(id="a", prompt="a dog", neg_prompt=None, latent_w=r["latent_w"], latent_l=r["latent_l"])
    ds = open_dataset(tmp_path / "ds")
    item = ds[0]
    assert item["cond"] is None and item["neg_cond"] is None and item["neg_prompt"] is None
    batch = collate_pairs([item, item])
    assert batch["cond"] is None and batch["latent_l"].shape == (2, *SHAPE)


def test_collate_rejects_empty_and_mixed(tmp_path):
    with pytest.raises(ValueError, match="items"):
        collate_pairs([])
    ds = open_dataset(make_ds(tmp_path / "ds", n=2))
    a, b = ds[0], dict(ds[1])
    b["cond"] = None
    with pytest.raises(ValueError, match="cond"):
        collate_pairs([a, b])


def test_empty_writer_leaves_valid_empty_dataset(tmp_path):
    PairWriter(tmp_path / "ds").close()
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 0


def test_dataloader_workers_and_pickle(tmp_path):
    ds = open_dataset(make_ds(tmp_path / "ds", n=6, shard_size=4))
    ds[0]  # parent opens a handle; workers must not reuse it
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5]["latent_w"], ds[5]["latent_w"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_pairs)
    ids = [i for b in loader for i in b["id"]]
    assert ids == [f"p{i:03d}" for i in range(6)]


# ---------------------------------------------------------------- resume


def test_killed_writer_resumes_to_same_content(tmp_path):
    full = make_ds(tmp_path / "full", n=7, shard_size=3)

    part = tmp_path / "part"
    w = PairWriter(part, family="sd15", model="tiny", shard_size=3)
    for i in range(5):
        w.add(**_row(i))
    del w  # "killed": rows 3, 4 were only buffered, never written
    # a crash between the shard rename and the index append leaves an orphan shard
    save_file({"latent_w": torch.zeros(1, *SHAPE)}, str(part / "shard-00007.safetensors"))
    with open(part / "manifest.jsonl", "a") as f:  # recorded in the manifest, half a line
        f.write(json.dumps({"shard": "shard-00007.safetensors", "sha256": "0" * 64,
                            "bytes": 1, "rows": 1}) + '\n{"shard": "sha')
    (part / ".shard-00008.safetensors.x.tmp").write_bytes(b"partial")
    with open(part / "index.jsonl", "a") as f:  # and a half-written index line
        f.write('{"id": "p003", "prom')

    w = PairWriter(part, family="sd15", model="tiny", shard_size=3)
    assert w.done_ids() == {"p000", "p001", "p002"}
    assert not (part / "shard-00007.safetensors").exists()
    assert not list(part.glob("*.tmp"))
    for i in range(7):
        if f"p{i:03d}" not in w.done_ids():
            w.add(**_row(i))
    w.close()

    a, b = open_dataset(full), open_dataset(part)
    assert a.ids() == b.ids() and len(b) == 7
    # the manifest holds the indexed shards only (a header's metadata order is not fixed,
    # so the checksums are those of each dataset's own files: validate checks them)
    assert _manifest(full, "sha256") == _manifest(part, "sha256")
    assert validate_dataset(part)["valid"] == 7
    for i in range(7):
        assert torch.equal(a[i]["latent_w"], b[i]["latent_w"])
        assert torch.equal(a[i]["neg_cond"]["prompt_embeds"], b[i]["neg_cond"]["prompt_embeds"])


# ---------------------------------------------------------------- shards bound to the index


def test_swapped_shards_are_refused_naming_the_shard(tmp_path, capsys):
    from ddspo_fast.cli import main
    from ddspo_fast.data import validate_dataset

    d = make_ds(tmp_path / "ds", n=4, shard_size=2)  # two shards of equal shape
    a, b = d / "shard-00000.safetensors", d / "shard-00001.safetensors"
    a.rename(d / "x")
    b.rename(a)
    (d / "x").rename(b)
    with pytest.raises(ValueError, match=f"shard file {a} holds the rows written as {b.name}"):
        open_dataset(d)
    report = validate_dataset(d)
    assert report["valid"] == 0 and all("swapped" in r for r in report["skipped"])
    assert main(["validate", str(d)]) == 1
    assert f"shard file {a} holds the rows written as {b.name}" in capsys.readouterr().err


def test_changed_shard_fails_its_checksum_once_per_process(tmp_path, monkeypatch):
    from ddspo_fast.data import packed_reader, validate_dataset

    d = make_ds(tmp_path / "ds", n=4, shard_size=2)
    shard = d / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one latent: same size, header intact
    shard.write_bytes(bytes(data))
    ds = open_dataset(d)  # name and size still agree with the manifest
    hashed = []
    real = packed_reader.sha256_file
    monkeypatch.setattr(packed_reader, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert ds[0]["id"] == "p000"
    for _ in range(2):
        with pytest.raises(ValueError, match=f"^shard file {shard} does not match its checksum"):
            ds[3]
    assert ds[1]["id"] == "p001" and len(hashed) == 2  # each shard hashed once
    report = validate_dataset(d)
    assert report["valid"] == 2 and all("checksum" in r for r in report["skipped"])


def test_dataset_of_an_earlier_version_is_read_and_resumed_with_a_manifest(tmp_path, caplog):
    d = make_ds(tmp_path / "ds", n=3, shard_size=2)
    want = (d / "manifest.jsonl").read_text()
    (d / "manifest.jsonl").unlink()
    with caplog.at_level("WARNING"):
        assert len(open_dataset(d)) == 3
    assert "no manifest.jsonl" in caplog.text
    PairWriter(d, family="sd15", model="tiny", shard_size=2).close()
    assert (d / "manifest.jsonl").read_text() == want
    assert validate_dataset(d)["valid"] == 3


def test_resume_refuses_different_settings(tmp_path):
    d = make_ds(tmp_path / "ds", n=2, info={"steps": 20})
    with pytest.raises(ValueError, match="steps"):
        PairWriter(d, family="sd15", info={"steps": 30})
    with pytest.raises(ValueError, match="family"):
        PairWriter(d, family="sdxl")
    w = PairWriter(d, family="sd15", info={"steps": 20})
    bad = _row(9)
    bad["latent_w"] = bad["latent_l"] = torch.zeros(4, 16, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="latent_shape"):
        w.add(**bad)


def test_writer_refuses_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("hi")
    with pytest.raises(ValueError, match="not empty"):
        PairWriter(tmp_path / "x")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(prompt="  "), "empty prompt"),
        (dict(neg_prompt="a red cube on a blue table number 1"), "neg_prompt equals prompt"),
        (dict(latent_l=torch.zeros(4, 8, 4, dtype=torch.float16)), "shape mismatch"),
        (dict(latent_l=torch.zeros(SHAPE)), "dtype mismatch"),
        (dict(latent_w=torch.full(SHAPE, float("nan"), dtype=torch.float16)), "NaN"),
        (dict(cond={"other": torch.zeros(3, 6)}), "keys"),
        (dict(id=""), "id"),
        (dict(seed="7"), "seed"),
    ],
)
def test_writer_rejects_bad_rows(tmp_path, change, match):
    with PairWriter(tmp_path / "ds", shard_size=8) as w:
        w.add(**_row(0))
        with pytest.raises(ValueError, match=match):
            w.add(**{**_row(1), **change})
        with pytest.raises(ValueError, match="already"):
            w.add(**_row(0))
    assert len(open_dataset(tmp_path / "ds")) == 1


def test_writer_rejects_bad_shard_size(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        PairWriter(tmp_path / "ds", shard_size=0)


# ---------------------------------------------------------------- bad datasets at load


def test_missing_shard_raises_naming_file_or_is_skipped(tmp_path):
    d = make_ds(tmp_path / "ds", n=5, shard_size=2)
    (d / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        open_dataset(d)
    ds = open_dataset(d, skip_invalid=True)
    assert ds.ids() == ["p000", "p001", "p004"]
    assert len(ds.skipped) == 2 and all("missing shard" in s.reason for s in ds.skipped)
    assert {s.id for s in ds.skipped} == {"p002", "p003"}


def test_truncated_shard_raises_naming_file(tmp_path):
    d = make_ds(tmp_path / "ds", n=4, shard_size=2)
    p = d / "shard-00000.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"truncated.*shard-00000\.safetensors"):
        open_dataset(d)
    ds = open_dataset(d, skip_invalid=True)
    assert ds.ids() == ["p002", "p003"] and len(ds.skipped) == 2


def test_missing_info_or_index(tmp_path):
    d = make_ds(tmp_path / "ds", n=2)
    (d / "index.jsonl").unlink()
    with pytest.raises(ValueError, match="index.jsonl"):
        open_dataset(d)
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a pair dataset"):
        open_dataset(tmp_path / "empty")


def _rewrite_shard(path, **override):
    """Change a shard's tensors and record the new file in the manifest, as a writer that
    wrote bad rows would have (the content checks, not the checksum, must catch them)."""
    t = load_file(str(path))
    t.update(override)
    save_file(t, str(path), metadata={"shard": path.name})
    _reseal(path)


def _reseal(shard):
    from ddspo_fast.fsio import sha256_file

    mf = shard.parent / "manifest.jsonl"
    recs = [json.loads(line) for line in mf.read_text().splitlines()]
    for r in recs:
        if r["shard"] == shard.name:
            r.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    mf.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(latent_l=torch.zeros(2, 4, 8, 4, dtype=torch.float16)), "shape mismatch within the pair"),
        (dict(latent_l=torch.zeros(2, *SHAPE, dtype=torch.float32)), "dtype mismatch within the pair"),
        (
            dict(latent_w=torch.zeros(2, 4, 4, 4, dtype=torch.float16), latent_l=torch.zeros(2, 4, 4, 4, dtype=torch.float16)),
            "does not match the expected latent_shape",
        ),
    ],
)
def test_shape_dtype_mismatch(tmp_path, override, match):
    d = make_ds(tmp_path / "ds", n=4, shard_size=2)
    _rewrite_shard(d / "shard-00001.safetensors", **override)
    with pytest.raises(ValueError, match=match) as e:
        open_dataset(d)
    assert "shard-00001.safetensors" in str(e.value)
    ds = open_dataset(d, skip_invalid=True)
    assert ds.ids() == ["p000", "p001"] and len(ds.skipped) == 2


def test_latent_shape_against_model(tmp_path):
    d = make_ds(tmp_path / "ds", n=2)
    with pytest.raises(ValueError, match="latent_shape.*\\[4, 16, 16\\]"):
        open_dataset(d, latent_shape=(4, 16, 16))
    with pytest.raises(ValueError, match="family"):
        open_dataset(d, family="sdxl")
    with pytest.raises(ValueError, match="latent_shape"):
        open_dataset(d, latent_shape=(4, -1))


def test_nan_latent_found_on_read_and_by_validate(tmp_path):
    d = make_ds(tmp_path / "ds", n=4, shard_size=2)
    lw = load_file(str(d / "shard-00001.safetensors"))["latent_w"].clone()
    lw[1, 0, 0, 0] = float("nan")
    _rewrite_shard(d / "shard-00001.safetensors", latent_w=lw)

    ds = open_dataset(d)  # headers are fine, contents are checked on read
    assert torch.isfinite(ds[2]["latent_w"].float()).all()
    with pytest.raises(ValueError, match=r"p003.*latent_w contains NaN"):
        ds[3]
    with pytest.raises(ValueError, match="p003"):
        open_dataset(d, validate=True)

    ds = open_dataset(d, skip_invalid=True)
    with pytest.warns(RuntimeWarning, match="p003"):
        sub = ds[3]  # replaced by the next good sample
    assert sub["id"] == "p000"
    skipped = ds.validate()
    assert [s.id for s in skipped] == ["p003"] and "NaN" in skipped[0].reason
    assert ds.ids() == ["p000", "p001", "p002"] and len(ds.skipped) == 1


def test_inf_in_text_embedding(tmp_path):
    d = make_ds(tmp_path / "ds", n=2, shard_size=2)
    c = load_file(str(d / "shard-00000.safetensors"))["cond.prompt_embeds"].clone()
    c[0, 0, 0] = float("inf")
    _rewrite_shard(d / "shard-00000.safetensors", **{"cond.prompt_embeds": c})
    with pytest.raises(ValueError, match="cond.prompt_embeds contains inf"):
        open_dataset(d)[0]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.update(prompt=""), "empty prompt"),
        (lambda r: r.update(neg_prompt=r["prompt"]), "neg_prompt equals prompt"),
        (lambda r: r.update(id="p000"), "duplicate id"),
        (lambda r: r.update(row=7), "out of range"),
        (lambda r: r.update(shard="../x.safetensors"), "invalid shard name"),
    ],
)
def test_bad_index_lines(tmp_path, edit, match):
    d = make_ds(tmp_path / "ds", n=4, shard_size=2)
    rows = _index(d)
    edit(rows[2])
    _write_index(d, rows)
    with pytest.raises(ValueError, match=match) as e:
        open_dataset(d)
    assert "index.jsonl:3" in str(e.value)
    ds = open_dataset(d, skip_invalid=True)
    assert len(ds) == 3 and len(ds.skipped) == 1
    assert ds.skipped[0].where.endswith("index.jsonl:3") and match in ds.skipped[0].reason


def test_invalid_json_line(tmp_path):
    d = make_ds(tmp_path / "ds", n=3)
    with open(d / "index.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="index.jsonl:4.*invalid JSON"):
        open_dataset(d)
    assert len(open_dataset(d, skip_invalid=True)) == 3


# ---------------------------------------------------------------- one writer per dataset


def test_second_writer_fails_naming_the_holder_and_a_dead_holder_leaves_no_lock(tmp_path):
    import os
    import subprocess
    import sys

    from ddspo_fast.fsio import LockedError

    d = tmp_path / "ds"
    w = PairWriter(d, shard_size=2)
    w.add(**_row(0))
    with pytest.raises(LockedError, match=rf"dataset {d} is in use by pid {os.getpid()}"):
        PairWriter(d, shard_size=2)
    w.close()
    with PairWriter(d, shard_size=2) as w2:  # released by close()
        w2.add(**_row(1))
    assert open_dataset(d).ids() == ["p000", "p001"]
    # a writer killed while holding the lock: the kernel drops it with the process
    code = ("import os, sys; from ddspo_fast.data import PairWriter; "
            "w = PairWriter(sys.argv[1]); os._exit(5)")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(__import__("pathlib").Path(__file__).parents[1])))
    assert r.returncode == 5, r.stderr[-1000:]
    PairWriter(d).close()
    assert len(open_dataset(d)) == 2


def test_pairs_whose_conditions_are_equal_are_refused_and_flagged(tmp_path):
    from ddspo_fast.data import validate_dataset

    same = _row(1)
    same["neg_cond"] = {"prompt_embeds": same["cond"]["prompt_embeds"].clone()}
    with PairWriter(tmp_path / "w") as w:
        with pytest.raises(ValueError, match="cond equals neg_cond"):
            w.add(**same)
    # one rounding step apart still counts as the same condition
    d = make_ds(tmp_path / "ds", n=3, shard_size=4)
    shard = d / "shard-00000.safetensors"
    t = load_file(str(shard))
    t["neg_cond.prompt_embeds"][1] = t["cond.prompt_embeds"][1] * (1 + 2 ** -22)
    save_file(t, str(shard))
    _reseal(shard)
    report = validate_dataset(d)
    assert report["valid"] == 2 and len(report["skipped"]) == 1
    assert "(id 'p001'): cond equals neg_cond" in report["skipped"][0]
    with pytest.raises(ValueError, match="p001.*cond equals neg_cond"):
        open_dataset(d)[1]
