"""Loads the compiled ops (torch.ops.fusednorm.*) and registers their fake kernels, which
describe output shapes and dtypes so torch.compile and meta tensors can trace through."""
import torch

from . import _C  # noqa: F401  (importing registers the ops)

ops = torch.ops.fusednorm


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_unless(flag, like, shape=None):
    if flag:
        return like.new_empty(like.shape if shape is None else shape)
    return like.new_empty((0,))


def _like_keeping_channels_last(x):
    """torch.empty_like keeps channels_last, which is what the kernels return."""
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
            return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusednorm::batch_norm_fwd")
def _(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope):
    c = x.shape[1]
    return _like_keeping_channels_last(x), x.new_empty((c,), dtype=_stat_dtype(x)), x.new_empty((c,), dtype=_stat_dtype(x))


@torch.library.register_fake("fusednorm::batch_norm_stats")
def _(x):
    c = x.shape[1]
    return x.new_empty((c,), dtype=_stat_dtype(x)), x.new_empty((c,), dtype=_stat_dtype(x))


@torch.library.register_fake("fusednorm::batch_norm_bwd")
def _(dy, x, weight, bias, mean, rstd, training, act, slope, mask):
    dx = _like_keeping_channels_last(x) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, (x.shape[1],))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, (x.shape[1],))
    return dx, dw, db


def _ln_rows(x, normalized_shape):
    return x.shape[: x.dim() - len(normalized_shape)].numel()


@torch.library.register_fake("fusednorm::layer_norm_fwd")
def _(x, normalized_shape, weight, bias, eps, act, slope):
    r = _ln_rows(x, normalized_shape)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((r,), dtype=_stat_dtype(x)), x.new_empty((r,), dtype=_stat_dtype(x))


@torch.library.register_fake("fusednorm::layer_norm_bwd")
def _(dy, x, normalized_shape, mean, rstd, weight, bias, act, slope, mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, tuple(normalized_shape))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, tuple(normalized_shape))
    return dx, dw, db


@torch.library.register_fake("fusednorm::group_norm_fwd")
def _(x, num_groups, weight, bias, eps, act, slope):
    y = _like_keeping_channels_last(x)
    n = x.shape[0]
    return y, x.new_empty((n, num_groups), dtype=_stat_dtype(x)), x.new_empty((n, num_groups), dtype=_stat_dtype(x))


@torch.library.register_fake("fusednorm::group_norm_bwd")
def _(dy, x, num_groups, mean, rstd, weight, bias, act, slope, mask):
    dx = _like_keeping_channels_last(x) if mask[0] else x.new_empty((0,))
    dw = _empty_unless(mask[1] and weight is not None, weight if weight is not None else x, (x.shape[1],))
    db = _empty_unless(mask[2] and bias is not None, bias if bias is not None else x, (x.shape[1],))
    return dx, dw, db


@torch.library.register_fake("fusednorm::instance_norm_fwd")
def _(x, weight, bias, running_mean, running_var, momentum, eps, act, slope):
    n, c = x.shape[0], x.shape[1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty((n, c), dtype=_stat_dtype(x)), x.new_empty((n, c), dtype=_stat_dtype(x))
