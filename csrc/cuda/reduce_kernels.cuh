// Per-channel reductions with a grid-level finish: a channel's elements are split over
// several blocks ("splits"); each block reduces its share, writes a partial, and the last
// block to finish a channel (an atomic ticket) merges the partials and finalises it.
//   NCHW: channel c of an (N, C, S) tensor, grid (C, splits).
//   NHWC: column c of an (M, C) matrix, grid (column groups, splits), block (bx, by).
// Both read W elements per access (16 bytes where the layout is aligned, launch.h).
// What is reduced is an Op: statistics (MomentsOp) or gradient sums (GradSumsOp). The same
// kernels give BatchNorm's statistics and gradients, and LayerNorm's / GroupNorm's
// parameter gradients (their statistics looked up per row or per group).
#pragma once
#include <type_traits>

#include "device.h"

namespace fusednorm {
namespace cuda {

// A small fixed-size vector of accumulators, shuffled member by member.
template <typename A, int K>
struct Vec {
  A v[K];
};

template <typename A, int K>
__device__ __forceinline__ Vec<A, K> shfl_xor(Vec<A, K> s, int offset) {
  Vec<A, K> o;
  for (int k = 0; k < K; ++k) o.v[k] = __shfl_xor_sync(0xffffffffu, s.v[k], offset);
  return o;
}

// Statistics: (count, mean, M2), merged with Chan's formula.
template <typename A>
struct MomentsOp {
  using State = Vec<A, 3>;
  static constexpr const char* kName = "moments";  // the emulation's coverage label
  A* mean;            // [C] out
  A* rstd;            // [C] out
  A* m2;              // [C] out: sum((x - mean)^2)
  A eps;
  int64_t count;      // elements per channel (the state's float count rounds above 2^24)
  __device__ __forceinline__ static State identity() { return {{A(0), A(0), A(0)}}; }
  __device__ __forceinline__ void add(State& s, A x, A, int64_t, int64_t) const {
    s.v[0] += A(1);
    const A delta = x - s.v[1];
    s.v[1] += delta / s.v[0];
    s.v[2] += delta * (x - s.v[1]);
  }
  __device__ __forceinline__ static State combine(State a, State b) {
    Moments<A> m = merge(Moments<A>{a.v[0], a.v[1], a.v[2]}, Moments<A>{b.v[0], b.v[1], b.v[2]});
    return {{m.count, m.mean, m.m2}};
  }
  __device__ __forceinline__ void finalize(int64_t c, State s) const {
    mean[c] = s.v[1];
    rstd[c] = rstd_from_m2<A>(s.v[2], count, eps);
    m2[c] = s.v[2];
  }
};

// Gradient sums per channel: sum(dyhat) and sum(dyhat * xhat), dyhat = dy * act'(z),
// z = (x - mean)*(rstd*gamma) + beta (the forward's pre_activation), xhat = (x - mean)*rstd,
// with the statistics of element
// (outer, c) at index outer*stat_outer + c/stat_div (BatchNorm: c; LayerNorm: the row;
// GroupNorm: the sample's group).
template <typename A>
struct GradSumsOp {
  using State = Vec<A, 2>;
  static constexpr const char* kName = "grad_sums";
  const A* mean;
  const A* rstd;
  const A* gamma;     // [C]
  const A* beta;      // [C]
  int64_t stat_outer, stat_div;
  int64_t act;
  ActParams<A> ap;
  A* dgamma;          // [C] out (nullable)
  A* dbeta;           // [C] out (nullable)
  // BatchNorm's input-gradient coefficients (nullable): dx = cA*dyhat + cB*(x - mean) + cC.
  A* cA;
  A* cB;
  A* cC;
  bool training;
  int64_t count;      // elements per channel (training coefficients)

  __device__ __forceinline__ static State identity() { return {{A(0), A(0)}}; }
  __device__ __forceinline__ void add(State& s, A x, A dy, int64_t outer, int64_t c) const {
    const int64_t k = outer * stat_outer + c / stat_div;
    const A xhat = (x - mean[k]) * rstd[k];
    const A g = activation_backward<A>(dy, pre_activation<A>(x, mean[k], rstd[k] * gamma[c], beta[c]), act, ap);
    s.v[0] += g;
    s.v[1] += g * xhat;
  }
  __device__ __forceinline__ static State combine(State a, State b) {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1]}};
  }
  __device__ __forceinline__ void finalize(int64_t c, State s) const {
    if (dgamma) dgamma[c] = s.v[1];
    if (dbeta) dbeta[c] = s.v[0];
    if (cA) {
      const A r = rstd[c], g = gamma[c];
      if (training) {
        input_grad_coefficients<A>(r, g, (r * g) * s.v[0], g * s.v[1], count, &cA[c], &cB[c], &cC[c]);
      } else {
        cA[c] = r * g;
        cB[c] = cC[c] = A(0);
      }
    }
  }
};

// The most threads a reduction block has (the 2-D reduction's shared slots).
constexpr int kReduceThreads = 256;

// Reduces `s` over the threads that share threadIdx.x (the block's y dimension, and for a
// 1-D block the whole block); the result is valid in threads with threadIdx.y == 0.
template <typename State, typename Op>
__device__ __forceinline__ State reduce_over_y(State s) {
  constexpr int K = sizeof(State) / sizeof(s.v[0]);
  using A = typename std::remove_reference<decltype(s.v[0])>::type;
  if (blockDim.x == 1) {  // 1-D block along y: warp shuffles, then one warp over the warps
    FN_SHARED(A, slots, [K][kWarp]);
    const int tid = threadIdx.y;
    for (int o = kWarp / 2; o > 0; o /= 2) s = Op::combine(s, shfl_xor(s, o));
    if (tid % kWarp == 0)
      for (int k = 0; k < K; ++k) slots[k][tid / kWarp] = s.v[k];
    __syncthreads();
    State w = Op::identity();
    if (tid % kWarp < int(blockDim.y) / kWarp)
      for (int k = 0; k < K; ++k) w.v[k] = slots[k][tid % kWarp];
    for (int o = kWarp / 2; o > 0; o /= 2) w = Op::combine(w, shfl_xor(w, o));
    __syncthreads();
    return w;
  }
  // 2-D block (blockDim.x columns x blockDim.y rows): through shared memory, row 0 combines.
  FN_SHARED(A, grid, [K][kReduceThreads]);
  const int bx = blockDim.x;
  for (int k = 0; k < K; ++k) grid[k][threadIdx.y * bx + threadIdx.x] = s.v[k];
  __syncthreads();
  State out = Op::identity();
  if (threadIdx.y == 0)
    for (int y = 0; y < int(blockDim.y); ++y) {
      State o;
      for (int k = 0; k < K; ++k) o.v[k] = grid[k][y * bx + threadIdx.x];
      out = Op::combine(out, o);
    }
  __syncthreads();
  return out;
}

// The grid-level finish, shared by both layouts: the thread's W columns c0 .. c0+W-1 (if
// `valid`) have partials of this split in `mine`, which go to partials[col * splits + split];
// the last block of a column group merges them all.
template <int W, typename Op>
__device__ __forceinline__ void finish_columns(const Op& op, typename Op::State (&mine)[W], int64_t c0,
                                               bool valid, int splits, int split,
                                               typename Op::State* partials, int* tickets,
                                               int64_t group) {
  using State = typename Op::State;
  if (threadIdx.y == 0 && valid)
    #pragma unroll
    for (int j = 0; j < W; ++j) partials[(c0 + j) * splits + split] = mine[j];
  FN_SHARED(bool, is_last, );
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) is_last = atomicAdd(&tickets[group], 1) == splits - 1;
  __syncthreads();
  if (!is_last) return;  // uniform across the block
  __threadfence();
  #pragma unroll
  for (int j = 0; j < W; ++j) {  // uniform: reduce_over_y has barriers
    State s = Op::identity();
    if (valid)
      for (int k = threadIdx.y; k < splits; k += blockDim.y) s = Op::combine(s, partials[(c0 + j) * splits + k]);
    s = reduce_over_y<State, Op>(s);
    if (threadIdx.y == 0 && valid) op.finalize(c0 + j, s);
  }
}

// Adds a pack of W elements (x and, if given, dy) of (outer, column c0 + j) to states.
template <int W, typename T, typename Op, int NS>
__device__ __forceinline__ void add_pack(const Op& op, typename Op::State (&s)[NS], const T* x, const T* dy,
                                         int64_t k, int64_t outer, int64_t c0, int64_t cstep) {
  using A = typename Acc<T>::type;
  const Pack<T, W> px = load_pack<W>(x, k);
  Pack<T, W> pg;
  if (dy) pg = load_pack<W>(dy, k);
  #pragma unroll
  for (int j = 0; j < W; ++j)
    op.add(s[NS == 1 ? 0 : j], to_acc(px.v[j]), dy ? to_acc(pg.v[j]) : A(0), outer, c0 + j * cstep);
}

// NCHW: grid (C, splits), block (1, threads). Channel c's elements are N runs of S, read in
// packs of W (W divides S); the pack index walks (n, s) without a divide per element.
template <typename T, typename Op, int W>
__global__ void channel_reduce_nchw(Op op, const T* __restrict__ x, const T* __restrict__ dy,
                                    int64_t N, int64_t C, int64_t S,
                                    typename Op::State* partials, int* tickets) {
  const int64_t c = blockIdx.x;
  const int split = blockIdx.y, splits = gridDim.y;
  const int64_t Sp = S / W;  // packs per run
  typename Op::State s[1] = {Op::identity()};
  // Over the flattened (n, pack) index, so every split has work even when S is small.
  const int64_t first = int64_t(split) * blockDim.y + threadIdx.y, stride = int64_t(splits) * blockDim.y;
  int64_t n = first / Sp, j = first - n * Sp;
  const int64_t dn = stride / Sp, dj = stride - dn * Sp;
  while (n < N) {
    add_pack<W>(op, s, x, dy, (n * C + c) * Sp + j, n, c, 0);
    n += dn;
    j += dj;
    if (j >= Sp) {
      j -= Sp;
      ++n;
    }
  }
  s[0] = reduce_over_y<typename Op::State, Op>(s[0]);
  finish_columns<1>(op, s, c, threadIdx.x == 0, splits, split, partials, tickets, c);
}

// NHWC: grid (groups, splits), block (bx, by); a group is bx*W columns, each thread W
// adjacent ones (W divides C). Column c's elements are rows m.
template <typename T, typename Op, int W>
__global__ void channel_reduce_nhwc(Op op, const T* __restrict__ x, const T* __restrict__ dy,
                                    int64_t M, int64_t C, typename Op::State* partials,
                                    int* tickets) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * W;
  const int split = blockIdx.y, splits = gridDim.y;
  const int64_t stride = int64_t(splits) * blockDim.y;
  typename Op::State s[W];
  #pragma unroll
  for (int j = 0; j < W; ++j) s[j] = Op::identity();
  // Rows interleaved over splits (coalescing is along the columns), so every split has
  // rows whenever M >= splits.
  if (c0 < C)
    for (int64_t m = split + int64_t(splits) * threadIdx.y; m < M; m += stride)
      add_pack<W>(op, s, x, dy, (m * C + c0) / W, m, c0, 1);
  #pragma unroll
  for (int j = 0; j < W; ++j) s[j] = reduce_over_y<typename Op::State, Op>(s[j]);
  finish_columns<W>(op, s, c0, c0 < C, splits, split, partials, tickets, blockIdx.x);
}

}  // namespace cuda
}  // namespace fusednorm
