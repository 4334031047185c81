// BatchNorm's elementwise passes, per channel, with z = (x - mean[c])*alpha[c] + beta[c]
// (norm_math.h's pre_activation, alpha = rstd*gamma):
//   apply:      y  = act(z) (act(z + residual) with BatchNorm's residual add)
//   input_grad: dx = cA[c]*dyhat + cB[c]*(x - mean[c]) + cC[c],  dyhat = dy * act'(z)
// Channel of element i: (i / S) % C in NCHW, i % C in NHWC (S = 1). Grid-stride loops with
// 64-bit indices; VEC moves 16 bytes per access (the launcher checks the alignment and that
// a pack never straddles two channels in NCHW).
#pragma once
#include "device.h"

namespace fusednorm {
namespace cuda {

// z (optional, laid out as x): BatchNorm's residual, y = act(z + pre-activation).
template <typename T, bool VEC>
__global__ void apply_kernel(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y, int64_t numel,
                             int64_t C, int64_t S, const typename Acc<T>::type* __restrict__ mean,
                             const typename Acc<T>::type* __restrict__ alpha,
                             const typename Acc<T>::type* __restrict__ beta, int64_t act,
                             ActParams<typename Acc<T>::type> ap) {
  using A = typename Acc<T>::type;
  constexpr int P = VEC ? pack_size<T>() : 1;
  const int64_t packs = numel / P;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const Pack<T, P> in = load_pack<P>(x, p);
    Pack<T, P> out, res;
    if (z) res = load_pack<P>(z, p);
    for (int k = 0; k < P; ++k) {
      const int64_t c = ((p * P + k) / S) % C;
      A v = pre_activation<A>(to_acc(in.v[k]), mean[c], alpha[c], beta[c]);
      if (z) v += to_acc(res.v[k]);
      out.v[k] = from_acc<T>(activate<A>(v, act, ap));
    }
    store_pack<P>(y, p, out);
  }
}

template <typename T, bool VEC>
__global__ void input_grad_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                  T* __restrict__ dx, int64_t numel, int64_t C, int64_t S,
                                  const typename Acc<T>::type* __restrict__ mean,
                                  const typename Acc<T>::type* __restrict__ alpha,
                                  const typename Acc<T>::type* __restrict__ beta,
                                  const typename Acc<T>::type* __restrict__ cA,
                                  const typename Acc<T>::type* __restrict__ cB,
                                  const typename Acc<T>::type* __restrict__ cC, int64_t act,
                                  ActParams<typename Acc<T>::type> ap) {
  using A = typename Acc<T>::type;
  constexpr int P = VEC ? pack_size<T>() : 1;
  const int64_t packs = numel / P;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const Pack<T, P> xin = load_pack<P>(x, p), gin = load_pack<P>(dy, p);
    Pack<T, P> out;
    for (int k = 0; k < P; ++k) {
      const int64_t c = ((p * P + k) / S) % C;
      const A xv = to_acc(xin.v[k]);
      const A g = activation_backward<A>(to_acc(gin.v[k]), pre_activation<A>(xv, mean[c], alpha[c], beta[c]), act, ap);
      out.v[k] = from_acc<T>(cA[c] * g + cB[c] * (xv - mean[c]) + cC[c]);
    }
    store_pack<P>(dx, p, out);
  }
}

// GroupNorm/InstanceNorm normalised by the two kernels above (rows too few to fill the GPU
// one block each: bindings.h's split_rows): per (n, c) plane of S elements, in row
// n*G + c/cg, the forward's mean, alpha = rstd*gamma[c] and beta[c]; with the backward's
// per-plane sums (sum_g: of dyhat, sum_gx: of dyhat*xhat), the input gradient's cA, cB, cC
// from the row's sums of gamma*dyhat and gamma*dyhat*xhat.
template <typename A>
__global__ void plane_coefficients_kernel(const A* __restrict__ mean, const A* __restrict__ rstd,
                                   const A* __restrict__ gamma, const A* __restrict__ beta, int64_t N,
                                   int64_t C, int64_t G, int64_t L, const A* __restrict__ sum_g,
                                   const A* __restrict__ sum_gx, A* mean_p, A* alpha_p, A* beta_p, A* cA,
                                   A* cB, A* cC) {
  const int64_t cg = C / G;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N * C; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p / C, c = p - n * C, row = n * G + c / cg;
    const A rs = rstd[row];
    mean_p[p] = mean[row];
    alpha_p[p] = rs * gamma[c];
    beta_p[p] = beta[c];
    if (!sum_g) continue;
    A row_g = 0, row_gx = 0;
    for (int64_t k = c - c % cg; k < c - c % cg + cg; ++k) {
      row_g += gamma[k] * sum_g[n * C + k];
      row_gx += gamma[k] * sum_gx[n * C + k];
    }
    input_grad_coefficients<A>(rs, gamma[c], rs * row_g, row_gx, L, &cA[p], &cB[p], &cC[p]);
  }
}

}  // namespace cuda
}  // namespace fusednorm
