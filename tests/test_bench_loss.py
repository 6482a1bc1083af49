"""The loss benchmark runs end to end and writes its JSON and plot; its eager column is
the independent script-form loss."""
import json
import os
import sys

import pytest
import torch

import ddspo_fast as df
from ddspo_fast.bench import loss as bench
from ddspo_fast.bench.script_loss import script_loss, script_loss_from_reference


def test_bench_loss_writes_rows_for_every_backend(tmp_path):
    out = tmp_path / "loss.json"
    assert bench.main(["--shapes", "tiny", "--dtypes", "fp32", "--layouts", "both",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("device", "torch", "ddspo_fast", "copy_gbps", "rows", "threads", "command",
                "definitions"):
        assert key in result
    assert result["command"].startswith("ddspo-fast bench loss --shapes tiny")
    assert result["copy_gbps"] > 0
    backends = {r["backend"] for r in result["rows"]}
    expected = {"eager", "compile"} | set(df.available_backends("cpu"))
    assert expected <= backends, (expected, backends)
    assert "torch" in backends     # the library's torch backend is a column of its own
    for r in result["rows"]:
        assert r["pass"] in ("fwd", "bwd", "fwd+bwd") and r["dtype"] == "fp32"
        assert r["shape"] == [4, 4, 8, 8] and r["layout"] in ("standard", "packed")
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["samples"] >= 10
        assert r["gbps"] > 0 and 0 < r["fraction_of_copy"]
        assert r["vs_eager"] > 0 and r["vs_compile"] > 0
        # host overhead: measured once per backend/dtype/layout, on the fwd+bwd rows
        assert (r["host_us"] is not None) == (r["pass"] == "fwd+bwd")
        if r["host_us"] is not None:
            assert r["host_us"] > 0
    eager = [r for r in result["rows"] if r["backend"] == "eager"]
    assert all(r["vs_eager"] == 1.0 for r in eager)
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("layout", ["standard", "packed"])
def test_eager_column_is_the_script_form_not_the_library(layout, monkeypatch):
    """The eager column must not call the library: poison the library's entry points."""
    model, refs = bench.make_inputs((4, 3, 5), torch.float32, "cpu", layout)
    want = bench.loss_fn(layout, "torch")(model, refs)
    monkeypatch.setattr(df, "ddspo_loss", None)
    monkeypatch.setattr(df, "ddspo_loss_from_reference", None)
    got = bench.loss_fn(layout, "eager")(model, refs)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_script_loss_matches_the_library_and_its_metrics():
    g = torch.Generator().manual_seed(3)
    m, r, t = (torch.randn(6, 4, 5, generator=g) for _ in range(3))
    m.requires_grad_(True)
    loss, metrics = script_loss(m, r, t, 2000.0)
    ref_loss, stats = df.ddspo_loss(m, r, t, 2000.0, backend="torch")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(metrics["implicit_acc"]) == pytest.approx(float(stats["implicit_acc"]))
    ref_out = torch.randn(9, 4, 5, generator=g)   # [x_w|c ; x_l|c ; x_l|c-], B = 3
    packed, _ = script_loss_from_reference(m, ref_out, 2000.0)
    lib, _ = df.ddspo_loss_from_reference(m, ref_out, 2000.0, backend="torch")
    assert float(packed) == pytest.approx(float(lib), rel=1e-5)


def test_pass_bytes_counts_each_term_once():
    # standard fwd: model, ref, target read once; bwd: model + target read, grad written.
    numel = 16 * 4 * 64 * 64
    assert bench.pass_bytes((16, 4, 64, 64), bench.DTYPES["bf16"], "standard", "fwd") == 3 * numel * 2
    assert bench.pass_bytes((16, 4, 64, 64), bench.DTYPES["bf16"], "packed", "fwd") == int(2.5 * numel * 2)
    assert bench.pass_bytes((16, 4, 64, 64), bench.DTYPES["fp32"], "standard", "fwd+bwd") == 6 * numel * 4


def test_quick_default_output_is_not_the_committed_results(tmp_path):
    cpu = torch.device("cpu")
    quick = bench.default_out(cpu, quick=True)
    full = bench.default_out(cpu, quick=False)
    assert quick.startswith(os.path.join("runs", "bench")) and quick.endswith("-quick.json")
    assert full.startswith(os.path.join("benchmarks", "results"))


def test_without_matplotlib_the_plot_is_reported_skipped(tmp_path, monkeypatch, capsys):
    canned = {"device": "x", "copy_gbps": 1.0, "rows": []}
    monkeypatch.setattr(bench, "run", lambda *a, **k: dict(canned))
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import raises ImportError
    assert bench.main(["--shapes", "tiny", "--out", str(tmp_path / "l.json")]) == 0
    out = capsys.readouterr().out
    assert "plot skipped: matplotlib is not installed" in out and "pip install matplotlib" in out
    assert json.loads((tmp_path / "l.json").read_text())["command"].startswith("ddspo-fast bench loss")
    assert not (tmp_path / "l.png").exists()
