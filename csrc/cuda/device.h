// What the kernels need from the device, in one place: the CUDA toolchain on a GPU build,
// or the host emulation (emulation.h) when FN_EMULATE is defined. Also the reductions every
// kernel shares: Welford/Chan moments and sums across a warp and across a block.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>

#include "../common/norm_math.h"

#ifdef FN_EMULATE
#include "emulation.h"
#define FN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fnemu::launch(#kernel, kernel, grid, block, smem, __VA_ARGS__)
#define FN_LAUNCH_CHECK()
#define FN_COUNT_ACCESS(ptr, bytes, write) ::fnemu::count_access((ptr), (bytes), (write))
using fn_stream_t = void*;
#else
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#define FN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fusednorm::cuda::launch_kernel(kernel, grid, block, smem, stream, __VA_ARGS__)
#define FN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define FN_COUNT_ACCESS(ptr, bytes, write)
#define FN_DYNAMIC_SMEM(type, name)                          \
  extern __shared__ __align__(16) unsigned char fn_smem_[]; \
  type* name = reinterpret_cast<type*>(fn_smem_)
// `__shared__ type name dims;` (the emulation gives each concurrently running block its own).
#define FN_SHARED(type, name, dims) __shared__ type name dims
using fn_stream_t = cudaStream_t;
#endif

namespace fusednorm {
namespace cuda {

// Streaming multiprocessors of the current device: the emulation's setting (an H100's 132
// unless a test changes it) or the GPU's own count.
#ifdef FN_EMULATE
inline int64_t sm_count() { return ::fnemu::settings().sms; }
#else
inline int64_t sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}
#endif

#ifndef FN_EMULATE
// Launch through a function pointer, so FN_LAUNCH takes a parenthesised template name.
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}
#endif

constexpr int kWarp = 32;

// Accumulation type: float, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}

// N values loaded or stored as one access of N*sizeof(T) bytes (16 at most; callers check
// alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T>
constexpr int pack_size() { return 16 / sizeof(T); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// Global-memory accesses to the tensors a kernel streams (inputs, outputs, gradients,
// residuals): element k*W .. k*W+W-1 of p as one access. Parameters and statistics, read
// per element but small enough to stay in cache, are plain indexing. The emulation counts
// these bytes and checks each access's alignment (a GPU faults on a misaligned one).
template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p, int64_t k) {
  const Pack<T, W>* q = reinterpret_cast<const Pack<T, W>*>(p) + k;
  FN_COUNT_ACCESS(q, sizeof(Pack<T, W>), false);
  return *q;
}
template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t k, const Pack<T, W>& v) {
  Pack<T, W>* q = reinterpret_cast<Pack<T, W>*>(p) + k;
  FN_COUNT_ACCESS(q, sizeof(Pack<T, W>), true);
  *q = v;
}

// The widest pack (elements) for rows of L elements at these pointers: 16 bytes when every
// row starts 16-byte aligned, else single elements.
template <typename T>
int row_pack(int64_t L, std::initializer_list<const void*> ptrs) {
  if (L % pack_size<T>() != 0) return 1;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return 1;
  return pack_size<T>();
}

// ---- reductions -----------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ Moments<A> warp_merge(Moments<A> m) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Moments<A> o{__shfl_xor_sync(0xffffffffu, m.count, offset),
                 __shfl_xor_sync(0xffffffffu, m.mean, offset),
                 __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, o);
  }
  return m;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Merges every thread's moments of a block (blockDim.x*blockDim.y threads, a multiple of
// 32, at most 1024); every thread gets the result. Uses 32 slots of shared memory.
template <typename A>
__device__ __forceinline__ Moments<A> block_merge(Moments<A> m) {
  FN_SHARED(A, s_count, [kWarp]);
  FN_SHARED(A, s_mean, [kWarp]);
  FN_SHARED(A, s_m2, [kWarp]);
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarp;
  m = warp_merge(m);
  if (tid % kWarp == 0) {
    s_count[tid / kWarp] = m.count;
    s_mean[tid / kWarp] = m.mean;
    s_m2[tid / kWarp] = m.m2;
  }
  __syncthreads();
  Moments<A> w{A(0), A(0), A(0)};
  if (tid % kWarp < warps) w = Moments<A>{s_count[tid % kWarp], s_mean[tid % kWarp], s_m2[tid % kWarp]};
  w = warp_merge(w);
  __syncthreads();  // the slots can be reused by the caller's next reduction
  return w;
}

// Block-wide sums of two values; every thread gets both.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  FN_SHARED(A, s_a, [kWarp]);
  FN_SHARED(A, s_b, [kWarp]);
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (tid % kWarp == 0) {
    s_a[tid / kWarp] = a;
    s_b[tid / kWarp] = b;
  }
  __syncthreads();
  a = tid % kWarp < warps ? s_a[tid % kWarp] : A(0);
  b = tid % kWarp < warps ? s_b[tid % kWarp] : A(0);
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
}

}  // namespace cuda
}  // namespace fusednorm
