"""A run against its base (evaluation.compare), the benchmark layouts and the model card,
on a tiny SD1.5, a tiny LoRA run trained here and a tiny random CLIP (nothing downloaded)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ddspo_fast.demo.tinyclip import make_tiny_clip
from ddspo_fast.evaluation import compare, write_model_card
from ddspo_fast.evaluation import generate as gen_mod
from ddspo_fast.testing import make_tiny_model

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = ["a photo of a cat", "a red car on the street", "a small green house"]


def _mlp(width):
    g = torch.Generator().manual_seed(5)
    dims = [width, 1024, 128, 64, 16, 1]
    return {f"layers.{i}.{p}": (torch.randn(dims[k + 1], dims[k], generator=g) * 0.05 if p == "weight"
                                else torch.zeros(dims[k + 1]))
            for k, i in enumerate((0, 2, 4, 6, 7)) for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from _train_helpers import config, tiny_data

    from ddspo_fast.train import Trainer

    root = tmp_path_factory.mktemp("compare")
    base = make_tiny_model("sd15", root / "sd15")
    clip = make_tiny_clip(root / "clip")
    run = root / "run"
    Trainer(config("sd15", run, model=base, data=tiny_data("sd15"), max_steps=2, lora_rank=4,
                   save_final=True, learning_rate=1e-2)).train()
    torch.save(_mlp(16), root / "aesthetic.pth")
    from transformers import CLIPTokenizer

    from test_evaluate_scorers import _open_clip_state, imagereward_folder

    torch.save({"state_dict": _open_clip_state(len(CLIPTokenizer.from_pretrained(clip)))},
               root / "hps.pt")
    weights = {"clip": clip, "pickscore": clip, "aesthetic": str(root / "aesthetic.pth"),
               "hpsv2": str(root / "hps.pt"),
               "imagereward": str(imagereward_folder(root / "ImageReward")[0])}
    return base, str(run), weights


METRICS = ["clip", "pickscore", "hpsv2", "imagereward", "aesthetic"]


def _compare(assets, out=None, **kw):
    base, run, weights = assets
    args = dict(metrics=METRICS, weights=weights, out_dir=out, num_images_per_prompt=2, steps=2,
                seed=0, device="cpu", batch_size=2, resamples=2000)
    args.update(kw)
    return compare(run, base, PROMPTS, **args)


def test_paired_scores_report_grid_and_resume(assets, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    writes = []
    real = gen_mod.atomic_write

    def interrupted(path, write):  # the process dies after its third image
        if len(writes) == 3:
            raise KeyboardInterrupt
        writes.append(Path(path).name)
        real(path, write)

    monkeypatch.setattr(gen_mod, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compare(assets, out)
    kept = {p: p.stat().st_mtime_ns for p in (out / "run").glob("*.png")}
    assert len(kept) == 3

    writes.clear()
    monkeypatch.setattr(gen_mod, "atomic_write", lambda p, w: (writes.append(Path(p)), real(p, w)))
    res = _compare(assets, out)
    # only the missing images were generated: 6 per model minus the 3 kept
    assert len(writes) == 12 - 3 and not set(writes) & set(kept)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())

    saved = json.loads((out / "scores.json").read_text())
    for m in METRICS:
        s = saved["metrics"][m]
        run_m = [r["scores"][m]["run"] for r in saved["per_prompt"]]
        base_m = [r["scores"][m]["base"] for r in saved["per_prompt"]]
        assert s["run_mean"] == pytest.approx(sum(run_m) / 3)
        assert s["base_mean"] == pytest.approx(sum(base_m) / 3)
        assert s["mean_diff"] == pytest.approx(s["run_mean"] - s["base_mean"])
        lo, hi = s["diff_ci95"]
        assert min(r - b for r, b in zip(run_m, base_m)) - 1e-9 <= lo <= s["mean_diff"] <= hi \
            <= max(r - b for r, b in zip(run_m, base_m)) + 1e-9
        wins = sum(1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(run_m, base_m)) / 3
        assert s["win_rate"] == pytest.approx(wins)
        assert 0 <= s["win_rate_ci95"][0] <= s["win_rate"] <= s["win_rate_ci95"][1] <= 1
        for rec in saved["per_prompt"]:  # per-prompt score is the mean of its images
            assert rec["scores"][m]["run"] == pytest.approx(sum(rec["per_image"][m]["run"]) / 2)
    # the LoRA changed the images, so the scores differ between the two models (pickscore:
    # the CLIP score of a random tiny CLIP may be clamped to 0 for both)
    assert any(r["scores"]["pickscore"]["run"] != r["scores"]["pickscore"]["base"]
               for r in saved["per_prompt"])

    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "prompt_index,prompt,metric,run,base,diff" and len(rows) == 1 + 3 * len(METRICS)
    report = (out / "report.md").read_text()
    assert "| pickscore |" in report and "grid.png" in report and "curves.png" in report
    from PIL import Image

    with Image.open(out / "grid.png") as g:
        assert g.width > 2 * 64 and g.height > 3 * 64
    assert (out / "curves.png").stat().st_size > 1000  # from the run's metrics.jsonl

    # a rerun with nothing missing generates nothing and gives the same scores
    writes.clear()
    again = _compare(assets, out)
    assert [w for w in writes if w.suffix == ".png"] == []
    for m in METRICS:  # key by key: pytest >= 9.2's approx takes no lists inside a dict
        assert again["metrics"][m].keys() == res["metrics"][m].keys()
        for k, v in res["metrics"][m].items():
            assert again["metrics"][m][k] == pytest.approx(v), (m, k)
    # and the interrupted-then-resumed evaluation scores what an uninterrupted one does (the
    # batches differ, so a pixel may round differently: 8-bit images, fp32 sampling)
    whole = _compare(assets, tmp_path / "whole", metrics=["pickscore", "imagereward"])
    for m in ("pickscore", "imagereward"):
        for k in ("run_mean", "base_mean"):
            assert whole["metrics"][m][k] == pytest.approx(res["metrics"][m][k], rel=1e-3, abs=1e-3)


def test_a_folder_made_with_other_settings_is_refused(assets, tmp_path):
    out = tmp_path / "eval"
    _compare(assets, out, metrics=["clip"], num_images_per_prompt=1)
    before = sorted(p.name for p in (out / "run").iterdir())
    with pytest.raises(ValueError, match="out_dir: .*other settings.*steps"):
        _compare(assets, out, metrics=["clip"], num_images_per_prompt=1, steps=3)
    assert sorted(p.name for p in (out / "run").iterdir()) == before


@pytest.mark.parametrize("change, msg", [
    (lambda a, t: dict(out_dir=a[0]), "out_dir: .*overlaps the input against"),
    (lambda a, t: dict(out_dir=Path(a[1]) / "eval"), "out_dir: .*overlaps the input run"),
    (lambda a, t: dict(out_dir=Path(a[2]["clip"]).parent), "out_dir: .*overlaps"),
    (lambda a, t: dict(out_dir=t / "f.txt"), "out_dir: .*is a file"),
    (lambda a, t: dict(metrics=["pickscore"], weights={}), "pickscore: no weights"),
    (lambda a, t: dict(metrics=["fid"]), "metrics: unknown metric 'fid'"),
    (lambda a, t: dict(guidance_scale=float("nan")), "guidance_scale"),
    (lambda a, t: dict(guidance_scale=float("inf")), "guidance_scale"),
    (lambda a, t: dict(device="cuda:7" if not torch.cuda.is_available() else "banana"), "device"),
])
def test_bad_input_is_named_and_nothing_is_written(assets, tmp_path, change, msg):
    (tmp_path / "f.txt").write_text("keep me")
    kw = dict(out_dir=tmp_path / "eval")
    kw.update(change(assets, tmp_path))
    with pytest.raises(ValueError, match=msg):
        _compare(assets, **kw)
    assert not (tmp_path / "eval").exists() and (tmp_path / "f.txt").read_text() == "keep me"
    assert not (Path(assets[0]) / "run").exists()


def test_a_damaged_image_is_named(assets, tmp_path):
    out = tmp_path / "eval"
    _compare(assets, out, metrics=["clip"], num_images_per_prompt=1)
    (out / "base" / "0001_0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="out_dir: .*0001_0.png is not a readable image"):
        _compare(assets, out, metrics=["clip"], num_images_per_prompt=1)


def test_models_of_different_families_are_refused(assets, tmp_path):
    from ddspo_fast.evaluation.sources import ModelSource

    import ddspo_fast.evaluation.api as cmp

    real = cmp.family_of
    cmp.family_of = lambda src: "sdxl" if Path(src.path) == Path(assets[0]) else real(src)
    try:
        with pytest.raises(ValueError, match="against: .* is a sdxl model but .* is sd15"):
            _compare(assets, tmp_path / "eval")
    finally:
        cmp.family_of = real
    assert not (tmp_path / "eval" / "run").exists()
    assert isinstance(ModelSource("pipeline", Path(".")), ModelSource)


def test_model_card_loads_names_base_and_carries_scores(assets, tmp_path):
    from huggingface_hub import ModelCard

    base, run, weights = assets
    export = tmp_path / "export"
    export.mkdir()
    (export / "pytorch_lora_weights.safetensors").write_bytes(
        (Path(run) / "pytorch_lora_weights.safetensors").read_bytes())
    (Path(base) / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# tiny\n")
    try:
        card = write_model_card(export, base_model=base,
                                train_config={"objective": "ddspo", "beta": 5000.0, "lora_rank": 4,
                                              "learning_rate": 1e-4, "max_steps": 2})
    finally:
        (Path(base) / "README.md").unlink()
    loaded = ModelCard.load(card)
    assert loaded.data.base_model == base and loaded.data.license == "creativeml-openrail-m"
    assert "ddspo-fast" in loaded.data.tags and "lora" in loaded.data.tags
    assert "| beta | `5000.0` |" in loaded.text

    res = compare(export, base, PROMPTS[:2], metrics=["clip"], weights=weights,
                  out_dir=tmp_path / "eval", steps=2, device="cpu", base_model=base,
                  resamples=500)
    assert res["files"]["card"] == str(card)
    after = ModelCard.load(card)
    assert after.data.base_model == base
    assert "| clip |" in after.text and "evaluation_grid.png" in after.text
    assert (export / "evaluation_grid.png").is_file()
    # a second evaluation replaces the section instead of adding one
    compare(export, base, PROMPTS[:2], metrics=["clip"], weights=weights,
            out_dir=tmp_path / "eval", steps=2, device="cpu", base_model=base, resamples=500)
    assert ModelCard.load(card).text.count("## Evaluation") == 1


def test_geneval_and_t2i_compbench_layouts(assets, tmp_path):
    from ddspo_fast.evaluation.api import render_benchmark

    base, _, _ = assets
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
             "prompt": "a photo of a red car"}]
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "geneval"
    res = render_benchmark(base, "geneval", f, out, num_images_per_prompt=2, steps=2, device="cpu")
    assert res["num_images"] == 4
    # GenEval's README: <IMAGE_FOLDER>/<5-digit index>/metadata.jsonl + samples/<4-digit>.png
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000", "00001"]
    for i, m in enumerate(meta):
        d = out / f"{i:05d}"
        assert json.loads((d / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]

    p = tmp_path / "color_val.txt"
    p.write_text("a green bench and a blue bowl\na red car\n")
    out = tmp_path / "t2i"
    render_benchmark(base, "t2i-compbench", p, out, num_images_per_prompt=2, steps=2, device="cpu")
    assert sorted(x.name for x in (out / "samples").iterdir()) == [
        "a green bench and a blue bowl_000000.png", "a green bench and a blue bowl_000001.png",
        "a red car_000002.png", "a red car_000003.png"]  # one running index: BLIP-VQA's question ids
    p.write_text("a cat / a dog\n")
    with pytest.raises(ValueError, match="prompts: prompt 1 cannot be a file name"):
        render_benchmark(base, "t2i-compbench", p, tmp_path / "t2i-2", steps=2, device="cpu")


def test_fid_of_each_model_against_a_reference_folder(assets, tmp_path):
    pytest.importorskip("torchmetrics", reason="FID uses torchmetrics (pip install torchmetrics)")
    from PIL import Image
    from test_evaluate_scorers import _PoolFeatures

    from ddspo_fast.evaluation.scorers.fid import FID

    base, run, weights = assets
    ref = tmp_path / "reference"
    ref.mkdir()
    g = torch.Generator().manual_seed(4)
    for i in range(5):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(ref / f"{i}.png")
    res = compare(run, base, PROMPTS, metrics=["clip"], weights={**weights, "fid": _PoolFeatures()},
                  out_dir=tmp_path / "eval", num_images_per_prompt=1, steps=2, device="cpu",
                  fid_reference=ref, resamples=500)
    f = res["fid"]
    with_images = lambda side: [Image.open(tmp_path / "eval" / side / f"{i:04d}_0.png").convert("RGB")  # noqa: E731
                                for i in range(len(PROMPTS))]
    direct = FID(_PoolFeatures(), ref)
    assert f["run"] == pytest.approx(direct.score_set(with_images("run")), rel=1e-6)
    assert f["base"] == pytest.approx(direct.score_set(with_images("base")), rel=1e-6)
    assert f["diff"] == pytest.approx(f["run"] - f["base"]) and f["reference_images"] == 5
    assert "FID (lower is better" in (tmp_path / "eval" / "report.md").read_text()


def test_a_checkpoint_samples_as_its_export(assets, tmp_path):
    """A checkpoint (and a run holding only checkpoints) is evaluated through its export:
    the pipeline it loads has the same LoRA denoiser as the finished run of that step."""
    from _train_helpers import config, tiny_data

    from ddspo_fast.evaluation.sources import load_pipeline, resolve
    from ddspo_fast.train import Trainer

    base = assets[0]
    run = tmp_path / "run"
    Trainer(config("sd15", run, model=base, data=tiny_data("sd15"), max_steps=2, lora_rank=4,
                   lora_alpha=8, checkpoint_every=2, save_final=True, learning_rate=1e-2)).train()
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert resolve(ckpt).kind == "checkpoint"
    finished, from_ckpt = load_pipeline(str(run), "cpu"), load_pipeline(str(ckpt), "cpu")
    unet = finished.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=g)
    c = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        want = finished.unet(x, t, c).sample
        got = from_ckpt.unet(x, t, c).sample
        plain = load_pipeline(base, "cpu").unet(x, t, c).sample
    assert not torch.allclose(want, plain, atol=1e-6)  # the LoRA changed the denoiser
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
