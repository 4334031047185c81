"""Loads the compiled ops (torch.ops.fusednorm.*) and registers their fake kernels, which
describe output shapes and dtypes so torch.compile and meta tensors can trace through.
The Triton backend's ops (torch.ops.fusednorm_triton.*) share the schemas' meaning and
register the same fakes (register_fakes) and vmap rules (_vmap.py)."""
import math

import torch

from . import _C  # noqa: F401  (importing registers the ops)
from ._layout import batch_norm_format, group_norm_format
from ._vmap import register_vmap_rules

ops = torch.ops.fusednorm


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _same_device(x, *tensors):
    """The device check the compiled ops make, for inputs that reach the fake kernels (a
    meta input beside CPU parameters): torch.nn's error."""
    for t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {x.device}!")


def _empty_unless(flag, like, shape=None):
    if flag:
        return like.new_empty(like.shape if shape is None else shape)
    return like.new_empty((0,))


def _fake_batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a, act_b,
                         residual=None):
    _same_device(x, weight, bias, running_mean, running_var, residual)
    c = x.shape[1]
    y = torch.empty_like(x, memory_format=batch_norm_format(x))
    return y, x.new_empty((c,), dtype=_stat_dtype(x)), x.new_empty((c,), dtype=_stat_dtype(x))


def _fake_batch_norm_stats(x):
    c = x.shape[1]
    return x.new_empty((c,), dtype=_stat_dtype(x)), x.new_empty((c,), dtype=_stat_dtype(x))


def _fake_batch_norm_bwd(dy, x, weight, bias, mean, rstd, training, act, act_a, act_b, mask):
    _same_device(x, dy, weight, bias, mean, rstd)
    dx = torch.empty_like(x, memory_format=batch_norm_format(x)) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, (x.shape[1],))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, (x.shape[1],))
    return dx, dw, db


def _ln_rows(x, normalized_shape):
    # math.prod keeps symbolic sizes symbolic; torch.Size.numel() made torch.export
    # specialise a dynamic batch dim to its example value.
    return math.prod(x.shape[: x.dim() - len(normalized_shape)])


def _fake_layer_norm_fwd(x, normalized_shape, weight, bias, eps, act, act_a, act_b):
    _same_device(x, weight, bias)
    r = _ln_rows(x, normalized_shape)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((r,), dtype=_stat_dtype(x)), x.new_empty((r,), dtype=_stat_dtype(x))


def _fake_layer_norm_bwd(dy, x, normalized_shape, mean, rstd, weight, bias, act, act_a, act_b, mask):
    _same_device(x, dy, mean, rstd, weight, bias)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, tuple(normalized_shape))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, tuple(normalized_shape))
    return dx, dw, db


def _fake_add_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, residual_in_fp32, act, act_a, act_b):
    _same_device(x, residual, weight, bias)
    r = _ln_rows(x, normalized_shape)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if residual is None:
        s = x.new_empty((0,))
    else:
        s = torch.empty_like(x, dtype=torch.float32 if residual_in_fp32 else x.dtype,
                             memory_format=torch.contiguous_format)
    normalised = s if residual is not None else x
    return y, s, x.new_empty((r,), dtype=_stat_dtype(normalised)), x.new_empty((r,), dtype=_stat_dtype(normalised))


def _fake_add_norm_bwd(dy, dres, x, normalized_shape, mean, rstd, weight, bias, rms, act, act_a, act_b, mask):
    _same_device(x, dy, dres, mean, rstd, weight, bias)
    return _fake_layer_norm_bwd(dy, x, normalized_shape, mean, rstd, weight, bias, act, act_a, act_b, mask)


def _fake_group_norm_fwd(x, num_groups, weight, bias, eps, act, act_a, act_b):
    _same_device(x, weight, bias)
    y = torch.empty_like(x, memory_format=group_norm_format(x))
    n = x.shape[0]
    return y, x.new_empty((n, num_groups), dtype=_stat_dtype(x)), x.new_empty((n, num_groups), dtype=_stat_dtype(x))


def _fake_group_norm_bwd(dy, x, num_groups, mean, rstd, weight, bias, act, act_a, act_b, mask):
    _same_device(x, dy, mean, rstd, weight, bias)
    dx = torch.empty_like(x, memory_format=group_norm_format(x)) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, (x.shape[1],))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, (x.shape[1],))
    return dx, dw, db


def _fake_instance_norm_fwd(x, weight, bias, running_mean, running_var, momentum, eps, act, act_a, act_b):
    _same_device(x, weight, bias, running_mean, running_var)
    n, c = x.shape[0], x.shape[1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((n, c), dtype=_stat_dtype(x)), x.new_empty((n, c), dtype=_stat_dtype(x))


FAKES = {
    "batch_norm_fwd": _fake_batch_norm_fwd,
    "batch_norm_stats": _fake_batch_norm_stats,
    "batch_norm_bwd": _fake_batch_norm_bwd,
    "layer_norm_fwd": _fake_layer_norm_fwd,
    "layer_norm_bwd": _fake_layer_norm_bwd,
    "add_norm_fwd": _fake_add_norm_fwd,
    "add_norm_bwd": _fake_add_norm_bwd,
    "group_norm_fwd": _fake_group_norm_fwd,
    "group_norm_bwd": _fake_group_norm_bwd,
    "instance_norm_fwd": _fake_instance_norm_fwd,
}


def register_fakes(namespace):
    """Registers the fake kernel of every fusednorm op under `namespace`."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)


register_fakes("fusednorm")
register_vmap_rules("fusednorm")
