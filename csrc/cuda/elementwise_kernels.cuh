// BatchNorm's elementwise passes, per channel, with z = (x - mean[c])*alpha[c] + beta[c]
// (norm_math.h's pre_activation, alpha = rstd*gamma):
//   ApplyPass:     y  = act(z) (act(z + residual) with BatchNorm's residual add)
//   InputGradPass: dx = cA[c]*dyhat + cB[c]*(x - mean[c]) + cC[c],  dyhat = dy * act'(z)
// The channel comes from the grid, never from a per-element divide: in NCHW a block walks
// one (n, c) plane at a time; in NHWC a thread keeps the same W columns for all its rows,
// their coefficients in registers. W elements per access (16 bytes where the launcher
// found the layout aligned; a pack never straddles two channels).
#pragma once
#include "device.h"

namespace fusednorm {
namespace cuda {

// Channel c's pre-activation z = (x - mean[c])*alpha[c] + beta[c] and the activation: what
// both passes apply.
template <typename A>
struct ChannelAffine {
  const A* mean;
  const A* alpha;
  const A* beta;
  int64_t act;
  ActParams<A> ap;
  struct Coef {
    A mean, alpha, beta;
  };
  __device__ __forceinline__ Coef coef(int64_t c) const { return {mean[c], alpha[c], beta[c]}; }
  __device__ __forceinline__ static A z(const Coef& k, A x) { return pre_activation<A>(x, k.mean, k.alpha, k.beta); }
};

template <typename T>
struct ApplyPass {
  using A = typename Acc<T>::type;
  using Coef = typename ChannelAffine<A>::Coef;
  static constexpr const char* kName = "apply";  // the emulation's coverage label
  ChannelAffine<A> affine;
  __device__ __forceinline__ Coef coef(int64_t c) const { return affine.coef(c); }
  // Pack k: y from x (`in`) and, with BatchNorm's residual, z (`in2`, laid out as x).
  template <int W, int KSTEP>
  __device__ __forceinline__ void run(const Coef* k, const T* in, const T* in2, T* out, int64_t pack) const {
    const Pack<T, W> x = load_pack<W>(in, pack);
    Pack<T, W> z, y;
    if (in2) z = load_pack<W>(in2, pack);
    #pragma unroll
    for (int j = 0; j < W; ++j) {
      A v = affine.z(k[j * KSTEP], to_acc(x.v[j]));
      if (in2) v += to_acc(z.v[j]);
      y.v[j] = from_acc<T>(activate<A>(v, affine.act, affine.ap));
    }
    store_pack<W>(out, pack, y);
  }
};

template <typename T>
struct InputGradPass {
  using A = typename Acc<T>::type;
  static constexpr const char* kName = "input_grad";
  ChannelAffine<A> affine;
  const A* cA;
  const A* cB;
  const A* cC;
  struct Coef {
    typename ChannelAffine<A>::Coef z;
    A a, b, c;
  };
  __device__ __forceinline__ Coef coef(int64_t c) const { return {affine.coef(c), cA[c], cB[c], cC[c]}; }
  // Pack k: dx from x (`in`) and dy (`in2`).
  template <int W, int KSTEP>
  __device__ __forceinline__ void run(const Coef* k, const T* in, const T* in2, T* out, int64_t pack) const {
    const Pack<T, W> x = load_pack<W>(in, pack), dy = load_pack<W>(in2, pack);
    Pack<T, W> dx;
    #pragma unroll
    for (int j = 0; j < W; ++j) {
      const Coef& kj = k[j * KSTEP];
      const A xv = to_acc(x.v[j]);
      const A g = activation_backward<A>(to_acc(dy.v[j]), affine.z(kj.z, xv), affine.act, affine.ap);
      dx.v[j] = from_acc<T>(kj.a * g + kj.b * (xv - kj.z.mean) + kj.c);
    }
    store_pack<W>(out, pack, dx);
  }
};

// NCHW: grid (planes, tiles of a plane), 1-D block; planes of S elements (W divides S),
// plane p is channel p % C.
template <typename T, typename Pass, int W>
__global__ void elementwise_nchw(Pass pass, const T* __restrict__ in, const T* __restrict__ in2,
                                 T* __restrict__ out, int64_t planes, int64_t C, int64_t S) {
  const int64_t Sp = S / W;
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    const typename Pass::Coef k = pass.coef(p % C);
    for (int64_t q = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; q < Sp; q += int64_t(gridDim.y) * blockDim.x)
      pass.template run<W, 0>(&k, in, in2, out, p * Sp + q);
  }
}

// NHWC: grid (column groups, row chunks), block (bx, by); M rows of C columns (W divides
// C), a thread's columns c0 .. c0+W-1.
template <typename T, typename Pass, int W>
__global__ void elementwise_nhwc(Pass pass, const T* __restrict__ in, const T* __restrict__ in2,
                                 T* __restrict__ out, int64_t M, int64_t C) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * W;
  if (c0 >= C) return;  // (no barrier in this kernel)
  typename Pass::Coef k[W];
  #pragma unroll
  for (int j = 0; j < W; ++j) k[j] = pass.coef(c0 + j);
  for (int64_t m = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; m < M; m += int64_t(gridDim.y) * blockDim.y)
    pass.template run<W, 1>(k, in, in2, out, (m * C + c0) / W);
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
