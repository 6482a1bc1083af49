"""bench step: tiny configs on CPU give the ladder's JSON; the measuring parts alone."""
import json

import pytest
import torch

from ddspo_fast.bench import archs, measure, report
from ddspo_fast.bench import step as bs
from ddspo_fast.bench.device import peak_tflops, quantiles, slug
from ddspo_fast.bench.ladder import RUNG_NAMES
from ddspo_fast.bench.steps import RowCounter


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert peak_tflops("Some Unknown Accelerator") is None


def test_quantiles_and_slug():
    q = quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert q["p50"] == 3.0 and 1.0 < q["p20"] < q["p50"] < q["p80"] < 5.0
    assert quantiles([2.0]) == {"p20": 2.0, "p50": 2.0, "p80": 2.0}
    assert slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert slug("CPU: AMD EPYC 7B13 (2 logical cores, 1 torch threads)") == "amd-epyc-7b13"


@pytest.mark.parametrize("family,params_b", [("sd15", 0.86), ("sdxl", 2.57), ("sd3", 2.03),
                                             ("sana", 0.59)])
def test_real_architectures_match_the_published_sizes(family, params_b):
    import diffusers

    spec = archs.REAL[family]
    with torch.device("meta"):
        m = getattr(diffusers, spec.denoiser_cls)(**spec.config)
    n = sum(p.numel() for p in m.parameters()) / 1e9
    assert n == pytest.approx(params_b, rel=0.01)


def test_row_counter_counts_positional_and_keyword_rows():
    lin = torch.nn.Linear(3, 3)

    class KW(torch.nn.Module):
        def forward(self, hidden_states=None):
            return hidden_states

    kw = KW()
    with RowCounter([lin, kw, lin]) as rc:      # a module given twice is hooked once
        lin(torch.zeros(4, 3))
        kw(hidden_states=torch.zeros(6, 3))
    lin(torch.zeros(5, 3))                      # outside the block: not counted
    assert (rc.rows, rc.calls) == (10, 2)


def test_tiny_cpu_run_json(tmp_path):
    out = tmp_path / "step.json"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rc = bs.main(["--tiny", "--device", "cpu", "--families", "sd15,sana", "--steps", "2",
                  "--warmup", "1", "--batch", "2", "--rungs", "official,3_reference_rows,fused_loss",
                  "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["device"].startswith("CPU") and res["torch"] == torch.__version__
    assert res["ddspo_fast"] and res["command"].startswith("ddspo-fast bench step --tiny")
    assert set(res["definitions"]) >= {"tflop_useful_per_step", "mfu_useful", "step_ms"}
    assert res["cpu_model"] and res["logical_cores"] >= 1
    assert res["load_average"][0]["before"] == "start" and res["load_average"][-1]["before"] == "end"
    assert isinstance(res["measured_under_load"], bool)
    # the official rung runs fp32 on a CPU (the script's fp16 cannot run there) and says so
    assert res["official_precision"]["sd15"]["script"] == "fp16-scaler"
    assert res["official_precision"]["sd15"]["runs"] == "fp32"
    assert "GradScaler" in res["official_precision"]["sd15"]["note"]
    assert res["official_precision"]["sana"] == {"script": "fp32", "runs": "fp32", "note": None}
    assert res["official_pairs_per_update"] == {"sd15": 128, "sana": 1024}
    for fam in ("sd15", "sana"):
        rows = [r for r in res["rows"] if r["family"] == fam]
        assert [r["name"] for r in rows] == list(RUNG_NAMES) + list(report.LIBRARY_ROWS)
        by = {r["name"]: r for r in rows}
        measured = [r for r in rows if not r["skipped"]]
        assert {r["name"] for r in measured} == {"official", "3_reference_rows", "fused_loss",
                                                 *report.LIBRARY_ROWS}
        for r in measured:
            assert r["pairs_per_s"] > 0 and r["batch"] == 2 and r["timed_steps"] == 2
            q = r["step_ms"]
            assert 0 < q["p20"] <= q["p50"] <= q["p80"]
            assert r["mfu_useful"] is None and r["peak_mem_gb"] is None   # CPU: see notes
            assert r["loss_finite"] and r["error"] is None
            # the optimizer step, timed apart, is charged per pair at the recipe's rate:
            # 2 of 128 (sd15) or 1024 (sana) pairs, so the charged step is shorter
            assert r["pairs_per_update"] == res["official_pairs_per_update"][fam]
            assert r["update_ms"]["p50"] > 0
            assert q["p50"] < r["step_ms_one_update"]["p50"]
        # no row compares across precisions without saying so
        for r in rows:
            if r.get("vs_official") is None:
                continue
            assert r["same_precision_as_official"] == (r["computes_in"] == "fp32")
            if not r["same_precision_as_official"]:
                assert r["computes_in"] in r["precision_note"] and "fp32" in r["precision_note"]
        # what ran, read back from the live objects: the official rung without autocast or
        # a GradScaler, the library's defaults with accelerate's "no" (fp32)
        assert by["official"]["live_settings"]["autocast"] is None
        assert not by["official"]["live_settings"]["grad_scaler"]
        assert by["official"]["computes_in"] == "fp32"
        defaults, tuned = by[report.DEFAULTS_ROW], by[report.TUNED_ROW]
        assert defaults["live_settings"]["mixed_precision"] == "no"
        assert defaults["same_precision_as_official"] and defaults["vs_official"] > 0
        assert defaults["config"]["channels_last"] == (fam == "sd15")
        # the tuned row carries bf16 (and 8-bit AdamW); on a CPU it computes in bf16 and
        # its vs_official says so
        assert tuned["live_settings"]["mixed_precision"] == "bf16"
        assert "bf16" in tuned["carries_device_dependent"]
        assert tuned["same_precision_as_official"] is False
        assert isinstance(tuned["carries_slower_here"], list)
        # rows counted at the modules: 2 policy + 4 reference, then 2 + 3
        assert by["official"]["denoiser_rows_per_pair"] == 6
        assert by["3_reference_rows"]["denoiser_rows_per_pair"] == 5
        assert by["fused_loss"]["denoiser_rows_per_pair"] == 5
        assert defaults["denoiser_rows_per_pair"] == 5
        assert by["3_reference_rows"]["effect_here"] in ("faster", "slower", "within noise")
        # the cached step runs the policy alone: 2 rows per pair, counted
        cached, live = by[report.CACHED_ROW], defaults
        assert cached["denoiser_rows_per_pair"] == 2
        assert cached["config"]["reference_cache"] and not live["config"]["reference_cache"]
        assert cached["same_precision_as_official"]
        # same batch, same draws, same start, same settings: the first steps agree to float
        # rounding (the cached reference outputs come from another call); after that AdamW,
        # which moves a weight by ~lr whatever its gradient's size, lets rounding
        # differences grow, so later losses only stay close (the policy starts as the
        # reference: ln 2 up to that rounding; a wrong draw's reference would be off by
        # orders more)
        assert cached["first_loss"] == pytest.approx(live["first_loss"], rel=1e-2)
        assert cached["loss"] == pytest.approx(live["loss"], rel=0.1)
        assert cached["vs_live"] == pytest.approx(
            live["step_ms"]["p50"] / cached["step_ms"]["p50"], rel=1e-3)
        assert cached["live_reference_ms_per_pair"] == pytest.approx(
            (live["step_ms"]["p50"] - cached["step_ms"]["p50"]) / 2, rel=1e-3)
        pre = cached["precompute"]
        assert (pre["pairs"], pre["draws"], pre["pair_draws_computed"]) == (2, 4, 8)
        assert pre["ms_per_pair_draw"] > 0 and pre["wall_seconds"] >= pre["seconds"] > 0
        assert pre["fields"] == ["target_w", "target_l", "r_l"]     # TF-CPP: r_w is 0
        # useful FLOPs are the objective's, the same for every row; executed FLOPs of the
        # official row carry the 4th reference row (about 10/9 of the 3-row step's)
        useful = {r["tflop_useful_per_step"] for r in measured if r is not cached}
        assert len(useful) == 1 and useful.pop() > 0
        # the cached step's reference work was done ahead: no "useful" figure, and it
        # executes the policy's share only (about 2/3 of the 3-row step's FLOPs at this
        # size: forward + backward on 2 rows against that plus a 3-row forward)
        assert cached["tflop_useful_per_step"] is None and cached["mfu_useful"] is None
        share = cached["tflop_hardware_per_step"] / by["fused_loss"]["tflop_hardware_per_step"]
        assert 0.5 < share < 0.8
        ratio = by["official"]["tflop_hardware_per_step"] / by["fused_loss"]["tflop_hardware_per_step"]
        assert 1.05 < ratio < 1.2
        assert by["fused_loss"]["tflop_hardware_per_step"] == pytest.approx(
            by["fused_loss"]["tflop_useful_per_step"], rel=0.02)
        assert by["fused_loss"]["vs_official"] == pytest.approx(
            by["official"]["step_ms"]["p50"] / by["fused_loss"]["step_ms"]["p50"], rel=1e-3)
    assert any("mfu is null" in n for n in res["notes"])
    # the run turns TF32 off for every row and restores the flags afterwards
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32


def _fake_measured(times_ms, update_ms):
    m = measure.Measured()
    m.times = [t / 1e3 for t in times_ms]
    m.update_times = [u / 1e3 for u in update_ms]
    m.loss = m.first_loss = 0.69
    return m


def test_cpu_table_names_every_precision_it_compares():
    """A CPU ladder with fake timings: every ratio against the (fp32) official rung that
    comes from a bf16 row names both precisions, in the JSON row and in the table; the
    defaults row, fp32 like the official rung, carries no such note; a rung slower than its
    base shows as such in its row and in the tuned row that carries it."""
    from ddspo_fast.bench import ladder as lad

    rungs = lad.build_ladder("sd15", is_unet=True, device_type="cpu", bnb_missing=lambda: None,
                             compile_missing="left out")
    by = {r.name: r for r in rungs}
    ms = {"official": 100, "3_reference_rows": 90, "fused_loss": 88, "channels_last": 120,
          "bf16": 400, "adamw8bit": 401}
    entries = {n: measure.Entry(n, None, _fake_measured([v, v + 1, v + 2], [10, 10, 10]))
               for n, v in ms.items()}
    d = lad.library_defaults("sd15", "cpu", is_unet=True)
    entries[report.DEFAULTS_ROW] = measure.Entry("d", None, _fake_measured([119, 120, 121],
                                                                           [10, 10, 10]))
    entries[report.TUNED_ROW] = measure.Entry("t", None, _fake_measured([409, 410, 411],
                                                                        [10, 10, 10]))
    library = {report.DEFAULTS_ROW: (d, by["channels_last"].index),
               report.TUNED_ROW: (lad.tuned(rungs).config, lad.tuned(rungs).index)}
    rows = report.build_rows(archs.TINY["sd15"], rungs, entries, None, 8, None,
                             pairs_per_update=128, library=library)
    got = {r["name"]: r for r in rows}
    # charged at 8 of 128 pairs: 100 - 10 + 10 * 8/128 ms
    assert got["official"]["step_ms"]["p50"] == pytest.approx(101 - 10 + 10 / 16, rel=1e-3)
    assert got["official"]["step_ms_one_update"]["p50"] == pytest.approx(101)
    assert got["channels_last"]["effect_here"] == "slower"
    assert got["3_reference_rows"]["effect_here"] == "faster"
    tuned = got[report.TUNED_ROW]
    assert tuned["carries_slower_here"] == ["channels_last", "bf16"]
    assert tuned["carries_device_dependent"] == ["channels_last", "bf16", "adamw8bit"]
    table = report.format_table(rows)
    for r in rows:
        if r.get("vs_official") is None:
            continue
        line = next(x for x in table.splitlines() if f"| {r['name']} " in x)
        if r["computes_in"] == "fp32":
            assert r["same_precision_as_official"] and "vs fp32" not in line
        else:
            assert not r["same_precision_as_official"] and "(bf16 vs fp32)" in line
    assert got[report.DEFAULTS_ROW]["same_precision_as_official"]
    assert "carries slower here: channels_last, bf16" in table
    assert report.amortised([1.0], [None], 8, 128) == [1.0]     # no update time: as timed
    assert report.amortised([1.0], [0.5], 8, None) == [1.0]     # --updates every-step


def test_flop_count_of_grouped_conv_backward():
    """Depthwise conv: forward + both gradients = 3 forward convolutions."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    fwd = 2 * 2 * 64 * 8 * 8 * 9           # 2 * batch * C_out * H * W * (C_in/groups) * k*k
    assert measure.count_flops(lambda b: conv(b).sum().backward(), x) == 3 * fwd


class _FakeStep:
    def __init__(self, limit=5):
        self.limit, self.resets, self.closed = limit, 0, False

    def __call__(self, batch):
        if batch["latent_w"].shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(())

    def reset(self):
        self.resets += 1

    def close(self):
        self.closed = True


def test_find_max_batch_bisects_to_the_largest_fitting_batch():
    fake = _FakeStep()
    mk = lambda n: {"latent_w": torch.zeros(n, 1)}  # noqa: E731
    cpu = torch.device("cpu")
    assert measure.find_max_batch(lambda: fake, mk, cpu, cap=64) == 5
    assert fake.closed and fake.resets >= 4
    assert measure.find_max_batch(lambda: _FakeStep(), mk, cpu, cap=3) == 3

    def no_room():
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")
    assert measure.find_max_batch(no_room, mk, cpu, cap=3) == 0


@pytest.mark.parametrize("mode", ["steps", "rounds"])
def test_out_of_memory_is_a_row_not_a_crash(mode):
    ok, oom = measure.Entry("ok", lambda: _FakeStep()), measure.Entry("oom", lambda: _FakeStep(0))
    batch = {"latent_w": torch.zeros(2, 1)}
    measure.run_interleaved([ok, oom], batch, torch.device("cpu"), warmup=1, steps=4,
                            mode=mode, rounds=2, count=False, log=lambda *a: None)
    assert oom.m.error == "out of memory" and not oom.m.times
    assert ok.m.error is None and len(ok.m.times) == 4
    spec = archs.TINY["sd15"]
    from ddspo_fast.bench.ladder import build_ladder

    rungs = build_ladder("sd15", is_unet=True, only={"official"}, bnb_missing=lambda: None,
                         device_type="cpu")
    rows = report.build_rows(spec, rungs, {"official": oom}, None, 2, None)
    assert rows[0]["error"] == "out of memory" and rows[0]["pairs_per_s"] is None
    assert "out of memory" in report.format_table(rows)


def test_committed_cpu_results_compare_like_with_like():
    """The committed CPU ladder (benchmarks/results/step-cpu-tiny.json, which the README
    quotes): no official rung ran fp16 on the CPU, and every ratio against it from a row
    that computes in another dtype says so."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "step-cpu-tiny.json"
    res = json.loads(path.read_text())
    assert res["device_type"] == "cpu" and res["cpu_model"]
    assert res["load_average"] and isinstance(res["measured_under_load"], bool)
    official = [r for r in res["rows"] if r["name"] == "official"]
    assert official and all(r["config"]["precision"] == "fp32" and r["computes_in"] == "fp32"
                            for r in official)
    for fam, p in res["official_precision"].items():
        assert p["runs"] == "fp32" and (p["note"] is not None) == (p["script"] != "fp32"), fam
    compared = [r for r in res["rows"] if r.get("vs_official") is not None]
    assert compared
    for r in compared:
        assert r["same_precision_as_official"] == (r["computes_in"] == "fp32"), r["name"]
        if not r["same_precision_as_official"]:
            assert r["computes_in"] in r["precision_note"], r["name"]
    for r in res["rows"]:
        if r["rung"] is not None:
            assert ("device_dependent" in r
                    and bool(r["device_dependent"]) == (r["name"] in ("channels_last", "bf16",
                                                                      "adamw8bit", "fp8_compute",
                                                                      "compile")))
