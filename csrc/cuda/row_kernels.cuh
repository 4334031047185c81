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

// Pack k (W elements) of the row starting at `base`, in the accumulation type: x, or with a
// residual the sum x + r as the sum stores it (rounded to T), which is also written.
template <int W, typename T, typename A>
__device__ __forceinline__ void load_row_pack(const T* x, const RowResidual<T>& res, int64_t base, int64_t k,
                                              A (&v)[W]) {
  const Pack<T, W> px = load_pack<W>(x + base, k);
  if (!res.r) {
    #pragma unroll
    for (int j = 0; j < W; ++j) v[j] = to_acc(px.v[j]);
    return;
  }
  const Pack<T, W> pr = load_pack<W>(res.r + base, k);
  Pack<T, W> sum;
  #pragma unroll
  for (int j = 0; j < W; ++j) {
    sum.v[j] = from_acc<T>(to_acc(px.v[j]) + to_acc(pr.v[j]));
    v[j] = to_acc(sum.v[j]);
  }
  store_pack<W>(res.sum + base, k, sum);
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

// Each thread reads packs of W elements (16 bytes where the rows are aligned, launch.h's
// row_pack; W divides L then, so a pack is wholly inside its row or wholly outside).

// ---- forward ----------------------------------------------------------------------------
// The output pack k of a row (elements k*W ..), from its values v and statistics.
template <int W, typename T, typename A>
__device__ __forceinline__ void store_output_pack(T* y, int64_t r, int64_t k, const A* v, A mean, A rstd,
                                                  const RowShape& sh, const RowParams<A>& pr) {
  Pack<T, W> out;
  #pragma unroll
  for (int j = 0; j < W; ++j)
    out.v[j] = from_acc<T>(activate<A>(row_pre_activation(v[j], mean, rstd, sh.param(r, k * W + j), pr), pr.act, pr.ap));
  store_pack<W>(y + r * sh.L, k, out);
}

template <typename T, int COLS, int W>
__global__ void row_fwd_warp(const T* __restrict__ x, T* __restrict__ y, RowShape sh,
                             RowParams<typename Acc<T>::type> pr, typename Acc<T>::type eps,
                             typename Acc<T>::type* mean_out, typename Acc<T>::type* rstd_out,
                             typename Acc<T>::type* m2_out, RowResidual<T> res) {
  using A = typename Acc<T>::type;
  static_assert(COLS % W == 0, "a lane's elements are whole packs");
  constexpr int PACKS = COLS / W;
  const int lane = threadIdx.x;
  // Grid-stride over groups of blockDim.y rows (the grid is capped); r0 is uniform across
  // the block, so every warp takes part in every shuffle.
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < sh.R; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < sh.R;  // inactive warps still join the shuffles
    // Lane's pack q is the row's pack q*32 + lane. Unrolled, so v[] stays in registers:
    // the activations' switch in the body would keep the compiler from unrolling by
    // itself, and v[] would go to local memory.
    A v[PACKS][W];
    Moments<A> m{A(0), A(0), A(0)};
    #pragma unroll
    for (int q = 0; q < PACKS; ++q) {
      const int64_t k = int64_t(q) * kWarp + lane;
      #pragma unroll
      for (int j = 0; j < W; ++j) v[q][j] = A(0);
      if (active && k * W < sh.L) {
        load_row_pack<W>(x, res, r * sh.L, k, v[q]);
        #pragma unroll
        for (int j = 0; j < W; ++j) welford_add(m, v[q][j]);
      }
    }
    m = warp_merge(m);
    A mean, rstd;
    row_stats(m, sh.L, eps, pr.rms, &mean, &rstd);
    if (!active) continue;  // after the last shuffle
    #pragma unroll
    for (int q = 0; q < PACKS; ++q) {
      const int64_t k = int64_t(q) * kWarp + lane;
      if (k * W < sh.L) store_output_pack<W>(y, r, k, v[q], mean, rstd, sh, pr);
    }
    if (lane == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      if (m2_out) m2_out[r] = m.m2;
    }
  }
}

template <typename T, bool CACHE, int W>
__global__ void row_fwd_block(const T* __restrict__ x, T* __restrict__ y, RowShape sh,
                              RowParams<typename Acc<T>::type> pr, typename Acc<T>::type eps,
                              typename Acc<T>::type* mean_out, typename Acc<T>::type* rstd_out,
                              typename Acc<T>::type* m2_out, RowResidual<T> res) {
  using A = typename Acc<T>::type;
  FN_DYNAMIC_SMEM(A, cache);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t packs = sh.L / W;
  for (int64_t r = blockIdx.x; r < sh.R; r += gridDim.x) {  // uniform across the block
    Moments<A> m{A(0), A(0), A(0)};
    for (int64_t k = tid; k < packs; k += nt) {
      A v[W];
      load_row_pack<W>(x, res, r * sh.L, k, v);
      #pragma unroll
      for (int j = 0; j < W; ++j) {
        if (CACHE) cache[k * W + j] = v[j];
        welford_add(m, v[j]);
      }
    }
    m = block_merge(m);
    A mean, rstd;
    row_stats(m, sh.L, eps, pr.rms, &mean, &rstd);
    // Uncached, the second pass reads the sum back (each thread the packs it wrote).
    const T* src = res.r ? res.sum : x;
    for (int64_t k = tid; k < packs; k += nt) {
      A v[W];
      if (CACHE) {
        #pragma unroll
        for (int j = 0; j < W; ++j) v[j] = cache[k * W + j];
      } else {
        const Pack<T, W> p = load_pack<W>(src + r * sh.L, k);
        #pragma unroll
        for (int j = 0; j < W; ++j) v[j] = to_acc(p.v[j]);
      }
      store_output_pack<W>(y, r, k, v, mean, rstd, sh, pr);
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

// xhat and g of pack k of row r.
template <int W, typename T, typename A>
__device__ __forceinline__ void load_grad_pack(const T* x, const T* dy, int64_t r, int64_t k, A mu, A rs,
                                               const RowShape& sh, const RowParams<A>& pr, A* xh, A* g) {
  const Pack<T, W> px = load_pack<W>(x + r * sh.L, k), pg = load_pack<W>(dy + r * sh.L, k);
  #pragma unroll
  for (int j = 0; j < W; ++j) {
    const A v = to_acc(px.v[j]);
    xh[j] = (v - mu) * rs;
    g[j] = scaled_grad(v, mu, rs, to_acc(pg.v[j]), sh.param(r, k * W + j), pr);
  }
}

// dx of pack k of row r: rstd*(g - mean(g) - xhat*mean(g*xhat)) (sums over the row, each
// times 1/L), plus the residual's own gradient.
template <int W, typename T, typename A>
__device__ __forceinline__ void store_dx_pack(T* dx, const RowResidual<T>& res, int64_t r, int64_t k,
                                              const A* xh, const A* g, A rs, A mean_g, A mean_gx,
                                              int64_t L) {
  Pack<T, W> out, pd;
  if (res.dres) pd = load_pack<W>(res.dres + r * L, k);
  #pragma unroll
  for (int j = 0; j < W; ++j) {
    const A d = rs * (g[j] - mean_g - xh[j] * mean_gx);
    out.v[j] = from_acc<T>(res.dres ? d + to_acc(pd.v[j]) : d);
  }
  store_pack<W>(dx + r * L, k, out);
}

template <typename T, int COLS, int W>
__global__ void row_bwd_warp(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                             RowShape sh, RowParams<typename Acc<T>::type> pr,
                             const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                             RowResidual<T> res) {
  using A = typename Acc<T>::type;
  static_assert(COLS % W == 0, "a lane's elements are whole packs");
  constexpr int PACKS = COLS / W;
  const int lane = threadIdx.x;
  const A inv_l = inverse_count<A>(sh.L);
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < sh.R; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < sh.R;
    const A mu = active ? mean[r] : A(0), rs = active ? rstd[r] : A(0);
    A xh[PACKS][W], g[PACKS][W];
    A sum_g = 0, sum_gx = 0;
    #pragma unroll
    for (int q = 0; q < PACKS; ++q) {
      const int64_t k = int64_t(q) * kWarp + lane;
      #pragma unroll
      for (int j = 0; j < W; ++j) xh[q][j] = g[q][j] = A(0);
      if (active && k * W < sh.L) {
        load_grad_pack<W>(x, dy, r, k, mu, rs, sh, pr, xh[q], g[q]);
        #pragma unroll
        for (int j = 0; j < W; ++j) {
          sum_g += g[q][j];
          sum_gx += g[q][j] * xh[q][j];
        }
      }
    }
    sum_g = pr.rms ? A(0) : warp_sum(sum_g);  // RMSNorm: no mean, no mean(g) term
    sum_gx = warp_sum(sum_gx);
    if (!active) continue;
    #pragma unroll
    for (int q = 0; q < PACKS; ++q) {
      const int64_t k = int64_t(q) * kWarp + lane;
      if (k * W < sh.L) store_dx_pack<W>(dx, res, r, k, xh[q], g[q], rs, sum_g * inv_l, sum_gx * inv_l, sh.L);
    }
  }
}

template <typename T, bool CACHE, int W>
__global__ void row_bwd_block(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                              RowShape sh, RowParams<typename Acc<T>::type> pr,
                              const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                              RowResidual<T> res) {
  using A = typename Acc<T>::type;
  FN_DYNAMIC_SMEM(A, cache);  // CACHE: xhat in [0, L), g in [L, 2L)
  const int tid = threadIdx.x, nt = blockDim.x;
  const A inv_l = inverse_count<A>(sh.L);
  const int64_t packs = sh.L / W;
  for (int64_t r = blockIdx.x; r < sh.R; r += gridDim.x) {
    const A mu = mean[r], rs = rstd[r];
    A sum_g = 0, sum_gx = 0;
    for (int64_t k = tid; k < packs; k += nt) {
      A xh[W], g[W];
      load_grad_pack<W>(x, dy, r, k, mu, rs, sh, pr, xh, g);
      #pragma unroll
      for (int j = 0; j < W; ++j) {
        if (CACHE) {
          cache[k * W + j] = xh[j];
          cache[sh.L + k * W + j] = g[j];
        }
        sum_g += g[j];
        sum_gx += g[j] * xh[j];
      }
    }
    block_sum2(sum_g, sum_gx);
    if (pr.rms) sum_g = A(0);  // RMSNorm: no mean, no mean(g) term
    for (int64_t k = tid; k < packs; k += nt) {
      A xh[W], g[W];
      if (CACHE) {
        #pragma unroll
        for (int j = 0; j < W; ++j) {
          xh[j] = cache[k * W + j];
          g[j] = cache[sh.L + k * W + j];
        }
      } else {
        load_grad_pack<W>(x, dy, r, k, mu, rs, sh, pr, xh, g);
      }
      store_dx_pack<W>(dx, res, r, k, xh, g, rs, sum_g * inv_l, sum_gx * inv_l, sh.L);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace fusednorm
