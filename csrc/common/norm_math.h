// The maths every fusednorm kernel shares, written once for the CPU (C++) and CUDA
// (__host__ __device__): Welford/Chan merging of partial statistics, the fused activations
// and their derivatives, the pre-activation (x - mean)*alpha + bias and the input gradient's
// coefficients.
// No torch types here: the CPU kernels include it in their per-ISA translation units.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FN_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the per-ISA CPU translation units must never share an out-of-line copy.
#define FN_HOST_DEVICE inline __attribute__((always_inline))
#endif

// The translation units built with FN_FMA compile the functions below differently (see
// fn_madd), so those functions live in an inline namespace named for the variant: each
// variant is a distinct entity to the linker (one definition each), while callers still
// write fusednorm::fn_exp. The types (ActParams, Moments, ...) stay outside it, since the
// kernel tables pass them between translation units.
#if defined(FN_FMA)
#define FN_MATH_VARIANT fma_math
#else
#define FN_MATH_VARIANT plain_math
#endif

namespace fusednorm {
inline namespace FN_MATH_VARIANT {

// ---- elementary functions ------------------------------------------------------------
// The activations below need exp, expm1, tanh, log1p and erf. On a GPU these are CUDA's
// own (expf, tanhf, ...). On the CPU, float exp, expm1, tanh and erf are written out here
// in arithmetic and bit operations the auto-vectoriser turns into vector code (a libm call
// keeps a loop scalar: SiLU's exp would cost more than the rest of the kernel); double
// and the rarer log1p (Softplus) call libm. fusednorm/triton/math.py computes expm1 and tanh
// by the same formulas (Triton's interpreter has no libdevice).
#if defined(__CUDA_ARCH__)
FN_HOST_DEVICE float fn_exp(float x) { return ::expf(x); }
FN_HOST_DEVICE float fn_expm1(float x) { return ::expm1f(x); }
FN_HOST_DEVICE float fn_tanh(float x) { return ::tanhf(x); }
FN_HOST_DEVICE float fn_erf(float x) { return ::erff(x); }
FN_HOST_DEVICE float fn_erf_given_exp(float x, float) { return ::erff(x); }
#else
FN_HOST_DEVICE float fn_bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// a*b + c in the polynomials below: one fused multiply-add in the translation units built
// for an instruction set that has one (they define FN_FMA before including this header:
// kernels_avx2.cpp, kernels_avx512.cpp), two roundings elsewhere (-ffp-contract=off keeps
// `a * b + c` unfused there, and a libm fmaf call would keep the loops scalar).
#if defined(FN_FMA)
FN_HOST_DEVICE float fn_madd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
FN_HOST_DEVICE float fn_madd(float a, float b, float c) { return a * b + c; }
#endif

// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is
// exact), |r| <= ln 2 / 2, exp(r) = 1 + r + r^2 P(r) with Cephes' degree-5 P (error
// below 5e-9 relative), 2^n built from its exponent bits (in two factors for n = 128).
// Within 2 ulp of the exact value; 0 below -87.5 (where the result would be subnormal), inf above
// log(FLT_MAX), NaN for NaN.
FN_HOST_DEVICE float fn_exp(float x) {
  const float kLogMax = 88.7228391f;
  const float xc = x < -87.5f ? -87.5f : (x > kLogMax ? kLogMax : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.9875691500e-4f;
  p = fn_madd(p, r, 1.3981999507e-3f);
  p = fn_madd(p, r, 8.3334519073e-3f);
  p = fn_madd(p, r, 4.1665795894e-2f);
  p = fn_madd(p, r, 1.6666665459e-1f);
  p = fn_madd(p, r, 5.0000001201e-1f);
  p = fn_madd(p, r * r, r) + 1.0f;
  const int32_t ni = int32_t(n);  // in [-126, 128]
  const int32_t top = ni > 0 ? 1 : 0;
  const float e = p * fn_bits_to_float(uint32_t(ni - top + 127) << 23) * (top ? 2.0f : 1.0f);
  return x > kLogMax ? __builtin_inff() : (x < -87.5f ? 0.0f : (x != x ? x : e));
}

// exp(x) - 1 without the cancellation of exp(x) - 1 near 0: for |x| < 0.5 its Taylor
// series to x^8, x(1 + x/2(1 + x/3(...(1 + x/8)))) (truncation < 1e-8 relative), else
// exp(x) - 1 (which cancels at most 2 bits there).
FN_HOST_DEVICE float fn_expm1(float x) {
  float p = 1.0f;
  for (int k = 8; k >= 2; --k) p = 1.0f + x * p * (1.0f / float(k));
  const float ax = x < 0.0f ? -x : x;
  return ax < 0.5f ? x * p : fn_exp(x) - 1.0f;
}

// tanh(x) = -t / (t + 2) with t = expm1(-2|x|) in (-1, 0], and x's sign: accurate near 0
// (expm1), never overflowing, 1 for large |x|, NaN for NaN.
FN_HOST_DEVICE float fn_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = fn_expm1(-2.0f * ax);
  const float th = -t / (t + 2.0f);
  return x < 0.0f ? -th : th;
}

// erf(x) given e = exp(-x^2), which GELU's derivative needs anyway (its pdf): Abramowitz
// and Stegun's 7.1.26 as ATen's vectorised float erf, 1 - (a1 t + ... + a5 t^5) e with
// t = 1 / (1 + p|x|), x's sign; absolute error below 2e-7 (GELU uses 1 + erf). NaN for NaN.
FN_HOST_DEVICE float fn_erf_given_exp(float x, float e) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly =
      fn_madd(fn_madd(fn_madd(fn_madd(1.061405429f, t, -1.453152027f), t, 1.421413741f), t, -0.284496736f), t,
              0.254829592f) * t;
  const float r = 1.0f - poly * e;
  return x < 0.0f ? -r : r;
}
FN_HOST_DEVICE float fn_erf(float x) { return fn_erf_given_exp(x, fn_exp(-x * x)); }
#endif
FN_HOST_DEVICE double fn_exp(double x) { return ::exp(x); }
FN_HOST_DEVICE double fn_expm1(double x) { return ::expm1(x); }
FN_HOST_DEVICE double fn_tanh(double x) { return ::tanh(x); }
FN_HOST_DEVICE float fn_log1p(float x) { return ::log1pf(x); }
FN_HOST_DEVICE double fn_log1p(double x) { return ::log1p(x); }
FN_HOST_DEVICE double fn_erf(double x) { return ::erf(x); }
FN_HOST_DEVICE double fn_erf_given_exp(double x, double) { return ::erf(x); }

}  // namespace FN_MATH_VARIANT

// ---- the fused activation ---------------------------------------------------------------
// Activation codes, shared with Python (fusednorm/_activation.py) and the op schemas.
// ReLU6 is Hardtanh(0, 6), as in torch.
enum Activation : int64_t {
  kNone = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kSilu = 3,
  kGelu = 4,
  kGeluTanh = 5,  // GELU(approximate="tanh")
  kElu = 6,
  kCelu = 7,
  kSelu = 8,
  kHardtanh = 9,
  kHardswish = 10,
  kHardsigmoid = 11,
  kSigmoid = 12,
  kTanh = 13,
  kSoftplus = 14,
  kMish = 15,
  kNumActivations = 16
};

// An activation's two parameters: leaky_relu (negative_slope, -), elu (alpha, -),
// celu (alpha, 1/alpha), hardtanh (min_val, max_val), softplus (beta, threshold).
template <typename T>
struct ActParams {
  T a;
  T b;
};

// The ops' act_a, act_b in the accumulation type.
template <typename T>
inline ActParams<T> act_params(double a, double b) {
  return ActParams<T>{T(a), T(b)};
}

// Constants as torch defines them (ATen's Activation.cpp, in double, rounded to T).
template <typename T>
struct ActConst {
  static constexpr T selu_scale = T(1.0507009873554804934193349852946);
  static constexpr T selu_neg = T(1.6732632423543772848170429916717 * 1.0507009873554804934193349852946);
  static constexpr T sqrt1_2 = T(0.70710678118654752440);           // M_SQRT1_2
  static constexpr T gelu_pdf = T(1.12837916709551257390 * 0.70710678118654752440 * 0.5);  // M_2_SQRTPI*M_SQRT1_2/2
  static constexpr T gelu_tanh_beta = T(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  static constexpr T gelu_tanh_kappa = T(0.044715);
};

inline namespace FN_MATH_VARIANT {

template <typename T>
FN_HOST_DEVICE T fn_sigmoid(T z) { return T(1) / (T(1) + fn_exp(-z)); }

// tanh(softplus(z)) = ((1+e)^2 - 1) / ((1+e)^2 + 1), e = exp(z), without a log; 1 above
// z = 20, where it rounds to 1 in double too (and e^2 would overflow further on).
template <typename T>
FN_HOST_DEVICE T tanh_softplus(T z) {
  const T e = fn_exp(z < T(20) ? z : T(20));
  const T n = e * (e + T(2));
  return z < T(20) ? n / (n + T(2)) : T(1);
}

template <typename T>
FN_HOST_DEVICE T clamp_to(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }

// y = act(z), with torch.nn's formulas (ATen's CPU kernels). NaN propagates.
template <typename T>
FN_HOST_DEVICE T activate(T z, int64_t act, ActParams<T> p) {
  using K = ActConst<T>;
  switch (act) {
    case kRelu: return z < T(0) ? T(0) : z;
    case kLeakyRelu: return z > T(0) ? z : z * p.a;
    case kSilu: return z / (T(1) + fn_exp(-z));
    case kGelu: return z * T(0.5) * (T(1) + fn_erf(z * K::sqrt1_2));
    case kGeluTanh: {
      const T inner = K::gelu_tanh_beta * (z + z * z * z * K::gelu_tanh_kappa);
      return T(0.5) * z * (T(1) + fn_tanh(inner));
    }
    case kElu: return z <= T(0) ? fn_expm1(z) * p.a : z;
    case kCelu: return z <= T(0) ? fn_expm1(z * p.b) * p.a : z;
    case kSelu: return z <= T(0) ? fn_expm1(z) * K::selu_neg : z * K::selu_scale;
    case kHardtanh: return clamp_to(z, p.a, p.b);
    case kHardswish: return z * clamp_to(z + T(3), T(0), T(6)) / T(6);
    case kHardsigmoid: return clamp_to(z + T(3), T(0), T(6)) / T(6);
    case kSigmoid: return fn_sigmoid(z);
    case kTanh: return fn_tanh(z);
    case kSoftplus: {
      const T zb = z * p.a;
      return zb > p.b ? z : fn_log1p(fn_exp(zb)) / p.a;
    }
    case kMish: return z * tanh_softplus(z);
    default: return z;
  }
}

// dL/dz for y = act(z), from g = dL/dy: torch.nn's derivative (ATen's *_backward), its
// choice at every kink included (relu 0 at 0, hardtanh 0 at both ends, hardswish 0 at -3
// and 1 at 3, hardsigmoid 0 at both ends, ...). ReLU and the hard functions select (0 for an inf or
// NaN g where the slope is 0, as torch's threshold_backward); the smooth ones multiply.
template <typename T>
FN_HOST_DEVICE T activation_backward(T g, T z, int64_t act, ActParams<T> p) {
  using K = ActConst<T>;
  switch (act) {
    case kRelu: return z <= T(0) ? T(0) : g;
    case kLeakyRelu: return z > T(0) ? g : g * p.a;
    case kSilu: {
      const T s = fn_sigmoid(z);
      return g * s * (T(1) + z * (T(1) - s));
    }
    case kGelu: {
      const T x = z * K::sqrt1_2;
      const T e = fn_exp(-x * x);  // exp(-z^2 / 2): the pdf's, and on the CPU erf's own
      const T cdf = T(0.5) * (T(1) + fn_erf_given_exp(x, e));
      return g * (cdf + z * e * K::gelu_pdf);
    }
    case kGeluTanh: {
      const T z2 = z * z;
      const T t = fn_tanh(K::gelu_tanh_beta * (z + z2 * z * K::gelu_tanh_kappa));
      const T dt = (T(1) - t * t) * K::gelu_tanh_beta * (T(1) + T(3) * K::gelu_tanh_kappa * z2);
      return g * (T(0.5) * (T(1) + t) + T(0.5) * z * dt);
    }
    case kElu: return z <= T(0) ? g * p.a * fn_exp(z) : g;
    case kCelu: return z <= T(0) ? g * fn_exp(z * p.b) : g;
    case kSelu: return z <= T(0) ? g * K::selu_neg * fn_exp(z) : g * K::selu_scale;
    case kHardtanh: return (z <= p.a || z >= p.b) ? T(0) : g;
    case kHardswish: return z <= T(-3) ? T(0) : (z < T(3) ? g * (z / T(3) + T(0.5)) : g);
    case kHardsigmoid: return (z > T(-3) && z < T(3)) ? g / T(6) : T(0);
    case kSigmoid: {
      const T y = fn_sigmoid(z);
      return g * (T(1) - y) * y;
    }
    case kTanh: {
      const T y = fn_tanh(z);
      return g * (T(1) - y * y);
    }
    // torch's exp(zb) / (exp(zb) + 1) is NaN once exp overflows (threshold > 88): the
    // sigmoid of zb, which it equals, is not.
    case kSoftplus: return z * p.a > p.b ? g : g * fn_sigmoid(z * p.a);
    case kMish: {
      const T t = tanh_softplus(z);
      return g * (t + z * fn_sigmoid(z) * (T(1) - t * t));
    }
    default: return g;
  }
}

}  // namespace FN_MATH_VARIANT

// Partial statistics of a set of values: count, mean and M2 = sum((x - mean)^2).
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// Chan et al.'s parallel merge of two partial statistics. Stable (no E[x^2]-E[x]^2).
template <typename T>
FN_HOST_DEVICE Moments<T> merge(Moments<T> a, Moments<T> b) {
  T n = a.count + b.count;
  if (n == T(0)) return a;
  T delta = b.mean - a.mean;
  T wb = b.count / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// 1 / count of a set of `count` elements, 0 for an empty set. The count is an integer,
// divided in double: a float would round counts above 2^24.
template <typename T>
FN_HOST_DEVICE T inverse_count(int64_t count) {
  return count > 0 ? T(1.0 / double(count)) : T(0);
}

// 1 / sqrt(var + eps) for the biased variance M2 / count; an M2 rounded below 0 counts
// as 0 (eps = 0 must not give NaN from rounding), and an empty set has variance 0.
template <typename T>
FN_HOST_DEVICE T rstd_from_m2(T m2, int64_t count, T eps) {
  T var = (m2 > T(0) ? m2 : T(0)) * inverse_count<T>(count);
  return T(1) / std::sqrt(var + eps);
}

// RMSNorm's statistic from a set's moments: the sum of squares about zero,
// M2 + count * mean^2, for rstd_from_m2 (mean(x^2) + eps under the root). Both terms are
// non-negative, so nothing cancels; the moments come from the same Welford/two-pass code
// as LayerNorm's.
template <typename T>
FN_HOST_DEVICE T m2_about_zero(T m2, T mean, int64_t count) {
  return (m2 > T(0) ? m2 : T(0)) + T(count) * mean * mean;
}

// The unbiased variance M2 / (count - 1) that running statistics follow; NaN for a set
// of fewer than two values, as torch's (0 / 0) there.
template <typename T>
FN_HOST_DEVICE T unbiased_var(T m2, T count) {
  return count > T(1) ? (m2 > T(0) ? m2 : T(0)) / (count - T(1)) : T(NAN);
}

// Exactly rounded product and sum, never contracted into one fused multiply-add: the
// forward and the backward compute the pre-activation with these and so get the same bits
// (the activation's derivative must agree with the output's side of a kink). The CPU
// kernels are compiled with -ffp-contract=off for the same reason.
#if defined(__CUDA_ARCH__)
FN_HOST_DEVICE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FN_HOST_DEVICE double mul_rn(double a, double b) { return __dmul_rn(a, b); }
FN_HOST_DEVICE float add_rn(float a, float b) { return __fadd_rn(a, b); }
FN_HOST_DEVICE double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
template <typename T>
FN_HOST_DEVICE T mul_rn(T a, T b) { return a * b; }
template <typename T>
FN_HOST_DEVICE T add_rn(T a, T b) { return a + b; }
#endif

// The pre-activation of one element, z = (x - mean) * alpha + bias with alpha = rstd*gamma.
// Centred, not folded into x*alpha + (bias - mean*alpha): that form cancels when
// |mean| >> std (a constant set, which normalises to exactly 0, came out nonzero), and
// a constant set gives exactly z = bias here whatever the rounding mode of the rest.
template <typename T>
FN_HOST_DEVICE T pre_activation(T x, T mean, T alpha, T bias) {
  return add_rn(mul_rn(x - mean, alpha), bias);
}

// The training-mode input gradient dx = A*dyhat + B*(x - mean) + C over a normalised set
// of M values (statistics mean/rstd, the element's scale gamma), from the set's sums
// sum_alpha_dy = sum(dyhat * rstd*gamma) and sum_dyxhat = sum(dyhat*gamma*xhat):
//   dx = rstd*gamma*dyhat - sum(rstd*gamma*dyhat)/M - rstd*xhat * sum_dyxhat/M.
// Centred on the mean (not B*x + C', which cancels when |mean| >> std), and A = rstd*gamma
// is the factor the sum was taken with, so a set of one value gets exactly dx = 0.
template <typename T>
FN_HOST_DEVICE void input_grad_coefficients(T rstd, T gamma, T sum_alpha_dy, T sum_dyxhat,
                                            int64_t count, T* A, T* B, T* C) {
  const T inv_m = inverse_count<T>(count);
  *A = rstd * gamma;
  *B = -rstd * rstd * sum_dyxhat * inv_m;
  *C = -sum_alpha_dy * inv_m;
}

}  // namespace fusednorm
