"""torch.autograd.Function wrappers over the fusednorm ops: forward calls the *_fwd op and
saves what its backward op needs; backward calls the *_bwd op of the same backend
(backend.ops_for picks torch.ops.fusednorm or torch.ops.fusednorm_triton). No torch
normalisation kernel is called on this path."""
import functools

import torch
from torch.autograd.function import once_differentiable

from .backend import ops_for


def first_order_only(backward):
    """torch's @once_differentiable without its cost on the usual path. The backward ops
    have no derivative of their own, so a double backward (create_graph=True, the only
    time backward runs with grad mode on) goes through once_differentiable, which makes
    differentiating the gradients raise instead of returning wrong zeros. A plain
    backward skips its no_grad block and output wrapping: about 6 % of a tiny module's
    forward+backward (bench.py's per-call overhead)."""
    refusing = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return refusing(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def apply(function, x, weight, bias, *rest):
    """function.apply(x, weight, bias, *rest): the output of a norm. When no gradient can
    flow (grad mode off, or none of x, weight, bias requires one: inference, frozen
    layers) the forward op is called directly, without autograd.Function's ~14 µs a call
    (a third of a small eval-mode forward); the result is the same."""
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return function.apply(x, weight, bias, *rest)
    return function.run(ops_for(x), x, weight, bias, *rest)[0]


def _grad_mask(ctx, weight, bias):
    """Which of (input, weight, bias) need a gradient; weight/bias at argument 1 and 2."""
    return [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    ]


def _grads(mask, dx, dw, db, n_other):
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None) + (None,) * n_other


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def run(ops, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
        return ops.batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope)

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
        ctx.ops = ops_for(x)
        y, mean, rstd = BatchNormFunction.run(
            ctx.ops, x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.training, ctx.act, ctx.slope = training, act, slope
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.batch_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.training, ctx.act, ctx.slope, mask)
        return _grads(mask, dx, dw, db, 7)


class InstanceNormFunction(torch.autograd.Function):
    """InstanceNorm with input statistics; backward is GroupNorm's with one group per channel."""

    @staticmethod
    def run(ops, x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
        return ops.instance_norm_fwd(x, weight, bias, running_mean, running_var, momentum, eps, act, slope)

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
        ctx.ops = ops_for(x)
        y, mean, rstd = InstanceNormFunction.run(
            ctx.ops, x, weight, bias, running_mean, running_var, momentum, eps, act, slope
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.act, ctx.slope = act, slope
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, x.shape[1], mean, rstd, weight, bias, ctx.act, ctx.slope, mask)
        return _grads(mask, dx, dw, db, 6)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def run(ops, x, weight, bias, normalized_shape, eps, act, slope):
        return ops.layer_norm_fwd(x, normalized_shape, weight, bias, eps, act, slope)

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, act, slope):
        ctx.ops = ops_for(x)
        y, mean, rstd = LayerNormFunction.run(ctx.ops, x, weight, bias, normalized_shape, eps, act, slope)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.act, ctx.slope = normalized_shape, act, slope
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.layer_norm_bwd(
            dy, x, ctx.normalized_shape, mean, rstd, weight, bias, ctx.act, ctx.slope, mask
        )
        return _grads(mask, dx, dw, db, 4)


class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def run(ops, x, weight, bias, num_groups, eps, act, slope):
        return ops.group_norm_fwd(x, num_groups, weight, bias, eps, act, slope)

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, act, slope):
        ctx.ops = ops_for(x)
        y, mean, rstd = GroupNormFunction.run(ctx.ops, x, weight, bias, num_groups, eps, act, slope)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.act, ctx.slope = num_groups, act, slope
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, ctx.num_groups, mean, rstd, weight, bias, ctx.act, ctx.slope, mask)
        return _grads(mask, dx, dw, db, 4)
