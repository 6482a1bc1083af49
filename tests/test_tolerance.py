"""The bounds of tests/_tolerance.py: they hold for runs that differ by rounding only, and
fail runs that differ in what they compute."""
import pytest
import torch

from _tolerance import adam_drift, adam_step_factor, assert_adam_runs_agree


def test_adam_step_factor():
    assert adam_step_factor(1) == pytest.approx(1.0)          # |g| / sqrt(g^2)
    assert 1.0 <= adam_step_factor(3) < 1.01
    assert adam_drift([1e-3] * 2) == pytest.approx(2e-3 * (adam_step_factor(1) + adam_step_factor(2)))


def _run(lr, rel_noise, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(20000, generator=g)
    grads = [torch.randn(20000, generator=g) for _ in range(steps)]
    grads[0][:5] = 1e-9                          # a few elements at rounding level
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=1e-2)
    noise = torch.Generator().manual_seed(seed + 1)
    for gr in grads:
        p.grad = gr * (1 + rel_noise * torch.randn(gr.shape, generator=noise)) \
            + rel_noise * torch.randn(gr.shape, generator=noise) * 1e-3
        opt.step()
    return {"w": p.detach()}


def test_rounding_only_differences_pass_and_a_wrong_run_fails():
    lr = 1e-3
    want = _run(lr, 0.0)
    assert_adam_runs_agree(_run(lr, 1e-6), want, [lr] * 3)    # rounding-size gradient noise
    with pytest.raises(AssertionError, match="elements differ"):
        assert_adam_runs_agree(_run(1.5 * lr, 0.0), want, [lr] * 3)   # another learning rate
    with pytest.raises(AssertionError, match="Adam bound"):
        assert_adam_runs_agree({"w": want["w"] + 10 * lr}, want, [lr] * 3)
