// The maths every fusednorm kernel shares, written once for the CPU (C++) and CUDA
// (__host__ __device__): Welford/Chan merging of partial statistics, the fused activation
// and its derivative, the pre-activation (x - mean)*alpha + bias and the input gradient's
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

namespace fusednorm {

// Activation codes, shared with Python (fusednorm/_activation.py) and the op schemas.
enum Activation : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

// y = act(z). NaN propagates like torch.relu / torch.nn.functional.leaky_relu.
template <typename T>
FN_HOST_DEVICE T activate(T z, int64_t act, T slope) {
  if (act == kRelu) return z < T(0) ? T(0) : z;
  if (act == kLeakyRelu) return z > T(0) ? z : z * slope;
  return z;
}

// dL/dz for y = act(z), from g = dL/dy, as torch's relu / leaky_relu backward: relu
// passes g where z > 0 and gives 0 elsewhere, also for an inf or NaN g (a select, not
// g * 0); leaky_relu scales g by slope where z <= 0. At z == 0: relu 0, leaky_relu slope;
// NaN z: relu passes g (threshold_backward), leaky_relu scales it.
template <typename T>
FN_HOST_DEVICE T activation_backward(T g, T z, int64_t act, T slope) {
  if (act == kRelu) return z <= T(0) ? T(0) : g;
  if (act == kLeakyRelu) return z > T(0) ? g : g * slope;
  return g;
}

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
