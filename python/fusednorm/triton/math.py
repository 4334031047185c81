"""The maths every fusednorm Triton kernel shares, the Triton twin of csrc/common/norm_math.h
(same formulas, same names): Chan's merge of partial statistics, the fused activation and
its derivative, the pre-activation and the training-mode input-gradient coefficients.
Activation codes are norm_math.h's: 0 none, 1 relu, 2 leaky_relu."""
import triton
import triton.language as tl


@triton.jit
def activate(z, act: tl.constexpr, slope):
    """y = act(z); NaN propagates like torch.relu / leaky_relu."""
    if act == 1:
        z = tl.where(z < 0, 0.0, z)
    elif act == 2:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def activation_backward(g, z, act: tl.constexpr, slope):
    """dL/dz from g = dL/dy for y = act(z), as torch: relu gives 0 where z <= 0 (a select,
    so an inf or NaN g there gives 0 too), leaky_relu scales g by slope there; at z == 0
    relu 0, leaky_relu slope."""
    if act == 1:
        g = tl.where(z <= 0, 0.0, g)
    elif act == 2:
        g = tl.where(z > 0, g, g * slope)
    return g


@triton.jit
def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of (count, mean, M2 = sum((x - mean)^2)); stable."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def block_moments(x, mask, axis: tl.constexpr):
    """(count, mean, M2) of the masked values of a block along `axis`, two-pass in registers."""
    x = tl.where(mask, x, 0.0)
    count = tl.sum(mask.to(x.dtype), axis=axis)
    mean = tl.sum(x, axis=axis) / tl.maximum(count, 1.0)
    if axis == 0:
        d = tl.where(mask, x - mean[None, :], 0.0)
    else:
        d = tl.where(mask, x - mean, 0.0)
    return count, mean, tl.sum(d * d, axis=axis)


@triton.jit
def rstd_from_m2(m2, count, eps):
    """1 / sqrt(var + eps), var = M2 / count; an M2 rounded below 0 counts as 0."""
    var = tl.where(count > 0, tl.maximum(m2, 0.0) / tl.maximum(count, 1.0), 0.0)
    return 1.0 / tl.sqrt(var + eps)


@triton.jit
def unbiased_var(m2, count):
    """M2 / (count - 1); NaN for fewer than two values, as torch."""
    return tl.where(count > 1, tl.maximum(m2, 0.0) / tl.maximum(count - 1, 1.0), float("nan"))


@triton.jit
def pre_activation(x, mean, alpha, bias):
    """z = (x - mean) * alpha + bias, alpha = rstd * gamma: centred, so a constant set gives
    exactly z = bias. The kernels are compiled without fp fusion (ops._launch), so the
    forward and backward compute it to the same bits."""
    return (x - mean) * alpha + bias


@triton.jit
def input_grad_coefficients(rstd, gamma, sum_alpha_dy, sum_dyxhat, count):
    """dx = A*dyhat + B*(x - mean) + C over a normalised set of `count` values, from its
    sums sum_alpha_dy = sum(dyhat * rstd*gamma) and sum_dyxhat = sum(dyhat*gamma*xhat);
    A = rstd*gamma is the factor the sum was taken with (a set of one value: dx = 0)."""
    inv_m = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
    a = rstd * gamma
    b = -rstd * rstd * sum_dyxhat * inv_m
    c = -sum_alpha_dy * inv_m
    return a, b, c


@triton.jit
def round_for(value, ptr):
    """The value to store through ptr. For a bfloat16 destination it is rounded to nearest
    even here: Triton's interpreter truncates float32 -> bfloat16, the GPU rounds; a value
    already representable converts exactly either way."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = value.to(tl.float32)
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return value


@triton.jit
def load_scalars(scalars_ptr):
    """(eps, negative_slope, momentum). They come as a tensor in the statistics' dtype
    because Triton passes Python floats as float32, and float64 needs them exact."""
    return tl.load(scalars_ptr), tl.load(scalars_ptr + 1), tl.load(scalars_ptr + 2)
