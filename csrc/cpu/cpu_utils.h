// Helpers for the CPU bindings: dtype dispatch onto the kernels' storage types, chunked
// parallel loops, and small per-channel parameter vectors in the accumulation type.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace fusednorm {
namespace cpu {

// Calls f(T{}) with T the kernels' storage type for t's dtype (checked by the caller).
template <typename F>
void dispatch_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16_t{}); break;
    case at::kHalf: f(half_t{}); break;
    default: TORCH_CHECK(false, "fusednorm: unsupported dtype ", t);
  }
}

// An uninitialised output shaped like x, dense in memory format `format` (layout.h says
// which), allocated for a cheap first write (output_alloc.cpp).
at::Tensor empty_output_like(const at::Tensor& x,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous);
// The same in dtype `dtype`.
at::Tensor empty_output_like(const at::Tensor& x, at::ScalarType dtype,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous);
// Frees the large output blocks output_alloc.cpp keeps for reuse.
void empty_output_cache();
// The output cache's limit (0: off) and the bytes it holds.
struct CacheInfo {
  size_t limit_bytes, cached_bytes;
};
void set_output_cache_limit(size_t bytes);
CacheInfo output_cache_info();

// t, or an empty tensor of its own when t is undefined (an op's outputs must not alias).
inline at::Tensor or_empty(const at::Tensor& t, const at::TensorOptions& options) {
  return t.defined() ? t : at::empty({0}, options);
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Splits [0, n) into at most one chunk per thread, each at least `grain` long, and runs
// f(chunk, begin, end) in parallel. Returns the number of chunks, so callers can keep
// one partial result per chunk and merge them in a fixed (deterministic) order.
inline int64_t num_chunks(int64_t n, int64_t grain) {
  if (n <= 0) return 0;
  int64_t by_size = (n + grain - 1) / std::max<int64_t>(grain, 1);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
}

template <typename F>
void parallel_chunks(int64_t n, int64_t chunks, F&& f) {
  if (chunks <= 0) return;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k, k * n / chunks, (k + 1) * n / chunks);
  });
}

// Elements each parallel chunk should at least hold (below that, threading costs more
// than it saves).
constexpr int64_t kGrainElements = 32768;

// Items of `item_len` elements each per parallel chunk: at least one, also for an empty
// item (a zero-size dimension must not divide by zero).
inline int64_t grain(int64_t item_len) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(item_len, 1));
}

// Elements from one per-thread partial array of n elements to the next: whole cache lines
// (threads' partials never share one) and half a 4 KiB page over whole pages, so that a
// kernel updating two partials side by side (dgamma[i] stored, then dbeta[i] loaded) does
// not have their addresses agree in the low 12 bits, which the CPU's load-store
// disambiguation treats as a possible dependence (4K aliasing: the load waits for the store).
template <typename A>
inline int64_t partial_stride(int64_t n) {
  constexpr int64_t page = 4096 / int64_t(sizeof(A));
  return (n + page - 1) / page * page + page / 2;
}

// Rows per cache block: about 16 KiB of float input, so that the block's second and third
// reads (centred moments, then the output) hit L1; 64 KiB blocks read them back from L2
// (measured: docs/benchmarks.md).
inline int64_t block_rows(int64_t row_len) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(row_len, 1));
}

// What a kernel writing elements [off, off + n) of a block `block` elements long should
// prefetch (kernels.h, Ahead): the same span of the next block, clipped to the `total`
// elements of x (and dy).
template <typename T>
Ahead<T> next_block(const T* x, const T* dy, int64_t off, int64_t n, int64_t block,
                    int64_t total) {
  const int64_t start = off + block;
  const int64_t len = std::min(n, total - start);
  if (len <= 0) return {};
  return {x + start, dy ? dy + start : nullptr, len};
}

// Runs f(begin, end) over [0, rows) in parallel, in cache-sized blocks.
template <typename F>
void for_row_blocks(int64_t rows, int64_t row_len, F&& f) {
  const int64_t blk = block_rows(row_len);
  parallel_chunks(rows, num_chunks(rows, grain(row_len)),
                  [&](int64_t, int64_t b, int64_t e) {
                    for (int64_t r = b; r < e; r += blk) f(r, std::min(e, r + blk));
                  });
}

// Per-column (mean, m2) of C columns from `chunks` partial column moments (chunk k's at
// pm/pq[k*C + c], over rows[k] rows): merged in double, in chunk order.
template <typename A>
void merge_column_chunks(const A* pm, const A* pq, const int64_t* rows, int64_t chunks, int64_t C, A* mean,
                         A* m2) {
  for (int64_t c = 0; c < C; ++c) {
    Moments<double> acc{0, 0, 0};
    for (int64_t k = 0; k < chunks; ++k)
      acc = merge(acc, Moments<double>{double(rows[k]), double(pm[k * C + c]), double(pq[k * C + c])});
    mean[c] = A(acc.mean);
    m2[c] = A(acc.m2);
  }
}

// Contiguous float32/float64: the usual dtypes of parameters and running statistics,
// which the helpers below read and update in place.
inline bool plain_float_vector(const at::Tensor& t) {
  return t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// A parameter vector (weight, bias, running statistic) in the accumulation type A, or
// `fill` repeated n times when the tensor is absent.
template <typename A>
std::vector<A> to_acc_vector(const c10::optional<at::Tensor>& p, int64_t n, A fill) {
  std::vector<A> v(n, fill);
  if (!p.has_value() || !p->defined()) return v;
  if (plain_float_vector(*p)) {  // the usual case, without the per-call conversion ops
    if (p->scalar_type() == at::kFloat)
      std::copy(p->const_data_ptr<float>(), p->const_data_ptr<float>() + n, v.begin());
    else
      std::copy(p->const_data_ptr<double>(), p->const_data_ptr<double>() + n, v.begin());
    return v;
  }
  at::Tensor c = p->detach().to(c10::CppTypeToScalarType<A>::value).contiguous();
  std::copy(c.data_ptr<A>(), c.data_ptr<A>() + n, v.begin());
  return v;
}

// Copies an accumulation-type vector into a new tensor of dtype `dtype`.
template <typename A>
at::Tensor from_acc_vector(const std::vector<A>& v, at::ScalarType dtype) {
  at::Tensor t = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  std::copy(v.begin(), v.end(), t.data_ptr<A>());
  return dtype == t.scalar_type() ? t : t.to(dtype);
}

// running = (1 - momentum) * running + momentum * fresh, computed in float64 and stored
// in the running statistic's own dtype.
template <typename R>
void blend_in_place(R* p, const std::vector<double>& fresh, double momentum) {
  for (size_t c = 0; c < fresh.size(); ++c) p[c] = R((1.0 - momentum) * double(p[c]) + momentum * fresh[c]);
}
inline void update_running(at::Tensor& running, const std::vector<double>& fresh, double momentum) {
  if (plain_float_vector(running)) {  // in place: no conversion ops per call
    if (running.scalar_type() == at::kFloat)
      blend_in_place(running.data_ptr<float>(), fresh, momentum);
    else
      blend_in_place(running.data_ptr<double>(), fresh, momentum);
    return;
  }
  at::Tensor cur = running.to(at::kDouble).cpu().contiguous();
  blend_in_place(cur.data_ptr<double>(), fresh, momentum);
  running.copy_(cur);
}

}  // namespace cpu
}  // namespace fusednorm
