"""Triton kernels for per-row normalisation: LayerNorm, GroupNorm and InstanceNorm.

The contiguous input is R rows of L elements; one program per row (a grid-stride loop when
R exceeds the grid, capped below CUDA's 2^31 - 1 programs), looping over the row in blocks
of BLOCK (a row longer than one block is never a problem). The parameter of element
i of row r is (r % G) * P + i // S:
  LayerNorm     G = 1,          P = L,    S = 1   (parameter = column)
  GroupNorm     G = num_groups, P = C/G,  S = spatial size
  InstanceNorm  G = C,          P = 1,    S = spatial size
A row that fits one block (ONE_BLOCK: ops.py's _row_config table) is read once and kept in
registers. Longer rows: block moments (two-pass in registers) merged by Chan, and the
output pass re-reads the row; backward, one pass for the row's two gradient sums, one to
write dx. The parameter gradients are channel_grad_sums_kernel's (channel_kernels.py).

RMSNorm (RMS) and the residual add (HAS_RES) are flags of the same kernels: statistics about
zero (mean 0) and no mean term in dx; the forward adds the residual to x, stores the sum in
its own dtype and normalises the stored sum; the backward adds the sum's own gradient."""
import triton
import triton.language as tl

from .math import (
    activate,
    activation_backward,
    block_moments,
    input_grad_coefficients,
    load_scalars,
    m2_about_zero,
    merge,
    pre_activation,
    round_for,
    rstd_from_m2,
    unbiased_var,
)


@triton.jit
def _params(w_ptr, b_ptr, p, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    gamma = tl.load(w_ptr + p, mask=mask, other=1.0).to(ACC) if HAS_W else 1.0
    beta = tl.load(b_ptr + p, mask=mask, other=0.0).to(ACC) if HAS_B else 0.0
    return gamma, beta


@triton.jit
def _load_row_block(x_ptr, r_ptr, s_ptr, row, i0, L, HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(offsets, mask, values) of a block of a row: x, or x + residual as the sum is stored
    (in its dtype; also written), which is what is normalised."""
    i = i0 + tl.arange(0, BLOCK)
    mask = i < L
    x = tl.load(x_ptr + row + i, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        s = round_for(x + tl.load(r_ptr + row + i, mask=mask, other=0.0).to(ACC), s_ptr)
        tl.store(s_ptr + row + i, s, mask=mask)
        x = s.to(ACC)
    return i, mask, x


@triton.jit
def _store_output(y_ptr, w_ptr, b_ptr, row, i, mask, x, first_param, S, mean, rstd, act_a, act_b,
                  ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    gamma, beta = _params(w_ptr, b_ptr, first_param + i // S, mask, HAS_W, HAS_B, ACC)
    y = activate(pre_activation(x, mean, rstd * gamma, beta), ACT, act_a, act_b)
    tl.store(y_ptr + row + i, round_for(y, y_ptr), mask=mask)


@triton.jit
def row_fwd_kernel(x_ptr, r_ptr, s_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, m2_ptr, R, L, G, P, S, scalars_ptr,
                   ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   STORE_M2: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    for rr in range(tl.program_id(0), R, tl.num_programs(0)):  # grid-stride over the rows
        r = tl.cast(rr, tl.int64)
        row = r * L
        if ONE_BLOCK:  # the row stays in registers for the output
            i, mask, x = _load_row_block(x_ptr, r_ptr, s_ptr, row, 0, L, HAS_RES, ACC, BLOCK)
            count, mean, m2 = block_moments(x, mask, 0)
        else:
            count = tl.sum(tl.zeros([BLOCK], ACC), axis=0)
            mean = count
            m2 = count
            for i0 in range(0, L, BLOCK):
                i, mask, x = _load_row_block(x_ptr, r_ptr, s_ptr, row, i0, L, HAS_RES, ACC, BLOCK)
                b_count, b_mean, b_m2 = block_moments(x, mask, 0)
                count, mean, m2 = merge(count, mean, m2, b_count, b_mean, b_m2)
        if RMS:
            m2 = m2_about_zero(m2, mean, count)
            mean = count * 0.0  # (count is finite; mean may not be)
        rstd = rstd_from_m2(m2, count, eps)
        tl.store(mean_ptr + r, mean)
        tl.store(rstd_ptr + r, rstd)
        if STORE_M2:
            tl.store(m2_ptr + r, m2)
        first_param = (r % G) * P
        if ONE_BLOCK:
            _store_output(y_ptr, w_ptr, b_ptr, row, i, mask, x, first_param, S, mean, rstd, act_a, act_b,
                          ACT, HAS_W, HAS_B, ACC)
        else:
            src_ptr = s_ptr if HAS_RES else x_ptr
            for i0 in range(0, L, BLOCK):
                i = i0 + tl.arange(0, BLOCK)
                mask = i < L
                x = tl.load(src_ptr + row + i, mask=mask, other=0.0).to(ACC)
                _store_output(y_ptr, w_ptr, b_ptr, row, i, mask, x, first_param, S, mean, rstd, act_a, act_b,
                              ACT, HAS_W, HAS_B, ACC)


@triton.jit
def _block_grad(dy_ptr, x_ptr, w_ptr, b_ptr, row, i0, L, first_param, S, mean, rstd, act_a, act_b,
                ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    """One block of a row: (offsets, mask, x, dyhat = dy * act'(z) (0 where masked), gamma)."""
    i = i0 + tl.arange(0, BLOCK)
    mask = i < L
    x = tl.load(x_ptr + row + i, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + row + i, mask=mask, other=0.0).to(ACC)
    gamma, beta = _params(w_ptr, b_ptr, first_param + i // S, mask, HAS_W, HAS_B, ACC)
    g = tl.where(mask, activation_backward(dy, pre_activation(x, mean, rstd * gamma, beta), ACT, act_a, act_b), 0.0)
    return i, mask, x, g, gamma


@triton.jit
def _block_sums(x, g, gamma, mean, rstd, RMS: tl.constexpr):
    """A block's shares of the row's sums of alpha*dyhat and gamma*dyhat*xhat."""
    sum_dyxhat = tl.sum(g * gamma * (x - mean) * rstd, axis=0)
    if RMS:  # RMSNorm has no mean, so no mean(dyhat) term
        sum_dy = tl.sum(tl.zeros_like(g), axis=0)
    else:
        sum_dy = tl.sum(g * (rstd * gamma), axis=0)
    return sum_dy, sum_dyxhat


@triton.jit
def _store_dx(dx_ptr, dres_ptr, row, i, mask, x, g, gamma, mean, rstd, sum_dy, sum_dyxhat, L,
              HAS_RES: tl.constexpr, ACC: tl.constexpr):
    a, b, k = input_grad_coefficients(rstd, gamma, sum_dy, sum_dyxhat, tl.cast(L, ACC))
    dx = a * g + b * (x - mean) + k
    if HAS_RES:
        dx += tl.load(dres_ptr + row + i, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + row + i, round_for(dx, dx_ptr), mask=mask)


@triton.jit
def row_bwd_kernel(dy_ptr, x_ptr, dres_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, L, G, P, S, scalars_ptr,
                   ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
                   HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    for rr in range(tl.program_id(0), R, tl.num_programs(0)):  # grid-stride over the rows
        r = tl.cast(rr, tl.int64)
        row = r * L
        mean = tl.load(mean_ptr + r)
        rstd = tl.load(rstd_ptr + r)
        first_param = (r % G) * P
        if ONE_BLOCK:  # the row stays in registers for dx
            i, mask, x, g, gamma = _block_grad(dy_ptr, x_ptr, w_ptr, b_ptr, row, 0, L, first_param, S,
                                               mean, rstd, act_a, act_b, ACT, HAS_W, HAS_B, ACC, BLOCK)
            sum_dy, sum_dyxhat = _block_sums(x, g, gamma, mean, rstd, RMS)
            _store_dx(dx_ptr, dres_ptr, row, i, mask, x, g, gamma, mean, rstd, sum_dy, sum_dyxhat, L, HAS_RES, ACC)
        else:
            sum_dy = tl.sum(tl.zeros([BLOCK], ACC), axis=0)
            sum_dyxhat = sum_dy
            for i0 in range(0, L, BLOCK):
                i, mask, x, g, gamma = _block_grad(dy_ptr, x_ptr, w_ptr, b_ptr, row, i0, L, first_param, S,
                                                   mean, rstd, act_a, act_b, ACT, HAS_W, HAS_B, ACC, BLOCK)
                b_dy, b_dyxhat = _block_sums(x, g, gamma, mean, rstd, RMS)
                sum_dy += b_dy
                sum_dyxhat += b_dyxhat
            for i0 in range(0, L, BLOCK):
                i, mask, x, g, gamma = _block_grad(dy_ptr, x_ptr, w_ptr, b_ptr, row, i0, L, first_param, S,
                                                   mean, rstd, act_a, act_b, ACT, HAS_W, HAS_B, ACC, BLOCK)
                _store_dx(dx_ptr, dres_ptr, row, i, mask, x, g, gamma, mean, rstd, sum_dy, sum_dyxhat, L,
                          HAS_RES, ACC)


@triton.jit
def instance_running_kernel(mean_ptr, m2_ptr, rm_ptr, rv_ptr, N, C, S, scalars_ptr,
                            HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """InstanceNorm's running statistics: the batch average of the per-instance mean and
    unbiased variance, blended in with momentum (what torch's instance_norm does)."""
    eps, act_a, act_b, momentum = load_scalars(scalars_ptr)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    fresh_mean = tl.zeros([BLOCK_C], ACC)
    fresh_var = tl.zeros([BLOCK_C], ACC)
    for n in range(0, N):
        fresh_mean += tl.load(mean_ptr + n * C + c, mask=cmask, other=0.0)
        fresh_var += unbiased_var(tl.load(m2_ptr + n * C + c, mask=cmask, other=0.0), tl.cast(S, ACC))
    fresh_mean = fresh_mean / tl.cast(N, ACC)
    fresh_var = fresh_var / tl.cast(N, ACC)
    if HAS_RM:
        r = tl.load(rm_ptr + c, mask=cmask).to(ACC)
        tl.store(rm_ptr + c, round_for((1.0 - momentum) * r + momentum * fresh_mean, rm_ptr), mask=cmask)
    if HAS_RV:
        r = tl.load(rv_ptr + c, mask=cmask).to(ACC)
        tl.store(rv_ptr + c, round_for((1.0 - momentum) * r + momentum * fresh_var, rv_ptr), mask=cmask)
