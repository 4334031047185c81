// The CPU kernels' interface: plain C++ (no torch types), one table of function pointers
// per storage type. Each table is filled once per instruction set (kernels_*.cpp compile
// kernels_impl.h under different target flags) and the best one the CPU supports is
// picked at first use (isa_dispatch.cpp). The kernels work on a range of rows handed to
// them by the caller, which owns threading (at::parallel_for) and the small per-channel
// bookkeeping.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../common/norm_math.h"

namespace fusednorm {
namespace cpu {

// 16-bit storage types, bit-compatible with c10::BFloat16 / c10::Half. Converted with
// integer operations (kernels_impl.h) that vectorise on every instruction set.
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};

// Accumulation type: float for every input type except double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Input for a kernel to pull into cache while it writes its output: the next block of a
// blocked two-pass loop (statistics, then normalise from cache). Without it a thread
// alternates a read-only phase with a write-only one and memory idles in each; prefetched,
// the reads overlap the writes (InstanceNorm forward 1.1-1.25x, forward+backward 1.07-1.2x
// faster on the 2-core VM) and the next statistics pass reads from cache. n elements from
// x and, if non-null, dy; one cache line of each per line of output written.
template <typename T>
struct Ahead {
  const T* x = nullptr;
  const T* dy = nullptr;
  int64_t n = 0;
};

// Layouts: "rows" = R contiguous rows of length S (NCHW channels, LN rows, GN groups);
// "cols" = a (rows, C) matrix whose per-column statistics we need (channels_last BN).
// mean/alpha/bias per row or column: the pre-activation z = (x - mean)*alpha + bias
// (norm_math.h's pre_activation, alpha = rstd*gamma); dx = A*dyhat + B*(x - mean) + C;
// sum_dy = sum(dyhat), sum_dy_xmu = sum(dyhat * (x - mean)), dyhat = dy * act'(z).
template <typename T, typename A>
struct KernelTable {
  // mean[r], m2[r] of each row.
  void (*moments_rows)(const T* x, int64_t rows, int64_t S, A* mean, A* m2);
  // Merge `rows` more rows into per-column (mean, m2) that already hold `count` rows.
  void (*moments_cols)(const T* x, int64_t rows, int64_t C, A count, A* mean, A* m2);
  // y = act(z + pre-activation) with z (BatchNorm's residual, laid out as x) non-null;
  // then act is none, ReLU or LeakyReLU.
  void (*apply_rows)(const T* x, const T* z, T* y, int64_t rows, int64_t S, const A* mean,
                     const A* alpha, const A* bias, int64_t act, ActParams<A> ap, Ahead<T> ahead);
  void (*apply_cols)(const T* x, const T* z, T* y, int64_t rows, int64_t C, const A* mean,
                     const A* alpha, const A* bias, int64_t act, ActParams<A> ap);
  // Per-row sums (written), per-column sums (accumulated). grad_sums_rows also writes
  // dyhat to `dyhat` (rows x S) when that is non-null (keeps_dyhat).
  void (*grad_sums_rows)(const T* x, const T* dy, int64_t rows, int64_t S, const A* mean,
                         const A* alpha, const A* bias, int64_t act, ActParams<A> ap, A* sum_dy,
                         A* sum_dy_xmu, T* dyhat);
  void (*grad_sums_cols)(const T* x, const T* dy, int64_t rows, int64_t C, const A* mean,
                         const A* alpha, const A* bias, int64_t act, ActParams<A> ap, A* sum_dy,
                         A* sum_dy_xmu);
  void (*input_grad_rows)(const T* x, const T* dy, T* dx, int64_t rows, int64_t S,
                          const A* mean, const A* alpha, const A* bias, const A* cA,
                          const A* cB, const A* cC, int64_t act, ActParams<A> ap, Ahead<T> ahead);
  void (*input_grad_cols)(const T* x, const T* dy, T* dx, int64_t rows, int64_t C,
                          const A* mean, const A* alpha, const A* bias, const A* cA,
                          const A* cB, const A* cC, int64_t act, ActParams<A> ap);
  // LayerNorm: per-element gamma/beta (length L), statistics per row. RMSNorm is the same
  // maths with mean 0 and beta 0 (the caller passes them), and no mean term in dx (rms).
  void (*layer_norm_apply)(const T* x, T* y, int64_t rows, int64_t L, const A* mean,
                           const A* rstd, const A* gamma, const A* beta, int64_t act,
                           ActParams<A> ap, Ahead<T> ahead);
  // dx (if non-null) per row, plus dres (if non-null: the gradient reaching a residual
  // add's sum directly); dgamma/dbeta partial sums accumulated.
  void (*layer_norm_backward)(const T* x, const T* dy, const T* dres, T* dx, int64_t rows,
                              int64_t L, const A* mean, const A* rstd, const A* gamma,
                              const A* beta, bool rms, int64_t act, ActParams<A> ap, A* dgamma,
                              A* dbeta);
  // Residual adds, s = x + r computed in float (or double): in the storage type, or into
  // float32 (residual_in_fp32); and float32 values rounded to the storage type.
  void (*add)(const T* x, const T* r, T* s, int64_t n);
  void (*add_to_float)(const T* x, const float* r, float* s, int64_t n);
  void (*from_float)(const float* v, T* out, int64_t n);
};

// Whether a backward keeps dyhat = dy * act'(z) from its sums pass (in dx's memory, while
// the rows are in cache) and computes dx from it with no activation, instead of evaluating
// the activation's derivative a second time: for the activations whose derivative costs
// more than that store and load (not ReLU or LeakyReLU), and only where the storage type
// is the accumulation type, so dyhat is kept exactly.
template <typename T>
inline bool keeps_dyhat(int64_t act) {
  return std::is_same<T, acc_t<T>>::value && act != kNone && act != kRelu && act != kLeakyRelu;
}

struct AllKernels {
  KernelTable<float, float> f32;
  KernelTable<double, double> f64;
  KernelTable<bf16_t, float> bf16;
  KernelTable<half_t, float> f16;
};

namespace isa_default { void fill(AllKernels* k); }
namespace isa_avx2 { void fill(AllKernels* k); }
namespace isa_avx512 { void fill(AllKernels* k); }

// The table for the best instruction set this CPU supports (or FUSEDNORM_CPU_ISA).
const AllKernels& kernels();
const char* isa_name();

template <typename T> const KernelTable<T, acc_t<T>>& table();
template <> inline const KernelTable<float, float>& table<float>() { return kernels().f32; }
template <> inline const KernelTable<double, double>& table<double>() { return kernels().f64; }
template <> inline const KernelTable<bf16_t, float>& table<bf16_t>() { return kernels().bf16; }
template <> inline const KernelTable<half_t, float>& table<half_t>() { return kernels().f16; }

}  // namespace cpu
}  // namespace fusednorm
