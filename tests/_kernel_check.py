"""Shared by tests/test_triton.py and tests/test_gpu.py: inputs in row-block form and the
accuracy rule for a loss kernel against the torch reference and fp64.

Rule: for each output, the kernel's max error against fp64 must be at most twice that of
the torch reference computed in fp32 from the same (possibly fp16/bf16) inputs, plus a
tiny floor relative to the quantity's scale (for the gradient, one unit of its own dtype's
rounding at its largest magnitude).
"""
from __future__ import annotations

import torch

from ddspo_fast.loss import eager as reference


def make_inputs(b, shape, dtype, packed, weighted, seed, device, scale=1.0, pad=3, offset=0):
    """(model, target_w, target_l, ref_w, ref_l, weights). Targets and ref_l are views of
    one padded (3B, N + pad) buffer, so their row stride is not N, as with the packed
    layout's views; `offset` > 0 shifts every row start off 16-byte alignment."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(3 * b, n + pad + offset, generator=g)
    ref_out = base.to(dtype).to(device)[:, offset:offset + n]
    target_w, ref_l, target_l = ref_out[:b], ref_out[b:2 * b], ref_out[2 * b:]
    model = (target_w.float().cpu().repeat(2, 1)
             + scale * torch.randn(2 * b, n, generator=g)).to(dtype).to(device)
    ref_w = None if packed else (target_w.float().cpu() + 0.3 * torch.randn(b, n, generator=g)
                                 ).to(dtype).to(device)
    weights = torch.rand(b, generator=g).to(device) if weighted else None
    return model, target_w, target_l, ref_w, ref_l, weights


def reference_outputs(model, tw, tl, rw, rl, w, beta, acc):
    """[loss, model_mse, ref_mse, margin, grad] of the torch reference, as fp64, with every
    input cast to `acc` first (fp64: the exact answer for these inputs; None: the torch
    backend on the inputs as they are, i.e. a careful fp32 computation)."""
    cast = (lambda t: t) if acc is None else (lambda t: None if t is None else t.to(acc))
    m = cast(model).detach().clone().requires_grad_(True)
    parts = reference.loss_rows(m, cast(tw), cast(tl), cast(rw), cast(rl), w, beta)
    parts.loss.backward()
    out = [parts.loss, parts.model_mse, parts.ref_mse, parts.margin]
    return [t.detach().double() for t in out] + [m.grad.double()]


def check_outputs(got, inputs, beta):
    """`got` = [loss, model_mse, ref_mse, margin, grad] from a kernel."""
    exact = reference_outputs(*inputs, beta, torch.float64)
    torch32 = reference_outputs(*inputs, beta, None)
    assert_rule(got, torch32, exact, beta)


def assert_rule(got, torch32, exact, beta):
    """The accuracy rule on [loss, model_mse, ref_mse, margin, grad] triples: the result
    under test, the torch backend's (fp32 math) and the fp64 answer."""
    mse_scale = float(exact[1].abs().max()) + float(exact[2].abs().max())
    floors = {
        "loss": 1e-6 * beta * mse_scale + 1e-7,
        "model_mse": 1e-6 * mse_scale,
        "ref_mse": 1e-6 * mse_scale,
        "margin": 1e-6 * beta * mse_scale,
        # One unit of the gradient's own dtype: the kernel's coefficient equals torch's
        # to fp32 noise (amplified by beta through sigmoid(-z)), and that noise may move a
        # value across a bf16/fp16 rounding boundary, a full ulp rather than half.
        "grad": torch.finfo(got[4].dtype).eps * float(exact[4].abs().max()) + 1e-30,
    }
    for name, g, e, t in zip(floors, got, exact, torch32):
        g = g.detach().double()
        assert g.shape == e.shape, name
        assert torch.isfinite(g).all(), f"{name} not finite"
        err = float((g - e).abs().max())
        ref_err = float((t - e).abs().max())
        assert err <= 2 * ref_err + floors[name], (
            f"{name}: error {err:.3e} vs torch fp32 {ref_err:.3e} (floor {floors[name]:.1e})")


def run_op(backend, inputs, beta):
    """The backend's fwd op with autograd: ([loss, model_mse, ref_mse, margin, grad], gs)."""
    model, tw, tl, rw, rl, w = inputs
    m = model.detach().clone().requires_grad_(True)
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd")
    loss, mmse, rmse, margin, gs = fwd(m, tw, tl, rw, rl, w, beta)
    loss.backward()
    return [loss, mmse, rmse, margin, m.grad], gs


OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supported_dtypes(backend, device):
    """The dtypes of OP_DTYPES that `backend` takes on `device` (dispatch's own answer)."""
    from ddspo_fast.loss import dispatch
    return [d for d in OP_DTYPES if not dispatch.unavailable_reasons(backend, device, d)]


def opcheck_ops(backend, device, dtypes=None):
    """`torch.library.opcheck` of `BK_fwd` and `BK_bwd` in every dtype the backend takes and
    the three reference layouts (ref_w given; None as in TF-CPP's packed rows; no rows but
    their errors `ref_mse`, as from a reference cache), weighted or not, plus the
    grad_scale dtype contract (`_ops.grad_scale_dtype`) that the fake kernel states."""
    from ddspo_fast.loss import _ops
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd").default
    bwd = getattr(torch.ops.ddspo_fast, f"{backend}_bwd").default
    device = torch.device(device)
    for dtype in (supported_dtypes(backend, device) if dtypes is None else dtypes):
        for packed in (False, True):
            model, tw, tl, rw, rl, w = make_inputs(2, (3, 11), dtype, packed, weighted=not packed,
                                                   seed=21, device=device)
            gs = fwd(model, tw, tl, rw, rl, w, 1500.0)[4]
            want = _ops.grad_scale_dtype(dtype)
            assert gs.dtype == want, (f"{backend}_fwd returned grad_scale {gs.dtype} for {dtype} "
                                      f"inputs; the contract (and the fake) say {want}")
            torch.library.opcheck(fwd, (model.requires_grad_(True), tw, tl, rw, rl, w, 1500.0))
            torch.library.opcheck(bwd, (torch.full((), 0.5, device=device), model.detach(), tw, tl, gs))
        r = torch.rand(4, generator=torch.Generator().manual_seed(5)).to(device)
        gs = fwd(model, tw, tl, None, None, w, 1500.0, r)[4]
        assert gs.dtype == _ops.grad_scale_dtype(dtype)
        torch.library.opcheck(fwd, (model.detach().requires_grad_(True), tw, tl, None, None, w,
                                    1500.0, r))


def check_compile_matches_eager(backend, inputs, beta):
    """The op under `torch.compile(fullgraph=True)`, forward and backward, equals the same
    op run eagerly (same kernels, so to fp32 rounding of the surrounding graph)."""
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd")
    model, tw, tl, rw, rl, w = inputs

    def step(m):
        loss, mmse, rmse, margin, _ = fwd(m, tw, tl, rw, rl, w, beta)
        return loss * 3.0, mmse, rmse, margin

    torch._dynamo.reset()
    outs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        m = model.detach().clone().requires_grad_(True)
        out = fn(m)
        out[0].backward()
        outs.append([t.detach() for t in out] + [m.grad])
    for name, c, e in zip(("loss", "model_mse", "ref_mse", "margin", "grad"), *outs):
        assert c.dtype == e.dtype and c.shape == e.shape, name
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=f"compiled vs eager: {name}")
