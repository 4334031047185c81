"""The maths every fusednorm Triton kernel shares, the Triton twin of csrc/common/norm_math.h
(same formulas, same names): Chan's merge of partial statistics, the fused activation and
its derivative, the pre-activation and the training-mode input-gradient coefficients.
Activation codes are norm_math.h's (fusednorm/_activation.py maps names to them)."""
import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """exp(x) - 1, as norm_math.h's fn_expm1: for |x| < 0.5 the Taylor series nested as
    x(1 + x/2(1 + x/3(...))), to x^8 in float32 and x^17 in float64; exp(x) - 1 beyond."""
    if x.dtype == tl.float64:
        p = 1.0 + x * (1.0 / 17.0)
        for k in tl.static_range(16, 1, -1):
            p = 1.0 + x * p * (1.0 / k)
    else:
        p = 1.0 + x * (1.0 / 8.0)
        for k in tl.static_range(7, 1, -1):
            p = 1.0 + x * p * (1.0 / k)
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def tanh(x):
    """-t / (t + 2), t = expm1(-2|x|), with x's sign (norm_math.h's fn_tanh)."""
    t = expm1(-2.0 * tl.abs(x))
    th = -t / (t + 2.0)
    return tl.where(x < 0, -th, th)


@triton.jit
def log1p(x):
    """log(1 + x) without losing x's low bits: log(u) * x / (u - 1), u = 1 + x rounded."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh_softplus(z):
    """tanh(softplus(z)) = n / (n + 2), n = e(e + 2), e = exp(z); 1 from z = 20 on."""
    e = tl.exp(tl.minimum(z, 20.0))
    n = e * (e + 2.0)
    return tl.where(z < 20.0, n / (n + 2.0), 1.0)


# Constants as norm_math.h's ActConst (torch's, in double). Multiplied with a tensor on the
# left: the interpreter cannot take a constexpr times a tensor.
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
SELU_NEG = tl.constexpr(1.6732632423543772848170429916717 * 1.0507009873554804934193349852946)
SQRT1_2 = tl.constexpr(0.70710678118654752440)
GELU_PDF = tl.constexpr(1.12837916709551257390 * 0.70710678118654752440 * 0.5)
GELU_TANH_BETA = tl.constexpr(1.41421356237309504880 * 1.12837916709551257390 * 0.5)
GELU_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def clamp_to(v, lo, hi):
    """lo below, hi above, else v (NaN stays NaN)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def activate(z, act: tl.constexpr, p_a, p_b):
    """y = act(z) for norm_math.h's activation code `act`, parameters (p_a, p_b); torch.nn's
    formulas (norm_math.h's activate); NaN propagates."""
    if act == 1:
        z = tl.where(z < 0, 0.0, z)
    elif act == 2:
        z = tl.where(z > 0, z, z * p_a)
    elif act == 3:
        z = z / (1.0 + tl.exp(-z))
    elif act == 4:
        z = z * 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
    elif act == 5:
        z = 0.5 * z * (1.0 + tanh((z + z * z * z * GELU_TANH_KAPPA) * GELU_TANH_BETA))
    elif act == 6:
        z = tl.where(z <= 0, expm1(z) * p_a, z)
    elif act == 7:
        z = tl.where(z <= 0, expm1(z * p_b) * p_a, z)
    elif act == 8:
        z = tl.where(z <= 0, expm1(z) * SELU_NEG, z * SELU_SCALE)
    elif act == 9:
        z = clamp_to(z, p_a, p_b)
    elif act == 10:
        z = z * clamp_to(z + 3.0, 0.0, 6.0) / 6.0
    elif act == 11:
        z = clamp_to(z + 3.0, 0.0, 6.0) / 6.0
    elif act == 12:
        z = sigmoid(z)
    elif act == 13:
        z = tanh(z)
    elif act == 14:
        zb = z * p_a
        z = tl.where(zb > p_b, z, log1p(tl.exp(tl.minimum(zb, p_b))) / p_a)
    elif act == 15:
        z = z * tanh_softplus(z)
    return z


@triton.jit
def activation_backward(g, z, act: tl.constexpr, p_a, p_b):
    """dL/dz from g = dL/dy for y = act(z): torch.nn's derivative, kinks included
    (norm_math.h's activation_backward); ReLU and the hard functions select (0 for an inf
    or NaN g where the slope is 0), the smooth ones multiply."""
    if act == 1:
        g = tl.where(z <= 0, 0.0, g)
    elif act == 2:
        g = tl.where(z > 0, g, g * p_a)
    elif act == 3:
        s = sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    elif act == 4:
        x = z * SQRT1_2
        e = tl.exp(-x * x)  # exp(-z^2 / 2), as norm_math.h
        cdf = 0.5 * (1.0 + tl.math.erf(x))
        g = g * (cdf + z * e * GELU_PDF)
    elif act == 5:
        z2 = z * z
        t = tanh((z + z2 * z * GELU_TANH_KAPPA) * GELU_TANH_BETA)
        dt = (1.0 - t * t) * GELU_TANH_BETA * (1.0 + z2 * (3.0 * GELU_TANH_KAPPA))
        g = g * (0.5 * (1.0 + t) + 0.5 * z * dt)
    elif act == 6:
        g = tl.where(z <= 0, g * p_a * tl.exp(z), g)
    elif act == 7:
        g = tl.where(z <= 0, g * tl.exp(z * p_b), g)
    elif act == 8:
        g = tl.where(z <= 0, g * SELU_NEG * tl.exp(z), g * SELU_SCALE)
    elif act == 9:
        g = tl.where((z <= p_a) | (z >= p_b), 0.0, g)
    elif act == 10:
        g = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, g * (z / 3.0 + 0.5), g))
    elif act == 11:
        g = tl.where((z > -3.0) & (z < 3.0), g / 6.0, 0.0)
    elif act == 12:
        y = sigmoid(z)
        g = g * (1.0 - y) * y
    elif act == 13:
        y = tanh(z)
        g = g * (1.0 - y * y)
    elif act == 14:
        g = tl.where(z * p_a > p_b, g, g * sigmoid(z * p_a))
    elif act == 15:
        t = tanh_softplus(z)
        g = g * (t + z * sigmoid(z) * (1.0 - t * t))
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
def m2_about_zero(m2, mean, count):
    """RMSNorm's statistic, the sum of squares M2 + count * mean^2 (norm_math.h's twin)."""
    return tl.maximum(m2, 0.0) + count * mean * mean


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
    """(eps, act_a, act_b, momentum): eps, the activation's two parameters and the running
    statistics' momentum. They come as a tensor in the statistics' dtype because Triton
    passes Python floats as float32, and float64 needs them exact."""
    return tl.load(scalars_ptr), tl.load(scalars_ptr + 1), tl.load(scalars_ptr + 2), tl.load(scalars_ptr + 3)
