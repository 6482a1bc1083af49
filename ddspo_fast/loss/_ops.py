"""`torch.library` ops of the compiled backends: schemas, fake kernels and autograd, once.

Each backend BK in BACKEND_OPS gets `ddspo_fast::BK_fwd` and `ddspo_fast::BK_bwd`
(docs/internals.md section 1). Kernels are registered elsewhere, per backend: the C++
extension registers `cpu_*` for the CPU key and `cuda_*` for the CUDA key;
`triton_backend.py` registers `triton_*`. Separate op names, rather than one op with a
backend argument, keep every backend reachable on the same device (the `cpu` kernel and
the Triton interpreter both take CPU tensors) and keep the schemas free of strings.
"""
from __future__ import annotations

import contextlib

import torch

BACKEND_OPS = ("cpu", "cuda", "triton")

# The reference enters either as rows (`ref_l`, and `ref_w` unless it is `target_w`) or as
# its per-row errors `ref_mse` (2B,) = [r_w ; r_l], e.g. read from a reference cache: then
# `ref_w` and `ref_l` are None and the kernels read no reference rows.
FWD_SCHEMA = (
    "(Tensor model, Tensor target_w, Tensor target_l, Tensor? ref_w, Tensor? ref_l, "
    "Tensor? weights, float beta, Tensor? ref_mse=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor model, Tensor target_w, Tensor target_l, "
    "Tensor grad_scale) -> Tensor"
)


def grad_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend's `grad_scale` has for inputs of `dtype`: fp64 for fp64
    inputs (so their gradient stays fp64-accurate), fp32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(model, target_w, target_l, ref_w, ref_l, weights, beta, ref_mse=None):
    rows = model.shape[0]
    f32 = dict(dtype=torch.float32, device=model.device)
    return (model.new_empty((), **f32), model.new_empty((rows,), **f32),
            model.new_empty((rows,), **f32), model.new_empty((rows // 2,), **f32),
            model.new_empty((rows,), dtype=grad_scale_dtype(model.dtype), device=model.device))


def _fake_bwd(grad_loss, model, target_w, target_l, grad_scale):
    return torch.empty(model.shape, dtype=model.dtype, device=model.device)


def _setup_context(ctx, inputs, output):
    model, target_w, target_l, beta = inputs[0], inputs[1], inputs[2], inputs[6]
    grad_scale = output[4]
    if target_w.is_inference() or target_l.is_inference():
        # A reference run under torch.inference_mode(): such tensors cannot be saved for
        # backward, and need not be: they cannot be modified in place outside inference
        # mode, which is what saving guards against.
        ctx.targets = (target_w, target_l)
        ctx.save_for_backward(model, grad_scale)
    else:
        ctx.targets = None
        ctx.save_for_backward(model, target_w, target_l, grad_scale)
    ctx.beta = beta
    # loss, model_mse and margin are differentiable (loss types other than sigmoid are
    # computed from the margin); ref_mse and grad_scale are not.
    ctx.mark_non_differentiable(output[2], output[4])
    ctx.set_materialize_grads(False)      # unused outputs arrive as None: no zero tensors


class _FirstOrderOnly(torch.autograd.Function):
    """The kernels' gradient, recorded so that differentiating it again raises.

    Used only when the backward pass itself is recorded (create_graph=True): the kernels
    have no second derivative, and silently returning none would be a wrong answer."""

    @staticmethod
    def forward(bwd, grad_loss, model, target_w, target_l, grad_scale):
        return bwd(grad_loss, model, target_w, target_l, grad_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, bwd, *args):
        return _map_slices(_FirstOrderOnly, info, in_dims, bwd, args), 0

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("ddspo_fast: the compiled loss backends have no second derivative "
                           "(double backward / create_graph through the loss); use "
                           "backend='torch' for higher-order gradients")


def _row_coefficients(ctx, grad_loss, grad_model_mse, grad_margin, grad_scale, n):
    """(upstream scalar, per-row coefficient c) with grad_model[j] = scalar * c[j] * (model[j] - target[j]).

    loss:      d loss / d model[j]  = grad_scale[j] * (model[j] - target[j])   (the kernel's)
    model_mse: d m_j / d model[j]   = (2/N) * (model[j] - target[j])
    margin:    d z_i / d model[w_i] = -(beta/N) * (...),  d z_i / d model[l_i] = +(beta/N) * (...)
    """
    if grad_model_mse is None and grad_margin is None:
        return grad_loss.float(), grad_scale     # the sigmoid loss alone: the kernels' path
    coef = (torch.zeros_like(grad_scale) if grad_loss is None
            else grad_loss.to(grad_scale.dtype) * grad_scale)
    if grad_model_mse is not None:
        coef = coef + grad_model_mse.to(grad_scale.dtype) * (2.0 / n)
    if grad_margin is not None:
        gz = grad_margin.to(grad_scale.dtype) * (ctx.beta / n)
        coef = coef + torch.cat([-gz, gz])
    return torch.ones((), dtype=torch.float32, device=coef.device), coef


def _grad_model(ctx, bwd_op, grad_loss, grad_model_mse, grad_margin):
    """d(upstream . outputs) / d model through `bwd_op`, or None when nothing flows back."""
    if grad_loss is None and grad_model_mse is None and grad_margin is None:
        return None
    if ctx.targets is None:
        model, target_w, target_l, grad_scale = ctx.saved_tensors
    else:
        (model, grad_scale), (target_w, target_l) = ctx.saved_tensors, ctx.targets
    scalar, coef = _row_coefficients(ctx, grad_loss, grad_model_mse, grad_margin, grad_scale,
                                     model.shape[1])
    args = (scalar, model, target_w, target_l, coef)
    if torch.is_grad_enabled():
        return _FirstOrderOnly.apply(bwd_op, *args)
    return bwd_op(*args)


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, grad_model_mse, _grad_ref_mse, grad_margin, _grad_scale):
        grad_model = None
        if ctx.needs_input_grad[0]:
            grad_model = _grad_model(ctx, bwd_op, grad_loss, grad_model_mse, grad_margin)
        return grad_model, None, None, None, None, None, None, None
    return backward


def _define_all() -> None:
    for bk in BACKEND_OPS:
        fwd, bwd = f"ddspo_fast::{bk}_fwd", f"ddspo_fast::{bk}_bwd"
        torch.library.define(fwd, FWD_SCHEMA)
        torch.library.define(bwd, BWD_SCHEMA)
        torch.library.register_fake(fwd)(_fake_fwd)
        torch.library.register_fake(bwd)(_fake_bwd)
        torch.library.register_autograd(
            fwd, _make_backward(getattr(torch.ops.ddspo_fast, f"{bk}_bwd")),
            setup_context=_setup_context)


_define_all()

_FWD = {bk: getattr(torch.ops.ddspo_fast, f"{bk}_fwd").default for bk in BACKEND_OPS}
_BWD = {bk: getattr(torch.ops.ddspo_fast, f"{bk}_bwd").default for bk in BACKEND_OPS}
# The guard torch.library's own autograd wrapper runs kernels under; if a future torch
# drops it, the op's Autograd kernel simply runs (it passes straight through without grad).
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class _EagerFwd(torch.autograd.Function):
    """`BK_fwd` with the autograd registered above (same setup, same backward), entered
    without torch.library's per-call Python wrapper, which costs more host time than a
    small call's kernels. Eager mode only: under torch.compile the registered op is traced.

    Written in the ``setup_context`` form, so torch.func transforms work: ``grad`` /
    ``jacrev`` unwrap the inputs and run the kernels as autograd does, and ``vmap`` runs
    the loss once per slice of the mapped dimension (`vmap` below) and stacks the results."""

    @staticmethod
    def forward(backend, model, target_w, target_l, ref_w, ref_l, weights, beta, ref_mse=None):
        with _below_autograd():
            return _FWD[backend](model, target_w, target_l, ref_w, ref_l, weights, beta, ref_mse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[1:], output)
        ctx.backend = inputs[0]

    @staticmethod
    def backward(ctx, grad_loss, grad_model_mse, _grad_ref_mse, grad_margin, _grad_scale):
        grad_model = None
        if ctx.needs_input_grad[1]:
            grad_model = _grad_model(ctx, _BWD[ctx.backend], grad_loss, grad_model_mse,
                                     grad_margin)
        return None, grad_model, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, backend, *args):
        return _map_slices(_EagerFwd, info, in_dims, backend, args), (0,) * 5


def _map_slices(fn, info, in_dims, first, args):
    """The vmap rule of a kernel-backed Function: the kernels take one problem, so run
    ``fn.apply(first, *slice_i)`` for each index i of the mapped dimension and stack."""
    def take(x, d, i):
        return x if d is None or x is None else x.select(d, i)

    outs = [fn.apply(first, *(take(x, d, i) for x, d in zip(args, in_dims[1:])))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def run_fwd(backend: str, *args):
    """BK_fwd(*args) with autograd: the registered op while compiling, else `_EagerFwd`."""
    if torch.compiler.is_compiling():
        return _FWD[backend](*args)
    return _EagerFwd.apply(backend, *args)
