"""The 2D toy: data, metrics, the fine-tuning rows, and a tiny end-to-end demo run."""
import json
from pathlib import Path

import pytest
import torch

from ddspo_fast.demo import format_table, main, passed, verdict
from ddspo_fast.demo import metrics as M
from ddspo_fast.demo import toy

TINY = dict(num_conditions=4, hidden=32, blocks=1, n_train=2000, ref_steps=60, ref_batch=128,
            sample_steps=8, n_pairs=128, ft_steps=6, ft_batch=32, n_eval=40)


def test_modes_are_distinct_and_truth_lands_on_them():
    cfg = toy.ToyConfig(num_conditions=6, radius=2.0, sigma=0.25)
    mu = toy.mode_centres(cfg)
    assert mu.shape == (6, 2)
    assert torch.allclose(mu.norm(dim=1), torch.full((6,), 2.0), atol=1e-5)
    assert torch.pdist(mu).min() > 1.9            # neighbours 2 * r * sin(pi / 6) = 2 apart
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat(200)
    x = toy.sample_truth(cfg, labels, g)
    assert (M.nearest_mode(x, mu) == labels).float().mean() > 0.99
    assert abs(M.mode_spread(x[labels == 0], mu, 0) - 0.25) < 0.03


def test_training_labels_are_corrupted_as_configured():
    cfg = toy.ToyConfig(num_conditions=5, n_train=20000, label_noise=0.3)
    x, label, true = toy.make_training_data(cfg, torch.Generator().manual_seed(1))
    wrong = label != true
    assert abs(wrong.float().mean().item() - 0.3 * 1.0) < 0.02
    # every point still sits on its *true* mode
    assert (M.nearest_mode(x, toy.mode_centres(cfg)) == true).float().mean() > 0.99
    # wrong labels are spread over the other conditions
    counts = torch.bincount((label[wrong] - true[wrong]) % 5, minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 0.2 * wrong.sum() / 4


def test_condition_accuracy_on_known_points():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    right = {k: mu[k].repeat(10, 1) + 0.05 for k in range(4)}
    assert M.condition_accuracy(right, mu) == 1.0
    wrong = {k: mu[(k + 1) % 4].repeat(10, 1) for k in range(4)}
    assert M.condition_accuracy(wrong, mu) == 0.0
    half = {k: torch.cat([mu[k].repeat(5, 1), mu[(k + 2) % 4].repeat(5, 1)]) for k in range(4)}
    assert M.condition_accuracy(half, mu) == pytest.approx(0.5)


def test_mmd_and_sliced_wasserstein_sanity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    shifted = b + torch.tensor([1.0, 0.0])
    assert abs(M.mmd2(a, b)) < 0.02
    assert M.mmd2(a, shifted) > 10 * abs(M.mmd2(a, b))
    assert M.sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-9)
    # a shift d moves every 1D projection by <d, theta>: W1 = E|<d, theta>| = 2/pi for |d| = 1
    sw = M.sliced_wasserstein(a, a + torch.tensor([1.0, 0.0]), n_proj=2000)
    assert sw == pytest.approx(2 / torch.pi, rel=0.05)
    assert M.sliced_wasserstein(a, shifted) > 3 * M.sliced_wasserstein(a, b)


class _Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, c):
        self.calls.append((x.shape[0], c.clone()))
        return self.inner(x, t, c)


@pytest.mark.parametrize("method,rows", [("ddspo", 3), ("dpo", 2)])
def test_finetune_reference_rows_and_library_loss(method, rows, monkeypatch):
    """The toy goes through the trainer's PairLoss: DDSPO runs the reference once on 3B
    rows [x_w|c; x_l|c; x_l|c-], DPO on 2B."""
    from ddspo_fast.train.pairs import PairLoss

    cfg = toy.ToyConfig(**{**TINY, "ft_steps": 2})
    sched = toy.Schedule(cfg.num_timesteps)
    ref = toy.ToyDenoiser(cfg.num_conditions, cfg.hidden, cfg.blocks, cfg.num_timesteps)
    ref.requires_grad_(False)
    rec = _Recorder(ref)
    n = 64
    pairs = {"x_w": torch.randn(n, 2), "x_l": torch.randn(n, 2),
             "c": torch.randint(4, (n,)), "c_neg": torch.full((n,), 4)}
    used = []
    real = PairLoss.__call__
    monkeypatch.setattr(PairLoss, "__call__",
                        lambda self, *a, **k: used.append(self.mode) or real(self, *a, **k))
    policy, hist = toy.finetune(cfg, method, rec, pairs, sched, seed=0)
    assert used == [{"ddspo": "tf_cpp", "dpo": "dpo"}[method]] * 2 and len(hist["loss"]) == 2
    assert all(r == rows * cfg.ft_batch for r, _ in rec.calls)
    c = rec.calls[0][1]
    if method == "ddspo":
        assert (c[2 * cfg.ft_batch:] == 4).all() and (c[:cfg.ft_batch] < 4).all()
    # the policy moved, the reference did not
    assert any((p - q).abs().max() > 0 for p, q in zip(policy.parameters(), ref.parameters()))


def _oracle_finetune(cfg, method, ref, pairs, sched, seed):
    """The rows and targets written out by hand with the public losses (the toy's
    former code): the PairLoss-based toy must give the same losses."""
    import copy

    import ddspo_fast

    g = torch.Generator().manual_seed(seed)
    policy = copy.deepcopy(ref).requires_grad_(True).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.ft_lr, weight_decay=0.0)
    losses, B = [], cfg.ft_batch
    for _ in range(cfg.ft_steps):
        idx = torch.randint(len(pairs["c"]), (B,), generator=g)
        c, c_neg = pairs["c"][idx], pairs["c_neg"][idx]
        t = torch.randint(cfg.num_timesteps, (B,), generator=g)
        eps = torch.randn(B, 2, generator=g)
        xt_w, xt_l = sched.noise(pairs["x_w"][idx], t, eps), sched.noise(pairs["x_l"][idx], t, eps)
        pred = policy(torch.cat([xt_w, xt_l]), torch.cat([t, t]), torch.cat([c, c]))
        with torch.no_grad():
            if method == "ddspo":
                out = ref(torch.cat([xt_w, xt_l, xt_l]), torch.cat([t, t, t]),
                          torch.cat([c, c, c_neg]))
            else:
                rp = ref(torch.cat([xt_w, xt_l]), torch.cat([t, t]), torch.cat([c, c]))
        if method == "ddspo":
            loss, _ = ddspo_fast.ddspo_loss_from_reference(pred, out, cfg.beta)
        else:
            loss, _ = ddspo_fast.dpo_loss(pred, rp, torch.cat([eps, eps]), cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["ddspo", "dpo"])
def test_finetune_equals_the_hand_written_rows(method):
    cfg = toy.ToyConfig(**{**TINY, "ft_steps": 4})
    sched = toy.Schedule(cfg.num_timesteps)
    torch.manual_seed(0)
    ref = toy.ToyDenoiser(cfg.num_conditions, cfg.hidden, cfg.blocks, cfg.num_timesteps)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    n = 64
    pairs = {"x_w": torch.randn(n, 2, generator=g), "x_l": torch.randn(n, 2, generator=g),
             "c": torch.randint(4, (n,), generator=g), "c_neg": torch.full((n,), 4)}
    _, hist = toy.finetune(cfg, method, ref, pairs, sched, seed=3)
    want = _oracle_finetune(cfg, method, ref, pairs, sched, seed=3)
    assert hist["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert len(set(round(v, 6) for v in want)) > 1  # the steps did change the loss


def test_tiny_demo_run_writes_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--quick", "--skip-pipeline", "--out", str(out), "--toy-config", json.dumps(TINY)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert rc == (0 if passed(metrics) else 1)  # the exit status follows the verdict
    for method in ("reference", "dpo", "ddspo", "ground_truth"):
        m = metrics[method]
        assert 0.0 <= m["condition_accuracy"] <= 1.0
        assert set(m) >= {"condition_accuracy", "mmd", "sliced_wasserstein", "diversity"}
    assert metrics["ground_truth"]["condition_accuracy"] > 0.99
    assert metrics["ground_truth"]["sliced_wasserstein"] < metrics["reference"]["sliced_wasserstein"]
    for png in ("toy_samples.png", "toy_per_condition.png", "toy_training.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    text = capsys.readouterr().out
    assert "DDSPO TF-CPP" in text and "Diffusion-DPO" in text and "cond. acc" in text
    # fixed seeds: a second run gives the same numbers
    out2 = tmp_path / "demo2"
    main(["--quick", "--skip-pipeline", "--out", str(out2), "--toy-config", json.dumps(TINY)])
    assert json.loads((out2 / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("ddspo_acc,rc", [(0.8, 0), (0.61, 1)])
def test_demo_exit_status_follows_the_verdict(monkeypatch, tmp_path, capsys, ddspo_acc, rc):
    import ddspo_fast.demo as demo

    m = {k: {"condition_accuracy": a, "mmd": 0.1, "sliced_wasserstein": 0.2, "diversity": 1.0,
             "pairwise_distance": 1.0}
         for k, a in (("reference", 0.6), ("dpo", 0.62), ("ddspo", ddspo_acc))}
    monkeypatch.setattr(demo, "run_toy_part", lambda args, out: {
        "metrics": m, "seconds": 1.0, "config": toy.ToyConfig()})
    assert main(["--skip-pipeline", "--out", str(tmp_path)]) == rc
    captured = capsys.readouterr()
    assert ("PASS" if rc == 0 else "FAIL") in captured.out
    assert ("exit status 1" in captured.err) == (rc == 1)


def test_verdict_and_table():
    m = {k: {"condition_accuracy": a, "mmd": 0.1, "sliced_wasserstein": 0.2, "diversity": 1.0,
             "pairwise_distance": 1.0} for k, a in (("reference", 0.6), ("dpo", 0.62), ("ddspo", 0.8))}
    assert "PASS" in verdict(m)
    m["ddspo"]["condition_accuracy"] = 0.61
    assert "FAIL" in verdict(m)
    m["ddspo"]["condition_accuracy"] = 0.7
    m["dpo"]["condition_accuracy"] = 0.75
    assert "FAIL" in verdict(m)
    table = format_table(m)
    assert table.count("\n") == 4 and "0.700" in table


def test_pipeline_part(tmp_path, capsys):
    """degrade -> prepare -> train -> sample on the tiny SD1.5 model, artifacts on disk."""
    from ddspo_fast.demo.pipeline import run_pipeline

    res = run_pipeline(tmp_path / "pipe", steps=2, pairs=4)
    said = " ".join(capsys.readouterr().out.split())
    # the numbers of a random tiny model are explained, not left to read as a failure
    assert "ln 2 = 0.693" in said and "near 0, as expected" in said
    assert "say nothing about quality" in said
    art = res["artifacts"]
    assert (tmp_path / "pipe" / "pipeline.json").is_file()
    assert len((tmp_path / "pipe" / "prompts.jsonl").read_text().splitlines()) >= 2
    assert (tmp_path / "pipe" / "train" / "model_index.json").is_file()
    assert res["summary"]["steps"] == 2
    # the trained model and its base, two prompts each, and the report beside them
    assert len(list((tmp_path / "pipe" / "samples").glob("*/*.png"))) == 4
    assert set(art) >= {"model", "dataset", "trained", "samples", "report", "grid", "curves"}
    assert "| clip |" in Path(art["report"]).read_text()


def test_sweep_table_has_every_combination():
    from ddspo_fast.demo import sweep

    cfg = toy.ToyConfig(**TINY)
    rows = sweep.run(cfg, ["ddspo"], [100.0, 500.0], [2], [1e-4], guidance=(2.0,), log=lambda *a: None)
    assert list(rows) == ["reference", "reference cfg 2", "ddspo beta=100 steps=2 lr=0.0001",
                          "ddspo beta=500 steps=2 lr=0.0001"]
    assert "implicit_acc" in rows["ddspo beta=100 steps=2 lr=0.0001"]
    assert sweep.table(rows).count("\n") == 4
