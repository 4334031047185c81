"""torch.nn.functional's normalisation functions with a fused activation.

Each takes torch.nn.functional's arguments plus keyword-only `activation` (None, a name such
as "relu", "silu", "gelu", or a torch.nn activation module such as nn.GELU(approximate="tanh"),
whose parameters are honoured) and `negative_slope` (for "leaky_relu"), and returns
act(norm(input))."""
import math

import torch

from ._activation import readable_from_output, resolve
from ._layout import rms_norm_format
from .autograd import BatchNormFunction, GroupNormFunction, InstanceNormFunction, LayerNormFunction, apply
from .autograd_add import apply_add_norm
from .autograd_bn_add import BatchNormAddFunction

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "add_layer_norm",
           "add_rms_norm"]


def _verify_batch_size(size):
    # torch.nn.functional's check, with its message.
    if math.prod([size[0]] + list(size[2:])) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _verify_spatial_size(size):
    if math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def _autocast_float32(input, weight, bias):
    """Under CUDA autocast torch computes layer_norm and group_norm in float32 (they are on
    autocast's float32 list) and returns float32: do the same. CPU autocast leaves norms in
    the input's dtype, as these kernels already do."""
    if input.is_cuda and torch.is_autocast_enabled("cuda"):
        cast = lambda t: t.float() if t is not None else None  # noqa: E731
        return cast(input), cast(weight), cast(bias)
    return input, weight, bias


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, residual=None):
    """torch.nn.functional.batch_norm followed by the activation, in one fused kernel. With
    `residual` (a tensor shaped and typed as the input): act(batch_norm(input) + residual),
    the ResNet block's tail; the activation is then None, "relu" or "leaky_relu" with a
    non-negative slope (ValueError otherwise)."""
    act = resolve(activation, negative_slope)
    if training:
        _verify_batch_size(input.size())
    if residual is not None:
        _check_residual_activation(act)
        return apply(BatchNormAddFunction, input, weight, bias, running_mean, running_var, bool(training),
                     float(momentum), float(eps), *act, residual)
    return apply(BatchNormFunction, input, weight, bias, running_mean, running_var, bool(training),
                 float(momentum), float(eps), *act)


def _check_residual_activation(act):
    """BatchNorm's residual add reads the activation's derivative off its output."""
    if not readable_from_output(act):
        raise ValueError("fusednorm: batch_norm with a residual fuses activation=None, 'relu' or 'leaky_relu' "
                         f"with a non-negative slope, not {act}")


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None,
                  negative_slope=0.01):
    """torch.nn.functional.instance_norm followed by the activation, in one fused kernel."""
    act = resolve(activation, negative_slope)
    if use_input_stats:
        _verify_spatial_size(input.size())
        return apply(InstanceNormFunction, input, weight, bias, running_mean, running_var,
                     float(momentum), float(eps), *act)
    # Normalising with running statistics is per channel: BatchNorm's eval path, on a
    # contiguous input since torch.nn.InstanceNorm's output is contiguous whatever the
    # input's layout (BatchNorm's keeps channels_last).
    if input.dim() >= 2 and input.size(0) == 0:
        _no_instances(weight, bias)
    return apply(BatchNormFunction, input.contiguous(), weight, bias, running_mean, running_var,
                 False, float(momentum), float(eps), *act)


def _no_instances(weight, bias):
    """torch's instance_norm on a batch of no samples with running statistics (eval): it
    repeats the parameters N times and indexes them, an IndexError."""
    if weight is not None or bias is not None:
        raise IndexError("select(): index 0 out of range for tensor of size [0] at dimension 0")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None,
               negative_slope=0.01):
    """torch.nn.functional.layer_norm followed by the activation, in one fused kernel."""
    act = resolve(activation, negative_slope)
    input, weight, bias = _autocast_float32(input, weight, bias)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return apply(LayerNormFunction, input, weight, bias, [int(s) for s in normalized_shape],
                 float(eps), *act)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               negative_slope=0.01):
    """torch.nn.functional.group_norm followed by the activation, in one fused kernel."""
    act = resolve(activation, negative_slope)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    input, weight, bias = _autocast_float32(input, weight, bias)
    return apply(GroupNormFunction, input, weight, bias, int(num_groups), float(eps), *act)


def _shape(normalized_shape):
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return [int(v) for v in normalized_shape]


def _rms_eps(eps, dtype):
    """torch's rms_norm default: the epsilon of the type it computes in (float32 for
    16-bit inputs, as the code does; its documentation says the input dtype's)."""
    if eps is not None:
        return float(eps)
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _same_dtype_weight(input, weight):
    """torch.nn.RMSNorm returns the input's dtype whatever the weight's: a weight the
    kernels would refuse beside this input (float64 beside float32, bfloat16 beside
    float32) is converted, which is exact where torch's promotion keeps the input's dtype."""
    if weight is None or weight.dtype == input.dtype:
        return weight
    if weight.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16):
        return weight
    return weight.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, activation=None, negative_slope=0.01):
    """torch.nn.functional.rms_norm followed by the activation, in one fused kernel."""
    act = resolve(activation, negative_slope)
    input, weight, _ = _autocast_float32(input, weight, None)
    y = apply_add_norm(input, None, _same_dtype_weight(input, weight), None, _shape(normalized_shape), True,
                       False, _rms_eps(eps, input.dtype), *act)
    fmt = rms_norm_format(input)  # torch's strides (a channels_last input stays channels_last)
    return y if fmt == torch.contiguous_format else y.contiguous(memory_format=fmt)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None,
                   negative_slope=0.01, residual_in_fp32=False):
    """(act(layer_norm(input + residual)), input + residual) in one pass: the pre-norm
    transformer block's residual add. The sum is in float32 if residual_in_fp32, else in
    the input's dtype; the output is in the input's dtype."""
    act = resolve(activation, negative_slope)
    return apply_add_norm(input, residual, weight, bias, _shape(normalized_shape), False, bool(residual_in_fp32),
                          float(eps), *act)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, activation=None,
                 negative_slope=0.01, residual_in_fp32=False):
    """(act(rms_norm(input + residual)), input + residual) in one pass; as add_layer_norm.
    eps=None: torch's default for the sum's dtype."""
    act = resolve(activation, negative_slope)
    sum_dtype = torch.float32 if residual_in_fp32 else input.dtype
    return apply_add_norm(input, residual, weight, None, _shape(normalized_shape), True, bool(residual_in_fp32),
                          _rms_eps(eps, sum_dtype), *act)

