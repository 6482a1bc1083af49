"""Sharded training (FSDP2, ``train/sharding.py``) on two CPU processes (gloo), launched
as a user launches it (``accelerate launch --config_file configs/accelerate_fsdp2.yaml``),
held against one unsharded process at the same global batch: per-step losses and final
weights agree within fp32 rounding, no process holds a whole copy of the policy or of the
reference, a checkpoint round trip continues exactly, and the exports load with
``from_pretrained`` / ``load_lora_weights``.

One launch runs every case one after the other (starting two processes costs more than
the tiny runs themselves); the one-process runs happen in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _tolerance import assert_adam_runs_agree, forward_rel
from _train_helpers import config, tiny_data, tiny_model
from test_train_families import _write_pair_lora

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd15", "flux")  # a UNet family and a flow-matching transformer family
# Small steps at a small beta, as in tests/test_refcache.py: the runs differ only in fp32
# rounding (how rows are batched, how the gradient is reduced), which beta/2 and the
# learning rate multiply; a wrong shard, draw or target moves the loss by O(1).
RUN = dict(max_steps=2, learning_rate=1e-4, beta=100.0, checkpoint_every=1, save_final=True,
           log_every=1)
DENOISER_DIR = {"sd15": "unet", "flux": "transformer"}
# family-kind-reference: TF-CPP with a live reference or the reference cache, both
# families; DD-CPP (winning / losing adapters on the frozen network) on sd15; and two
# micro-batches per step (gradients reduce-scattered each time, summed in the shards)
CASES = [f"{fam}-{kind}-{ref}" for fam in FAMILIES for kind in ("lora", "full")
         for ref in ("live", "cache")] + ["sd15-lora-ddcpp", "sd15-full-ddcpp",
                                          "sd15-full-accum"]

# one launch of two processes and 13 tiny runs: about a minute on 2 cores
SLOW = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from ddspo_fast.train import Trainer, TrainConfig
    from ddspo_fast.train.sharding import held_numel, is_sharded

    for case in json.loads(Path(sys.argv[1]).read_text()):
        if "precompute" in case:
            from ddspo_fast.train.precompute import precompute

            done = precompute(TrainConfig.from_dict(case["precompute"]), case["out"], 1,
                              batch_size=3, pairs_per_shard=3, progress=False)
            # the main process completes the cache's metadata
            assert done["sharded"] and (done["complete"] or os.environ["RANK"] != "0"), done
            continue
        tr = Trainer(TrainConfig.from_dict(case))
        ref = tr.reference
        rec = {"world": tr.accelerator.num_processes,
               "policy": held_numel(tr.policy), "policy_sharded": is_sharded(tr.policy),
               "reference": None if ref is None or ref is tr.policy else held_numel(ref),
               "reference_sharded": ref is not None and is_sharded(ref),
               "reference_trains": ref is not None and ref is not tr.policy
                                   and any(p.requires_grad for p in ref.parameters()),
               "trainable_fp32": all(p.dtype == torch.float32 for p in tr.trainable),
               "banner": tr.banner()}
        tr.train()
        # clipping takes the norm over every process's shards: all-ones gradients have
        # the global norm sqrt(elements), and after clipping to 1 the norm is 1
        from ddspo_fast.train.sharding import clip_grad_norm_
        for p in tr.trainable:
            p.grad = torch.ones_like(p)
        rec["norms"] = [float(clip_grad_norm_(tr.trainable, 1.0)),
                        float(clip_grad_norm_(tr.trainable, 1e9)),
                        sum(p.numel() for p in tr.trainable)]
        Path(case["output_dir"], f"rank{tr.accelerator.process_index}.json").write_text(
            json.dumps(rec))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run: Path, family: str, lora: bool) -> dict:
    from safetensors.torch import load_file

    if lora:
        return load_file(str(run / "pytorch_lora_weights.safetensors"))
    return load_file(str(run / DENOISER_DIR[family] / "diffusion_pytorch_model.safetensors"))


def _case(family: str, lora: bool, cache: str | None, out: Path, **kw):
    return config(family, out, data=tiny_data(family, 8), lora_rank=4 if lora else None,
                  reference_cache=cache, **{**RUN, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case sharded over 2 processes (one launch) and unsharded in 1 process."""
    from ddspo_fast.train import Trainer
    from ddspo_fast.train.precompute import precompute

    tmp = tmp_path_factory.mktemp("fsdp")
    caches = {}
    for fam in FAMILIES:
        caches[fam] = str(tmp / f"cache-{fam}")
        precompute(_case(fam, False, None, tmp / "pre"), caches[fam], 1, batch_size=3,
                   pairs_per_shard=3, progress=False)
    pair_lora = tmp / "pair"
    _write_pair_lora("sd15", pair_lora)
    cases, baselines = [], []
    for name in CASES:
        fam, kind, ref = name.split("-")
        lora, cache = kind == "lora", caches[fam] if ref == "cache" else None
        kw = (dict(pair="lora", pair_lora=str(pair_lora)) if ref == "ddcpp" else
              dict(grad_accum=2) if ref == "accum" else {})
        # 2 processes x 1 pair = the 1-process run's 2 pairs per step; the sharded
        # full fine-tunes also recompute their blocks (checkpointing inside units)
        cases.append(_case(fam, lora, cache, tmp / "two" / name, batch_size=1,
                           gradient_checkpointing=not lora, **kw))
        baselines.append(_case(fam, lora, cache, tmp / "one" / name, batch_size=2, **kw))
    # a checkpoint round trip mid-run: new processes' worth of state (a new Trainer,
    # freshly sharded) continue from checkpoint 1 of a sharded run
    resumed = {}
    for name in ("sd15-full-live", "flux-lora-live"):
        fam, kind = name.split("-")[:2]
        src = tmp / "two" / name / "checkpoints" / "checkpoint-1"
        resumed[name] = tmp / "resumed" / name
        cases.append(_case(fam, kind == "lora", None, resumed[name], batch_size=1,
                           resume=str(src)))
    # bf16 gathers / fp32 reduce (MixedPrecisionPolicy), LoRA on a bf16 base
    cases.append(_case("sd15", True, None, tmp / "two" / "sd15-lora-bf16", batch_size=1,
                       mixed_precision="bf16"))
    # the reference cache computed by the sharded frozen denoiser
    pre = [{"precompute": _case(fam, False, None, tmp / "pre").to_dict(),
            "out": str(tmp / f"cache-two-{fam}")} for fam in FAMILIES]
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(pre + [c.to_dict() for c in cases]))
    script = tmp / "run_cases.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate_fsdp2.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(script), str(spec)]
    # the one-process runs go on here while the two processes start and train
    log = tmp / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
        try:
            for cfg in baselines:
                Trainer(cfg).train()
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0, log.read_text()[-6000:]
    return {"tmp": tmp, "resumed": resumed, "caches": caches}


@SLOW
@pytest.mark.parametrize("name", CASES)
def test_two_processes_equal_one(runs, name):
    fam, kind, ref = name.split("-")
    two, one = runs["tmp"] / "two" / name, runs["tmp"] / "one" / name
    # The two runs compute the same steps on the same pairs and draws (draws are a function
    # of pair id and seed), batched and reduced differently: fp32 rounding only. A forward
    # of the tiny models (sd15: 83 layers, longest accumulation 576 terms; FLUX fewer) is
    # within forward_rel = 1.3e-5 of another batching; losses are held to 1e-4 over the
    # steps (as the live-vs-cached runs of tests/test_refcache.py), weights to AdamW's bound.
    rel = 1e-4
    assert rel >= 5 * forward_rel(83, 576)
    want = _losses(one)
    assert len(want) == RUN["max_steps"]
    assert _losses(two) == pytest.approx(want, rel=rel, abs=1e-8)
    got_w, want_w = _final(two, fam, kind == "lora"), _final(one, fam, kind == "lora")
    assert_adam_runs_agree(got_w, want_w, [RUN["learning_rate"]] * RUN["max_steps"])

    ranks = [json.loads((two / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 and r["policy_sharded"] for r in ranks)
    assert "sharded (FSDP2)" in ranks[0]["banner"]
    assert all(r["trainable_fp32"] for r in ranks)
    for r in ranks:  # the global norm, on every process
        before, after, n = r["norms"]
        assert before == pytest.approx(n ** 0.5, rel=1e-5) and after == pytest.approx(1.0, rel=1e-5)
    # Each process holds a shard: the two together hold every element once, neither
    # anything near a whole copy (dim-0 chunks: at most half plus one row per tensor).
    for what in ("policy", "reference"):
        held = [r[what] for r in ranks]
        if held[0] is None:
            continue
        total = held[0][1]
        assert held[0][0] + held[1][0] == total, (what, held)
        assert max(h for h, _ in held) < 0.6 * total, (what, held)
    # a full fine-tune's live reference (with DD-CPP's pair adapters on it): a second
    # sharded module that never trains; LoRA's reference is the policy with adapters
    # off; a cached run has none
    assert (ranks[0]["reference"] is not None) == (kind == "full" and ref != "cache")
    assert ranks[0]["reference_sharded"] == (ref != "cache")
    assert not any(r["reference_trains"] for r in ranks)


@SLOW
@pytest.mark.parametrize("name", ["sd15-full-live", "flux-lora-live"])
def test_checkpoint_round_trip_continues_exactly(runs, name):
    """Resumed from the sharded checkpoint of step 1 by a fresh Trainer (its own shards
    loaded from the per-process files), step 2 equals the uninterrupted run's."""
    fam, kind = name.split("-")[:2]
    full, resumed = runs["tmp"] / "two" / name, runs["resumed"][name]
    ck = full / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        ["manifest.json", "sharding.json", "scheduler.json", "trainer_state.json"]
        + [f"{k}-rank{i}.safetensors" for k in ("trainable", "optimizer", "rng") for i in (0, 1)])
    # the same step on the same weights, inputs and process count: rounding only (buffers
    # at other addresses may round differently, tests/test_train_resume.py)
    assert _losses(resumed) == pytest.approx(_losses(full)[1:], rel=1e-5, abs=1e-8)
    assert_adam_runs_agree(_final(resumed, fam, kind == "lora"), _final(full, fam, kind == "lora"),
                           [RUN["learning_rate"]], first_step=2)


@SLOW
def test_exports_load(runs):
    from diffusers import DiffusionPipeline

    tmp = runs["tmp"]
    pipe = DiffusionPipeline.from_pretrained(str(tmp / "two" / "flux-full-live"))
    assert type(pipe).__name__ == "FluxPipeline"
    want = _final(tmp / "two" / "flux-full-live", "flux", False)
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    for fam in FAMILIES:
        base = DiffusionPipeline.from_pretrained(tiny_model(fam))
        before = {k: v.clone() for k, v in base.components[DENOISER_DIR[fam]].state_dict().items()}
        base.load_lora_weights(str(tmp / "two" / f"{fam}-lora-live"))
        assert base.get_list_adapters()  # the adapter is there, with the trained weights:
        base.fuse_lora()
        base.unload_lora_weights()
        after = base.components[DENOISER_DIR[fam]].state_dict()
        assert after.keys() == before.keys()
        assert any(not torch.equal(after[k], before[k]) for k in before)


@SLOW
def test_export_of_a_sharded_checkpoint_equals_the_final_weights_path(runs, tmp_path):
    """``ddspo-fast export`` puts a sharded checkpoint's shards back together."""
    from ddspo_fast.train.export import export

    tmp = runs["tmp"]
    for name in ("sd15-lora-live", "sd15-full-live"):
        got = export(tmp / "two" / name / "checkpoints" / "checkpoint-1", tmp_path / f"two-{name}")
        want = export(tmp / "one" / name / "checkpoints" / "checkpoint-1", tmp_path / f"one-{name}")
        assert got["kind"] == want["kind"]
        lora = got["kind"] == "lora"
        assert_adam_runs_agree(_final(Path(got["out"]), "sd15", lora),
                               _final(Path(want["out"]), "sd15", lora),
                               [RUN["learning_rate"]])


@SLOW
@pytest.mark.parametrize("fam", FAMILIES)
def test_sharded_precompute_equals_one_process(runs, fam):
    """``precompute`` under the FSDP2 launch (the frozen denoiser sharded, the shards of
    the cache split over the processes) writes the cache one process writes: the same
    files, values within the rounding of another computation of the forward (as above)."""
    from safetensors.torch import load_file

    from ddspo_fast.train import refcache as rc

    one, two = Path(runs["caches"][fam]), runs["tmp"] / f"cache-two-{fam}"
    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    assert rc.read_meta(two)["fingerprint"] == rc.read_meta(one)["fingerprint"]
    for f in files:
        got, want = load_file(str(two / f)), load_file(str(one / f))
        assert got.keys() == want.keys()
        for k in want:
            # rounding of the forward relative to the outputs' scale (elements near 0 have
            # no relative accuracy; the sharded UNet also runs without channels_last)
            scale = float(want[k].abs().max())
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * scale)


@SLOW
def test_bf16_sharded_lora_trains(runs):
    run = runs["tmp"] / "two" / "sd15-lora-bf16"
    losses = _losses(run)
    assert len(losses) == RUN["max_steps"] and all(map(lambda v: abs(v) < 10, losses))
    ranks = [json.loads((run / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["trainable_fp32"] for r in ranks)  # fp32 master weights under bf16 gathers
    assert "bf16" in ranks[0]["banner"]
    lora = _final(run, "sd15", True)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)


@SLOW
def test_another_world_size_is_refused(runs):
    from ddspo_fast.train import checkpoint as ckpt

    path = runs["tmp"] / "two" / "sd15-lora-live" / "checkpoints" / "checkpoint-1"
    assert ckpt.is_sharded(path) and ckpt.sharded_world_size(path) == 2
    with pytest.raises(ValueError, match="sharded over 2 processes, this run has 1"):
        ckpt.load_sharded(path, 0, 1)


def test_every_family_names_blocks_diffusers_has():
    import importlib

    from ddspo_fast.models import family_names
    from ddspo_fast.train.sharding import block_classes

    where = [importlib.import_module(f"diffusers.models.{m}") for m in (
        "attention", "resnet", "unets.unet_2d_blocks", "transformers.transformer_sd3",
        "transformers.sana_transformer",
        "transformers.transformer_flux", "transformers.transformer_qwenimage",
        "transformers.transformer_flux2")]
    for fam in family_names():
        for name in block_classes(fam):
            assert any(isinstance(getattr(m, name, None), type) for m in where), (fam, name)


def test_launch_options(monkeypatch):
    from accelerate.utils import DistributedType

    from ddspo_fast.train.sharding import ShardOptions, launch_options

    class Acc:
        distributed_type = DistributedType.MULTI_CPU
        state = object()

    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD",
              "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(k, raising=False)
    assert launch_options(Acc()) is None  # DDP / one process
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 1"):
        launch_options(Acc())
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert launch_options(Acc()) == ShardOptions(reshard_after_forward=False)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="fsdp_offload_params"):
        launch_options(Acc())


def test_launch_options_from_accelerates_fsdp2_plugin(monkeypatch):
    """On a GPU accelerate turns the config into its plugin: read from there the same."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from ddspo_fast.train.sharding import ShardOptions, launch_options

    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD",
              "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(k, raising=False)

    class Acc:
        distributed_type = DistributedType.FSDP

        def __init__(self, plugin):
            self.state = type("State", (), {"fsdp_plugin": plugin})()

    assert launch_options(Acc(FullyShardedDataParallelPlugin(fsdp_version=2))) == ShardOptions()
    assert launch_options(Acc(FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=False))) == ShardOptions(reshard_after_forward=False)
    with pytest.raises(ValueError, match="fsdp_offload_params"):
        launch_options(Acc(FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True)))
    with pytest.raises(ValueError, match="fsdp_version: 1"):
        launch_options(Acc(FullyShardedDataParallelPlugin(fsdp_version=1)))


def test_train_pair_refuses_a_sharded_launch(monkeypatch, tmp_path):
    """train-pair's adapters are not sharded: its trainer refuses the launch, naming it."""
    from ddspo_fast.train.errors import UnsupportedDistributedError
    from ddspo_fast.train.pair_policies import PairTrainConfig, PairTrainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    cfg = PairTrainConfig(model=tiny_model("sd15"), data=tiny_data("sd15"),
                          output_dir=str(tmp_path / "run"), mixed_precision="no", device="cpu",
                          progress=False, tensorboard=False)
    with pytest.raises(UnsupportedDistributedError, match="FSDP is not supported by"):
        PairTrainer(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,precision", [("optimizer", "adamw8bit", "no"),
                                                   ("optimizer", "adafactor", "no"),
                                                   ("compile", True, "no"),
                                                   ("mixed_precision", "fp16", "fp16")])
def test_settings_a_sharded_run_cannot_take_are_refused(tmp_path, field, value, precision):
    from ddspo_fast.train.sharding import check_config

    cfg = config("sd15", tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        check_config(cfg, precision)
    check_config(config("sd15", tmp_path), "bf16")  # adamw, bf16: taken
