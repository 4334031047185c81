// Launch code shared by the GPU build and the CPU emulation: grid/block sizes, tier choice,
// split counts. Takes raw pointers (allocation and checks live in bindings.h).
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "elementwise_kernels.cuh"
#include "reduce_kernels.cuh"
#include "row_kernels.cuh"

namespace fusednorm {
namespace cuda {

// Thresholds. The emulation tests lower them to reach every tier on small shapes.
struct Limits {
  int64_t warp_cols = 16;                 // warp tier: rows up to 32*16 = 512 elements
  int64_t smem_bytes = 48 * 1024;         // block tier: row cache up to this many bytes
  int64_t elements_per_split = 16384;     // reductions: work per block before splitting
  int64_t max_splits = 256;
  int64_t max_blocks = 65535;             // grid-stride kernels
  int threads = 256;
};
inline Limits& limits() {
  static Limits l;
  return l;
}

enum class RowTier { Warp4, Warp16, Block, Long };

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
  if (L <= lim.warp_cols * kWarp && lim.warp_cols >= 16) return RowTier::Warp16;
  return row_block_smem<A>(L, backward) <= lim.smem_bytes ? RowTier::Block : RowTier::Long;
}

// The row lengths at which the tier changes, and one above each: warp4 | warp16 | block |
// long (tests and the GPU selftest run them).
template <typename A>
inline std::vector<int64_t> row_tier_edges(bool backward) {
  const Limits& lim = limits();
  const int64_t static_smem = int64_t(backward ? kRowBwdStaticSmem<A> : kRowFwdStaticSmem<A>);
  const int64_t top = (lim.smem_bytes - static_smem) / row_cache_bytes<A>(1, backward);
  const int64_t warp = 4 * kWarp, warp16 = lim.warp_cols * kWarp;
  return {warp, warp + 1, warp16, warp16 + 1, top, top + 1};
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
    case RowTier::Block: return "block";
    default: return "long";
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void row_forward(const T* x, T* y, RowShape sh, RowParams<typename Acc<T>::type> pr,
                 typename Acc<T>::type eps, typename Acc<T>::type* mean,
                 typename Acc<T>::type* rstd, typename Acc<T>::type* m2, fn_stream_t stream,
                 RowResidual<T> res = {}) {
  using A = typename Acc<T>::type;
  if (sh.R == 0 || sh.L == 0) return;  // nothing to normalise
  const Limits& lim = limits();
  const RowTier tier = row_tier<A>(sh.L, false);
  if (tier == RowTier::Warp4 || tier == RowTier::Warp16) {
    const dim3 block(kWarp, 4);  // a warp per row, grid-stride over the rows
    const int64_t blocks = std::min(ceil_div(sh.R, 4), lim.max_blocks);
    check_launch("row_fwd_warp", blocks, 1, 4 * kWarp, 0, 0);
    if (tier == RowTier::Warp4)
      FN_LAUNCH((row_fwd_warp<T, 4>), dim3(unsigned(blocks)), block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else
      FN_LAUNCH((row_fwd_warp<T, 16>), dim3(unsigned(blocks)), block, 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
  } else {
    const int64_t blocks = std::min(sh.R, lim.max_blocks);
    const bool cache = tier == RowTier::Block;
    const int64_t smem = cache ? row_cache_bytes<A>(sh.L, false) : 0;
    check_launch("row_fwd_block", blocks, 1, lim.threads, smem, kRowFwdStaticSmem<A>);
    if (cache)
      FN_LAUNCH((row_fwd_block<T, true>), dim3(unsigned(blocks)), dim3(lim.threads), smem, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
    else
      FN_LAUNCH((row_fwd_block<T, false>), dim3(unsigned(blocks)), dim3(lim.threads), 0, stream, x, y, sh, pr, eps, mean, rstd, m2, res);
  }
  FN_LAUNCH_CHECK();
}

template <typename T>
void row_backward(const T* x, const T* dy, T* dx, RowShape sh, RowParams<typename Acc<T>::type> pr,
                  const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                  fn_stream_t stream, RowResidual<T> res = {}) {
  using A = typename Acc<T>::type;
  if (sh.R == 0 || sh.L == 0) return;  // nothing to normalise
  const Limits& lim = limits();
  const RowTier tier = row_tier<A>(sh.L, true);
  if (tier == RowTier::Warp4 || tier == RowTier::Warp16) {
    const dim3 block(kWarp, 4);  // a warp per row, grid-stride over the rows
    const int64_t blocks = std::min(ceil_div(sh.R, 4), lim.max_blocks);
    check_launch("row_bwd_warp", blocks, 1, 4 * kWarp, 0, 0);
    if (tier == RowTier::Warp4)
      FN_LAUNCH((row_bwd_warp<T, 4>), dim3(unsigned(blocks)), block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else
      FN_LAUNCH((row_bwd_warp<T, 16>), dim3(unsigned(blocks)), block, 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
  } else {
    const int64_t blocks = std::min(sh.R, lim.max_blocks);
    const bool cache = tier == RowTier::Block;
    const int64_t smem = cache ? row_cache_bytes<A>(sh.L, true) : 0;
    check_launch("row_bwd_block", blocks, 1, lim.threads, smem, kRowBwdStaticSmem<A>);
    if (cache)
      FN_LAUNCH((row_bwd_block<T, true>), dim3(unsigned(blocks)), dim3(lim.threads), smem, stream, x, dy, dx, sh, pr, mean, rstd, res);
    else
      FN_LAUNCH((row_bwd_block<T, false>), dim3(unsigned(blocks)), dim3(lim.threads), 0, stream, x, dy, dx, sh, pr, mean, rstd, res);
  }
  FN_LAUNCH_CHECK();
}

// ---- per-channel reductions -------------------------------------------------------------
// Layout of a channel reduction: NCHW (N, C, S) or NHWC (M = N*S rows, C columns).
struct ChannelPlan {
  bool nhwc;
  int64_t N, C, S;
  int splits;
  int64_t groups() const { return nhwc ? ceil_div(C, kWarp) : C; }  // one ticket each
  int64_t partials() const { return C * splits; }
};

inline ChannelPlan plan_channels(bool nhwc, int64_t N, int64_t C, int64_t S) {
  const Limits& lim = limits();
  const int64_t per_channel = N * S;
  int64_t splits = std::max<int64_t>(1, ceil_div(per_channel, lim.elements_per_split));
  splits = std::min(splits, lim.max_splits);
  return ChannelPlan{nhwc, N, C, S, int(splits)};
}

template <typename T, typename Op>
void channel_reduce(const ChannelPlan& plan, const Op& op, const T* x, const T* dy,
                    typename Op::State* partials, int* tickets, fn_stream_t stream) {
  if (plan.C == 0) return;
  const Limits& lim = limits();
  check_launch(plan.nhwc ? "channel_reduce_nhwc" : "channel_reduce_nchw",
               plan.nhwc ? plan.groups() : plan.C, plan.splits, plan.nhwc ? kWarp * 8 : lim.threads, 0,
               0);  // static slots: a few KiB at most (reduce_kernels.cuh)
  if (plan.nhwc) {
    const dim3 grid(unsigned(plan.groups()), unsigned(plan.splits));
    FN_LAUNCH((channel_reduce_nhwc<T, Op>), grid, dim3(kWarp, 8), 0, stream, op, x, dy,
              plan.N * plan.S, plan.C, partials, tickets);
  } else {
    const dim3 grid(unsigned(plan.C), unsigned(plan.splits));
    FN_LAUNCH((channel_reduce_nchw<T, Op>), grid, dim3(1, lim.threads), 0, stream, op, x, dy,
              plan.N, plan.C, plan.S, partials, tickets);
  }
  FN_LAUNCH_CHECK();
}

// ---- elementwise ------------------------------------------------------------------------
// Vectorised when every pointer is 16-byte aligned, numel is a multiple of the pack and (in
// NCHW) a pack never crosses a channel boundary.
template <typename T>
bool can_vectorize(int64_t numel, int64_t S, bool nhwc, std::initializer_list<const void*> ptrs) {
  const int64_t P = pack_size<T>();
  if (numel % P != 0 || (!nhwc && S % P != 0)) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

inline dim3 elementwise_grid(int64_t work) {
  const Limits& lim = limits();
  return dim3(unsigned(std::max<int64_t>(1, std::min(ceil_div(work, lim.threads), lim.max_blocks))));
}

template <typename T>
void apply(const T* x, const T* z, T* y, int64_t numel, int64_t C, int64_t S, bool nhwc,
           const typename Acc<T>::type* mean, const typename Acc<T>::type* alpha, const typename Acc<T>::type* beta, int64_t act,
           ActParams<typename Acc<T>::type> ap, fn_stream_t stream) {
  if (numel == 0) return;
  const int64_t s = nhwc ? 1 : S;
  if (can_vectorize<T>(numel, s, nhwc, {x, y, z ? z : x}))
    FN_LAUNCH((apply_kernel<T, true>), elementwise_grid(numel / pack_size<T>()), dim3(limits().threads), 0, stream,
              x, z, y, numel, C, s, mean, alpha, beta, act, ap);
  else
    FN_LAUNCH((apply_kernel<T, false>), elementwise_grid(numel), dim3(limits().threads), 0, stream,
              x, z, y, numel, C, s, mean, alpha, beta, act, ap);
  FN_LAUNCH_CHECK();
}

template <typename T>
void input_grad(const T* x, const T* dy, T* dx, int64_t numel, int64_t C, int64_t S, bool nhwc,
                const typename Acc<T>::type* mean, const typename Acc<T>::type* alpha, const typename Acc<T>::type* beta,
                const typename Acc<T>::type* cA, const typename Acc<T>::type* cB,
                const typename Acc<T>::type* cC, int64_t act, ActParams<typename Acc<T>::type> ap,
                fn_stream_t stream) {
  if (numel == 0) return;
  const int64_t s = nhwc ? 1 : S;
  if (can_vectorize<T>(numel, s, nhwc, {x, dy, dx}))
    FN_LAUNCH((input_grad_kernel<T, true>), elementwise_grid(numel / pack_size<T>()), dim3(limits().threads), 0,
              stream, x, dy, dx, numel, C, s, mean, alpha, beta, cA, cB, cC, act, ap);
  else
    FN_LAUNCH((input_grad_kernel<T, false>), elementwise_grid(numel), dim3(limits().threads), 0, stream,
              x, dy, dx, numel, C, s, mean, alpha, beta, cA, cB, cC, act, ap);
  FN_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusednorm
