"""Triton kernels for per-channel normalisation (BatchNorm) and for per-parameter gradient
sums (every norm's dweight/dbias).

The input is seen as an (N, C, S) array with strides (sn, sc, ss): NCHW-contiguous and
channels_last tensors both flatten their spatial dims to S that way, so neither needs a
copy. The reductions take a [BLOCK_J, BLOCK_C] tile of (sample*spatial, channel) per step
and grid (channel blocks, splits): each split of the N*S "rows" writes partial results that
a second launch (or a torch sum) combines. The elementwise kernels walk the flat memory of
dense tensors: channel = (e // chan_div) % C, chan_div = S for NCHW and 1 for channels_last."""
import triton
import triton.language as tl

from .math import (
    activate,
    activation_backward,
    block_moments,
    input_grad_coefficients,
    load_scalars,
    merge,
    pre_activation,
    round_for,
    rstd_from_m2,
    unbiased_var,
)


@triton.jit
def _tile(j0, end, cb, C, S, sn, sc, ss, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of the tile of rows j0.. (j = n*S + s) and channel block cb,
    with the sample index n of each row (64-bit)."""
    j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n = j // S
    s = j - n * S
    offs = n[:, None] * sn + s[:, None] * ss + c[None, :].to(tl.int64) * sc
    mask = (j < end)[:, None] & (c < C)[None, :]
    return offs, mask, n, c


@triton.jit
def channel_moments_kernel(x_ptr, part_mean_ptr, part_m2_ptr, M, C, S, sn, sc, ss, rows_per_split,
                           ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial (mean, M2) per channel over this split's rows; block moments merged by Chan."""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for j0 in range(start, end, BLOCK_J):
        offs, mask, n, c = _tile(j0, end, cb, C, S, sn, sc, ss, BLOCK_J, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        b_count, b_mean, b_m2 = block_moments(x, mask, 0)
        count, mean, m2 = merge(count, mean, m2, b_count, b_mean, b_m2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(part_mean_ptr + split * C + c, mean, mask=c < C)
    tl.store(part_m2_ptr + split * C + c, m2, mask=c < C)


@triton.jit
def channel_finish_kernel(part_mean_ptr, part_m2_ptr, splits, rows_per_split, M, C,
                          w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, rstd_ptr, m2_ptr, alpha_ptr,
                          bias_ptr, scalars_ptr, TRAINING: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel: mean/rstd (merged partials in training, running statistics in eval),
    the running statistics' update (unbiased variance), M2, and the pre-activation's
    alpha = rstd * gamma and bias (0 without one)."""
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING:
        count = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        for s in range(0, splits):
            n_s = tl.cast(tl.minimum(rows_per_split, M - s * rows_per_split), ACC)
            p_mean = tl.load(part_mean_ptr + s * C + c, mask=cmask, other=0.0)
            p_m2 = tl.load(part_m2_ptr + s * C + c, mask=cmask, other=0.0)
            count, mean, m2 = merge(count, mean, m2, tl.zeros([BLOCK_C], ACC) + n_s, p_mean, p_m2)
        rstd = rstd_from_m2(m2, count, eps)
        tl.store(m2_ptr + c, m2, mask=cmask)
        if HAS_RM:
            r = tl.load(rm_ptr + c, mask=cmask).to(ACC)
            tl.store(rm_ptr + c, round_for((1.0 - momentum) * r + momentum * mean, rm_ptr), mask=cmask)
        if HAS_RV:
            r = tl.load(rv_ptr + c, mask=cmask).to(ACC)
            unbiased = unbiased_var(m2, count)
            tl.store(rv_ptr + c, round_for((1.0 - momentum) * r + momentum * unbiased, rv_ptr), mask=cmask)
    else:
        mean = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(ACC)
        rstd = 1.0 / tl.sqrt(tl.load(rv_ptr + c, mask=cmask, other=1.0).to(ACC) + eps)
    gamma = tl.load(w_ptr + c, mask=cmask, other=1.0).to(ACC) if HAS_W else tl.full([BLOCK_C], 1.0, ACC)
    beta = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC) if HAS_B else tl.zeros([BLOCK_C], ACC)
    alpha = rstd * gamma
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(rstd_ptr + c, rstd, mask=cmask)
    tl.store(alpha_ptr + c, alpha, mask=cmask)
    tl.store(bias_ptr + c, beta, mask=cmask)


@triton.jit
def channel_apply_kernel(x_ptr, z_ptr, y_ptr, mean_ptr, alpha_ptr, bias_ptr, total, C, chan_div, scalars_ptr,
                         ACT: tl.constexpr, HAS_Z: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(pre_activation(x, mean[c], alpha[c], bias[c]) (+ z, BatchNorm's residual, laid
    out as x)) over the flat memory of a dense tensor."""
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    c = (e // chan_div) % C
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    alpha = tl.load(alpha_ptr + c, mask=mask, other=0.0)
    bias = tl.load(bias_ptr + c, mask=mask, other=0.0)
    v = pre_activation(x, mean, alpha, bias)
    if HAS_Z:
        v += tl.load(z_ptr + e, mask=mask, other=0.0).to(ACC)
    y = activate(v, ACT, act_a, act_b)
    tl.store(y_ptr + e, round_for(y, y_ptr), mask=mask)


@triton.jit
def channel_grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_g_ptr,
                             part_gx_ptr, M, C, S, sn, sc, ss, stat_sn, cpg, rows_per_split, scalars_ptr,
                             ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sum(dyhat) and sum(dyhat * xhat) per channel over this split's rows, where
    dyhat = dy * act'(z) is the gradient before the activation. The statistics of element
    (n, c) are at n * stat_sn + c // cpg: BatchNorm (0, 1), GroupNorm (G, C/G),
    InstanceNorm (C, 1), LayerNorm seen as (rows, L, 1): (1, L)."""
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    cb = tl.program_id(0)
    split = tl.program_id(1)
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    gamma = tl.load(w_ptr + c, mask=c < C, other=1.0).to(ACC) if HAS_W else tl.full([BLOCK_C], 1.0, ACC)
    beta = tl.load(b_ptr + c, mask=c < C, other=0.0).to(ACC) if HAS_B else tl.zeros([BLOCK_C], ACC)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for j0 in range(start, end, BLOCK_J):
        offs, mask, n, c = _tile(j0, end, cb, C, S, sn, sc, ss, BLOCK_J, BLOCK_C)
        stat = n[:, None] * stat_sn + (c // cpg)[None, :]
        mean = tl.load(mean_ptr + stat, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = pre_activation(x, mean, rstd * gamma[None, :], beta[None, :])  # the forward's z
        g = tl.where(mask, activation_backward(dy, z, ACT, act_a, act_b), 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * (x - mean) * rstd, axis=0)
    tl.store(part_g_ptr + split * C + c, sum_g, mask=c < C)
    tl.store(part_gx_ptr + split * C + c, sum_gx, mask=c < C)


@triton.jit
def channel_input_grad_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sum_g_ptr,
                              sum_gx_ptr, total, C, chan_div, count, scalars_ptr, ACT: tl.constexpr,
                              TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                              ACC: tl.constexpr, BLOCK: tl.constexpr):
    """BatchNorm's dx over the flat memory; training adds the batch statistics' terms
    from the per-channel sums (input_grad_coefficients), eval is dyhat * rstd * gamma."""
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    c = (e // chan_div) % C
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + e, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=mask, other=0.0)
    gamma = tl.load(w_ptr + c, mask=mask, other=1.0).to(ACC) if HAS_W else 1.0
    beta = tl.load(b_ptr + c, mask=mask, other=0.0).to(ACC) if HAS_B else 0.0
    alpha = rstd * gamma
    g = activation_backward(dy, pre_activation(x, mean, alpha, beta), ACT, act_a, act_b)
    if TRAINING:
        sum_dy = tl.load(sum_g_ptr + c, mask=mask, other=0.0) * alpha
        sum_dyxhat = tl.load(sum_gx_ptr + c, mask=mask, other=0.0) * gamma
        a, b, k = input_grad_coefficients(rstd, gamma, sum_dy, sum_dyxhat, tl.cast(count, ACC))
        dx = a * g + b * (x - mean) + k
    else:
        dx = alpha * g
    tl.store(dx_ptr + e, round_for(dx, dx_ptr), mask=mask)
