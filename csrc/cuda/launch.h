// Launch code shared by the GPU build and the CPU emulation: grid/block sizes, tier choice,
// split counts. Takes raw pointers (allocation and checks live in bindings.h).
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "elementwise_kernels.cuh"
#include "reduce_kernels.cuh"
#include "row_kernels.cuh"

namespace fusednorm {
namespace cuda {

// Thresholds. The emulation tests lower them to reach every tier on small shapes.
struct Limits {
  int64_t warp_cols = 32;                 // warp tiers: rows up to 32*32 = 1024 elements
  int64_t smem_bytes = 48 * 1024;         // block tier: row cache up to this many bytes
  int64_t elements_per_split = 16384;     // reductions: work per block and column before splitting
  int64_t max_splits = 1024;
  int64_t min_block_work = 4096;          // reductions: elements per block when splitting to fill the GPU
  int64_t split_plane_min = 1024;         // GroupNorm rows split over blocks: planes of at least this
  int64_t max_blocks = 65535;             // grid-stride kernels
  int threads = 256;
};
inline Limits& limits() {
  static Limits l;
  return l;
}

enum class RowTier { Warp4, Warp16, Warp32, Block, Long };

// The widest warp tier holds 32 elements per lane: for float statistics only (64 doubles
// a lane in the backward would spill).
template <typename A>
constexpr bool kHasWarp32 = sizeof(A) == 4;

// A block-tier row kernel's dynamic row cache: the row, and in backward its gradient too.
template <typename A>
inline int64_t row_cache_bytes(int64_t L, bool backward) {
  return L * int64_t(sizeof(A)) * (backward ? 2 : 1);
}

// All the shared memory a block-tier row kernel needs: the cache and its static reduction
// slots.
template <typename A>
inline int64_t row_block_smem(int64_t L, bool backward) {
  return row_cache_bytes<A>(L, backward) + int64_t(backward ? kRowBwdStaticSmem<A> : kRowFwdStaticSmem<A>);
}

template <typename A>
inline RowTier row_tier(int64_t L, bool backward) {
  const Limits& lim = limits();
  if (L <= 4 * kWarp && lim.warp_cols >= 4) return RowTier::Warp4;
  if (L <= 16 * kWarp && lim.warp_cols >= 16) return RowTier::Warp16;
  if (L <= 32 * kWarp && lim.warp_cols >= 32 && kHasWarp32<A>) return RowTier::Warp32;
  return row_block_smem<A>(L, backward) <= lim.smem_bytes ? RowTier::Block : RowTier::Long;
}

// The row lengths at which the tier changes, and one above each: warp4 | warp16 | (warp32) |
// block | long (tests and the GPU selftest run them).
template <typename A>
inline std::vector<int64_t> row_tier_edges(bool backward) {
  const Limits& lim = limits();
  const int64_t static_smem = int64_t(backward ? kRowBwdStaticSmem<A> : kRowFwdStaticSmem<A>);
  const int64_t top = (lim.smem_bytes - static_smem) / row_cache_bytes<A>(1, backward);
  std::vector<int64_t> edges = {4 * kWarp, 4 * kWarp + 1, 16 * kWarp, 16 * kWarp + 1};
  if (lim.warp_cols >= 32 && kHasWarp32<A>) edges.insert(edges.end(), {32 * kWarp, 32 * kWarp + 1});
  edges.insert(edges.end(), {top, top + 1});
  return edges;
}

// What the CUDA runtime checks at a launch (no kernel here opts in to more than the default
// shared memory): outside these limits a launch fails with an invalid-configuration or
// invalid-value error. Checked before every launch, in the GPU build and in the emulation,
// so that an over-limit launch fails the tests as it would fail on a GPU.
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxSharedPerBlock = 48 * 1024;  // static + dynamic, without opt-in

inline void check_launch(const char* kernel, int64_t grid_x, int64_t grid_y, int64_t threads,
                         int64_t dynamic_smem, int64_t static_smem) {
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock, kernel, ": ", threads,
              " threads per block (CUDA allows 1 to ", kMaxThreadsPerBlock, ")");
  TORCH_CHECK(grid_x >= 1 && grid_x <= kMaxGridX && grid_y >= 1 && grid_y <= kMaxGridYZ, kernel,
              ": grid (", grid_x, ", ", grid_y, ") outside CUDA's limits (x up to ", kMaxGridX,
              ", y up to ", kMaxGridYZ, ")");
  TORCH_CHECK(dynamic_smem + static_smem <= kMaxSharedPerBlock, kernel, ": ", static_smem,
              " bytes of static and ", dynamic_smem, " of dynamic shared memory per block (CUDA "
              "allows ", kMaxSharedPerBlock, " in all without opting in)");
}

inline const char* row_tier_name(RowTier t) {
  switch (t) {
    case RowTier::Warp4: return "warp4";
    case RowTier::Warp16: return "warp16";
    case RowTier::Warp32: return "warp32";
    case RowTier::Block: return "block";
    default: return "long";
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row kernels read packs of P = 16 bytes where row_pack allows, else single elements. The
// packed 4-column warp tier holds C4 = max(4, P) elements a lane: one 16-byte pack for
// 2-byte types (lanes past the row's end idle).
template <typename T>
void row_forward(const T* x, T* y, RowShape sh, RowParams<typename Acc<T>::type> pr,
                 typename Acc<T>::type eps, typename Acc<T>::type* mean,
                 typename Acc<T>::type* rstd, typename Acc<T>::type* m2, fn_stream_t stream,
                 RowResidual<T> res = {}) {
  using A = typename Acc<T>::type;
  if (sh.R == 0 || sh.L == 0) return;  // nothing to normalise
  constexpr int P = pack_size<T>(), C4 = P > 4 ? P : 4;
  const bool vec = row_pack<T>(sh.L, {x, y, res.r, res.sum}) > 1;
  const Limits& lim = limits();
  const RowTier tier = row_tier<A>(sh.L, false);
  if (tier == RowTier::Warp4 || tier == RowTier::Warp16 || tier == RowTier::Warp32) {
    const dim3 grid(unsigned(std::min(ceil_div(sh.R, 4), lim.max_blocks))), block(kWarp, 4);  // a warp per row
    check_launch("row_fwd_warp", grid.x, 1, 4 * kWarp, 0, 0);
    if (tier == RowTier::Warp4 && vec)
      FN_LAUNCH((row_fwd_warp<T, C4, P>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if (tier == RowTier::Warp4)
      FN_LAUNCH((row_fwd_warp<T, 4, 1>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if (tier == RowTier::Warp16 && vec)
      FN_LAUNCH((row_fwd_warp<T, 16, P>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if (tier == RowTier::Warp16)
      FN_LAUNCH((row_fwd_warp<T, 16, 1>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if constexpr (kHasWarp32<A>) {
      if (vec)
        FN_LAUNCH((row_fwd_warp<T, 32, P>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
      else
        FN_LAUNCH((row_fwd_warp<T, 32, 1>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    }
  } else {
    const dim3 grid(unsigned(std::min(sh.R, lim.max_blocks))), block(lim.threads);  // a block per row
    const bool cache = tier == RowTier::Block;
    const int64_t smem = cache ? row_cache_bytes<A>(sh.L, false) : 0;
    check_launch("row_fwd_block", grid.x, 1, lim.threads, smem, kRowFwdStaticSmem<A>);
    if (cache && vec)
      FN_LAUNCH((row_fwd_block<T, true, P>), grid, block, smem, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if (cache)
      FN_LAUNCH((row_fwd_block<T, true, 1>), grid, block, smem, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else if (vec)
      FN_LAUNCH((row_fwd_block<T, false, P>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else
      FN_LAUNCH((row_fwd_block<T, false, 1>), grid, block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
  }
  FN_LAUNCH_CHECK();
}

template <typename T>
void row_backward(const T* x, const T* dy, T* dx, RowShape sh, RowParams<typename Acc<T>::type> pr,
                  const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                  fn_stream_t stream, RowResidual<T> res = {}) {
  using A = typename Acc<T>::type;
  if (sh.R == 0 || sh.L == 0) return;  // nothing to normalise
  constexpr int P = pack_size<T>(), C4 = P > 4 ? P : 4;
  const bool vec = row_pack<T>(sh.L, {x, dy, dx, res.dres}) > 1;
  const Limits& lim = limits();
  const RowTier tier = row_tier<A>(sh.L, true);
  if (tier == RowTier::Warp4 || tier == RowTier::Warp16 || tier == RowTier::Warp32) {
    const dim3 grid(unsigned(std::min(ceil_div(sh.R, 4), lim.max_blocks))), block(kWarp, 4);  // a warp per row
    check_launch("row_bwd_warp", grid.x, 1, 4 * kWarp, 0, 0);
    if (tier == RowTier::Warp4 && vec)
      FN_LAUNCH((row_bwd_warp<T, C4, P>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if (tier == RowTier::Warp4)
      FN_LAUNCH((row_bwd_warp<T, 4, 1>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if (tier == RowTier::Warp16 && vec)
      FN_LAUNCH((row_bwd_warp<T, 16, P>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if (tier == RowTier::Warp16)
      FN_LAUNCH((row_bwd_warp<T, 16, 1>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if constexpr (kHasWarp32<A>) {
      if (vec)
        FN_LAUNCH((row_bwd_warp<T, 32, P>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
      else
        FN_LAUNCH((row_bwd_warp<T, 32, 1>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    }
  } else {
    const dim3 grid(unsigned(std::min(sh.R, lim.max_blocks))), block(lim.threads);  // a block per row
    const bool cache = tier == RowTier::Block;
    const int64_t smem = cache ? row_cache_bytes<A>(sh.L, true) : 0;
    check_launch("row_bwd_block", grid.x, 1, lim.threads, smem, kRowBwdStaticSmem<A>);
    if (cache && vec)
      FN_LAUNCH((row_bwd_block<T, true, P>), grid, block, smem, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if (cache)
      FN_LAUNCH((row_bwd_block<T, true, 1>), grid, block, smem, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else if (vec)
      FN_LAUNCH((row_bwd_block<T, false, P>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else
      FN_LAUNCH((row_bwd_block<T, false, 1>), grid, block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
  }
  FN_LAUNCH_CHECK();
}

// ---- per-channel reductions -------------------------------------------------------------
// Layout of a channel reduction: NCHW (N, C, S) or NHWC (M = N*S rows, C columns), read in
// packs of `width` elements; blocks of bx x by threads (NCHW: 1 x threads), `groups`
// column groups (NCHW: one per channel) times `splits` blocks each.
struct ChannelPlan {
  bool nhwc;
  int64_t N, C, S;
  int width, bx, by, splits;
  int64_t groups() const { return nhwc ? ceil_div(C, int64_t(bx) * width) : C; }  // one ticket each
  int64_t partials() const { return C * splits; }
};

// An NHWC pass's block (bx, by) of `threads`: bx threads across the C columns, W a thread,
// as many as C needs up to a warp's width; by down the rows.
inline std::pair<int, int> nhwc_block(int64_t C, int W, int threads) {
  int bx = 1;
  while (bx < kWarp && int64_t(bx) * W < C) bx *= 2;
  return {bx, threads / bx};
}

// Splits: enough that no block reduces more than elements_per_split per column, and, while
// every block keeps min_block_work elements, enough blocks for kWaves waves of the device's
// SMs (a reduction with few channels would otherwise leave most of a GPU idle).
constexpr int64_t kWaves = 4;

inline ChannelPlan plan_channels(bool nhwc, int64_t N, int64_t C, int64_t S, int width = 1) {
  const Limits& lim = limits();
  TORCH_CHECK(lim.threads <= kReduceThreads && lim.threads % kWarp == 0, "reduction blocks of ", lim.threads,
              " threads (a multiple of 32, at most ", kReduceThreads, ")");
  ChannelPlan plan{nhwc, N, C, S, width, 1, lim.threads, 1};
  if (nhwc) std::tie(plan.bx, plan.by) = nhwc_block(C, width, lim.threads);
  const int64_t per_column = N * S;
  const int64_t block_columns = nhwc ? std::min<int64_t>(C, int64_t(plan.bx) * width) : 1;
  int64_t splits = ceil_div(per_column, lim.elements_per_split);
  const int64_t for_waves = ceil_div(kWaves * sm_count(), std::max<int64_t>(plan.groups(), 1));
  const int64_t most_full = per_column * block_columns / std::max<int64_t>(lim.min_block_work, 1);
  splits = std::max(splits, std::min(for_waves, most_full));
  splits = std::min({splits, lim.max_splits, std::max<int64_t>(per_column, 1)});
  plan.splits = int(std::max<int64_t>(splits, 1));
  return plan;
}

// The pack width a reduction over these tensors can use: 16 bytes when the reduced runs
// (NCHW: S elements; NHWC: rows of C) start 16-byte aligned.
template <typename T>
int channel_pack(bool nhwc, int64_t C, int64_t S, const T* x, const T* dy) {
  return row_pack<T>(nhwc ? C : S, {x, dy});
}

template <typename T, typename Op>
void channel_reduce(const ChannelPlan& plan, const Op& op, const T* x, const T* dy,
                    typename Op::State* partials, int* tickets, fn_stream_t stream) {
  if (plan.C == 0) return;
  constexpr int P = pack_size<T>();
  const bool vec = plan.width > 1;
  TORCH_CHECK(!vec || plan.width == P, "channel reduction: pack width ", plan.width, " is not ", P);
  const dim3 grid(unsigned(plan.groups()), unsigned(plan.splits)), block(plan.bx, plan.by);
  check_launch(plan.nhwc ? "channel_reduce_nhwc" : "channel_reduce_nchw", grid.x, grid.y, plan.bx * plan.by, 0,
               0);  // static slots: a few KiB at most (reduce_kernels.cuh)
  if (plan.nhwc && vec)
    FN_LAUNCH((channel_reduce_nhwc<T, Op, P>), grid, block, 0, stream, op, x, dy, plan.N * plan.S, plan.C, partials, tickets);
  else if (plan.nhwc)
    FN_LAUNCH((channel_reduce_nhwc<T, Op, 1>), grid, block, 0, stream, op, x, dy, plan.N * plan.S, plan.C, partials, tickets);
  else if (vec)
    FN_LAUNCH((channel_reduce_nchw<T, Op, P>), grid, block, 0, stream, op, x, dy, plan.N, plan.C, plan.S, partials, tickets);
  else
    FN_LAUNCH((channel_reduce_nchw<T, Op, 1>), grid, block, 0, stream, op, x, dy, plan.N, plan.C, plan.S, partials, tickets);
  FN_LAUNCH_CHECK();
}

// ---- elementwise ------------------------------------------------------------------------
// BatchNorm's passes over a tensor laid out NCHW (N*C planes of S) or NHWC (M = N*S rows of
// C): 16-byte packs when the runs (S or C elements) and every pointer are 16-byte aligned.
template <typename T, typename Pass>
void elementwise(const Pass& pass, const T* in, const T* in2, T* out, int64_t numel, int64_t C, int64_t S,
                 bool nhwc, fn_stream_t stream) {
  if (numel == 0) return;
  constexpr int P = pack_size<T>();
  const Limits& lim = limits();
  const int W = row_pack<T>(nhwc ? C : S, {in, in2, out});
  if (nhwc) {
    const auto [bx, by] = nhwc_block(C, W, lim.threads);
    const int64_t M = numel / C;
    const dim3 grid(unsigned(ceil_div(C, int64_t(bx) * W)), unsigned(std::min({ceil_div(M, 4 * by), kMaxGridYZ, lim.max_blocks})));
    check_launch("elementwise_nhwc", grid.x, grid.y, bx * by, 0, 0);
    if (W > 1)
      FN_LAUNCH((elementwise_nhwc<T, Pass, P>), grid, dim3(bx, by), 0, stream, pass, in, in2, out, M, C);
    else
      FN_LAUNCH((elementwise_nhwc<T, Pass, 1>), grid, dim3(bx, by), 0, stream, pass, in, in2, out, M, C);
  } else {  // a block per plane (grid-stride), tiles of a long plane over grid.y
    const int64_t planes = numel / S, packs = S / W;
    const int threads = int(std::min<int64_t>(lim.threads, ceil_div(packs, kWarp) * kWarp));
    const dim3 grid(unsigned(std::min(planes, lim.max_blocks)), unsigned(std::min({ceil_div(packs, 4 * threads), kMaxGridYZ, lim.max_blocks})));
    check_launch("elementwise_nchw", grid.x, grid.y, threads, 0, 0);
    if (W > 1)
      FN_LAUNCH((elementwise_nchw<T, Pass, P>), grid, dim3(threads), 0, stream, pass, in, in2, out, planes, C, S);
    else
      FN_LAUNCH((elementwise_nchw<T, Pass, 1>), grid, dim3(threads), 0, stream, pass, in, in2, out, planes, C, S);
  }
  FN_LAUNCH_CHECK();
}

template <typename T>
void apply(const T* x, const T* z, T* y, int64_t numel, int64_t C, int64_t S, bool nhwc,
           const typename Acc<T>::type* mean, const typename Acc<T>::type* alpha, const typename Acc<T>::type* beta, int64_t act,
           ActParams<typename Acc<T>::type> ap, fn_stream_t stream) {
  elementwise(ApplyPass<T>{{mean, alpha, beta, act, ap}}, x, z, y, numel, C, nhwc ? 1 : S, nhwc, stream);
}

template <typename T>
void input_grad(const T* x, const T* dy, T* dx, int64_t numel, int64_t C, int64_t S, bool nhwc,
                const typename Acc<T>::type* mean, const typename Acc<T>::type* alpha, const typename Acc<T>::type* beta,
                const typename Acc<T>::type* cA, const typename Acc<T>::type* cB,
                const typename Acc<T>::type* cC, int64_t act, ActParams<typename Acc<T>::type> ap,
                fn_stream_t stream) {
  elementwise(InputGradPass<T>{{mean, alpha, beta, act, ap}, cA, cB, cC}, x, dy, dx, numel, C, nhwc ? 1 : S, nhwc, stream);
}

// Grid-stride launch of `work` threads' worth of a small kernel.
inline dim3 elementwise_grid(int64_t work) {
  const Limits& lim = limits();
  return dim3(unsigned(std::max<int64_t>(1, std::min(ceil_div(work, lim.threads), lim.max_blocks))));
}

template <typename A>
void plane_coefficients(const A* mean, const A* rstd, const A* gamma, const A* beta, int64_t N, int64_t C, int64_t G,
                        int64_t L, const A* sum_g, const A* sum_gx, A* mean_p, A* alpha_p, A* beta_p, A* cA, A* cB,
                        A* cC, fn_stream_t stream) {
  if (N * C == 0) return;
  FN_LAUNCH((plane_coefficients_kernel<A>), elementwise_grid(N * C), dim3(limits().threads), 0, stream, mean, rstd, gamma,
            beta, N, C, G, L, sum_g, sum_gx, mean_p, alpha_p, beta_p, cA, cB, cC);
  FN_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusednorm
