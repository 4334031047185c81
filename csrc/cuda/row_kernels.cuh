// Row normalisation (LayerNorm, GroupNorm, InstanceNorm): R contiguous rows of L elements,
// statistics per row, affine parameter of element i of row r at (r % G)*P + i/S
// (LayerNorm: G=1, P=L, S=1; GroupNorm: P=C/G channels of S elements; InstanceNorm: G=C).
// Three tiers by row length, as in OneFlow's layer_norm.cuh:
//   warp:  one warp per row, the row in registers (L <= 32*COLS), grid-stride over rows;
//   block: one block per row, the row cached in shared memory (CACHE=true);
//   long:  one block per row reading global memory twice (CACHE=false).
// Forward: statistics then y = act(z), z = (x - mean)*(rstd*gamma) + beta (norm_math.h's
// pre_activation). LayerNorm/RMSNorm also take RowParams::rms and a RowResidual. Backward (dx only; parameter gradients come from reduce_kernels.cuh):
// dx = rstd*(g - mean(g) - xhat*mean(g*xhat)), g = dy*act'(z)*gamma.
#pragma once
#include "device.h"

namespace fusednorm {
namespace cuda {

struct RowShape {
  int64_t R, L, G, P, S;
  __device__ __forceinline__ int64_t param(int64_t r, int64_t i) const { return (r % G) * P + i / S; }
};

// Static shared memory of the block-tier kernels (block_merge's and block_sum2's slots,
// device.h). CUDA counts it with the dynamic row cache against the per-block limit, so the
// tier choice (launch.h) counts it too.
template <typename A>
constexpr size_t kRowFwdStaticSmem = 3 * kWarp * sizeof(A);
template <typename A>
constexpr size_t kRowBwdStaticSmem = 2 * kWarp * sizeof(A);

template <typename A>
struct RowParams {
  const A* gamma;
  const A* beta;
  int64_t act;
  ActParams<A> ap;
  bool rms;  // RMSNorm: statistics about zero (mean 0), no mean term in dx
};

// A residual add fused into LayerNorm/RMSNorm (all null without one): forward reads r and
// writes sum = x + r (rounded to T), which is what is normalised; backward adds dres,
// the gradient the sum receives directly, to dx.
template <typename T>
struct RowResidual {
  const T* r = nullptr;
  T* sum = nullptr;
  const T* dres = nullptr;
};

// x + r as the sum stores it (rounded to T); the sum is also written.
template <typename T, typename A>
__device__ __forceinline__ A add_residual(A v, const RowResidual<T>& res, int64_t idx) {
  const T s = from_acc<T>(v + to_acc(res.r[idx]));
  res.sum[idx] = s;
  return to_acc(s);
}

// (mean, rstd) of a row from its moments: about zero for RMSNorm.
template <typename A>
__device__ __forceinline__ void row_stats(const Moments<A>& m, int64_t L, A eps, bool rms, A* mean, A* rstd) {
  *mean = rms ? A(0) : m.mean;
  *rstd = rstd_from_m2<A>(rms ? m2_about_zero<A>(m.m2, m.mean, L) : m.m2, L, eps);
}

// z of element i (parameter index p) of a row with statistics (mean, rstd).
template <typename A>
__device__ __forceinline__ A row_pre_activation(A v, A mean, A rstd, int64_t p, const RowParams<A>& pr) {
  return pre_activation<A>(v, mean, rstd * pr.gamma[p], pr.beta[p]);
}

template <typename A>
__device__ __forceinline__ void welford_add(Moments<A>& m, A v) {
  m.count += A(1);
  const A d = v - m.mean;
  m.mean += d / m.count;
  m.m2 += d * (v - m.mean);
}

// ---- forward ----------------------------------------------------------------------------
template <typename T, int COLS>
__global__ void row_fwd_warp(const T* __restrict__ x, T* __restrict__ y, RowShape sh,
                             RowParams<typename Acc<T>::type> pr, typename Acc<T>::type eps,
                             typename Acc<T>::type* mean_out, typename Acc<T>::type* rstd_out,
                             typename Acc<T>::type* m2_out, RowResidual<T> res) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x;
  // Grid-stride over groups of blockDim.y rows (the grid is capped); r0 is uniform across
  // the block, so every warp takes part in every shuffle.
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < sh.R; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < sh.R;  // inactive warps still join the shuffles
    A v[COLS];
    Moments<A> m{A(0), A(0), A(0)};
    // Unrolled, so v[k] is a register: the activations' switch in the body would keep
    // the compiler from unrolling by itself, and v[] would go to local memory.
    #pragma unroll
    for (int k = 0; k < COLS; ++k) {
      const int64_t i = lane + int64_t(k) * kWarp;
      v[k] = active && i < sh.L ? to_acc(x[r * sh.L + i]) : A(0);
      if (active && i < sh.L) {
        if (res.r) v[k] = add_residual(v[k], res, r * sh.L + i);
        welford_add(m, v[k]);
      }
    }
    m = warp_merge(m);
    A mean, rstd;
    row_stats(m, sh.L, eps, pr.rms, &mean, &rstd);
    if (!active) continue;  // after the last shuffle
    #pragma unroll
    for (int k = 0; k < COLS; ++k) {
      const int64_t i = lane + int64_t(k) * kWarp;
      if (i < sh.L) {
        const int64_t p = sh.param(r, i);
        y[r * sh.L + i] = from_acc<T>(activate<A>(row_pre_activation(v[k], mean, rstd, p, pr), pr.act, pr.ap));
      }
    }
    if (lane == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      if (m2_out) m2_out[r] = m.m2;
    }
  }
}

template <typename T, bool CACHE>
__global__ void row_fwd_block(const T* __restrict__ x, T* __restrict__ y, RowShape sh,
                              RowParams<typename Acc<T>::type> pr, typename Acc<T>::type eps,
                              typename Acc<T>::type* mean_out, typename Acc<T>::type* rstd_out,
                              typename Acc<T>::type* m2_out, RowResidual<T> res) {
  using A = typename Acc<T>::type;
  FN_DYNAMIC_SMEM(A, cache);
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t r = blockIdx.x; r < sh.R; r += gridDim.x) {  // uniform across the block
    const T* xr = x + r * sh.L;
    Moments<A> m{A(0), A(0), A(0)};
    for (int64_t i = tid; i < sh.L; i += nt) {
      A v = to_acc(xr[i]);
      if (res.r) v = add_residual(v, res, r * sh.L + i);
      if (CACHE) cache[i] = v;
      welford_add(m, v);
    }
    m = block_merge(m);
    A mean, rstd;
    row_stats(m, sh.L, eps, pr.rms, &mean, &rstd);
    // Uncached, the second pass reads the sum back (each thread the elements it wrote).
    const T* src = res.r ? res.sum + r * sh.L : xr;
    for (int64_t i = tid; i < sh.L; i += nt) {
      const A v = CACHE ? cache[i] : to_acc(src[i]);
      const int64_t p = sh.param(r, i);
      y[r * sh.L + i] = from_acc<T>(activate<A>(row_pre_activation(v, mean, rstd, p, pr), pr.act, pr.ap));
    }
    if (tid == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      if (m2_out) m2_out[r] = m.m2;
    }
    __syncthreads();  // the cache is rewritten by the next row
  }
}

// ---- backward (dx) ------------------------------------------------------------------------
// g = (dy through act at the forward's z) * gamma for element v (parameter index p).
template <typename A>
__device__ __forceinline__ A scaled_grad(A v, A mean, A rstd, A dy, int64_t p, const RowParams<A>& pr) {
  return activation_backward<A>(dy, row_pre_activation(v, mean, rstd, p, pr), pr.act, pr.ap) * pr.gamma[p];
}

template <typename T, int COLS>
__global__ void row_bwd_warp(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                             RowShape sh, RowParams<typename Acc<T>::type> pr,
                             const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                             RowResidual<T> res) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x;
  const A inv_l = inverse_count<A>(sh.L);
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < sh.R; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < sh.R;
    const A mu = active ? mean[r] : A(0), rs = active ? rstd[r] : A(0);
    A xh[COLS], g[COLS];
    A sum_g = 0, sum_gx = 0;
    #pragma unroll
    for (int k = 0; k < COLS; ++k) {
      const int64_t i = lane + int64_t(k) * kWarp;
      xh[k] = g[k] = A(0);
      if (active && i < sh.L) {
        const A v = to_acc(x[r * sh.L + i]);
        xh[k] = (v - mu) * rs;
        g[k] = scaled_grad(v, mu, rs, to_acc(dy[r * sh.L + i]), sh.param(r, i), pr);
        sum_g += g[k];
        sum_gx += g[k] * xh[k];
      }
    }
    sum_g = pr.rms ? A(0) : warp_sum(sum_g);  // RMSNorm: no mean, no mean(g) term
    sum_gx = warp_sum(sum_gx);
    if (!active) continue;
    #pragma unroll
    for (int k = 0; k < COLS; ++k) {
      const int64_t i = lane + int64_t(k) * kWarp;
      if (i < sh.L) {
        const int64_t idx = r * sh.L + i;
        const A d = rs * (g[k] - sum_g * inv_l - xh[k] * sum_gx * inv_l);
        dx[idx] = from_acc<T>(res.dres ? d + to_acc(res.dres[idx]) : d);
      }
    }
  }
}

template <typename T, bool CACHE>
__global__ void row_bwd_block(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                              RowShape sh, RowParams<typename Acc<T>::type> pr,
                              const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                              RowResidual<T> res) {
  using A = typename Acc<T>::type;
  FN_DYNAMIC_SMEM(A, cache);  // CACHE: xhat in [0, L), g in [L, 2L)
  const int tid = threadIdx.x, nt = blockDim.x;
  const A inv_l = inverse_count<A>(sh.L);
  for (int64_t r = blockIdx.x; r < sh.R; r += gridDim.x) {
    const T* xr = x + r * sh.L;
    const T* gr = dy + r * sh.L;
    const A mu = mean[r], rs = rstd[r];
    A sum_g = 0, sum_gx = 0;
    for (int64_t i = tid; i < sh.L; i += nt) {
      const A v = to_acc(xr[i]);
      const A xh = (v - mu) * rs;
      const A g = scaled_grad(v, mu, rs, to_acc(gr[i]), sh.param(r, i), pr);
      if (CACHE) {
        cache[i] = xh;
        cache[sh.L + i] = g;
      }
      sum_g += g;
      sum_gx += g * xh;
    }
    block_sum2(sum_g, sum_gx);
    if (pr.rms) sum_g = A(0);  // RMSNorm: no mean, no mean(g) term
    for (int64_t i = tid; i < sh.L; i += nt) {
      A xh, g;
      if (CACHE) {
        xh = cache[i];
        g = cache[sh.L + i];
      } else {
        const A v = to_acc(xr[i]);
        xh = (v - mu) * rs;
        g = scaled_grad(v, mu, rs, to_acc(gr[i]), sh.param(r, i), pr);
      }
      const A d = rs * (g - sum_g * inv_l - xh * sum_gx * inv_l);
      dx[r * sh.L + i] = from_acc<T>(res.dres ? d + to_acc(res.dres[r * sh.L + i]) : d);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace fusednorm
