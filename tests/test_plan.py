"""The planner: its trace against the CPU allocator on tiny real-weight models, the
relations a real-size estimate must keep, the CLI, and one published figure.

Real-size estimates build the released architectures without weights and trace them on
fake tensors in a subprocess (tens of seconds each); the tiny checks run in-process.
"""
from __future__ import annotations

import pytest
import torch

from ddspo_fast.cli import main
from ddspo_fast.plan import analytic, by_name, from_folder
from ddspo_fast.plan.check import measured_peak, traced_peak
from ddspo_fast.plan.estimate import PlanOptions, estimate_steps, step_setup
from ddspo_fast.plan.gpus import parse_memory
from ddspo_fast.plan.whatif import with_optimizer
from ddspo_fast.testing import make_tiny_model

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return make_tiny_model("sd15", tmp_path_factory.mktemp("plan") / "sd15")


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_trace_equals_cpu_allocator_peak(tiny_sd15, lora, ckpt):
    """The traced count of a DDSPO step equals the peak of the same step run on the tiny
    model's real weights, as torch.profiler's allocator events measure it (fp32 on CPU:
    no GPU rules, exact bytes)."""
    torch.set_num_threads(1)
    setup = step_setup(from_folder(tiny_sd15), PlanOptions(batch=2, lora_rank=lora,
                                                          precision="fp32", checkpointing=ckpt),
                       granule=1, gpu_rules=False)
    measured = measured_peak(setup, f"{tiny_sd15}/unet")
    traced = traced_peak(setup)
    assert abs(traced / measured - 1) < 0.01, (traced, measured)


@pytest.fixture(scope="module")
def sd15_ckpt():
    """SD1.5 full fine-tune with checkpointing: live reference and reference cache."""
    return estimate_steps(by_name("sd15"), [
        PlanOptions(batch=1, checkpointing=True),
        PlanOptions(batch=1, checkpointing=True, reference="cached")])


@pytest.fixture(scope="module")
def sd15_full_ckpt(sd15_ckpt):
    return sd15_ckpt[0]


def test_reference_cache_saves_the_reference_copy(sd15_ckpt):
    live, cached = sd15_ckpt
    ref = live.traced["reference_bytes"]
    assert ref > 1.5 * GiB  # the bf16 copy of a 0.86 B-parameter UNet
    assert cached.traced["reference_bytes"] == 0
    assert live.peak - cached.peak >= ref


def test_8bit_states_at_most_30_percent_of_adamw(sd15_full_ckpt):
    fp32 = sd15_full_ckpt.extras["optimizer states"]
    eight = with_optimizer(sd15_full_ckpt, "adamw8bit").extras["optimizer states"]
    assert fp32 == pytest.approx(8 * sd15_full_ckpt.traced["params"], rel=0.01)
    assert eight <= 0.30 * fp32


def test_checkpointing_cuts_sdxl_policy_saved_activations():
    plain, ckpt = estimate_steps(by_name("sdxl"), [
        PlanOptions(mode="sft", batch=1, lora_rank=8),
        PlanOptions(mode="sft", batch=1, lora_rank=8, checkpointing=True)])
    assert plain.traced["saved"] > 2 * GiB
    assert ckpt.traced["saved"] <= 0.2 * plain.traced["saved"]


def test_cli_plans_sdxl_full_batch_4(capsys):
    assert main(["plan", "--model", "sdxl", "--full", "--batch", "4", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    for phase in ("reference forward", "policy forward", "backward", "optimizer step"):
        assert phase in out
    assert "peak (count):" in out and "margin:" in out and "largest batch that fits" in out
    assert "8-bit AdamW states" in out and "reference cache" in out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["plan", "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model:" in err[0] and "sdxl" in err[0]
    assert main(["plan", "--model", "sdxl", "--gpu-memory", "lots"]) == 1
    assert "gpu_memory" in capsys.readouterr().err


def test_counted_parts():
    shapes = [[320, 320], [16]]   # one 8-bit tensor, one small fp32-state tensor
    st = analytic.optimizer_memory(shapes, "adamw8bit", 4)["states"]
    assert st == 2 * (102400 + 2048) + 2 * 512   # codes + absmax (400 x 4 B, 512-B blocks)
    assert analytic.optimizer_memory(shapes, "adamw", 4)["step_temp"] == 0
    assert analytic.optimizer_memory(shapes, "adamw-foreach", 4)["step_temp"] > 0
    q = analytic.quantized_base([4096 * 4096], "nf4", 2)
    assert q["weights_delta"] == pytest.approx(-(2 - 0.5625) * 4096 * 4096, rel=0.01)
    assert parse_memory("24GB")[0] == 24 * GiB
    assert parse_memory("h100")[0] > 79 * GiB


def test_one_published_figure_in_band():
    from ddspo_fast.plan.published import check

    (row,) = check({"peft-sd14-lora-ckpt"}, log=lambda s: None)
    assert row["in_band"], row


def test_ladder_rows_get_their_real_size_memory():
    """Every ladder row with settings gets the planned peak of those settings on the
    released model: the official rung's foreach AdamW and second reference call cost more
    than the library's bf16 + 8-bit row; a row without settings gets nothing."""
    from ddspo_fast.plan.ladder import annotate, options_of

    official = {"family": "sd15", "name": "official", "config": {
        "precision": "fp32", "optimizer": "adamw", "gradient_checkpointing": False,
        "reference_rows": 4, "lora_rank": None}}
    tuned = {"family": "sd15", "name": "ddspo_fast:tuned", "config": {
        "precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": False,
        "reference_rows": 3, "lora_rank": None, "reference_cache": False}}
    skipped = {"family": "sd15", "name": "compile", "config": None}
    o = options_of(official, 8)
    assert (o.optimizer, o.mode, o.precision, o.reference) == ("adamw-foreach", "ddspo-official", "fp32", "live")
    t = options_of(tuned, 8)
    assert (t.optimizer, t.mode, t.precision) == ("adamw8bit", "ddspo", "bf16")
    assert options_of(dict(tuned, name="ddspo_fast:defaults", config=dict(tuned["config"], optimizer="adamw")), 8).optimizer == "adamw"
    doc = annotate({"rows": [official, tuned, skipped]})
    po, pt = official["planned_real"], tuned["planned_real"]
    assert po["estimate"] and po["batch"] == 8 and "planned_real" not in skipped
    assert pt["count_gib"] < po["count_gib"]
    assert po["count_gib"] < po["allocated_gib"] < po["reserved_gib"]
    assert "margin" in doc["planned_real_note"]
