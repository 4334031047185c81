"""Argument checks of the Triton ops: csrc/common/checks.h's, with the same exception types
and messages (torch.nn's), for inputs that reach the ops without the C++ checks."""
import math

import torch

from .._activation import NUM_CODES as NUM_ACTIVATIONS  # norm_math.h's kNumActivations

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_activation(act):
    if not 0 <= act < NUM_ACTIVATIONS:
        raise ValueError(f"fusednorm: unknown activation code {act} (expected 0 to {NUM_ACTIVATIONS - 1})")


def _input_dtype(x, op, not_implemented):
    if x.dtype not in _FLOATS:
        if not_implemented:
            raise NotImplementedError(f'"{op}" not implemented for \'{x.dtype}\'')
        raise RuntimeError(f"{op}: expected a floating-point input (float32, float64, bfloat16 "
                           f"or float16), got {x.dtype}")


def _param(p, x, what, numel, op):
    if p is None:
        return
    if p.device != x.device:
        raise RuntimeError(f"{op}: {what} is on {p.device} but the input is on {x.device}")
    reduced = x.dtype in (torch.bfloat16, torch.float16)
    if not (p.dtype == x.dtype or (reduced and p.dtype == torch.float32)):
        raise RuntimeError(f"mixed dtype ({op}): {what} has dtype {p.dtype} but the input has "
                           f"dtype {x.dtype}; all inputs must share the same dtype (float32 "
                           "parameters are allowed with bfloat16/float16 inputs)")
    if p.numel() != numel:
        raise RuntimeError(f"{op}: {what} should contain {numel} elements not {p.numel()}")


def check_empty_affine(x, channels, weight, bias):
    """checks.h's: torch indexes weight[0] / bias[0] of an empty input's parameters (repeated
    N times by InstanceNorm): with no channel (or sample), an IndexError."""
    if x.numel() == 0 and channels == 0 and (weight is not None or bias is not None):
        raise IndexError("select(): index 0 out of range for tensor of size [0] at dimension 0")


def check_bn(x, weight, bias, running_mean, running_var):
    _input_dtype(x, "batch_norm", True)
    if x.dim() < 2:
        raise RuntimeError(f"batch_norm: expected at least 2D input (got {x.dim()}D input)")
    c = x.shape[1]
    check_empty_affine(x, c, weight, bias)
    for p, what in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, "weight"), (bias, "bias")):
        _param(p, x, what, c, "batch_norm")


def check_layer_norm(x, shape, weight, bias):
    """Returns the normalised size L."""
    _input_dtype(x, "layer_norm", False)
    shape = list(shape)
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., "
                           f"containing at least one element, but got normalized_shape = {shape}")
    if x.dim() < len(shape) or list(x.shape[x.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={shape}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(x.shape)}")
    for p, what in ((weight, "weight"), (bias, "bias")):
        if p is not None and list(p.shape) != shape:
            raise RuntimeError(f"Expected {what} to be of same shape as normalized_shape, but got "
                               f"{what} of shape {list(p.shape)} and normalized_shape = {shape}")
        _param(p, x, what, math.prod(shape), "layer_norm")
    return math.prod(shape)


def _check_residual(x, residual, op, allow_float32):
    """A residual (or its gradient) shaped, placed and typed as x, or float32 where
    allow_float32 (csrc/common/checks.h's check_residual)."""
    if residual is None:
        return
    if residual.shape != x.shape:
        raise RuntimeError(f"{op}: the residual has shape {list(residual.shape)} but the input has shape "
                           f"{list(x.shape)}")
    if residual.device != x.device:
        raise RuntimeError(f"{op}: the residual is on {residual.device} but the input is on {x.device}")
    if residual.dtype != x.dtype and not (allow_float32 and residual.dtype == torch.float32):
        raise RuntimeError(f"{op}: the residual has dtype {residual.dtype} but the input has dtype {x.dtype}"
                           + (" (float32 residuals are allowed with any input)" if allow_float32 else ""))


def check_bn_residual(x, residual, act):
    """BatchNorm's residual, in x's dtype; the activation none, relu or leaky_relu."""
    _check_residual(x, residual, "batch_norm", False)
    if residual is not None and act not in (0, 1, 2):
        raise ValueError(f"batch_norm with a residual: the activation must be none, relu or leaky_relu, not code {act}")


def check_add_norm(x, residual, shape, weight, bias, rms, op):
    """check_layer_norm, no bias for RMSNorm, a residual (or its gradient) in x's dtype or
    float32 (csrc/common/checks.h's check_add_norm)."""
    length = check_layer_norm(x, shape, weight, bias)
    if rms and bias is not None:
        raise RuntimeError(f"{op}: RMSNorm has no bias")
    _check_residual(x, residual, op, True)
    return length


def check_group_norm(x, groups, weight, bias, op="group_norm"):
    if x.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
    if op == "group_norm":
        _input_dtype(x, op, False)
    c = x.shape[1]
    if not ((groups > 0 and c % groups == 0) or (groups == 0 and c == 0)):
        raise RuntimeError("Expected number of channels in input to be divisible by num_groups, "
                           f"but got input of shape {list(x.shape)} and num_groups={groups}")
    for p, what in ((weight, "weight"), (bias, "bias")):
        if p is not None and (p.dim() != 1 or p.numel() != c):
            raise RuntimeError(f"Expected {what} to be a vector of size equal to the number of "
                               f"channels in input, but got {what} of shape {list(p.shape)} and "
                               f"input of shape {list(x.shape)}")
        _param(p, x, what, c, op)


def check_instance_norm(x, weight, bias, running_mean, running_var):
    _input_dtype(x, "instance_norm", True)
    if x.dim() < 2:
        raise RuntimeError(f"instance_norm: expected at least 2D input (got {x.dim()}D input)")
    c = x.shape[1]
    _param(running_mean, x, "running_mean", c, "instance_norm")
    _param(running_var, x, "running_var", c, "instance_norm")
    check_empty_affine(x, x.shape[0] * c, weight, bias)
    check_group_norm(x, c, weight, bias, "instance_norm")


def check_group_norm_sizes(x):
    """GroupNorm's own refusals, torch's (checks.h)."""
    if x.shape[1] == 0:
        raise RuntimeError("Expected number of channels to be greater than 0, got 0")
    if math.prod(x.shape[2:]) == 0:
        raise RuntimeError("Expected HxW to be greater than 0, got 0")


def check_backward(grad_out, x, mean, rstd, count, op):
    """A backward op's own arguments (checks.h, check_backward_args): grad_out shaped as the
    input, `count` saved statistics of each kind, all on the input's device."""
    if grad_out.shape != x.shape:
        raise RuntimeError(f"{op}: grad_out has shape {list(grad_out.shape)} but the input has "
                           f"shape {list(x.shape)}")
    for t, what in ((grad_out, "grad_out"), (mean, "mean"), (rstd, "rstd")):
        if t.device != x.device:
            raise RuntimeError(f"{op}: {what} is on {t.device} but the input is on {x.device}")
        if t is not grad_out and t.numel() != count:
            raise RuntimeError(f"{op}: {what} should contain {count} elements (the forward's "
                               f"statistics for this input) not {t.numel()}")
