"""The autograd.Function of add_norm_fwd/bwd: LayerNorm or RMSNorm of input + residual (of
the input alone without a residual, which is how RMSNorm runs), returning the output and
the sum. The pattern is autograd.py's (_NormFunction): forward is the op alone, setup_context
saves what the backward op needs, a classic form for plain autograd, a forward-mode form
with a jvp, and the output recomputed in torch ops when a backward is differentiated again.

The gradient of the sum s = input + residual reaches both inputs unchanged: the backward
op returns ds = (the norm's input gradient) + (the gradient s receives as an output), and
input and residual get ds in their own dtypes. Plain eager calls take the same backward as a
C++ node (AddNormBackward in csrc/autograd.cpp)."""
import torch
from torch.autograd.function import once_differentiable

from . import _C, _differentiable
from ._activation import Activation
from .autograd import (
    _classic,
    _forward_mode,
    _forward_mode_or_torch_func,
    _recomputed,
    _second_derivative_wanted,
    native_path,
)
from .backend import ops_for


def _kind(ctx):
    return "rms_norm" if ctx.rms else "layer_norm"


def _param_in(p, dtype):
    """A parameter the backward op accepts beside a normalised tensor of `dtype` (a float32
    sum normalised with bfloat16 parameters: the parameters in float32)."""
    if p is None or p.dtype == dtype or (p.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        return p
    return p.to(dtype)


def _grads(ctx, dy, ds, recompute):
    """(d input, d residual, d weight, d bias, None...) for the output and sum gradients."""
    s, weight, bias = ctx.saved_tensors[:3]
    needs = ctx.needs_input_grad
    mask = [needs[0] or needs[1], weight is not None and needs[2], bias is not None and needs[3]]
    dw = db = None
    if dy is None:  # only the sum is used: its gradient passes through
        dsum = ds
    elif recompute:
        def output(ctx, *tensors):  # in y's dtype (a float32 sum's output is not)
            return _differentiable.output(_kind(ctx), ctx, *tensors).to(ctx.dtypes[0])
        dsum, dw, db = _recomputed(output, ctx, dy, mask)
        if ds is not None and dsum is not None:
            dsum = dsum + ds
    else:
        w, b = _param_in(weight, s.dtype), _param_in(bias, s.dtype)
        dsum, dw, db = ctx.ops.add_norm_bwd(dy, ds, s, ctx.normalized_shape, ctx.saved_tensors[3],
                                            ctx.saved_tensors[4], w, b, ctx.rms, *ctx.act, mask)
        dw = dw.to(weight.dtype) if mask[1] else None
        db = db.to(bias.dtype) if mask[2] else None
    x_dtype, r_dtype = ctx.dtypes
    dx = dsum.to(x_dtype) if needs[0] and dsum is not None else None
    dr = dsum.to(r_dtype) if needs[1] and dsum is not None else None
    return (dx, dr, dw, db) + (None,) * 7


_first_order = once_differentiable(lambda ctx, dy, ds: _grads(ctx, dy, ds, False))


class AddNormFunction(torch.autograd.Function):
    """forward(x, residual, weight, bias, normalized_shape, rms, residual_in_fp32, eps,
    activation, act_a, act_b) -> (y, residual_out, mean, rstd); residual may be None
    (residual_out is then empty and not differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, residual, weight, bias, normalized_shape, rms, residual_in_fp32, eps, act, act_a, act_b):
        return ops_for(x).add_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, residual_in_fp32,
                                       act, act_a, act_b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, normalized_shape, rms, _, eps, *act = inputs
        _, s, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        if residual is None:
            ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)
        ctx.ops = ops_for(x)
        ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.rms, ctx.eps, ctx.act = normalized_shape, rms, eps, Activation(*act)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)

    @staticmethod
    def backward(ctx, dy, ds=None, *_):
        if ctx.dtypes[1] is None:  # no residual: the (empty) sum's gradient, zeros under AOT autograd
            ds = None
        if dy is None and ds is None:
            return (None,) * 11
        if not torch.is_grad_enabled():
            return _grads(ctx, dy, ds, False)
        if _second_derivative_wanted(ctx):
            return _grads(ctx, dy, ds, True)
        return _first_order(ctx, dy, ds)


def _jvp(ctx, x_t, r_t, weight_t, bias_t, *_):
    """The tangents of (y, residual_out): the norm's tangent along s_t = x_t + r_t."""
    x, residual, weight, bias, s, mean, rstd = ctx.saved_tensors  # those saved for forward
    normalised = s if residual is not None else x
    s_t = x_t
    if residual is not None and r_t is not None:
        s_t = r_t.to(s.dtype) if s_t is None else s_t.to(s.dtype) + r_t.to(s.dtype)
    y_t = _differentiable.tangent(_kind(ctx), ctx, normalised, weight, bias, mean, rstd, s_t, weight_t, bias_t)
    s_out_t = None
    if residual is not None:
        s_out_t = s_t.to(s.dtype) if s_t is not None else torch.zeros_like(s)
    return y_t.to(x.dtype), s_out_t, None, None


def _with_jvp_setup(ctx, inputs, output):
    AddNormFunction.setup_context(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:4], *output[1:])  # x, residual, weight, bias, s, mean, rstd


# Dynamo refuses to trace a Function that defines jvp: the forward-mode form is its own
# class, used only under forward-mode AD (as autograd._with_jvp).
AddNormForwardMode = type("AddNormFunctionForwardMode", (AddNormFunction,),
                          {"setup_context": staticmethod(_with_jvp_setup), "jvp": staticmethod(_jvp),
                           "__module__": __name__})
AddNormFunction.classic_y = _classic(AddNormFunction, outputs=1)
AddNormFunction.classic_ys = _classic(AddNormFunction, outputs=2)


def apply_add_norm(x, residual, weight, bias, *rest):
    """(y, residual_out), or y alone without a residual: AddNormFunction in the form the
    call needs (autograd.apply's four ways)."""
    both = residual is not None
    args = (x, residual, weight, bias, *rest)
    if not _forward_mode_or_torch_func():
        if native_path(x):
            y, s = _C.add_norm(*args)  # the plain eager path's C++ node (AddNormBackward)
            return (y, s) if both else y
        tensors = (x, residual, weight, bias)
        if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
            out = AddNormFunction.forward(*args)
            return out[:2] if both else out[0]
        return (AddNormFunction.classic_ys if both else AddNormFunction.classic_y).apply(*args)
    out = (AddNormForwardMode if _forward_mode() else AddNormFunction).apply(*args)
    return out[:2] if both else out[0]
