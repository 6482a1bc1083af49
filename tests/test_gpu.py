"""GPU kernels (triton, cuda) against the torch reference and fp64; skipped without CUDA.

On a machine with a GPU nothing here skips: a backend that cannot run (an extension built
without CUDA kernels, or for other GPUs; Triton missing) fails its tests with the reasons,
so a GPU check can never pass by skipping everything.

Accuracy rule: tests/_kernel_check.py. Shapes cover odd sizes, B = 1, the SDXL and SD3
row sizes (65,536 and 262,144 elements) that exercise split-row partials, both reference
layouts, weights, beta 1..22000 and every input dtype; rows 16-byte aligned (vector
path) and not (scalar path).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

from _kernel_check import check_outputs, make_inputs, run_op  # noqa: E402

import ddspo_fast  # noqa: E402,F401  (defines the ops)
from ddspo_fast.loss import cuda_arch  # noqa: E402
from ddspo_fast.loss import dispatch as backends  # noqa: E402

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _need(backend, dtype=torch.float32):
    reasons = backends.unavailable_reasons(backend, DEV, dtype)
    if reasons:
        pytest.fail(f"{backend} backend cannot run on this GPU machine: " + "; ".join(reasons),
                    pytrace=False)


def test_extension_has_cuda_kernels_for_this_gpu():
    from ddspo_fast.loss import _ext
    assert _ext.load_error() is None, _ext.load_error()
    assert _ext.has_cuda_kernels(), (
        "ddspo_fast._C was built without CUDA kernels on a machine with a GPU "
        "(rebuild with DDSPO_FAST_CUDA=1 where torch has CUDA and nvcc exists)")
    built = cuda_arch.built_archs()
    assert built, "the extension does not report the GPU code it was built for"
    assert cuda_arch.device_reason(DEV) is None, cuda_arch.device_reason(DEV)


CASES = [
    # (B, trailing shape, packed, weighted, beta, row offset)
    (3, (3, 17, 9), False, True, 2000.0, 0),
    (1, (7,), True, False, 22000.0, 0),
    (1, (7,), False, False, 1.0, 1),
    (8, (4, 128, 128), True, True, 5000.0, 0),      # SDXL latents
    (8, (4, 128, 128), False, False, 22000.0, 0),
    (2, (16, 128, 128), True, False, 2000.0, 0),    # SD3 latents, 262,144 a row
    (2, (16, 128, 128), False, True, 2000.0, 1),    # ... misaligned rows: scalar path
    (5, (1001,), False, True, 22000.0, 3),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,shape,packed,weighted,beta,offset", CASES)
def test_matches_reference(backend, dtype, b, shape, packed, weighted, beta, offset):
    _need(backend, dtype)
    inputs = make_inputs(b, shape, dtype, packed, weighted, seed=b + len(shape), device=DEV,
                         offset=offset)
    got, gs = run_op(backend, inputs, beta)
    assert got[4].dtype == dtype and got[4].is_contiguous()
    assert torch.equal(gs[b:], -gs[:b])
    check_outputs(got, inputs, beta)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fp16_beta_22000_extreme(backend):
    _need(backend, torch.float16)
    for scale in (10.0, 0.0):
        inputs = make_inputs(4, (4, 64, 64), torch.float16, False, False, seed=7, device=DEV,
                             scale=scale)
        got, gs = run_op(backend, inputs, 22000.0)
        for t in got + [gs]:
            assert torch.isfinite(t.float()).all()
        check_outputs(got, inputs, 22000.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic(backend):
    _need(backend, torch.bfloat16)
    inputs = make_inputs(4, (4, 128, 128), torch.bfloat16, True, True, seed=3, device=DEV)
    a, ga = run_op(backend, inputs, 2000.0)
    b, gb = run_op(backend, inputs, 2000.0)
    for x, y in zip(a + [ga], b + [gb]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backends_agree_with_public_api(backend):
    _need(backend, torch.bfloat16)
    import ddspo_fast as df
    g = torch.Generator(device="cpu").manual_seed(0)
    mp = torch.randn(8, 4, 32, 32, generator=g).to(DEV, torch.bfloat16)
    ro = torch.randn(12, 4, 32, 32, generator=g).to(DEV, torch.bfloat16)
    m1 = mp.clone().requires_grad_(True)
    m2 = mp.clone().requires_grad_(True)
    l1, s1 = df.ddspo_loss_from_reference(m1, ro, 3000.0, backend=backend)
    l2, s2 = df.ddspo_loss_from_reference(m2, ro, 3000.0, backend="torch")
    (l1 * 3).backward()
    (l2 * 3).backward()
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1["margin"], s2["margin"], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(m1.grad.float(), m2.grad.float(), rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("packed", [True, False])
def test_opcheck(backend, packed):
    _need(backend)
    model, tw, tl, rw, rl, w = make_inputs(2, (4, 8, 8), torch.float32, packed, True, seed=1,
                                           device=DEV)
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd")
    bwd = getattr(torch.ops.ddspo_fast, f"{backend}_bwd")
    torch.library.opcheck(fwd.default, (model.requires_grad_(True), tw, tl, rw, rl, w, 1500.0))
    out = fwd(model.detach(), tw, tl, rw, rl, w, 1500.0)
    torch.library.opcheck(bwd.default, (torch.ones((), device=DEV), model.detach(), tw, tl,
                                        out[4]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,offset", [((3, 17, 9), 0), ((4, 128, 128), 0),
                                          ((16, 128, 128), 1)])
def test_reference_errors_given(backend, dtype, shape, offset):
    """The reference as its row errors (a reference cache): the accuracy rule through the
    public API (split rows, aligned and not), opcheck of the op so called, and a policy
    equal to its reference having a margin of exactly 0."""
    _need(backend, dtype)
    from loss_checks import check_backend

    import ddspo_fast as df
    check_backend(backend, (4,) + shape, dtype, 5000.0, weights=True, device="cuda",
                  given=True)
    model, tw, tl, rw, rl, w = make_inputs(2, shape, dtype, False, True, seed=3, device=DEV,
                                           offset=offset)
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd")
    r = torch.rand(4, device=DEV)
    torch.library.opcheck(fwd.default, (model.requires_grad_(True), tw, tl, None, None, w,
                                        1500.0, r))
    ref = torch.cat([tw, tl]).reshape(4, *shape) + 0.1
    tgt = torch.cat([tw, tl]).reshape(4, *shape)
    r = df.reference_mse(ref, tgt, backend=backend)
    _, stats = df.ddspo_loss_from_ref_mse(ref.clone(), tgt, r, 22000.0, backend=backend)
    assert torch.equal(stats["margin"], torch.zeros(2, device=DEV))


@pytest.mark.parametrize("packed", [True, False])
def test_triton_fp64(packed):
    """fp64 on the GPU: fp64 grad_scale (the op contract) and an fp64-accurate gradient."""
    _need("triton", torch.float64)
    inputs = make_inputs(3, (4, 32, 32), torch.float64, packed, True, seed=5, device=DEV)
    got, gs = run_op("triton", inputs, 3000.0)
    assert gs.dtype == torch.float64 and got[4].dtype == torch.float64
    check_outputs(got, inputs, 3000.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph(backend):
    _need(backend, torch.bfloat16)
    inputs = make_inputs(2, (4, 16, 16), torch.bfloat16, True, False, seed=2, device=DEV)
    fwd = getattr(torch.ops.ddspo_fast, f"{backend}_fwd")

    def f(m, tw, tl, rl):
        return fwd(m, tw, tl, None, rl, None, 2000.0)[0]

    m = inputs[0].clone().requires_grad_(True)
    loss = torch.compile(f, fullgraph=True)(m, inputs[1], inputs[2], inputs[4])
    loss.backward()
    m_eager = inputs[0].clone().requires_grad_(True)
    loss_eager = f(m_eager, inputs[1], inputs[2], inputs[4])
    loss_eager.backward()
    # The op is opaque to the compiler: the compiled graph runs the same kernels on the
    # same inputs, so it must agree with eager (to rounding), and both with the reference.
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.grad, m_eager.grad, rtol=1e-6, atol=1e-7)
    eager_out = fwd(inputs[0], inputs[1], inputs[2], None, inputs[4], None, 2000.0)
    check_outputs(list(eager_out[:4]) + [m.grad], inputs, 2000.0)
