"""The fusednorm ops on the Triton kernels: torch.ops.fusednorm_triton.*, with the same
signatures, results and fake kernels as torch.ops.fusednorm.* (csrc/schemas.h), so the
autograd wrappers call either namespace unchanged (fusednorm/backend.py picks one).

Each op checks its arguments, lays the input out for the kernels, launches them through
_launch (which counts launches: the tests use the count to prove Triton ran) and returns
torch's shapes. Opaque custom ops (torch.library.custom_op): torch.compile traces them
through the fakes and calls them as they are."""
import collections
import contextlib
import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import batch_norm_format, group_norm_format
from .._ops import _ln_rows, register_fakes
from .._vmap import register_vmap_rules
from . import channel_kernels as ck
from . import row_kernels as rk
from .checks import (
    check_activation,
    check_add_norm,
    check_backward,
    check_bn,
    check_bn_residual,
    check_group_norm,
    check_group_norm_sizes,
    check_instance_norm,
)

Tensor = torch.Tensor
_NS = "fusednorm_triton"

# Launch shapes. Tests shrink them (limits()) so that small inputs take the multi-block
# and multi-split paths.
_LIMITS = {"max_block": 4096, "block_j": 64, "elementwise_block": 1024, "max_programs": 1024,
           "max_row_programs": 2**31 - 1}  # CUDA's grid x limit: more rows are walked grid-stride

launches = collections.Counter()  # kernel name -> number of launches


@contextlib.contextmanager
def limits(**overrides):
    """Temporarily change the launch limits (tests: force row loops and split reductions)."""
    old = dict(_LIMITS)
    _LIMITS.update(overrides)
    try:
        yield
    finally:
        _LIMITS.clear()
        _LIMITS.update(old)


def kernels_interpreted():
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU
    tensors, in numpy)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(rk.row_fwd_kernel, InterpretedFunction)


# No fused multiply-adds the source does not ask for: the forward and backward kernels then
# compute the pre-activation (math.pre_activation) to the same bits, so the activation's
# derivative agrees with the output's side of a kink. The interpreter ignores it.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _launch(kernel, grid, *args, **meta):
    """Launches on the input's GPU and that GPU's current stream: Triton launches on the
    current device, so without the guard a tensor on cuda:1 would be handed to a kernel
    running on cuda:0. Compiled with COMPILE_OPTIONS."""
    launches[kernel.__name__] += 1
    device = args[0].device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta, **COMPILE_OPTIONS)


def _acc(x):
    """(torch dtype, Triton dtype) of the statistics: float64 for float64 input, else float32."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


# ---- per-channel (BatchNorm) -----------------------------------------------------------

def _spatial(x):
    return math.prod(x.shape[2:])


def _channel_view(x):
    """(dense input, N, C, S, (sn, sc, ss), chan_div): the input as (N, C, S) with strides,
    made dense in the memory format of BatchNorm's output (_layout.py)."""
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    fmt = batch_norm_format(x)
    if fmt == torch.preserve_format:  # empty: nothing is read
        return x, n, c, s, (c * s, s, 1), max(s, 1)
    x = x.contiguous(memory_format=fmt)
    if fmt != torch.contiguous_format:
        return x, n, c, s, (s * c, 1, c), 1
    return x, n, c, s, (c * s, s, 1), s


def _like_view(t, x):
    """t in the memory layout of x, a _channel_view input."""
    fmt = batch_norm_format(x)
    return t if fmt == torch.preserve_format else t.contiguous(memory_format=fmt)


def _reduce_tiles(m, c, strides):
    """(BLOCK_J, BLOCK_C, rows_per_split, splits) for an (m rows x c channels) reduction:
    channel tiles of 32 where channels are adjacent in memory (channels_last, LayerNorm's
    columns), single channels otherwise; enough splits to fill about max_programs programs."""
    block_c = min(32, triton.next_power_of_2(c)) if strides[1] == 1 else 1
    block_j = _LIMITS["block_j"] if block_c > 1 else 4 * _LIMITS["block_j"]
    channel_blocks = triton.cdiv(c, block_c)
    want = max(1, _LIMITS["max_programs"] // channel_blocks)
    rows = max(block_j, triton.cdiv(triton.cdiv(m, want), block_j) * block_j)
    return block_j, block_c, rows, triton.cdiv(m, rows)


def _channel_stats(x, n, c, s, strides, stat_dtype, acc):
    """Launches the partial moments; returns (partial means, partial M2s, rows_per_split, splits)."""
    m = n * s
    block_j, block_c, rows, splits = _reduce_tiles(m, c, strides)
    part_mean = torch.empty((splits, c), dtype=stat_dtype, device=x.device)
    part_m2 = torch.empty((splits, c), dtype=stat_dtype, device=x.device)
    _launch(ck.channel_moments_kernel, (triton.cdiv(c, block_c), splits), x, part_mean, part_m2,
            m, c, s, *strides, rows, ACC=acc, BLOCK_J=block_j, BLOCK_C=block_c)
    return part_mean, part_m2, rows, splits


def _channel_finish(x, c, parts, m, weight, bias, rm, rv, training, momentum, eps, stat_dtype, acc):
    """(mean, rstd, M2, alpha, bias) per channel; updates the running statistics in training."""
    out = [torch.empty(c, dtype=stat_dtype, device=x.device) for _ in range(5)]
    mean, rstd, m2, alpha, bias_acc = out
    part_mean, part_m2, rows, splits = parts if parts is not None else (mean, mean, 1, 0)
    dummy = mean
    block_c = min(256, triton.next_power_of_2(max(c, 1)))
    _launch(ck.channel_finish_kernel, (triton.cdiv(c, block_c),), part_mean, part_m2, splits, rows,
            m, c, _or(weight, dummy), _or(bias, dummy), _or(rm, dummy), _or(rv, dummy), mean,
            rstd, m2, alpha, bias_acc, _scalars(x, stat_dtype, eps=eps, momentum=momentum),
            TRAINING=training, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RM=rm is not None,
            HAS_RV=rv is not None, ACC=acc, BLOCK_C=block_c)
    return mean, rstd, m2, alpha, bias_acc


def _scalars(x, stat_dtype, eps=0.0, act=(0.0, 0.0), momentum=0.0):
    """The kernels' float arguments as one tensor in the statistics' dtype (math.load_scalars),
    made once per distinct value set and device: a new tensor per launch would be a
    host-to-device copy each time, and one a CUDA graph cannot capture."""
    return _scalars_tensor(float(eps), float(act[0]), float(act[1]), float(momentum), stat_dtype, x.device)


@functools.lru_cache(maxsize=256)
def _scalars_tensor(eps, act_a, act_b, momentum, stat_dtype, device):
    return torch.tensor([eps, act_a, act_b, momentum], dtype=stat_dtype, device=device)


def _running(t):
    """A running statistic the kernels can update in place: itself, or a contiguous copy
    that _write_back copies into it afterwards."""
    return t.contiguous() if t is not None else None


def _write_back(running, updated):
    if running is not None and updated is not running:
        running.copy_(updated)


def _or(t, dummy):
    """A pointer argument for an optional tensor: the kernel's HAS_* flag keeps it unread."""
    return t.contiguous() if t is not None else dummy


def _dense(t):
    return t.contiguous() if t is not None else None


@torch.library.custom_op(f"{_NS}::batch_norm_fwd", mutates_args={"running_mean", "running_var"})
def batch_norm_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                   momentum: float, eps: float, activation: int,
                   act_a: float, act_b: float, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    check_bn(input, weight, bias, running_mean, running_var)
    check_activation(activation)
    check_bn_residual(input, residual, activation)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    x, n, c, s, strides, chan_div = _channel_view(input)
    stat_dtype, acc = _acc(x)
    y = torch.empty_like(x, memory_format=batch_norm_format(x))
    m = n * s
    if x.numel() == 0:  # empty batch: running statistics untouched, as the C++ kernels
        if training:
            return y, x.new_zeros(c, dtype=stat_dtype), x.new_full((c,), eps ** -0.5, dtype=stat_dtype)
        return y, running_mean.to(stat_dtype, copy=True), (running_var.to(stat_dtype) + eps).rsqrt()
    parts = _channel_stats(x, n, c, s, strides, stat_dtype, acc) if training else None
    rm, rv = _running(running_mean), _running(running_var)
    mean, rstd, _, alpha, bias_acc = _channel_finish(x, c, parts, m, weight, bias, rm, rv, training,
                                                  momentum, eps, stat_dtype, acc)
    _write_back(running_mean, rm)
    _write_back(running_var, rv)
    if x.numel():
        block = _LIMITS["elementwise_block"]
        z = x if residual is None else _like_view(residual, x)  # (x: an unread pointer argument)
        _launch(ck.channel_apply_kernel, (triton.cdiv(x.numel(), block),), x, z, y, mean, alpha, bias_acc,
                x.numel(), c, chan_div, _scalars(x, stat_dtype, act=(act_a, act_b)),
                ACT=activation, HAS_Z=residual is not None, ACC=acc, BLOCK=block)
    return y, mean, rstd


@torch.library.custom_op(f"{_NS}::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    check_bn(input, None, None, None, None)
    x, n, c, s, strides, _ = _channel_view(input)
    stat_dtype, acc = _acc(x)
    if x.numel() == 0:
        return x.new_zeros(c, dtype=stat_dtype), x.new_zeros(c, dtype=stat_dtype)
    parts = _channel_stats(x, n, c, s, strides, stat_dtype, acc)
    # rstd is not returned; eps = 1 keeps it finite for constant channels.
    mean, _, m2, _, _ = _channel_finish(x, c, parts, n * s, None, None, None, None, True, 0.0,
                                        1.0, stat_dtype, acc)
    return mean, m2


def _grad_sums(dy, x, mean, rstd, weight, bias, view, stat_index, act, act_ab, acc):
    """Per-channel sum(dyhat) and sum(dyhat * xhat) (see channel_grad_sums_kernel); view is
    (N, C, S, strides), stat_index (stat_sn, cpg)."""
    n, c, s, strides = view
    m = n * s
    block_j, block_c, rows, splits = _reduce_tiles(m, c, strides)
    part_g = torch.empty((splits, c), dtype=mean.dtype, device=x.device)
    part_gx = torch.empty((splits, c), dtype=mean.dtype, device=x.device)
    _launch(ck.channel_grad_sums_kernel, (triton.cdiv(c, block_c), splits), dy, x, mean, rstd,
            _or(weight, mean), _or(bias, mean), part_g, part_gx, m, c, s, *strides, *stat_index,
            rows, _scalars(x, mean.dtype, act=act_ab), ACT=act, HAS_W=weight is not None,
            HAS_B=bias is not None, ACC=acc, BLOCK_J=block_j, BLOCK_C=block_c)
    return part_g.sum(0), part_gx.sum(0)


def _zero_sums(n, dtype, device):
    """The gradient sums of an empty input: two tensors (returned outputs must not alias)."""
    return torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)


def _param_grads(mask, weight, bias, sum_g, sum_gx, shape):
    dw = sum_gx.to(weight.dtype).reshape(shape) if mask[1] and weight is not None else None
    db = sum_g.to(bias.dtype).reshape(shape) if mask[2] and bias is not None else None
    return dw, db


def _empty_unless(t, like):
    return t if t is not None else like.new_empty((0,))


@torch.library.custom_op(f"{_NS}::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool,
                   activation: int, act_a: float, act_b: float,
                   output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    check_bn(input, weight, bias, None, None)
    check_activation(activation)
    check_backward(grad_out, input, mean, rstd, input.shape[1], "batch_norm_bwd")
    x, n, c, s, strides, chan_div = _channel_view(input)
    stat_dtype, acc = _acc(x)
    dy = _like_view(grad_out.to(x.dtype), x)
    mean, rstd = mean.to(stat_dtype).contiguous(), rstd.to(stat_dtype).contiguous()
    need_sums = output_mask[1] or output_mask[2] or (training and output_mask[0])
    if need_sums and x.numel() > 0:
        sum_g, sum_gx = _grad_sums(dy, x, mean, rstd, weight, bias, (n, c, s, strides), (0, 1),
                                   activation, (act_a, act_b), acc)
    else:
        sum_g, sum_gx = _zero_sums(c, stat_dtype, x.device)
    dx = None
    if output_mask[0]:
        dx = torch.empty_like(x, memory_format=batch_norm_format(x))
        if x.numel():
            block = _LIMITS["elementwise_block"]
            _launch(ck.channel_input_grad_kernel, (triton.cdiv(x.numel(), block),), dy, x, dx,
                    mean, rstd, _or(weight, mean), _or(bias, mean), sum_g, sum_gx, x.numel(), c,
                    chan_div, n * s, _scalars(x, stat_dtype, act=(act_a, act_b)), ACT=activation,
                    TRAINING=training, HAS_W=weight is not None, HAS_B=bias is not None, ACC=acc,
                    BLOCK=block)
    dw, db = _param_grads(output_mask, weight, bias, sum_g, sum_gx, (c,))
    return _empty_unless(dx, x), _empty_unless(dw, x), _empty_unless(db, x)


# ---- per-row (LayerNorm, GroupNorm, InstanceNorm) ---------------------------------------

def _row_grid(rows):
    return (min(rows, _LIMITS["max_row_programs"]),)


# Row kernels' launch table: (longest row, warps). A row up to max_block elements is one
# block of its next power of two, read from memory once and kept in registers; longer rows
# loop over blocks of max_block (statistics, then a second read for the output).
ROW_WARPS = ((256, 1), (1024, 4), (2 ** 62, 8))


def _row_config(length):
    """(BLOCK, num_warps, ONE_BLOCK) of the row kernels for rows of `length`."""
    block = min(_LIMITS["max_block"], triton.next_power_of_2(max(length, 1)))
    warps = next(w for top, w in ROW_WARPS if block <= top)
    return block, warps, length <= block


def _rows_fwd(x, rows, length, groups, per_group, s, weight, bias, eps, act, act_ab, store_m2=False,
              rms=False, residual=None, sum_dtype=None):
    """Launches row_fwd_kernel over a contiguous x (plus a contiguous residual, summed into
    a new tensor of sum_dtype that is normalised): (y, mean, rstd, m2 or None, sum or None)."""
    total = None if residual is None else torch.empty_like(x, dtype=sum_dtype)
    stat_dtype, acc = _acc(x if total is None else total)
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=stat_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=stat_dtype, device=x.device)
    m2 = torch.empty(rows, dtype=stat_dtype, device=x.device) if store_m2 else None
    if rows and length:
        block, warps, one_block = _row_config(length)
        _launch(rk.row_fwd_kernel, _row_grid(rows), x, _or(residual, x), _or(total, x), y, _or(weight, mean),
                _or(bias, mean), mean, rstd, _or(m2, mean), rows, length, groups, per_group, s,
                _scalars(x, stat_dtype, eps=eps, act=act_ab), ACT=act, HAS_W=weight is not None,
                HAS_B=bias is not None, STORE_M2=store_m2, RMS=rms, HAS_RES=residual is not None, ACC=acc,
                BLOCK=block, ONE_BLOCK=one_block, num_warps=warps)
    elif rows:  # empty rows: the statistics of nothing, as the C++ kernels give
        mean.zero_()
        rstd.fill_(eps ** -0.5)
        if m2 is not None:
            m2.zero_()
    return y, mean, rstd, m2, total


def _rows_bwd(dy, x, mean, rstd, rows, length, groups, per_group, s, weight, bias, act, act_ab, rms=False,
              dres=None):
    dx = torch.empty_like(x)
    if rows and length:
        _, acc = _acc(x)
        block, warps, one_block = _row_config(length)
        _launch(rk.row_bwd_kernel, _row_grid(rows), dy, x, _or(dres, x), dx, _or(weight, mean), _or(bias, mean),
                mean, rstd, rows, length, groups, per_group, s, _scalars(x, mean.dtype, act=act_ab), ACT=act,
                HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, HAS_RES=dres is not None, ACC=acc,
                BLOCK=block, ONE_BLOCK=one_block, num_warps=warps)
    return dx


def _add_norm_fwd(input, residual, normalized_shape, weight, bias, eps, rms, residual_in_fp32, act, act_ab):
    length = check_add_norm(input, residual, normalized_shape, weight, bias, rms, "add_norm_fwd")
    check_activation(act)
    x = input.contiguous()
    rows = _ln_rows(x, normalized_shape)
    r = None if residual is None else residual.contiguous()
    sum_dtype = torch.float32 if residual_in_fp32 else x.dtype
    if r is not None and x.dtype == torch.float64 and sum_dtype != torch.float64:
        # The kernel adds in the sum's accumulation type: a float64 input into a float32
        # sum is added in float64 first (rounded once), then normalised.
        total = (x + r.double()).to(sum_dtype)
        y, mean, rstd, _, _ = _rows_fwd(total, rows, length, 1, length, 1, _dense(weight), _dense(bias), eps, act,
                                        act_ab, rms=rms)
        return y.to(x.dtype), total, mean, rstd
    y, mean, rstd, _, total = _rows_fwd(x, rows, length, 1, length, 1, _dense(weight), _dense(bias), eps, act, act_ab,
                                        rms=rms, residual=r, sum_dtype=sum_dtype)
    return y, (total if total is not None else x.new_empty((0,))), mean, rstd


def _add_norm_bwd(grad_out, grad_residual, input, normalized_shape, mean, rstd, weight, bias, rms, act, act_ab,
                  output_mask, op):
    length = check_add_norm(input, grad_residual, normalized_shape, weight, bias, rms, op)
    check_activation(act)
    rows = _ln_rows(input, normalized_shape)
    check_backward(grad_out, input, mean, rstd, rows, op)
    x = input.contiguous()
    stat_dtype, acc = _acc(x)
    dy = grad_out.to(x.dtype).contiguous()
    mean, rstd = mean.to(stat_dtype).contiguous(), rstd.to(stat_dtype).contiguous()
    w, b = _dense(weight), _dense(bias)
    dres = None if grad_residual is None else grad_residual.contiguous()
    dx = _rows_bwd(dy, x, mean, rstd, rows, length, 1, length, 1, w, b, act, act_ab, rms=rms,
                   dres=dres) if output_mask[0] else None
    dw = db = None
    if output_mask[1] or output_mask[2]:
        # Parameter gradients: LayerNorm seen as (rows, L, 1); the statistics are per row
        # (RMSNorm's mean is 0).
        if rows and length:
            sum_g, sum_gx = _grad_sums(dy, x, mean, rstd, w, b, (rows, length, 1, (length, 1, 0)),
                                       (1, length), act, act_ab, acc)
        else:
            sum_g, sum_gx = _zero_sums(length, stat_dtype, x.device)
        dw, db = _param_grads(output_mask, weight, bias, sum_g, sum_gx, tuple(normalized_shape))
    return _empty_unless(dx, x), _empty_unless(dw, x), _empty_unless(db, x)


@torch.library.custom_op(f"{_NS}::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, activation: int,
                   act_a: float, act_b: float) -> Tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = _add_norm_fwd(input, None, normalized_shape, weight, bias, eps, False, False, activation,
                                     (act_a, act_b))
    return y, mean, rstd


@torch.library.custom_op(f"{_NS}::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_out: Tensor, input: Tensor, normalized_shape: List[int], mean: Tensor,
                   rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: int,
                   act_a: float, act_b: float, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    return _add_norm_bwd(grad_out, None, input, normalized_shape, mean, rstd, weight, bias, False, activation,
                         (act_a, act_b), output_mask, "layer_norm_bwd")


@torch.library.custom_op(f"{_NS}::add_norm_fwd", mutates_args=())
def add_norm_fwd(input: Tensor, residual: Optional[Tensor], normalized_shape: List[int], weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, rms: bool, residual_in_fp32: bool, activation: int,
                 act_a: float, act_b: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _add_norm_fwd(input, residual, normalized_shape, weight, bias, eps, rms, residual_in_fp32, activation,
                         (act_a, act_b))


@torch.library.custom_op(f"{_NS}::add_norm_bwd", mutates_args=())
def add_norm_bwd(grad_out: Tensor, grad_residual: Optional[Tensor], input: Tensor, normalized_shape: List[int],
                 mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], rms: bool,
                 activation: int, act_a: float, act_b: float,
                 output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    return _add_norm_bwd(grad_out, grad_residual if output_mask[0] else None, input, normalized_shape, mean, rstd,
                         weight, bias, rms, activation, (act_a, act_b), output_mask, "add_norm_bwd")


def _group_layout(input):
    """(contiguous input, memory format of the results): the row kernels read NCHW; a
    channels_last GroupNorm input is normalised from a contiguous copy and its results
    returned in the format torch.nn.GroupNorm gives them (_layout.py)."""
    return input.contiguous(), group_norm_format(input)


@torch.library.custom_op(f"{_NS}::group_norm_fwd", mutates_args=())
def group_norm_fwd(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, activation: int, act_a: float, act_b: float) -> Tuple[Tensor, Tensor, Tensor]:
    check_group_norm(input, num_groups, weight, bias)
    check_activation(activation)
    check_group_norm_sizes(input)
    x, fmt = _group_layout(input)
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    per_group = c // num_groups
    y, mean, rstd, _, _ = _rows_fwd(x, n * num_groups, per_group * s, num_groups, per_group, s,
                                 weight, bias, eps, activation, (act_a, act_b))
    y = y.contiguous(memory_format=fmt)
    return y, mean.view(n, num_groups), rstd.view(n, num_groups)


@torch.library.custom_op(f"{_NS}::group_norm_bwd", mutates_args=())
def group_norm_bwd(grad_out: Tensor, input: Tensor, num_groups: int, mean: Tensor, rstd: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor], activation: int,
                   act_a: float, act_b: float, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    check_group_norm(input, num_groups, weight, bias)
    check_activation(activation)
    check_backward(grad_out, input, mean, rstd, input.shape[0] * num_groups, "group_norm_bwd")
    x, fmt = _group_layout(input)
    stat_dtype, acc = _acc(x)
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    per_group = c // num_groups if num_groups else 0  # InstanceNorm of no channel: no groups
    dy = grad_out.to(x.dtype).contiguous()
    mean, rstd = mean.to(stat_dtype).contiguous(), rstd.to(stat_dtype).contiguous()
    dx = None
    if output_mask[0]:
        dx = _rows_bwd(dy, x, mean, rstd, n * num_groups, per_group * s, num_groups, per_group, s,
                       weight, bias, activation, (act_a, act_b))
        dx = dx.contiguous(memory_format=fmt)
    dw = db = None
    if output_mask[1] or output_mask[2]:
        if x.numel():
            sum_g, sum_gx = _grad_sums(dy, x, mean, rstd, weight, bias, (n, c, s, (c * s, s, 1)),
                                       (num_groups, per_group), activation, (act_a, act_b), acc)
        else:
            sum_g, sum_gx = _zero_sums(c, stat_dtype, x.device)
        dw, db = _param_grads(output_mask, weight, bias, sum_g, sum_gx, (c,))
    return _empty_unless(dx, x), _empty_unless(dw, x), _empty_unless(db, x)


@torch.library.custom_op(f"{_NS}::instance_norm_fwd", mutates_args={"running_mean", "running_var"})
def instance_norm_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      momentum: float, eps: float, activation: int,
                      act_a: float, act_b: float) -> Tuple[Tensor, Tensor, Tensor]:
    check_instance_norm(input, weight, bias, running_mean, running_var)
    check_activation(activation)
    x = input.contiguous()  # torch.nn.InstanceNorm returns a contiguous output
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    update = running_mean is not None or running_var is not None
    y, mean, rstd, m2, _ = _rows_fwd(x, n * c, s, c, 1, s, weight, bias, eps, activation,
                                  (act_a, act_b), store_m2=update)
    if update and n == 0:  # torch's average over no instances: NaN
        for r in (running_mean, running_var):
            if r is not None:
                r.fill_(float("nan"))
    elif update and s and c:  # (no spatial elements: no statistics, untouched)
        _, acc = _acc(x)
        block_c = min(256, triton.next_power_of_2(c))
        rm, rv = _running(running_mean), _running(running_var)
        _launch(rk.instance_running_kernel, (triton.cdiv(c, block_c),), mean, m2, _or(rm, mean),
                _or(rv, mean), n, c, s, _scalars(x, mean.dtype, momentum=momentum),
                HAS_RM=rm is not None, HAS_RV=rv is not None, ACC=acc, BLOCK_C=block_c)
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    return y, mean.view(n, c), rstd.view(n, c)


register_fakes(_NS)
register_vmap_rules(_NS)
