"""The autograd.Function of BatchNorm with a residual add, y = act(bn(x) + z) (ResNet tails,
apex's bn_addrelu): batch_norm_fwd with its `residual`. The activation is none, ReLU or
LeakyReLU with a non-negative slope, whose derivative the output gives (y > 0 exactly
where the pre-activation is, as torch's ReLU reads it off its saved output): the backward
takes dz = dy * act'(y) in one elementwise pass, then BatchNorm's backward of dz without an
activation, whose passes are today's. Saved: x and y (eager saves x for the norm and y for
the ReLU), not z.

The forms follow autograd.py's (_NormFunction): classic, setup_context (torch.func), a
forward-mode subclass with a jvp, and differentiable recomputation when the backward is
differentiated again. Plain eager calls take the same backward as a C++ node
(BatchNormAddBackward in csrc/autograd.cpp)."""
import types

import torch

from . import _C, _differentiable
from ._activation import NONE
from .autograd import _classic, _grad_mask, _NormFunction, _recomputed, _second_derivative_wanted
from .backend import ops_for

_LEAKY = 2


def _through_activation(g, y, act):
    """g * act'(pre-activation), read off the output y."""
    if act.code == 0:
        return g
    slope = act.a if act.code == _LEAKY else 0.0
    # ATen's own ReLU/LeakyReLU backward kernels, one vectorised pass (torch.where with a
    # comparison was two passes and 8x slower).
    if slope:
        return torch.ops.aten.leaky_relu_backward(g, y, slope, True)
    return torch.ops.aten.threshold_backward(g, y, 0)


def _without_activation(ctx):
    """ctx's view for _differentiable: the norm alone (the residual and the activation are
    outside it here)."""
    return types.SimpleNamespace(training=ctx.training, eps=ctx.eps, act=NONE, saved_tensors=ctx.saved_tensors)


class BatchNormAddFunction(torch.autograd.Function):
    """forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
    activation, act_a, act_b, residual) -> (y, mean, rstd)."""

    generate_vmap_rule = True
    native = _C.batch_norm_add  # the plain eager path's C++ node (autograd.apply)

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a, act_b, residual):
        return ops_for(x).batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, act,
                                         act_a, act_b, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs[:-1], output)  # the norm's: ops, eps, act
        y, mean, rstd = output
        ctx.save_for_backward(*inputs[:3], mean, rstd, y)  # and y, for act'
        ctx.training, ctx.residual_dtype = inputs[5], inputs[-1].dtype

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 12
        x, weight, bias, mean, rstd, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = _grad_mask(ctx, weight, bias)
        if not (mask[0] or mask[1] or mask[2] or needs[11]):
            return (None,) * 12
        if torch.is_grad_enabled() and _second_derivative_wanted(ctx):
            # act' is piecewise constant: only dz's dependence on dy is differentiated.
            dz = _through_activation(dy, y.detach(), ctx.act)
            norm = _without_activation(ctx)
            dx, dw, db = _recomputed(lambda c, *t: _differentiable.output("batch_norm", norm, *t), norm, dz, mask)
        else:
            with torch.no_grad():
                dz = _through_activation(dy, y, ctx.act)
                dx, dw, db = ctx.ops.batch_norm_bwd(dz, x, weight, bias, mean, rstd, ctx.training, 0, 0.0, 0.0, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                *(None,) * 8, dz.to(ctx.residual_dtype) if needs[11] else None)


def _setup_with_jvp(ctx, inputs, output):
    BatchNormAddFunction.setup_context(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:3], *output[1:], output[0])  # x, weight, bias, mean, rstd, y


def _jvp(ctx, x_t, weight_t, bias_t, *rest):
    """y_t = act'(pre) * (bn's tangent + z_t), act' read off y."""
    z_t = rest[-1]
    x, weight, bias, mean, rstd, y = ctx.saved_tensors  # those saved for forward
    norm = _without_activation(ctx)
    t = _differentiable.tangent("batch_norm", norm, x, weight, bias, mean, rstd, x_t, weight_t, bias_t)
    if z_t is not None:
        t = t + z_t.to(t.dtype)
    return _through_activation(t, y, ctx.act).to(x.dtype), None, None


# Dynamo refuses to trace a Function that defines jvp (autograd._with_jvp).
BatchNormAddForwardMode = type("BatchNormAddFunctionForwardMode", (BatchNormAddFunction,),
                               {"setup_context": staticmethod(_setup_with_jvp), "jvp": staticmethod(_jvp),
                                "__module__": __name__})
BatchNormAddFunction.classic = _classic(BatchNormAddFunction)
BatchNormAddFunction.forward_mode = BatchNormAddForwardMode
