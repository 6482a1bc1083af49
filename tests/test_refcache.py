"""The reference cache: deterministic draws, the precompute, policy-only steps.

A cached run and a live run with the same seed see the same draws, so their per-step
losses and final weights agree; the cached step calls the denoiser on exactly 2 rows per
pair-draw and holds no reference; a cache made for other settings is refused naming the
setting; a killed precompute resumes to a bit-identical cache.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tolerance import assert_adam_runs_agree, forward_rel
from _train_helpers import DENOISERS, config, count_rows, tiny_data, tiny_model

from ddspo_fast.train import Trainer
from ddspo_fast.train.draws import draw_seed, draws_needed, make_draws, pick_prompts
from ddspo_fast.train.precompute import precompute
from ddspo_fast.train.refcache import RefCache

# 4 pairs, 2 per micro-batch, K=2 draws per visit, 3 steps: 2 epochs -> 4 draws per pair.
# A learning rate at which the tiny models train smoothly: at 1e-3 a full fine-tune's loss
# explodes within 3 steps and rounding differences grow with it.
# beta/2 multiplies the fp32 rounding of the reference's outputs (which on a CPU depends on
# how rows are batched) in every margin; at beta = 100 that stays well under the loss
# tolerance below, while a wrong draw or target moves the loss by far more.
RUN = dict(max_steps=3, batch_size=2, timesteps_per_pair=2, learning_rate=1e-4, beta=100.0)
DRAWS = 4
# The precompute batches pairs differently from training (3 per forward, shards of 3
# pairs): the stored values must not depend on the batch composition.
PRE = dict(batch_size=3, pairs_per_shard=3, progress=False)


def _mix_file(tmp_path) -> str:
    f = tmp_path / "mix.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "neg_prompts": n}) + "\n" for p, n in
                         [("a red car", ["a car", "red"]), ("a blue sky with a tree", ["a sky"])]))
    return str(f)


def _pair_lora(tmp_path) -> str:
    from test_train_families import _write_pair_lora

    root = tmp_path / "pair"
    _write_pair_lora("sd15", root)
    return str(root)


def _train(tr) -> tuple[list, list]:
    """Losses and ref_mse of every step of a full run."""
    losses, refs = [], []
    batches = tr.batches()
    while tr.global_step < tr.config.max_steps:
        out = tr.train_step(next(batches))
        losses.append(out["loss"].item())
        refs.append(out["ref_mse"])
    return losses, refs


# ------------------------------------------------------------------ draws
def _adapter(family="sd15"):
    from ddspo_fast.models import load_adapter

    return load_adapter(tiny_model(family), components=("denoiser",))


@pytest.mark.parametrize("family", ["sd15", "sana"])
def test_draws_are_a_function_of_seed_pair_and_index_only(family):
    a = _adapter(family)
    ids = ["p0", "p1", "p2"]
    whole = make_draws(a, ids, [[0, 1]] * 3, (4, 8, 8), seed=7, mix_schedule="sigmoid",
                       mix_lambda=20.0)
    # another batch composition, order and draw grouping: the same rows
    part = make_draws(a, ["p2", "p0"], [[1], [0, 1]], (4, 8, 8), seed=7, mix_schedule="sigmoid",
                      mix_lambda=20.0)
    for got, want in ((0, 5), (1, 0), (2, 1)):
        assert torch.equal(part.t[got], whole.t[want])
        assert torch.equal(part.noise[got], whole.noise[want])
        assert torch.equal(part.pick[got], whole.pick[want])
        assert torch.equal(part.mixed[got], whole.mixed[want])
    # every row its own draw; another seed, other draws
    assert len({tuple(r.flatten()[:4].tolist()) for r in whole.noise}) == 6
    other = make_draws(a, ids, [[0, 1]] * 3, (4, 8, 8), seed=8)
    assert not torch.equal(other.noise, whole.noise)
    assert draw_seed(7, "p0", 1) != draw_seed(7, "p1", 0) != draw_seed(8, "p0", 1)
    # the mixing decision is u < p(tau), decided on the CPU
    from ddspo_fast.train.randcond import mix_probability

    p = mix_probability(a.noise_level(whole.t), "sigmoid", 20.0)
    assert torch.equal(whole.mixed, whole.u < p)
    ps, ns = pick_prompts([("a", ["x"]), ("b", ["y", "z"])], torch.tensor([[0, 5], [1, 1]]))
    assert ps == ["a", "b"] and ns == ["x", "z"]


def test_draws_needed_counts_epochs_touched():
    # 3 steps x 1 accumulation over 2 micro-batches per epoch: 2 epochs, K=2 each
    assert draws_needed(3, 1, 2, 2) == 4
    assert draws_needed(2, 1, 2, 1) == 1
    assert draws_needed(5, 2, 4, 3) == 9


def test_live_draws_do_not_depend_on_batch_size(tmp_path):
    one = Trainer(config("sd15", tmp_path / "a", batch_size=1, timesteps_per_pair=2))
    two = Trainer(config("sd15", tmp_path / "b", batch_size=2, timesteps_per_pair=2))
    b2 = next(two.batches())
    i2 = two.make_inputs(b2)
    for j, pid in enumerate(b2["id"]):
        b1 = {k: (v[j:j + 1] if torch.is_tensor(v) else
                  {n: t[j:j + 1] for n, t in v.items()} if isinstance(v, dict) else v[j:j + 1])
              for k, v in b2.items()}
        i1 = one.make_inputs(b1)
        assert torch.equal(i1.t, i2.t[2 * j:2 * j + 2])
        assert torch.equal(i1.noise, i2.noise[2 * j:2 * j + 2])


# ------------------------------------------------------------------ cached == live
CASES = {
    "sd15-tfcpp-full": ("sd15", {}, False),
    "sd15-tfcpp-lora-mix": ("sd15", {"lora_rank": 2}, True),
    "sd15-dpo": ("sd15", {"objective": "dpo"}, False),
    "sd15-dpo-mix": ("sd15", {"objective": "dpo", "lora_rank": 2}, True),
    "sd15-ddcpp-lora": ("sd15", {"pair": "lora", "lora_rank": 2}, False),
    "sd15-ddcpp-full-mix": ("sd15", {"pair": "lora"}, True),
    "sana-tfcpp-lora-mix": ("sana", {"lora_rank": 2}, True),
    "sana-dpo-lora": ("sana", {"objective": "dpo", "lora_rank": 2}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_run_equals_live_run(case, tmp_path):
    family, kw, mixing = CASES[case]
    kw = dict(kw, **RUN)
    if kw.get("pair") == "lora":
        kw["pair_lora"] = _pair_lora(tmp_path)
    if mixing:
        kw.update(rand_cond_prompts=_mix_file(tmp_path), rand_cond_schedule="sigmoid",
                  rand_cond_lambda=2.0)
    live_cfg = config(family, tmp_path / "live", **kw)
    summary = precompute(live_cfg, tmp_path / "cache", DRAWS, **PRE)
    assert summary["complete"] and summary["pair_draws_computed"] == 4 * DRAWS

    live = Trainer(live_cfg)
    want, want_ref = _train(live)
    want_w = {n: p.detach().clone() for n, p in live.policy.named_parameters() if p.requires_grad}
    del live
    gc.collect()
    den_cls = getattr(__import__("diffusers"), DENOISERS[family])
    alive = lambda: sum(isinstance(o, den_cls) for o in gc.get_objects())  # noqa: E731
    before = alive()

    cached = Trainer(config(family, tmp_path / "cached", reference_cache=str(tmp_path / "cache"),
                            **kw))
    # no reference copy, no adapters-off module, no pair adapters: one denoiser
    assert cached.reference is None and alive() - before == 1
    names = [n for n, _ in cached.policy.named_parameters()]
    assert not any(".win." in n or ".lose." in n for n in names)
    with count_rows(family) as calls:
        got, got_ref = _train(cached)
    # policy only: one call per step on 2 rows per pair-draw
    assert calls == [2 * RUN["batch_size"] * RUN["timesteps_per_pair"]] * RUN["max_steps"]

    # The two runs differ only in how the reference's forward was batched (precompute vs
    # live), so in fp32 rounding: a forward of the tiny models (sd15: 83 layers, longest
    # accumulation 576 terms; SANA smaller) is within forward_rel = sqrt(83*576)*2^-24 =
    # 1.3e-5 relative of another batching of it; losses and reference MSEs are held to
    # 1e-4 relative, several times that over the 3 steps, while a wrong draw, target or
    # cache row moves them by O(1). The weights: AdamW's bound (tests/_tolerance.py).
    rel = 1e-4
    assert rel >= 5 * forward_rel(83, 576)
    assert got == pytest.approx(want, rel=rel, abs=1e-8)
    for r1, r2 in zip(got_ref, want_ref):
        torch.testing.assert_close(r1, r2, rtol=rel, atol=1e-8)
    got_w = dict(cached.policy.named_parameters())
    assert all(got_w[n].requires_grad for n in want_w)
    assert_adam_runs_agree({n: got_w[n] for n in want_w}, want_w,
                           [RUN["learning_rate"]] * RUN["max_steps"])
    if mixing:  # both kinds of rows were seen: mixed ones take the cached TF-CPP targets
        a = cached.adapter
        d = make_draws(a, cached.dataset.ids(), [list(range(DRAWS))] * 4, (4, 8, 8),
                       seed=cached.config.seed, mix_schedule="sigmoid", mix_lambda=2.0)
        assert d.mixed.any() and (~d.mixed).any()


def test_full_finetune_with_cache_holds_only_the_policy(tmp_path):
    cfg = config("sd15", tmp_path / "run", max_steps=1)
    precompute(cfg, tmp_path / "cache", 1, **PRE)
    tr = Trainer(cfg.replace(reference_cache=str(tmp_path / "cache")))
    assert tr.reference is None and not tr.need_text
    modules = [m for m in tr.adapter.pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert modules == [tr.policy]
    n_policy = sum(p.numel() for p in tr.policy.parameters())
    assert sum(p.numel() for m in modules for p in m.parameters()) == n_policy
    assert tr.train()["steps"] == 1


# ------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    cfg = config("sd15", root / "run", max_steps=1)
    precompute(cfg, root / "cache", 1, **PRE)
    return root


def _other_model(root: Path) -> str:
    from safetensors.torch import load_file, save_file

    dst = root / "other-model"
    if not dst.exists():
        shutil.copytree(tiny_model("sd15"), dst)
        f = dst / "unet" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        k = sorted(sd)[0]
        sd[k] = sd[k] + 1e-3
        save_file(sd, str(f))
    return str(dst)


@pytest.mark.parametrize("change, field", [
    ({"objective": "dpo"}, "objective"),
    ({"data": "OTHER_DATA"}, "data"),
    ({"model": "OTHER_MODEL"}, "model"),
    ({"seed": 1}, "seed"),
    ({"mixed_precision": "bf16"}, "mixed_precision"),
])
def test_mismatched_cache_is_refused_naming_the_setting(small_cache, change, field):
    if change.get("data") == "OTHER_DATA":
        change = {"data": tiny_data("sd15", 4, seed=1)}
    if change.get("model") == "OTHER_MODEL":
        change = {"model": _other_model(small_cache)}
    cfg = config("sd15", small_cache / "x", max_steps=1,
                 reference_cache=str(small_cache / "cache"), **change)
    with pytest.raises(ValueError, match=rf"^reference_cache: .* another run: {field}\b"):
        Trainer(cfg)


def test_too_few_draws_says_how_many_before_step_one(small_cache):
    # 3 steps over 2 micro-batches per epoch: 2 epochs x K=2 draws
    cfg = config("sd15", small_cache / "y", max_steps=3, timesteps_per_pair=2,
                 reference_cache=str(small_cache / "cache"))
    with pytest.raises(ValueError, match=r"needs 4 draws per pair .* holds 1; rerun the "
                                         r"precompute with --draws 4"):
        Trainer(cfg)


def test_extending_a_cache_keeps_its_draws(small_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(small_cache / "cache", cache)
    first = (cache / "draw-00000" / "shard-00000.safetensors").read_bytes()
    cfg = config("sd15", tmp_path / "run", max_steps=1)
    s = precompute(cfg, cache, 2, **PRE)
    assert s["pair_draws_computed"] == 4 and RefCache(cache).draws == 2
    assert (cache / "draw-00000" / "shard-00000.safetensors").read_bytes() == first


def test_precompute_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="^out: .* not empty and holds no reference cache"):
        precompute(config("sd15", tmp_path / "r"), tmp_path / "out", 1, **PRE)


# ------------------------------------------------------------------ crash safety
_DRIVER = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from ddspo_fast.train import TrainConfig
from ddspo_fast.train import precompute as pc

real, calls = pc._write_shard, [0]

def dying(path, tensors):
    calls[0] += 1
    if calls[0] == 3:  # killed while writing the third shard: a partial temp file is left
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ("." + path.name + ".partial.tmp")).write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, tensors)

pc._write_shard = dying
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
pc.precompute(cfg, sys.argv[2], int(sys.argv[3]), batch_size=2, pairs_per_shard=3,
              progress=False)
"""


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)}


def test_killed_precompute_resumes_to_a_bit_identical_cache(tmp_path):
    mix = _mix_file(tmp_path)
    cfg = config("sd15", tmp_path / "run", objective="dpo", rand_cond_prompts=mix,
                 rand_cond_schedule="sigmoid")
    pre = dict(batch_size=2, pairs_per_shard=3, progress=False)
    precompute(cfg, tmp_path / "straight", 2, **pre)
    want = _files(tmp_path / "straight")
    assert len([f for f in want if f.endswith(".safetensors")]) == 4  # 2 draws x 2 shards

    drv = tmp_path / "driver.py"
    drv.write_text(_DRIVER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(drv), json.dumps(cfg.to_dict()),
                           str(tmp_path / "killed"), "2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    half = _files(tmp_path / "killed")
    assert len([f for f in half if f.endswith(".safetensors")]) == 2
    assert RefCache(tmp_path / "killed").draws == 0  # not usable yet
    with pytest.raises(ValueError, match="holds 0"):
        Trainer(cfg.replace(reference_cache=str(tmp_path / "killed")))

    s = precompute(cfg, tmp_path / "killed", 2, **pre)
    assert s["pair_draws_computed"] == 4  # only the two missing shards
    assert _files(tmp_path / "killed") == want
    assert not list((tmp_path / "killed").rglob("*.tmp"))

    # the same cache split over two processes by hand, one after the other
    for rank in (0, 1):
        precompute(cfg, tmp_path / "split", 2, process_index=rank, num_processes=2, **pre)
    assert _files(tmp_path / "split") == want


# ------------------------------------------------------------------ command line
def test_cli_writes_a_cache_and_names_bad_flags(tmp_path, capsys):
    from ddspo_fast import cli

    base = ["precompute", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"), "--mixed-precision",
            "no", "--device", "cpu", "--no-progress", "--batch-size", "4"]
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--draws", "1"]) == 0
    err = capsys.readouterr().err
    assert "reference cache" in err and "4 pairs x 1 draws" in err
    assert RefCache(tmp_path / "c").draws == 1
    assert cli.main(base + ["--out", str(tmp_path / "d"), "--draws", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ddspo-fast: error: argument --draws: expected an int >= 1, got 0"]
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--draws", "1", "--seed", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddspo-fast: error: argument --out: ") and "seed differs" in err
