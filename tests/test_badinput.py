"""Bad input never costs data and is never silent: one shared validator for every
command's numbers, devices and paths (cli/_validate.py), outputs kept apart from inputs
(fsio.check_output_apart, also where a config file sets the paths), what encoded a
dataset (data/provenance.py), and the loss API's argument errors."""

from __future__ import annotations

import argparse
import re
import os
import shutil
from pathlib import Path

import pytest
import torch

from _train_helpers import config, tiny_model
from ddspo_fast.cli import COMMANDS, command_module, command_parser, main
from ddspo_fast.cli import _validate as V

NO_CUDA = not torch.cuda.is_available()

#: commands whose parser is not yet routed through the validator. EMPTY BY
#: INTENT: a command listed here is a known gap, to be cleared, never a place to park one.
KNOWN_UNWIRED: tuple = ()


def _parsers():
    for name in COMMANDS:
        module = command_module(name)
        if getattr(module, "PASSTHROUGH", False):  # bench / demo parse their own arguments
            continue
        yield name, command_parser(name, module)


def _err(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddspo-fast: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ the parser walk
@pytest.mark.parametrize("name", [n for n, _ in _parsers()])
def test_every_flag_of_every_command_goes_through_the_validator(name):
    """Each value-taking flag is a number, a device, a path (input or output), a choice,
    a bool or declared text; numbers refuse non-finite and out-of-range values."""
    if name in KNOWN_UNWIRED:
        pytest.xfail(f"{name}: not wired to the shared validator yet (KNOWN_UNWIRED)")
    parser = command_parser(name)
    for action in parser._actions:
        kind = V.classify(action)
        assert kind is not None, (f"{name} {'/'.join(action.option_strings) or action.dest}: "
                                  "not classified by cli/_validate.py (add its dest to a table)")
        if kind == "text":
            assert action.dest in V.TEXT_DESTS
        if kind == "number":
            info = V.kind_of(action.type)
            bads = ("nan", "inf", "-inf", "x") + ((str(2 ** 70), "1.5") if info["number"] is int else ())
            for bad in bads:
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)
            if action.dest == "seed":
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(str(2 ** 32))
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type("-1")
                assert action.type("7") == 7
            if info["minimum"] is not None:
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(str(int(info["minimum"]) - 1))
        if kind == "device":
            with pytest.raises(argparse.ArgumentTypeError, match="banana"):
                action.type("banana")
            assert action.type("cpu") == "cpu"
            if NO_CUDA:
                with pytest.raises(argparse.ArgumentTypeError, match="no CUDA"):
                    action.type("cuda")
        if action.dest in ("device", "llm_device"):
            assert kind == "device"
        if action.dest in V.INPUT_DESTS or action.dest in V.OUTPUT_DESTS:
            assert kind == "path"


#: every command that writes, and its output flag's destination
WRITERS = {"degrade": "out", "prepare": "out", "encode": "out", "precompute": "out",
           "train": "output_dir", "train-pair": "output_dir", "evaluate": "out", "export": "out"}


def test_every_writing_command_has_a_checked_output():
    found = {}
    for name, parser in _parsers():
        outs = [a.dest for a in parser._actions
                if V.kind_of(a.type) and V.kind_of(a.type).get("role") == "output"]
        if outs:
            found[name] = outs[0]
    for name, dest in WRITERS.items():
        assert found.get(name) == dest, name


@pytest.mark.parametrize("name", [n for n, _ in _parsers()])
def test_no_output_may_be_contain_or_sit_inside_an_input(name, tmp_path):
    """The class, for every command with an output and inputs (export included once it
    exists): the output set to each input, inside it, or around it, is refused."""
    parser = command_parser(name)
    acts = [(a, V.kind_of(a.type)) for a in parser._actions]
    outs = [a for a, k in acts if k and k["kind"] == "path" and k["role"] == "output"]
    ins = [(a, k) for a, k in acts if k and k["kind"] == "path" and k["role"] == "input"
           and a.dest not in V.READ_FIRST]
    if not outs or not ins:
        pytest.skip(f"{name} writes nothing or reads no path")
    for out in outs:
        for inp, k in ins:
            where = tmp_path / inp.dest
            out_is_file = V.kind_of(out.type)["what"] == "file"
            if k["what"] == "file":
                where.write_text("x\n")
                cases = [where] if out_is_file else [tmp_path]         # is / contains
            else:
                (where / "sub").mkdir(parents=True, exist_ok=True)
                cases = ([where / "x.out"] if out_is_file                # inside
                         else [where / "sub", where, tmp_path])         # inside / is / contains
            for bad in cases:
                ns = argparse.Namespace(**{a.dest: None for a in parser._actions})
                setattr(ns, inp.dest, str(where))
                setattr(ns, out.dest, str(bad))
                with pytest.raises(ValueError, match="must not be, contain or sit inside") as e:
                    V.check_parsed(parser, ns)
                assert V._flag(inp) in str(e.value) and V._flag(out) in str(e.value)


def _fake_model(root: Path) -> Path:
    m = root / "model"
    (m / "unet").mkdir(parents=True)
    (m / "model_index.json").write_text("{}")
    (m / "unet" / "weights.bin").write_bytes(b"w")
    return m


def _inputs(root: Path):
    """A fake model, an empty data folder and a one-prompt JSONL under ``root``."""
    d = root / "data"
    d.mkdir()
    p = root / "prompts.jsonl"
    p.write_text('{"prompt": "a cat"}\n')
    return _fake_model(root), d, p


def _tree(p: Path):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


@pytest.mark.parametrize("argv", [
    "train --model {m} --data {d} --output-dir {m} --overwrite",
    "train --model {m} --data {d} --output-dir {m}/run --overwrite true",
    "train --model {m}/unet --data {d} --output-dir {m}",
    "train --model {m} --data {d} --output-dir {d}",
    "train-pair --model {m} --data {d} --output-dir {m} --overwrite",
    "prepare --model {m} --prompts {p} --out {m}/pairs",
    "encode --model {m} --pairs {p} --out {root}",
    "precompute --model {m} --data {d} --out {m} --draws 1",
    "degrade {p} --out {p}",
    "degrade {p} --out {m}/neg.jsonl --model {m}",
    "evaluate {m} --prompts {p} --clip {m} --out {m}/eval",
    "export {d} --out {d}/exported",
    "export {d} --model {m} --out {m}",
])
def test_cli_refuses_an_output_on_an_input_and_leaves_it_untouched(argv, tmp_path, capsys):
    m, d, p = _inputs(tmp_path)
    before = _tree(tmp_path)
    rc = main(argv.format(m=m, d=d, p=p, root=tmp_path).split())
    line = _err(capsys)
    assert rc != 0
    assert "must not be, contain or sit inside an input" in line
    assert line.count("--") >= 2  # names the output flag and the input flag
    assert _tree(tmp_path) == before  # nothing written, no .lock left behind


def test_library_refuses_output_dir_on_the_model_before_locking(tmp_path):
    from ddspo_fast.train import Trainer

    model = Path(tmp_path / "model")
    shutil.copytree(tiny_model("sd15"), model)
    before = _tree(model)
    for out in (model, model / "run"):
        with pytest.raises(ValueError, match="^output_dir: .* the model input"):
            Trainer(config("sd15", out, model=str(model), overwrite=True))
    assert _tree(model) == before  # the weights and no .lock


def test_precompute_refused_leaves_no_lock_in_the_model(tmp_path):
    from ddspo_fast.train.precompute import precompute

    model = Path(tmp_path / "model")
    shutil.copytree(tiny_model("sd15"), model)
    before = _tree(model)
    with pytest.raises(ValueError, match="^out: .* the model input"):
        precompute(config("sd15", tmp_path / "run", model=str(model)), model, 1, progress=False)
    assert _tree(model) == before


def test_prepare_and_encode_refuse_an_output_on_an_input(tmp_path):
    from ddspo_fast.data.encode import encode_pairs
    from ddspo_fast.data.prepare import prepare_dataset

    m = _fake_model(tmp_path)
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"id": "a", "prompt": "a cat", "neg_prompts": ["a"]}\n')
    with pytest.raises(ValueError, match="^out: .* is inside the model input"):
        prepare_dataset(str(m), str(p), str(m / "pairs"))
    with pytest.raises(ValueError, match="^out: .* is the prompts input"):
        prepare_dataset(str(m), str(p), str(p))
    with pytest.raises(ValueError, match="^out: .* contains the (model|pairs) input"):
        encode_pairs(str(m), str(p), str(tmp_path))
    assert not (m / ".lock").exists() and not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------ numbers, devices
@pytest.mark.parametrize("argv,flag", [
    ("evaluate {m} --prompts {p} --clip {m} --guidance-scale inf", "--guidance-scale"),
    ("evaluate {m} --prompts {p} --clip {m} --guidance-scale nan", "--guidance-scale"),
    ("degrade {p} --out {o} --seed 1180591620717411303424", "--seed"),
    ("degrade {p} --out {o} --show-skipped -1", "--show-skipped"),
    ("validate {d} --show-skipped -1", "--show-skipped"),
    ("encode --model {m} --pairs {p} --out {o} --seed -3", "--seed"),
    ("precompute --model {m} --data {d} --out {o} --draws 1 --logit-std inf", "--logit-std"),
    ("train --model {m} --data {d} --learning-rate nan", "--learning-rate"),
    ("prepare --model {m} --prompts {p} --out {o} --device banana", "--device"),
    ("evaluate {m} --prompts {p} --clip {m} --device banana", "--device"),
    ("precompute --model {m} --data {d} --out {o} --draws 1 --device banana", "--device"),
    ("encode --model {m} --pairs {p} --out {o} --resolution 1000000", "--resolution"),
])
def test_bad_numbers_and_devices_are_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    m, d, p = _inputs(tmp_path)
    rc = main(argv.format(m=m, d=d, p=p, o=tmp_path / "out").split())
    line = _err(capsys)
    # a config field's flag is named in both spellings (--logit_std/--logit-std)
    assert rc == 2 and re.search(rf"argument (--\w+/)?{flag}\b", line), line


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", ["prepare --model {m} --prompts {p} --out {o}",
                                 "precompute --model {m} --data {d} --out {o} --draws 1",
                                 "evaluate {m} --prompts {p} --clip {m}",
                                 "encode --model {m} --pairs {p} --out {o}"])
def test_device_cuda_without_cuda_is_one_line(cmd, tmp_path, capsys):
    m, d, p = _inputs(tmp_path)
    rc = main((cmd + " --device cuda").format(m=m, d=d, p=p, o=tmp_path / "o").split())
    line = _err(capsys)
    assert rc == 2 and "argument --device" in line and "no CUDA device" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ wrong names
def test_paths_of_the_wrong_kind_name_their_flag(tmp_path, capsys):
    m = _fake_model(tmp_path)
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "a cat"}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        (f"degrade {p} --out {folder}", "argument --out: ", "is a directory"),
        (f"degrade {folder} --out {tmp_path / 'x.jsonl'}", "argument PROMPTS: ", "is not a file"),
        (f"prepare --model {m} --prompts {p} --out {p}", "argument --out: ", "not a directory"),
        (f"precompute --model {m} --data {folder} --out {p} --draws 1", "argument --out: ",
         "not a directory"),
    ]
    for argv, flag, what in cases:
        assert main(argv.split()) == 1
        line = _err(capsys)
        assert flag in line and what in line, line
    assert list(folder.iterdir()) == []


def test_degrade_library_names_a_directory_out_and_prompts(tmp_path):
    from ddspo_fast.data.degrade import degrade_file

    p = tmp_path / "p.txt"
    p.write_text("a red car on the street\n")
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(ValueError, match="^out: .* is a directory"):
        degrade_file(p, d)
    with pytest.raises(ValueError, match="is a directory"):
        degrade_file(d, tmp_path / "o.jsonl")
    assert sorted(tmp_path.iterdir()) == [d, p] and not list(d.iterdir())


def test_full_disk_in_a_dataset_shard_names_the_path(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from ddspo_fast.data import PairWriter
    from ddspo_fast.fsio import DiskFullError

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "pairs"
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {out}"):
        with PairWriter(str(out), family="sd15", model="m", shard_size=1) as w:
            w.add(id="a", prompt="a cat", neg_prompt="a", seed=0,
                  latent_w=torch.zeros(4, 8, 8), latent_l=torch.ones(4, 8, 8),
                  cond={"c": torch.zeros(3, 4)}, neg_cond={"c": torch.ones(3, 4)})


def test_bench_loss_checks_out_before_running_and_keeps_results(tmp_path, monkeypatch, capsys):
    from ddspo_fast.bench import loss as bl

    def never(*a, **k):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(bl, "run", never)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(SystemExit) as e:
        bl.main(["--quick", "--device", "cpu", "--out", str(blocked / "x.json")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err

    # the run finished but the write failed: the results are kept, and where is said
    monkeypatch.setattr(bl, "run", lambda *a, **k: {"rows": [1, 2]})
    import ddspo_fast.fsio as fsio

    def fail(path, text):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsio, "atomic_write_text", fail)
    assert bl.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    kept = err.rsplit("the results are in ", 1)[1].strip()
    try:
        assert '"rows"' in Path(kept).read_text()
    finally:
        os.unlink(kept)


def test_encode_refuses_a_resolution_the_family_cannot_use(monkeypatch):
    from ddspo_fast.data import encode as enc
    from ddspo_fast.data.images import family_resolution
    from ddspo_fast.models import load_adapter

    adapter = load_adapter(tiny_model("sd15"), components=("vae",), device="cpu")
    h, w = family_resolution(adapter)
    assert enc._resolution(2 * h, adapter) == (2 * h, 2 * h)
    f = adapter.vae_scale_factor
    with pytest.raises(ValueError, match="^resolution: .* beyond what this model can use"):
        enc._resolution(2 * h + f, adapter)
    # the memory estimate grows with the area and refuses before allocating
    small = enc.vae_memory_estimate(adapter, (h, w), 2, torch.float32)
    assert enc.vae_memory_estimate(adapter, (2 * h, 2 * w), 2, torch.float32) > 4 * small > 0
    monkeypatch.setattr(enc, "_available_bytes", lambda device: small // 2)
    with pytest.raises(ValueError, match="^resolution: .* an estimate"):
        enc.check_vae_memory(adapter, (h, w), 1, "cpu", torch.float32)


def test_unknown_lora_target_names_the_setting(tmp_path):
    from ddspo_fast.train import Trainer

    with pytest.raises(ValueError, match=r"^lora_targets: \['no_such_layer'\] matches no layer"):
        Trainer(config("sd15", tmp_path / "run", lora_rank=2, lora_targets=["no_such_layer"]))


# ------------------------------------------------------------------ what encoded the data
def _other_text_encoder(root: Path) -> str:
    from safetensors.torch import load_file, save_file

    dst = root / "other-text-encoder"
    shutil.copytree(tiny_model("sd15"), dst)
    f = next((dst / "text_encoder").glob("*.safetensors"))
    sd = load_file(str(f))
    k = sorted(sd)[0]
    sd[k] = sd[k] + 1e-3
    save_file(sd, str(f))
    return str(dst)


def test_dataset_records_its_encoders_and_train_refuses_another(tmp_path, caplog):
    from ddspo_fast.data.prepare import prepare_dataset
    from ddspo_fast.data.provenance import encoder_fingerprint
    from ddspo_fast.testing import tiny_prompts
    from ddspo_fast.train import Trainer

    model = tiny_model("sd15")
    other = _other_text_encoder(tmp_path)
    copy = tmp_path / "same"
    shutil.copytree(model, copy)
    assert encoder_fingerprint(copy, "sd15") == encoder_fingerprint(model, "sd15")
    assert encoder_fingerprint(other, "sd15") != encoder_fingerprint(model, "sd15")

    data = tmp_path / "pairs"
    prepare_dataset(model, tiny_prompts(2), data, steps=1, batch_size=2, device="cpu",
                    progress=False)
    import json

    assert json.loads((data / "info.json").read_text())["encoders"] == encoder_fingerprint(model, "sd15")
    Trainer(config("sd15", tmp_path / "ok", data=str(data), model=str(copy))).close()
    with pytest.raises(ValueError, match="^data: .* another text encoder .* allow_encoder_mismatch"):
        Trainer(config("sd15", tmp_path / "no", data=str(data), model=other))
    with caplog.at_level("WARNING"):
        Trainer(config("sd15", tmp_path / "warned", data=str(data), model=other,
                       allow_encoder_mismatch=True)).close()
    assert "another text encoder" in caplog.text


# ------------------------------------------------------------------ the loss API
def _loss_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g, dtype=dtype) for _ in range(3)]


def test_loss_arguments_name_themselves():
    import ddspo_fast as df

    m, r, t = _loss_inputs(torch.float32)
    with pytest.raises(ValueError, match="^weights: expected a tensor or a sequence of real"):
        df.ddspo_loss(m, r, t, 5.0, weights=["a", "b"])
    with pytest.raises(ValueError, match="^weights: expected a dense"):
        df.ddspo_loss(m, r, t, 5.0, weights=torch.ones(2).to_sparse())
    for name, args in (("model_pred", (m.to_sparse(), r, t)), ("ref_pred", (m, r.to_sparse(), t)),
                       ("target", (m, r, t.to_sparse()))):
        with pytest.raises(ValueError, match=f"^{name}: expected a dense"):
            df.ddspo_loss(*args, 5.0)
    with pytest.raises(ValueError, match="^ref_out: expected a dense"):
        df.ddspo_loss_from_reference(m, torch.randn(6, 8).to_sparse(), 5.0)
    for ts in (torch.tensor([-5.0, 3.0, -5.0, 3.0]), torch.tensor([float("nan"), 3.0, 1.0, 1.0]),
               ["x"] * 4):
        with pytest.raises(ValueError, match="^timesteps: "):
            df.dpo_loss(m, r, t, 5.0, timesteps=ts, loss_weighting="linear")


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_func_transforms_on_compiled_backends(backend):
    import ddspo_fast as df
    from ddspo_fast.loss.dispatch import unavailable_reasons

    dev = torch.device("cuda" if backend == "cuda" or (backend == "triton" and not NO_CUDA)
                       else "cpu")
    if unavailable_reasons(backend, dev, torch.float64):
        pytest.skip(f"backend {backend} unavailable here")
    m, r, t = (x.to(dev) for x in _loss_inputs())

    def loss(bk, mm, rr=r, tt=t):
        return df.ddspo_loss(mm, rr, tt, 5.0, backend=bk)[0]

    want = torch.func.grad(lambda x: loss("torch", x))(m)
    got = torch.func.grad(lambda x: loss(backend, x))(m)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    batched = m.view(2, 2, 8)
    f = {bk: (lambda x, bk=bk: loss(bk, x, r[:2], t[:2])) for bk in ("torch", backend)}
    torch.testing.assert_close(torch.func.vmap(f[backend])(batched),
                               torch.func.vmap(f["torch"])(batched), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f[backend]))(batched),
                               torch.func.vmap(torch.func.grad(f["torch"]))(batched),
                               rtol=1e-10, atol=1e-12)


def test_config_file_numbers_are_bounded_too():
    """A YAML file bypasses the flags' validator: the configs bound ints themselves."""
    from ddspo_fast.train import TrainConfig
    from ddspo_fast.train.pair_policies import PairTrainConfig

    for cls in (TrainConfig, PairTrainConfig):
        for field, value in (("seed", 2 ** 70), ("seed", 2 ** 32), ("batch_size", 2 ** 70)):
            with pytest.raises(ValueError, match=f"^{field}: "):
                cls.from_dict({"model": "m", "data": "d", field: value})


def test_library_device_check_names_the_device(tmp_path):
    from ddspo_fast.data.prepare import prepare_dataset
    from ddspo_fast.devices import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="banana"):
        check_device("banana")
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "a cat", "neg_prompts": ["a"]}\n')
    with pytest.raises(ValueError, match="^device: .*banana"):
        prepare_dataset(tiny_model("sd15"), str(p), str(tmp_path / "out"), device="banana")
    assert not (tmp_path / "out").exists()
