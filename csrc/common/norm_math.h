// The maths every fusednorm kernel shares, written once for the CPU (C++) and CUDA
// (__host__ __device__): Welford/Chan merging of partial statistics, the fused activation
// and its derivative, and folding mean/rstd/gamma/beta into one multiply-add.
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

// 1 / sqrt(var + eps) for the biased variance M2 / count.
template <typename T>
FN_HOST_DEVICE T rstd_from_m2(T m2, T count, T eps) {
  T var = count > T(0) ? m2 / count : T(0);
  return T(1) / std::sqrt(var + eps);
}

// The epilogue's fold: act(x * alpha + beta) == act((x - mean) * rstd * gamma + bias).
template <typename T>
FN_HOST_DEVICE void fold_affine(T mean, T rstd, T gamma, T bias, T* alpha, T* beta) {
  *alpha = rstd * gamma;
  *beta = bias - mean * (*alpha);
}

// The training-mode input gradient dx = A*dyhat + B*x + C, given over the normalised set
// (M values, statistics mean/rstd, scale gamma) sum_dy = sum(dyhat*gamma) and
// sum_dyxhat = sum(dyhat*gamma*xhat) (gamma already folded into both sums):
//   dx = rstd * (gamma*dyhat - sum_dy/M - xhat * sum_dyxhat/M).
// Here A's gamma is the element's own (per channel); B and C come from the set's sums.
template <typename T>
FN_HOST_DEVICE void input_grad_coefficients(T mean, T rstd, T gamma, T sum_dy, T sum_dyxhat,
                                            T count, T* A, T* B, T* C) {
  T inv_m = count > T(0) ? T(1) / count : T(0);
  *A = rstd * gamma;
  *B = -rstd * rstd * sum_dyxhat * inv_m;
  *C = -rstd * sum_dy * inv_m - (*B) * mean;
}

}  // namespace fusednorm
