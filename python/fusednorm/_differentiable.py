"""Each norm's forward in differentiable torch ops, for a backward that autograd records.

The backward ops have no derivative of their own. When autograd records a backward
(`create_graph=True`: gradient penalties, MAML-style meta-gradients, Hessian-vector
products), autograd.py recomputes the norm's output with these functions and lets autograd
differentiate that: the gradient is then a graph that can be differentiated again, as
torch.nn's is. Slower than the fused kernels and keeps more memory, so it runs only then.

Each function takes the Function's ctx (the arguments setup_context kept), the saved
input, weight, bias and statistics, and returns act(norm(x)) in x's dtype. The statistics
are computed as the kernels compute them: in float32 (float64 for float64 input), two-pass
(the mean, then the mean of the squared deviations).
"""
import math

import torch
import torch.nn.functional as F

from ._activation import activation_code

_RELU, _LEAKY_RELU = activation_code("relu"), activation_code("leaky_relu")


def _normalize(x, dims, eps, mean=None, rstd=None):
    """(x - mean) * rstd in the statistics' dtype: over `dims` (kept as size-1 dims) of x,
    or with the given, broadcastable, statistics."""
    xs = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if mean is None:
        mean = xs.mean(dims, keepdim=True)
        rstd = torch.rsqrt((xs - mean).square().mean(dims, keepdim=True) + eps)
    return (xs - mean) * rstd


def _affine_activation(ctx, xhat, weight, bias, param_shape, dtype):
    y = xhat
    if weight is not None:
        y = y * weight.reshape(param_shape)
    if bias is not None:
        y = y + bias.reshape(param_shape)
    if ctx.act == _RELU:
        y = F.relu(y)
    elif ctx.act == _LEAKY_RELU:
        y = F.leaky_relu(y, ctx.slope)
    return y.to(dtype)


def _channel_shape(x):
    """Per-channel values (dim 1) broadcast over x."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def batch_norm(ctx, x, weight, bias, mean, rstd):
    shape = _channel_shape(x)
    if ctx.training:  # batch statistics: they depend on x
        xhat = _normalize(x, [0] + list(range(2, x.dim())), ctx.eps)
    else:  # running statistics, as the forward read them: constants
        xhat = _normalize(x, None, None, mean.reshape(shape), rstd.reshape(shape))
    return _affine_activation(ctx, xhat, weight, bias, shape, x.dtype)


def instance_norm(ctx, x, weight, bias, mean, rstd):
    xhat = _normalize(x, list(range(2, x.dim())), ctx.eps)
    return _affine_activation(ctx, xhat, weight, bias, _channel_shape(x), x.dtype)


def layer_norm(ctx, x, weight, bias, mean, rstd):
    k = len(ctx.normalized_shape)
    xhat = _normalize(x, list(range(x.dim() - k, x.dim())), ctx.eps)
    return _affine_activation(ctx, xhat, weight, bias, tuple(ctx.normalized_shape), x.dtype)


def group_norm(ctx, x, weight, bias, mean, rstd):
    per_group = x.shape[1] // ctx.num_groups * math.prod(x.shape[2:])  # not -1: N may be 0
    grouped = x.reshape(x.shape[0], ctx.num_groups, per_group)
    xhat = _normalize(grouped, [2], ctx.eps).reshape(x.shape)
    return _affine_activation(ctx, xhat, weight, bias, _channel_shape(x), x.dtype)
