"""`train-pair`: DD-CPP's winning / losing LoRA adapters, trained as the official
train_lora_target.py does (plain denoising loss, shared t, independent noise, both on c),
on one base with one stacked forward, written where `train --pair lora` reads them."""

import json
import os
import stat

import pytest
import torch

from _cli_helpers import assert_one_line_error
from _tolerance import assert_adam_runs_agree
from _train_helpers import Killed, config, die_mid_step, tiny_data, tiny_model

from ddspo_fast import cli
from ddspo_fast.train import Trainer
from ddspo_fast.train import checkpoint as ckpt
from ddspo_fast.train.lora import LOSE, WIN, AdapterSwitch, find_pair_dirs
from ddspo_fast.train.pair_policies import (LOSE_DIR, WIN_DIR, NonFiniteLossError,
                                            PairTrainConfig, PairTrainer, SplitAdapters,
                                            add_pair_adapters)


def pair_config(out, family="sd15", **kw):
    base = dict(model=tiny_model(family), data=tiny_data(family), output_dir=str(out),
                mixed_precision="no", max_steps=2, batch_size=2, checkpoint_every=0,
                log_every=1, progress=False, tensorboard=False, learning_rate=1e-2,
                device="cpu")
    base.update(kw)
    return PairTrainConfig(**base)


def saved_adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _randomize(module, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(f".{a}." in n for a in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- the stacked forward
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sana"])
def test_split_forward_equals_one_adapter_per_half(family):
    """One forward on [x_w ; x_l] with rows routed to win / lose equals running the base
    + win on x_w and the base + lose on x_l separately: outputs and LoRA gradients."""
    from ddspo_fast.models import load_adapter

    a = load_adapter(tiny_model(family), components=("denoiser",))
    den = a.denoiser
    add_pair_adapters(den, 2, 2.0, a.lora_targets, 0.0, seed=0)
    _randomize(den, (WIN, LOSE))
    den.requires_grad_(False)
    lora = {n: p for n, p in den.named_parameters() if ".win." in n or ".lose." in n}
    for p in lora.values():
        p.requires_grad_(True)
    c, h, w = a.latent_shape()
    n = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n, c, h, w, generator=g)
    t = torch.tensor([10, 900] * 2) if not a.flow else torch.tensor([100.0, 800.0] * 2)
    from ddspo_fast.testing import tiny_prompts

    enc = load_adapter(tiny_model(family), components=("text",),
                       text_dtype=torch.float32).encode_prompts(
        [r["prompt"] for r in tiny_prompts(n)])
    cond = {k: torch.cat([v, v]) for k, v in enc.items()}

    with SplitAdapters(den, (WIN, LOSE)):
        stacked = a.predict(den, x, t, cond)
        stacked.square().mean().backward()
    got = {k: p.grad.clone() for k, p in lora.items()}
    for p in lora.values():
        p.grad = None

    sw = AdapterSwitch(den)
    halves = []
    for i, name in enumerate((WIN, LOSE)):
        rows = slice(i * n, (i + 1) * n)
        with sw.use([name]):
            halves.append(a.predict(den, x[rows], t[rows], {k: v[rows] for k, v in cond.items()}))
    separate = torch.cat(halves)
    separate.square().mean().backward()
    # One forward on 2n rows vs two on n: the same math batched differently, equal up to
    # fp32 rounding, about forward_rel(83, 576) = 1.3e-5 relative for the tiny UNet
    # (tests/_tolerance.py); the gradients, one backward more, get 10x that again.
    torch.testing.assert_close(stacked, separate, rtol=1e-4, atol=1e-5)
    for k, p in lora.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-3, atol=1e-6)
    assert any(got[k].abs().sum() > 0 for k in got if ".win." in k)
    assert any(got[k].abs().sum() > 0 for k in got if ".lose." in k)
    # removed: the layers behave as before (both adapters back to their own switch)
    with sw.use(None):
        base = a.predict(den, x, t, cond)
    assert not torch.allclose(base, separate.detach())


# ---------------------------------------------------------------- the official objective
def test_loss_is_the_official_pair_objective(tmp_path):
    """loss = mse(phi_w(x_t^w, c), eps_w) + mse(phi_l(x_t^l, c), eps_l): shared t,
    independent noise, both conditioned on the positive prompt; one denoiser call on 2B
    rows; one base copy carrying both adapters."""
    tr = PairTrainer(pair_config(tmp_path))
    try:
        batch = next(tr.batches())
        seen = []
        predict = tr.adapter.predict

        def spy(mod, x_t, t, cond):
            seen.append((x_t.detach().clone(), t.clone(), {k: v.clone() for k, v in cond.items()}))
            return predict(mod, x_t, t, cond)

        tr.adapter.predict = spy
        loss, mse_w, mse_l = tr.compute_loss(batch)
        tr.adapter.predict = predict
        assert len(seen) == 1  # one stacked forward
        x_t, t, cond = seen[0]
        n = len(batch["latent_w"])
        assert x_t.shape[0] == 2 * n and torch.equal(t[:n], t[n:])
        pos = batch["cond"]["prompt_embeds"]
        for half in (cond["prompt_embeds"][:n], cond["prompt_embeds"][n:]):
            torch.testing.assert_close(half, pos.float())
        ac = tr.adapter._table("cpu")[t.long()].reshape(-1, 1, 1, 1)
        x0 = torch.cat([batch["latent_w"], batch["latent_l"]]).float()
        eps = (x_t - ac.sqrt() * x0) / (1 - ac).sqrt()
        assert not torch.allclose(eps[:n], eps[n:])  # independent noise
        tr.split.remove()
        sw = AdapterSwitch(tr.denoiser)
        with torch.no_grad(), sw.use([WIN]):
            pw = tr.adapter.predict(tr.denoiser, x_t[:n], t[:n], {"prompt_embeds": pos.float()})
        with torch.no_grad(), sw.use([LOSE]):
            pl = tr.adapter.predict(tr.denoiser, x_t[n:], t[n:], {"prompt_embeds": pos.float()})
        want_w = torch.nn.functional.mse_loss(pw, eps[:n])
        want_l = torch.nn.functional.mse_loss(pl, eps[n:])
        torch.testing.assert_close(mse_w.detach(), want_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mse_l.detach(), want_l, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss.detach(), want_w + want_l, rtol=1e-4, atol=1e-5)
        # one copy of the base: non-LoRA parameters counted once
        from diffusers import UNet2DConditionModel

        base_numel = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(
            tiny_model("sd15"), subfolder="unet").parameters())
        ours = sum(p.numel() for n_, p in tr.denoiser.named_parameters() if "lora_" not in n_)
        assert ours == base_numel
        assert all(".win." in n_ or ".lose." in n_ for n_ in tr.trainable_names)
    finally:
        tr.close()


def test_defaults_are_the_official_ones():
    from ddspo_fast.models import get_family

    c = PairTrainConfig()
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (4, 4.0, 0.0)
    assert (c.learning_rate, c.lr_scheduler, c.lr_warmup_steps) == (1e-4, "constant_with_warmup", 0)
    assert (c.max_grad_norm, c.optimizer, c.batch_size, c.num_epochs) == (1.0, "adamw", 1, 100)
    assert c.weight_decay == torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"]
    assert c.checkpoint_every == 500 and c.max_steps is None
    for fam in ("sd15", "sdxl"):
        assert list(get_family(fam).lora_targets) == ["to_q", "to_k", "to_v", "to_out.0"]


# ---------------------------------------------------------------- end to end
def test_cli_train_pair_then_dd_cpp_training(tmp_path, capsys):
    """Done-when: train-pair (CLI) writes the pair; train with pair='lora' runs on it; the
    adapters differ from each other and from the base; the official loader reads them."""
    out = tmp_path / "pair"
    model, data = tiny_model("sd15"), tiny_data("sd15")
    capsys.readouterr()
    old = os.umask(0o022)
    try:
        rc = cli.main(["train-pair", "--model", model, "--data", data,
                       "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
                       "--learning-rate", "1e-2", "--mixed-precision", "no", "--device", "cpu",
                       "--log-every", "1", "--checkpoint-every", "2", "--no-progress",
                       "--no-tensorboard"])
    finally:
        os.umask(old)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.startswith("trained pair: ") and "steps=3" in cap.out
    assert find_pair_dirs(out) == (out / WIN_DIR, out / LOSE_DIR)
    for d in (out / WIN_DIR, out / LOSE_DIR):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    win, lose = saved_adapter(out / WIN_DIR), saved_adapter(out / LOSE_DIR)
    assert win.keys() == lose.keys() and all(k.startswith("base_model.model.") for k in win)
    bs = [k for k in win if "lora_B" in k]
    assert bs and all(win[k].abs().sum() > 0 and lose[k].abs().sum() > 0 for k in bs)
    assert any(not torch.equal(win[k], lose[k]) for k in bs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss"] > 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]

    tr = Trainer(config("sd15", tmp_path / "ddspo", pair="lora", pair_lora=str(out),
                        lora_rank=4, max_steps=2))
    summary = tr.train()
    assert summary["steps"] == 2 and summary["loss"] is not None
    inp = tr.make_inputs(next(tr.batches()))
    with torch.no_grad():
        ref = tr._reference_fn(inp.x_w, inp.t, inp.cond)
        w = tr._phi(WIN)(inp.x_w, inp.t, inp.cond)
        lo = tr._phi(LOSE)(inp.x_w, inp.t, inp.cond)
    assert not torch.allclose(ref, w) and not torch.allclose(ref, lo) and not torch.allclose(w, lo)

    # the official consumer: PeftModel.from_pretrained(copy of the base, pos_lora_unet)
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    base = UNet2DConditionModel.from_pretrained(tiny_model("sd15"), subfolder="unet")
    official = PeftModel.from_pretrained(base, str(out / WIN_DIR)).eval()
    with torch.no_grad():
        theirs = official(inp.x_w, inp.t, inp.cond["prompt_embeds"]).sample
    # The same weights run by peft and by us: equal up to forward rounding (as above).
    torch.testing.assert_close(theirs, w, rtol=1e-4, atol=1e-5)


def test_resume_gives_the_same_adapters_as_an_uninterrupted_run(tmp_path):
    kw = dict(grad_accum=2, batch_size=1, max_steps=4, checkpoint_every=2, lr_warmup_steps=1,
              lr_scheduler="cosine", data=tiny_data("sd15", 6))
    full = PairTrainer(pair_config(tmp_path / "a", **kw))
    full.train()

    part = PairTrainer(pair_config(tmp_path / "b", **kw))
    die_mid_step(part, 3)  # after checkpoint 2
    with pytest.raises(Killed):
        part.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2]
    assert not (tmp_path / "b" / WIN_DIR).exists()
    with pytest.raises(ValueError, match="^output_dir: .*--resume latest"):
        PairTrainer(pair_config(tmp_path / "b", **kw))  # a fresh start would lose the run

    resumed = PairTrainer(pair_config(tmp_path / "b", resume="latest", **kw))
    assert resumed.global_step == 2 and resumed.micro_step == 4
    assert resumed.train()["steps"] == 4
    for d in (WIN_DIR, LOSE_DIR):
        want, got = saved_adapter(tmp_path / "a" / d), saved_adapter(tmp_path / "b" / d)
        # Not bit-equal by guarantee (BLAS rounding may follow buffer alignment): AdamW's
        # bound over the 2 steps after the checkpoint (tests/_tolerance.py).
        assert_adam_runs_agree(got, want, [full.config.learning_rate] * 2,
                               first_step=3)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------- things going wrong
def test_non_finite_loss_stops_keeps_checkpoints_writes_no_adapters(tmp_path, monkeypatch, capsys):
    real = PairTrainer.compute_loss

    def nan_at_step_3(self, batch):
        loss, w, l = real(self, batch)
        if self.global_step == 2:
            loss = loss * float("nan")
        return loss, w, l

    monkeypatch.setattr(PairTrainer, "compute_loss", nan_at_step_3)
    tr = PairTrainer(pair_config(tmp_path / "py", max_steps=4, checkpoint_every=1, log_every=2))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        tr.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "py")] == [1, 2]
    assert not (tmp_path / "py" / WIN_DIR).exists() and not (tmp_path / "py" / LOSE_DIR).exists()

    capsys.readouterr()  # only what the command itself prints
    rc = cli.main(["train-pair", "--model", tiny_model("sd15"), "--data", tiny_data("sd15"),
                   "--output-dir", str(tmp_path / "cli"), "--max-steps", "3", "--batch-size", "2",
                   "--mixed-precision", "no", "--device", "cpu", "--no-progress",
                   "--no-tensorboard"])
    assert rc == 1
    assert_one_line_error(capsys.readouterr().err, "NaN/inf at step 3")


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    model, data = tiny_model("sd15"), tiny_data("sd15")
    common = ["--device", "cpu", "--no-progress", "--max-steps", "1"]
    cases = [
        (["--model", model, "--data", str(tmp_path / "nope")], ("--data", "is not a directory")),
        (["--model", str(tmp_path / "nomodel"), "--data", data], ("--model", "does not exist")),
        (["--model", str(tmp_path / "empty"), "--data", data], ("--model", "model_index.json")),
        (["--model", tiny_model("sana"), "--data", data], ("sd15",)),  # data of another family
        (["--model", model, "--data", data, "--lora-rank", "0"], ("--lora_rank", "int >= 1")),
        (["--model", model, "--data", data, "--lora-targets", "nonexistent_proj"],
         ("--lora_targets", "nonexistent_proj")),
        (["--model", model, "--data", data, "--timestep-sampling", "logit_normal"],
         ("--timestep_sampling", "sd15")),
    ]
    (tmp_path / "empty").mkdir()  # a folder that is not a model (beside the output)
    capsys.readouterr()  # building the tiny models may print; only the command's output counts
    for args, fragments in cases:
        rc = cli.main(["train-pair", *args, "--output-dir", str(tmp_path / "o"), *common])
        err = capsys.readouterr().err
        assert rc in (1, 2), (args, err)
        assert_one_line_error(err, *fragments)


def test_output_dir_is_locked_and_kept(tmp_path):
    from ddspo_fast.fsio import DirLock, LockedError

    with DirLock(tmp_path / "o"):
        with pytest.raises(LockedError, match="in use"):
            PairTrainer(pair_config(tmp_path / "o"))
    PairTrainer(pair_config(tmp_path / "o", max_steps=1)).train()
    with pytest.raises(ValueError, match="already holds"):
        PairTrainer(pair_config(tmp_path / "o", max_steps=1))
    before = saved_adapter(tmp_path / "o" / WIN_DIR)
    PairTrainer(pair_config(tmp_path / "o", max_steps=1, overwrite=True, seed=5)).train()
    after = saved_adapter(tmp_path / "o" / WIN_DIR)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_config_validation_and_yaml(tmp_path):
    for bad, field in [({"lora_rank": 0}, "lora_rank"), ({"lora_dropout": 1.5}, "lora_dropout"),
                       ({"mixed_precision": "fp8"}, "mixed_precision"),
                       ({"max_steps": 0}, "max_steps"), ({"overwrite": "yes"}, "overwrite")]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            PairTrainConfig(**bad)
    with pytest.raises(ValueError, match="^lora_rnak: unknown config field.*lora_rank"):
        PairTrainConfig.from_dict({"lora_rnak": 2})
    p = tmp_path / "c.yaml"
    PairTrainConfig(model="m", data="d", lora_rank=8, lora_targets=["to_q"]).to_yaml(p)
    c = PairTrainConfig.from_yaml(p, overrides={"lora-alpha": 2.0})
    assert (c.lora_rank, c.lora_alpha, c.lora_targets) == (8, 2.0, ["to_q"])


def test_help_lists_the_flags(capsys):
    assert cli.main(["train-pair", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--output-dir", "--lora-rank", "--resume", "--overwrite",
                 "--config", "--max-steps", "--timestep-sampling"):
        assert flag in out, flag


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sana"])
def test_every_family_trains_a_step(tmp_path, family):
    tr = PairTrainer(pair_config(tmp_path, family, max_steps=1, batch_size=1))
    s = tr.train()
    assert s["steps"] == 1 and s["loss"] > 0
    win = saved_adapter(tmp_path / WIN_DIR)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in win.items())


def test_official_layout_without_embeddings_encodes_the_prompt(tmp_path):
    from test_data_official import build_official

    data = build_official(tmp_path / "official")
    tr = PairTrainer(pair_config(tmp_path / "o", data=str(data), max_steps=1, batch_size=2))
    assert tr.need_text
    encoded = []
    orig = tr.adapter.encode_prompts
    tr.adapter.encode_prompts = lambda ps: encoded.append(list(ps)) or orig(ps)
    s = tr.train()
    assert s["steps"] == 1 and s["loss"] > 0
    assert len(encoded) == 1 and all(p.startswith("two green apples") for p in encoded[0])


# ---------------------------------------------------------------- one training run
# train-pair is a TrainingRun like train: the same resume checks, intact-checkpoint
# fall-back, precision resolution, error types and distributed refusal.
@pytest.mark.parametrize("change", [{"seed": 1}, {"batch_size": 2, "grad_accum": 1}])
def test_resume_with_another_run_defining_setting_is_refused(tmp_path, change):
    from ddspo_fast.train.errors import ResumeMismatchError

    kw = dict(grad_accum=2, batch_size=1, max_steps=1, checkpoint_every=1)
    PairTrainer(pair_config(tmp_path, **kw)).train()
    field = next(iter(change))
    with pytest.raises(ResumeMismatchError, match=f"^{field}: the checkpoint"):
        PairTrainer(pair_config(tmp_path, resume="latest", **{**kw, **change, "max_steps": 2}))


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    kw = dict(max_steps=2, checkpoint_every=1, batch_size=1)
    PairTrainer(pair_config(tmp_path, **kw)).train()
    damaged = ckpt.final_path(tmp_path, 2) / ckpt.TRAINABLE_FILE
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated
    tr = PairTrainer(pair_config(tmp_path, resume="latest", **{**kw, "max_steps": 3}))
    try:
        assert tr.global_step == 1
        assert tr.last_checkpoint == str(ckpt.final_path(tmp_path, 1))
    finally:
        tr.close()


def test_mixed_precision_auto_resolves_like_train(tmp_path):
    tr = PairTrainer(pair_config(tmp_path, mixed_precision="auto", max_steps=1, batch_size=1))
    assert tr.mixed_precision == "no" and tr.weight_dtype == torch.float32  # on the CPU
    assert tr.train()["steps"] == 1


def test_errors_are_training_errors_and_nothing_private_is_shared():
    import pathlib
    import re

    from ddspo_fast.train.errors import TrainingError

    assert issubclass(NonFiniteLossError, TrainingError)
    train = pathlib.Path(ckpt.__file__).parent
    for f in train.glob("*.py"):
        text = f.read_text()
        assert not re.search(r"from \.trainer import _|from \.trainer import \([^)]*\b_", text), f


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
@pytest.mark.parametrize("trainer", ["train", "train-pair"])
def test_sharded_launches_are_refused_by_both_trainers(tmp_path, monkeypatch, kind, trainer):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from _train_helpers import config

    monkeypatch.setattr(Accelerator, "distributed_type",
                        property(lambda self: getattr(DistributedType, kind)))
    cfg = config("sd15", tmp_path) if trainer == "train" else pair_config(tmp_path)
    cls = Trainer if trainer == "train" else PairTrainer
    # train shards an FSDP2 launch (tests/test_fsdp.py); FSDP1 (no plugin saying 2) it refuses
    want = ("^fsdp_version: 1" if (trainer, kind) == ("train", "FSDP")
            else "^distributed_type: .* not supported")
    with pytest.raises(ValueError, match=want):
        cls(cfg)
    assert not (tmp_path / ".lock").exists()
