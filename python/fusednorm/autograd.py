"""torch.autograd.Function wrappers over the fusednorm ops: forward calls the *_fwd op,
setup_context saves what its backward op needs; backward calls the *_bwd op of the same backend
(backend.ops_for picks torch.ops.fusednorm or torch.ops.fusednorm_triton). No torch
normalisation kernel is called on this path."""
import functools

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from .backend import ops_for


def _differentiated_again_by_torch_func():
    """True when a torch.func transform will differentiate this backward's result: the
    backward runs under the innermost grad (or jvp) transform, and another one encloses it
    (grad(grad(f)), jacrev(jacrev(f))). once_differentiable does not see this case: it
    gets no error to raise there and the second derivative comes out as zeros."""
    stack = torch._C._functorch.get_interpreter_stack()  # None outside torch.func
    if not stack:
        return False
    differentiating = (TransformType.Grad, TransformType.Jvp)
    return sum(i.key() in differentiating for i in stack) > 1


def first_order_only(backward):
    """torch's @once_differentiable without its cost on the usual path. The backward ops
    have no derivative of their own, so a double backward (create_graph=True, the only
    time backward runs with grad mode on) goes through once_differentiable, which makes
    differentiating the gradients raise instead of returning wrong zeros; nested torch.func
    differentiation raises at once. A plain backward skips its no_grad block and output
    wrapping: about 6 % of a tiny module's forward+backward (bench.py's per-call overhead)."""
    refusing = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if grads[0] is None:  # the output's gradient is undefined, i.e. zero: so are the inputs'
            return (None,) * len(ctx.needs_input_grad)
        if torch.is_grad_enabled():
            if _differentiated_again_by_torch_func():
                raise RuntimeError(
                    "fusednorm: trying to differentiate twice: the norms' backward has no derivative "
                    "of its own (nested torch.func.grad / jacrev over a fusednorm norm)")
            return refusing(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def _no_gradient_can_flow(x, weight, bias):
    """True when nothing can differentiate this call: grad mode off or no input requiring
    a gradient, and no forward-mode AD (a dual_level, or a torch.func transform, which can
    differentiate tensors that do not require grad). The ops alone have no derivatives:
    called directly under forward-mode AD they would drop the tangents silently."""
    if forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not torch.is_grad_enabled() or not (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def apply(function, x, weight, bias, *rest):
    """function.apply(x, weight, bias, *rest)[0]: the output of a norm. When no gradient can
    flow (inference, frozen layers) the forward is called directly, without
    autograd.Function's ~14 µs a call (a third of a small eval-mode forward); the result
    is the same."""
    if _no_gradient_can_flow(x, weight, bias):
        return function.forward(x, weight, bias, *rest)[0]
    return function.apply(x, weight, bias, *rest)[0]


class _NormFunction(torch.autograd.Function):
    """The pattern of the four norms below. forward is the op alone and returns what the
    op returns, (y, mean, rstd); setup_context saves what the backward op needs. Keeping
    ctx out of forward (torch's "separate setup_context" form) is what lets torch.func
    transforms (grad, vjp, functional_call + grad) differentiate through the norms, as
    they do through torch.nn's. mean and rstd are outputs only to be saved: they are
    marked non-differentiable, and no gradients are materialised as zeros (an absent output
    gradient means no input gradients: first_order_only).

    torch.func.vmap (e.g. per-sample gradients, vmap(grad(f))) works for LayerNorm and
    GroupNorm: generate_vmap_rule lets torch run their ops once per sample (its batched
    fallback, which warns that it is slow). BatchNorm's and InstanceNorm's forward ops
    take the running statistics as mutable arguments, which that fallback refuses, so
    vmap over them raises, as torch.nn's BatchNorm does in training."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs[:3]
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.ops = ops_for(x)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.act, ctx.slope = inputs[-2:]  # every norm's last two arguments


def _grad_mask(ctx, weight, bias):
    """Which of (input, weight, bias) need a gradient; weight/bias at argument 1 and 2."""
    return [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    ]


def _grads(mask, dx, dw, db, n_other):
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None) + (None,) * n_other


class BatchNormFunction(_NormFunction):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.training = inputs[5]

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
        return ops_for(x).batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum,
                                         eps, act, slope)

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.batch_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.training, ctx.act, ctx.slope,
                                            mask)
        return _grads(mask, dx, dw, db, 7)


class InstanceNormFunction(_NormFunction):
    """InstanceNorm with input statistics; backward is GroupNorm's with one group per channel."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
        return ops_for(x).instance_norm_fwd(x, weight, bias, running_mean, running_var, momentum, eps, act,
                                            slope)

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, x.shape[1], mean, rstd, weight, bias, ctx.act, ctx.slope, mask)
        return _grads(mask, dx, dw, db, 6)


class LayerNormFunction(_NormFunction):
    generate_vmap_rule = True  # see _NormFunction

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.normalized_shape = inputs[3]

    @staticmethod
    def forward(x, weight, bias, normalized_shape, eps, act, slope):
        return ops_for(x).layer_norm_fwd(x, normalized_shape, weight, bias, eps, act, slope)

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.layer_norm_bwd(
            dy, x, ctx.normalized_shape, mean, rstd, weight, bias, ctx.act, ctx.slope, mask
        )
        return _grads(mask, dx, dw, db, 4)


class GroupNormFunction(_NormFunction):
    generate_vmap_rule = True  # see _NormFunction

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.num_groups = inputs[3]

    @staticmethod
    def forward(x, weight, bias, num_groups, eps, act, slope):
        return ops_for(x).group_norm_fwd(x, num_groups, weight, bias, eps, act, slope)

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, ctx.num_groups, mean, rstd, weight, bias, ctx.act, ctx.slope,
                                            mask)
        return _grads(mask, dx, dw, db, 4)
