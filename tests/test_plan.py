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
    q = analytic.quantized_base([[4096, 4096]], "nf4", 2)
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


# ---------------------------------------------------------------------- quantized, sharded
def _allocated_bytes(layer) -> int:
    """Bytes of every distinct storage a quantized layer's weight holds."""
    w = layer.weight
    tensors = [w.data]
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        tensors += [qs.absmax, qs.code]
    for owner in (w, getattr(layer, "state", None)):
        for name in ("SCB", "CB"):
            t = getattr(owner, name, None)
            if torch.is_tensor(t):
                tensors.append(t)
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_bytes_are_what_bitsandbytes_allocates(kind):
    pytest.importorskip("bitsandbytes")
    from ddspo_fast.train.quantize import quantize_base, stored_bytes

    shapes = [(128, 64), (64, 192), (320, 1280)]
    net = torch.nn.Sequential(*[torch.nn.Linear(i, o) for o, i in shapes])
    assert quantize_base(net, kind, compute_dtype=torch.float32) == len(shapes)
    for layer, shape in zip(net, shapes):
        assert _allocated_bytes(layer) == stored_bytes(kind, shape), (kind, shape)
    # and the planner's delta: the stored tensors (512-B granules) minus the bf16 weights
    q = analytic.quantized_base([list(s) for s in shapes], kind, 2)
    bf16 = sum(analytic._round(2 * o * i) for o, i in shapes)
    stored = sum(analytic._round(stored_bytes(kind, s)) for s in shapes)
    assert stored - bf16 <= q["weights_delta"] < 0


def _traced() -> dict:
    """A traced step as the worker reports one (bytes per phase and category)."""
    phases = {name: {"weights": 1000 + i, "autocast": 70, "grads": 300 * i, "saved": 5000 + i,
                     "transient": 40} for i, name in enumerate(
                         ("reference forward", "policy forward", "loss", "backward"))}
    return {"phases": phases, "flops": {}, "trainable_shapes": [[10, 10]],
            "trainable_bytes": 400, "policy_frozen_bytes": 500, "reference_bytes": 100,
            "frozen_linear_shapes": [[10, 10]], "largest_unit_bytes": 64, "params": 1}


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_sharding_divides_weights_grads_and_states_not_activations(ranks):
    from ddspo_fast.plan.estimate import combine

    whole = combine(None, PlanOptions(lora_rank=None), _traced())
    per = combine(None, PlanOptions(lora_rank=None, shard_degree=ranks), _traced())
    ceil = lambda b: -(-b // ranks)  # noqa: E731
    for name, w in whole.phases.items():
        p = per.phases[name]
        for cat in ("weights", "grads", "optimizer states"):
            assert p[cat] == ceil(w[cat]), (name, cat)
        assert p["saved"] == w["saved"] and p["autocast"] == w["autocast"]
        gather = 2 * 64 if name in ("policy forward", "reference forward", "backward") else 0
        if name == "optimizer step":
            assert p["transient"] == ceil(w["transient"])
        else:
            assert p["transient"] == w["transient"] + gather
    assert per.peak < whole.peak


def test_plan_of_a_train_config_reads_quantization_and_sharding():
    from types import SimpleNamespace

    from ddspo_fast.plan import options_from_train_config
    from ddspo_fast.train import TrainConfig

    cfg = TrainConfig(model="m", data="d", lora_rank=8, base_quantization="nf4")
    o = options_from_train_config(cfg)
    assert (o.base, o.lora_rank, o.shard_degree) == ("nf4", 8, 1)
    # a sharding setting, where the config has one
    sharded = SimpleNamespace(**{**cfg.to_dict(), "shard_degree": 4})
    assert options_from_train_config(sharded).shard_degree == 4
    with pytest.raises(ValueError, match="shard_degree"):
        PlanOptions(shard_degree=0).check()


def test_a_sharded_unit_is_a_no_split_module_less_its_nested_units():
    from ddspo_fast.plan.worker import _largest_unit

    class Block(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.own = torch.nn.Linear(4, 4)
            self.inner = Block(10)

    class Net(torch.nn.Module):
        _no_split_modules = ["Block", "Outer"]

        def __init__(self):
            super().__init__()
            self.outer, self.block = Outer(), Block(6)

    # Block(10) is the largest unit; Outer's own part is its 4x4 layer only
    assert _largest_unit(Net(), 1) == (10 * 10 + 10) * 4


def test_the_readme_quotes_the_committed_shard_and_quantization_table():
    import json
    from pathlib import Path

    from ddspo_fast.plan.fit import markdown

    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "benchmarks" / "results" / "plan-shard-quant.json").read_text())
    assert doc["command"].startswith("python -m ddspo_fast.plan.fit") and doc["torch"]
    assert markdown(doc) in (root / "README.md").read_text()
    for row in doc["rows"]:  # more ranks, or fewer bits, never more memory per rank
        counts = [c["count_gib"] for c in row["columns"].values()]
        assert counts == sorted(counts, reverse=True), row["config"]
