"""Public-API checks shared by the backends' tests: inputs in user layout (2B, *S), a
backend run through `ddspo_loss` / `ddspo_loss_from_reference` / `ddspo_loss_from_ref_mse`,
and the accuracy rule of tests/_kernel_check.py (at most 2x the torch fp32 computation's
error against fp64)."""
from __future__ import annotations

import torch

import ddspo_fast as df
from _kernel_check import assert_rule

SHAPES = [(6, 3, 17, 9), (2, 7), (2, 1), (4, 4, 8, 8), (8, 3, 1031)]
BETAS = [1.0, 500.0, 5000.0, 22000.0]


def make(shape, dtype, device="cpu", packed=False, scale=1.0, seed=0, near=False):
    """Inputs; `near` makes model and reference close to the target (realistic margins)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    tgt = torch.randn(shape, generator=g)
    noise = lambda r: torch.randn((r,) + tuple(shape[1:]), generator=g) * scale
    if packed:
        ref_out = torch.cat([tgt[: n // 2], noise(n // 2) + (tgt[n // 2:] if near else 0),
                             tgt[n // 2:]])
        model = ref_out[torch.cat([torch.arange(n // 2), torch.arange(n, 3 * n // 2)])] + noise(n) * 0.1
        return model.to(device, dtype).requires_grad_(), ref_out.to(device, dtype)
    model = (tgt if near else 0) + noise(n)
    ref = (tgt if near else 0) + noise(n)
    return (model.to(device, dtype).requires_grad_(), ref.to(device, dtype), tgt.to(device, dtype))


def with_ref_mse(inputs):
    """(model, target, ref_mse): the reference of standard inputs as its row errors, exact
    (fp64) and then stored in fp32, as a reference cache stores them."""
    model, ref, tgt = inputs
    r = (ref.double() - tgt.double()).pow(2).flatten(1).mean(1)
    return model, tgt, r.float()


def run(backend, inputs, beta, weights=None, packed=False, loss_type="sigmoid"):
    """(loss, stats, grad) for one backend; the gradient is of the loss w.r.t. model_pred.
    Inputs (model, target, ref_mse) (`with_ref_mse`) go through `ddspo_loss_from_ref_mse`."""
    model = inputs[0]
    if model.grad is not None:
        model.grad = None
    if len(inputs) == 3 and inputs[2].dim() == 1:
        loss, stats = df.ddspo_loss_from_ref_mse(model, inputs[1], inputs[2], beta,
                                                 weights=weights, backend=backend,
                                                 loss_type=loss_type)
    elif packed:
        loss, stats = df.ddspo_loss_from_reference(model, inputs[1], beta, weights=weights,
                                                   backend=backend, loss_type=loss_type)
    else:
        loss, stats = df.ddspo_loss(model, inputs[1], inputs[2], beta, weights=weights,
                                    backend=backend, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, model)
    return loss, stats, grad


def as64(inputs):
    out = [inputs[0].detach().double().requires_grad_()]
    out += [x.double() for x in inputs[1:]]
    return out


def _outputs(loss, stats, grad):
    return [loss, stats["model_mse"], stats["ref_mse"], stats["margin"], grad]


def check_backend(backend, shape, dtype, beta, weights=False, packed=False, device="cpu",
                  near=True, loss_type="sigmoid", given=False):
    """A backend through the public API against the torch backend and fp64 (the rule of
    tests/_kernel_check.py), plus the API's output contract. `given`: the reference enters
    as its row errors (`ddspo_loss_from_ref_mse`)."""
    inputs = make(shape, dtype, device, packed=packed, near=near)
    if given:
        inputs = with_ref_mse(inputs)
    b = shape[0] // 2
    w = torch.rand(b, generator=torch.Generator().manual_seed(1)).to(device) if weights else None
    loss, stats, grad = run(backend, inputs, beta, w, packed, loss_type)
    loss32, stats32, grad32 = run("torch", inputs, beta, w, packed, loss_type)
    loss64, stats64, grad64 = run("torch", as64(inputs), beta, w, packed, loss_type)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == inputs[0].shape
    for key, n in (("model_mse", 2 * b), ("ref_mse", 2 * b), ("margin", b)):
        assert stats[key].shape == (n,) and stats[key].dtype == torch.float32
        assert not stats[key].requires_grad
    assert_rule(_outputs(loss, stats, grad), _outputs(loss32, stats32, grad32),
                [t.detach().double() for t in _outputs(loss64, stats64, grad64)], beta)
    assert stats["implicit_acc"].item() == stats32["implicit_acc"].item() or \
        (stats64["margin"].abs() < 1e-3).any()
    if packed:
        assert torch.all(stats["ref_mse"][:b] == 0)
    if given:  # the given errors come back as they were
        assert torch.equal(stats["ref_mse"], inputs[2].float())
