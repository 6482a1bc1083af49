"""PairLoss: a live call is the frozen part then the policy's loss on the same rows; a
cached call is that policy loss on a stored frozen part, through the same kernels.

A tiny family and denoisers written here (no diffusers): each objective's live loss is held
against the loss spelled out with the public `ddspo_loss` on hand-built rows, and against
`cached_loss` on what `frozen` returned.
"""
import pytest
import torch

import ddspo_fast as df
from ddspo_fast.loss import _ops, available_backends
from ddspo_fast.train.draws import batch_draws
from ddspo_fast.train.pairs import FrozenOutputs, PairInputs, PairLoss

BACKENDS = [b for b in ("torch", "cpu") if b in available_backends()]
N, S = 3, (2, 3, 3)


class _Family:
    """DDPM-like noising and the epsilon target: all PairLoss asks of a family."""

    def add_noise(self, x0, noise, t):
        a = (1 - t.float() / 10).reshape(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def dpo_target(self, x0, noise, t):
        return noise


class _Net(torch.nn.Module):
    """(x, t, cond) -> x-shaped output; records the rows of every call."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.emb = torch.nn.Linear(4, 2)
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.conv(x) + self.emb(cond["e"])[:, :, None, None] + t.float()[:, None, None, None] / 7


def _inputs(mixed: bool) -> PairInputs:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return PairInputs(x_w=r(N, *S), x_l=r(N, *S), noise=r(N, *S),
                      t=torch.tensor([1, 4, 8]), cond={"e": r(N, 4)}, neg_cond={"e": r(N, 4)},
                      weights=torch.tensor([0.5, 1.0, 2.0]),
                      mixed=torch.tensor([True, False, True]) if mixed else None,
                      ids=["a", "b", "c"], draws=[[0], [0], [0]])


# objective, pair, mixing
MODES = {"tf_cpp": ("ddspo", "reference", False), "dpo": ("dpo", "reference", False),
         "dpo-mix": ("dpo", "reference", True), "dd_cpp": ("ddspo", "lora", False)}


def _spelled_out(mode, policy, ref, phi_w, phi_l, inp, beta, backend):
    """The loss written out with the public ddspo_loss on hand-built rows."""
    fam = _Family()
    xw, xl = fam.add_noise(inp.x_w, inp.noise, inp.t), fam.add_noise(inp.x_l, inp.noise, inp.t)
    x2, t2 = torch.cat([xw, xl]), torch.cat([inp.t, inp.t])
    c2 = {"e": torch.cat([inp.cond["e"]] * 2)}
    with torch.no_grad():
        ref_pred = ref(x2, t2, c2)
        if mode == "tf_cpp":
            target = torch.cat([ref(xw, inp.t, inp.cond), ref(xl, inp.t, inp.neg_cond)])
        elif mode == "dd_cpp":
            target = torch.cat([phi_w(xw, inp.t, inp.cond), phi_l(xl, inp.t, inp.cond)])
        else:
            target = torch.cat([inp.noise, inp.noise])
            if inp.mixed is not None:
                tf = torch.cat([ref(xw, inp.t, inp.cond), ref(xl, inp.t, inp.neg_cond)])
                m = torch.cat([inp.mixed] * 2)[:, None, None, None]
                target = torch.where(m, tf, target)
    return df.ddspo_loss(policy(x2, t2, c2), ref_pred, target, beta, weights=inp.weights,
                         backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_live_is_frozen_then_policy_and_cached_is_the_same_policy_loss(mode, backend):
    objective, pair, mixing = MODES[mode]
    policy, ref, phi_w, phi_l = _Net(0), _Net(1), _Net(2), _Net(3)
    for net in (ref, phi_w, phi_l):
        net.requires_grad_(False)
    loss_fn = PairLoss(_Family(), objective, pair, beta=50.0, backend=backend)
    inp = _inputs(mixing)
    phis = (phi_w, phi_l) if pair == "lora" else (None, None)

    live, live_stats = loss_fn(policy, ref, inp, *phis)
    (g_live,) = torch.autograd.grad(live, policy.conv.weight)
    # one stacked reference call (3n rows where c- is needed), one policy call on 2n rows
    assert ref.calls == [3 * N if mode in ("tf_cpp", "dpo-mix") else 2 * N]
    assert policy.calls == [2 * N]

    want, want_stats = _spelled_out(loss_fn.mode, policy, ref, phi_w, phi_l, inp, 50.0, backend)
    (g_want,) = torch.autograd.grad(want, policy.conv.weight)
    # The live r_w, r_l are PyTorch's fp32 row means (what a cache stores), the spelled-out
    # ones a kernel's wider sums: an fp32 ulp apart, i.e. ~1e-7 relative times beta/2 = 25
    # in the margins; a wrong row or target moves everything by O(1).
    scale = float(g_want.abs().max())
    torch.testing.assert_close(live, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_live, g_want, rtol=1e-5, atol=1e-5 * scale)
    for k, atol in (("model_mse", 1e-6), ("ref_mse", 1e-6), ("margin", 25 * 1e-6)):
        torch.testing.assert_close(live_stats[k], want_stats[k], rtol=1e-5, atol=atol)

    fr = loss_fn.frozen(ref, inp, *phis)
    assert isinstance(fr, FrozenOutputs) and fr.ref_mse.shape == (2 * N,)
    assert fr.ref_mse.dtype == torch.float32 and not fr.ref_mse.requires_grad
    assert (fr.target is None) == (mode == "dpo")
    if mode == "tf_cpp":
        assert torch.all(fr.ref_mse[:N] == 0)
    ref.calls.clear()
    policy.calls.clear()
    # the cached step: no reference, no c- (a cache-fed step does not encode it)
    cached_inp = PairInputs(**{**inp.__dict__, "neg_cond": None})
    got, got_stats = loss_fn.cached_loss(policy, cached_inp, fr)
    (g_got,) = torch.autograd.grad(got, policy.conv.weight)
    assert ref.calls == [] and policy.calls == [2 * N]
    torch.testing.assert_close(got, live, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_got, g_live, rtol=1e-6, atol=1e-9)
    for k in live_stats:
        torch.testing.assert_close(got_stats[k], live_stats[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dpo", "dpo-mix", "dd_cpp"])
def test_policy_equal_to_reference_has_margin_exactly_zero(mode, backend):
    """Where policy and reference see the same rows and targets (not TF-CPP, whose
    reference sees c- for target_l), a policy equal to the reference has margin 0: its
    errors and the reference's come from one arithmetic."""
    objective, pair, mixing = MODES[mode]
    ref, phi_w, phi_l = (_Net(i).requires_grad_(False) for i in (1, 2, 3))
    policy = _Net(1)
    loss_fn = PairLoss(_Family(), objective, pair, beta=22000.0, backend=backend)
    phis = (phi_w, phi_l) if pair == "lora" else (None, None)
    loss, stats = loss_fn(policy, ref, _inputs(mixing), *phis)
    assert torch.equal(stats["margin"], torch.zeros(N))
    want = float(_inputs(mixing).weights.mean() * torch.log(torch.tensor(2.0)))
    assert loss.item() == pytest.approx(want, abs=1e-6)   # weighted mean of log 2


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu extension is not built")
def test_cached_loss_runs_the_fused_op(monkeypatch):
    """The cached path goes through the library's op (ddspo_fast::cpu_fwd), with the
    reference's row errors as its input, not through eager loss math; the frozen part's
    errors come from the same op."""
    seen = []
    real = _ops._FWD["cpu"]
    monkeypatch.setitem(_ops._FWD, "cpu",
                        lambda *a: seen.append((a[3], a[4], a[7])) or real(*a))
    policy, ref = _Net(0), _Net(1).requires_grad_(False)
    loss_fn = PairLoss(_Family(), "ddspo", "reference", beta=50.0, backend="cpu")
    fr = loss_fn.frozen(ref, _inputs(False))
    assert len(seen) == 1   # the reference's errors: the op's own, on the reference's rows
    seen.clear()
    loss, _ = loss_fn.cached_loss(policy, _inputs(False), fr)
    loss.backward()
    assert len(seen) == 1
    ref_w, ref_l, ref_mse = seen[0]
    assert ref_w is None and ref_l is None and torch.equal(ref_mse, fr.ref_mse)
    assert policy.conv.weight.grad is not None


def test_batch_draws_is_the_one_place_of_the_draw_indices():
    batch = {"id": ["p0", 7]}
    assert batch_draws(batch, 3, 2) == (["p0", "7"], [[6, 7], [6, 7]])
    # a caller pinning the visit (the benchmark's repeated steps)
    assert batch_draws(dict(batch, draw_epoch=1), 3, 2) == (["p0", "7"], [[2, 3], [2, 3]])
    with pytest.raises(ValueError, match="batch: has no 'id'"):
        batch_draws({}, 0, 1)
