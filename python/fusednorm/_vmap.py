"""torch.vmap rules for every fusednorm op but batch_norm_stats (SyncBatchNorm's). torch's
batched fallback (one op call per sample) refuses ops that mutate arguments, as
batch_norm_fwd and instance_norm_fwd may (running statistics), and is slow for the rest. The
Functions in autograd.py set generate_vmap_rule so vmap reaches these rules.

A vmapped call is B independent calls, one per sample. Where the norm's statistics do not
mix samples it is one call on the samples stacked along the batch dim (N -> B*N):
LayerNorm, GroupNorm, InstanceNorm, and BatchNorm in eval (running statistics, read only).
BatchNorm's training statistics are per sample's batch: the samples side by side as
channels (C -> B*C), as the backward rules of GroupNorm and BatchNorm do. Batched
parameters differ per sample: one call per sample. Running statistics updated in place
from batched statistics cannot be one tensor: refused as torch refuses it, unless they are
batched themselves (then each sample's call updates its own slice)."""
import math

import torch

from . import _differentiable
from ._activation import Activation

_REFUSED = ("fusednorm {op} under vmap: the running_mean and running_var, which will be updated "
            "in place, are not batched, so they cannot take one update per sample (torch.nn's "
            "norms refuse this too). Use track_running_stats=False, eval mode, or batched running "
            "statistics")


def _per_sample(op, batch_size, in_dims, args):
    """The op once per sample (args sliced on their batched dim), results stacked at 0."""
    if batch_size == 0:  # no call to take the results' shapes from
        raise RuntimeError(f"fusednorm: {op} under vmap over zero samples is only supported with "
                           "parameters and statistics shared by the samples")
    outs = []
    for i in range(batch_size):
        sample = [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                  for a, d in zip(args, in_dims)]  # a list argument's in_dims entry is a list
        outs.append(op(*sample))
    return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])


def _no_samples(x, x_dim, weight, bias, mask):
    """A backward op's results under vmap over zero samples: gradients of (0, *sample's
    shape), where one call on the (empty) stacked samples would have no channels or groups
    left to check the arguments against."""
    xb = x.movedim(x_dim, 0) if x_dim is not None else x.unsqueeze(0)[:0]
    outs = [(torch.empty_like(xb, memory_format=torch.contiguous_format), 0) if mask[0] else (xb.new_empty((0,)), None)]
    for asked, p in ((mask[1], weight), (mask[2], bias)):
        outs.append((p.new_empty((0, *p.shape)), 0) if asked and p is not None else (xb.new_empty((0,)), None))
    return tuple(t for t, _ in outs), tuple(d for _, d in outs)


def _stacked(op, x, x_dim, args):
    """The op on the samples stacked along the batch dim: x (.., B at x_dim, ..) -> (B*N, ...);
    outputs (B*N, ...) split back into (B, N, ...)."""
    xb = x.movedim(x_dim, 0)
    sizes = xb.shape[:2]  # (B, N), not (B, -1), which cannot be sized when B is 0
    outs = op(xb.flatten(0, 1), *args)
    return tuple(t.unflatten(0, sizes) for t in outs), (0, 0, 0)


def _layer_norm_fwd_rule(op):
    def rule(info, in_dims, x, normalized_shape, weight, bias, eps, act, act_a, act_b):
        x_dim, w_dim, b_dim = in_dims[0], in_dims[2], in_dims[3]
        if x_dim is not None and w_dim is None and b_dim is None:
            # The batch dim is one more leading dim: mean/rstd have one entry per row.
            xb = x.movedim(x_dim, 0)
            y, mean, rstd = op(xb, normalized_shape, weight, bias, eps, act, act_a, act_b)
            stats = (xb.shape[0], math.prod(xb.shape[1:xb.dim() - len(normalized_shape)]))  # (B, rows)
            return (y, mean.reshape(stats), rstd.reshape(stats)), (0, 0, 0)
        return _per_sample(op, info.batch_size, in_dims, (x, normalized_shape, weight, bias, eps, act, act_a, act_b))
    return rule


def _leading(t, d, batch_size):
    """t with the batch dim first; unbatched (a tensor shared by the samples): expanded."""
    return t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape)


def _add_norm_fwd_rule(op):
    def rule(info, in_dims, x, residual, normalized_shape, weight, bias, *rest):
        x_dim, r_dim, w_dim, b_dim = in_dims[0], in_dims[1], in_dims[3], in_dims[4]
        if w_dim is not None or b_dim is not None or (x_dim is None and r_dim is None):
            return _per_sample(op, info.batch_size, in_dims, (x, residual, normalized_shape, weight, bias, *rest))
        # The batch dim is one more leading dim: mean/rstd have one entry per row.
        xb = _leading(x, x_dim, info.batch_size)
        rb = None if residual is None else _leading(residual, r_dim, info.batch_size)
        y, s, mean, rstd = op(xb, rb, normalized_shape, weight, bias, *rest)
        stats = (xb.shape[0], math.prod(xb.shape[1:xb.dim() - len(normalized_shape)]))  # (B, rows)
        return (y, s, mean.reshape(stats), rstd.reshape(stats)), (0, 0 if rb is not None else None, 0, 0)
    return rule


def _group_norm_fwd_rule(op):
    def rule(info, in_dims, x, num_groups, weight, bias, eps, act, act_a, act_b):
        x_dim, w_dim, b_dim = in_dims[0], in_dims[2], in_dims[3]
        if x_dim is not None and w_dim is None and b_dim is None:
            return _stacked(op, x, x_dim, (num_groups, weight, bias, eps, act, act_a, act_b))
        return _per_sample(op, info.batch_size, in_dims, (x, num_groups, weight, bias, eps, act, act_a, act_b))
    return rule


def _instance_norm_fwd_rule(op):
    def rule(info, in_dims, x, weight, bias, running_mean, running_var, momentum, eps, act, act_a, act_b):
        x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
        tracked = running_mean is not None or running_var is not None
        if tracked and (rm_dim is None or rv_dim is None):
            raise RuntimeError(_REFUSED.format(op="instance_norm"))
        if x_dim is not None and w_dim is None and b_dim is None and not tracked:
            return _stacked(op, x, x_dim, (weight, bias, None, None, momentum, eps, act, act_a, act_b))
        args = (x, weight, bias, running_mean, running_var, momentum, eps, act, act_a, act_b)
        return _per_sample(op, info.batch_size, in_dims, args)
    return rule


def _batch_norm_fwd_rule(op):
    def rule(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a,
             act_b, residual=None):
        x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
        tracked = running_mean is not None or running_var is not None
        if training and tracked and (rm_dim is None or rv_dim is None):
            raise RuntimeError(_REFUSED.format(op="batch_norm"))
        if residual is not None:  # act(bn(x) + z): one call per sample
            args = (x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a, act_b, residual)
            return _per_sample(op, info.batch_size, list(in_dims) + [None] * (len(args) - len(in_dims)), args)
        if not training and x_dim is not None and w_dim is None and b_dim is None \
                and rm_dim is None and rv_dim is None:
            # Eval: per-channel running statistics, not batched: mean/rstd are shared.
            xb = x.movedim(x_dim, 0)
            y, mean, rstd = op(xb.flatten(0, 1), weight, bias, running_mean, running_var, training,
                               momentum, eps, act, act_a, act_b)
            return (y.unflatten(0, xb.shape[:2]), mean, rstd), (0, None, None)
        B = info.batch_size
        if training and not tracked and x_dim is not None and w_dim is None and b_dim is None and B:
            # Training statistics are per sample's batch: the samples side by side as
            # channels, (N, C, ...) -> (N, B*C, ...), each (sample, channel) its own.
            y, mean, rstd = op(_side_by_side(x, x_dim, B), _repeat(weight, B), _repeat(bias, B), None, None,
                               training, momentum, eps, act, act_a, act_b)
            return (y.unflatten(1, (B, -1)), mean.unflatten(0, (B, -1)), rstd.unflatten(0, (B, -1))), (1, 0, 0)
        args = (x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a, act_b)
        return _per_sample(op, B, in_dims, args)
    return rule


def _side_by_side_bwd_rule(op, w_at, args_side_by_side):
    """A backward op's vmap rule with the B samples side by side as channels: (N, C, ...)
    per sample -> one input of (N, B*C, ...), the parameters repeated B times. Each channel
    b*C + c keeps sample b's statistics, and its parameter gradient is sample b's gradient
    of channel c: per-sample input and parameter gradients from one call (for per-sample
    gradients' usual N = 1, side by side is a view). args_side_by_side(B, in_dims, *args)
    gives the op's arguments for that call. Batched parameters go one call per sample.
    The op's arguments: (dy, x, ...) first, weight and bias at w_at and w_at + 1, mask last."""
    def rule(info, in_dims, *args):
        weight, bias, mask = args[w_at], args[w_at + 1], args[-1]
        if in_dims[w_at] is not None or in_dims[w_at + 1] is not None:  # batched parameters
            return _per_sample(op, info.batch_size, in_dims, args)
        B = info.batch_size
        if B == 0:
            return _no_samples(args[1], in_dims[1], weight, bias, mask)
        dx, dw, db = op(*args_side_by_side(B, in_dims, *args))
        # Back per sample: dx batched at dim 1, dw/db at 0; outputs not asked for (mask) are
        # empty and unbatched.
        outs = [(dx.unflatten(1, (B, -1)), 1) if mask[0] else (dx, None)]
        outs += [(g.unflatten(0, (B, -1)), 0) if g.numel() else (g, None) for g in (dw, db)]
        return tuple(t for t, _ in outs), tuple(d for _, d in outs)
    return rule


def _side_by_side(t, d, batch):
    """(N, K, ...) per sample, batched at d (None: shared) -> (N, batch*K, ...): the samples
    side by side along dim 1. A view for N = 1."""
    t = t.movedim(d, 1) if d is not None else t.unsqueeze(1).expand(t.shape[0], batch, *t.shape[1:])
    return t.flatten(1, 2)


def _repeat(p, batch):
    return None if p is None else p.repeat(batch)


def _group_norm_bwd_args(B, in_dims, dy, x, num_groups, mean, rstd, weight, bias, act, act_a, act_b, mask):
    """GroupNorm's and InstanceNorm's backward side by side: B*G groups, each group's
    statistics (N, G per sample) its sample's own."""
    side = lambda t, d: _side_by_side(t, d, B)  # noqa: E731
    return (side(dy, in_dims[0]), side(x, in_dims[1]), B * num_groups, side(mean, in_dims[3]),
            side(rstd, in_dims[4]), _repeat(weight, B), _repeat(bias, B), act, act_a, act_b, mask)


def _batch_norm_bwd_args(B, in_dims, dy, x, weight, bias, mean, rstd, training, act, act_a, act_b, mask):
    """BatchNorm's backward side by side: the per-channel statistics (training: over the
    sample's batch; eval: the running ones, repeated) as B*C channels'."""
    def per_channel(t, d):  # (C,) per sample -> (B*C,)
        return t.movedim(d, 0).flatten() if d is not None else t.repeat(B)

    return (_side_by_side(dy, in_dims[0], B), _side_by_side(x, in_dims[1], B), _repeat(weight, B),
            _repeat(bias, B), per_channel(mean, in_dims[4]), per_channel(rstd, in_dims[5]), training, act,
            act_a, act_b, mask)


# Largest sample (elements) whose LayerNorm backward under vmap runs stacked (below). The
# per-sample parameter sums in torch ops pass over memory several times where the op
# passes once. Per-sample gradients (vmap(grad)) of LayerNorm, time stacked vs one op call
# per sample (torch's batched fallback), 2 cores: samples of 1K elements 0.55x, 4K 0.75x,
# 8K 0.8x, 16K 0.95x, 32K level; 98K-393K 1.1-1.8x (against _per_sample).
_STACKED_LAYER_NORM_BWD_MAX = 1 << 14


def _layer_norm_bwd_rule(op):
    """LayerNorm's backward under vmap (per-sample gradients), with parameters shared by the
    samples. The input gradient is per row: one call on every sample's rows, the batch dim
    being one more leading dim. The op's parameter gradients sum over all those rows, which
    would add the samples' together: they are summed per sample instead, from the same saved
    statistics (_differentiable.layer_norm_param_grads). Large samples, and batched
    parameters, go one op call per sample."""
    def rule(info, in_dims, dy, x, normalized_shape, mean, rstd, weight, bias, act, act_a, act_b, mask):
        def dx_call(dy, x, mean, rstd):
            return op(dy, x, normalized_shape, mean, rstd, weight, bias, act, act_a, act_b, [True, False, False])[0]
        return _row_bwd(info, in_dims[:2] + in_dims[3:7], (dy, x, mean, rstd, weight, bias), dx_call,
                        lambda: _per_sample(op, info.batch_size, in_dims, (dy, x, normalized_shape, mean, rstd,
                                                                          weight, bias, act, act_a, act_b, mask)),
                        normalized_shape, Activation(act, act_a, act_b), mask)
    return rule


def _add_norm_bwd_rule(op):
    """add_norm_bwd under vmap: LayerNorm's rule, the residual's gradient batched as dy."""
    def rule(info, in_dims, dy, dres, x, normalized_shape, mean, rstd, weight, bias, rms, act, act_a, act_b,
             mask):
        def dx_call(dy, x, mean, rstd):
            d = None if dres is None else _leading(dres, in_dims[1], info.batch_size)
            return op(dy, d, x, normalized_shape, mean, rstd, weight, bias, rms, act, act_a, act_b,
                      [True, False, False])[0]
        return _row_bwd(info, (in_dims[0], in_dims[2]) + in_dims[4:8], (dy, x, mean, rstd, weight, bias), dx_call,
                        lambda: _per_sample(op, info.batch_size, in_dims, (dy, dres, x, normalized_shape, mean, rstd,
                                                                          weight, bias, rms, act, act_a, act_b, mask)),
                        normalized_shape, Activation(act, act_a, act_b), mask)
    return rule


def _row_bwd(info, dims, tensors, dx_call, per_sample, normalized_shape, act, mask):
    """The body of the two rules above: dims/tensors are those of (dy, x, mean, rstd,
    weight, bias); dx_call(dy, x, mean, rstd) the op's input gradient on stacked samples."""
    B = info.batch_size
    dy, x, mean, rstd, weight, bias = tensors
    sample_numel = x.numel() // B if dims[1] is not None and B else x.numel()
    if dims[4] is not None or dims[5] is not None or sample_numel > _STACKED_LAYER_NORM_BWD_MAX:
        return per_sample()
    dy, x, mean, rstd = (_leading(t, d, B) for t, d in zip((dy, x, mean, rstd), dims[:4]))
    empty = x.new_empty((0,))
    # Outputs not asked for (mask, or an absent parameter) are empty and unbatched.
    outs = [(empty, None)] * 3
    if mask[0]:
        outs[0] = (dx_call(dy, x, mean.reshape(-1), rstd.reshape(-1)), 0)
    if mask[1] or mask[2]:
        dw, db = _differentiable.layer_norm_param_grads(dy, x, normalized_shape, mean, rstd, weight, bias, act)
        for i, g in ((1, dw), (2, db)):
            if mask[i] and g is not None:
                outs[i] = (g, 0)
    return tuple(t for t, _ in outs), tuple(d for _, d in outs)


def register_vmap_rules(namespace):
    """Registers the rules above for the ops of `namespace` (fusednorm, fusednorm_triton)."""
    ops = getattr(torch.ops, namespace)
    torch.library.register_vmap(f"{namespace}::layer_norm_fwd", _layer_norm_fwd_rule(ops.layer_norm_fwd))
    torch.library.register_vmap(f"{namespace}::group_norm_fwd", _group_norm_fwd_rule(ops.group_norm_fwd))
    torch.library.register_vmap(f"{namespace}::instance_norm_fwd", _instance_norm_fwd_rule(ops.instance_norm_fwd))
    torch.library.register_vmap(f"{namespace}::batch_norm_fwd", _batch_norm_fwd_rule(ops.batch_norm_fwd))
    torch.library.register_vmap(f"{namespace}::group_norm_bwd",
                                _side_by_side_bwd_rule(ops.group_norm_bwd, 5, _group_norm_bwd_args))
    torch.library.register_vmap(f"{namespace}::layer_norm_bwd", _layer_norm_bwd_rule(ops.layer_norm_bwd))
    torch.library.register_vmap(f"{namespace}::add_norm_fwd", _add_norm_fwd_rule(ops.add_norm_fwd))
    torch.library.register_vmap(f"{namespace}::add_norm_bwd", _add_norm_bwd_rule(ops.add_norm_bwd))
    torch.library.register_vmap(f"{namespace}::batch_norm_bwd",
                                _side_by_side_bwd_rule(ops.batch_norm_bwd, 2, _batch_norm_bwd_args))
