// CPU emulation of the small part of CUDA our kernels use, so the same kernel source runs
// on the host in tests (no GPU is available to this project's CI).
//
// A launch runs the grid's blocks one after another; each block runs with one host thread
// per CUDA thread. __syncthreads() is a barrier of the block's threads; warp shuffles go
// through a per-warp buffer between two warp barriers; `__shared__` variables become
// function statics (one copy, shared by the block's threads, reused block after block);
// dynamic shared memory is a per-launch buffer; atomics are std::atomic_ref operations.
// Kernels must keep barriers and shuffles uniform (no early return before them): on a GPU
// that is undefined behaviour, here it is a deadlock, so the tests also catch it.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fnemu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarpSize = 32;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  alignas(16) unsigned char buf[kWarpSize][16];
};

struct Block {
  Block(int threads, size_t smem) : barrier(threads), dynamic_smem(smem + 16) {
    for (int t = 0; t < threads; t += kWarpSize)
      warps.emplace_back(std::make_unique<Warp>(std::min(kWarpSize, threads - t)));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic_smem;
};

struct ThreadContext {
  dim3 threadIdx, blockIdx, blockDim, gridDim;
  Block* block = nullptr;
  int linear = 0;
};
inline thread_local ThreadContext ctx;

inline void syncthreads() { ctx.block->barrier.arrive_and_wait(); }

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 16, "shuffle of a value wider than 16 bytes");
  Warp& w = *ctx.block->warps[ctx.linear / kWarpSize];
  const int lane = ctx.linear % kWarpSize;
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, w.buf[lane ^ lane_mask], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

template <typename T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}

// Runs kernel(args...) over the grid. Threads are created once per launch and walk the
// blocks in order, with a barrier between blocks.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  // The runtime's own launch checks (launch.h's check_launch also counts static shared
  // memory, which only the launcher knows).
  if (uint64_t(block.x) * block.y * block.z > 1024 || block.x * block.y * block.z == 0 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535 || smem > 48 * 1024)
    throw std::runtime_error("emulated CUDA launch outside the runtime's limits");
  const int threads = int(block.x * block.y * block.z);
  Block b(threads, smem);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ctx.blockDim = block;
      ctx.gridDim = grid;
      ctx.block = &b;
      ctx.linear = t;
      ctx.threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            ctx.blockIdx = dim3(bx, by, bz);
            kernel(args...);
            b.barrier.arrive_and_wait();  // the whole block ends before the next starts
          }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace fnemu

// ---- the CUDA spellings our kernels use ------------------------------------------------
using fnemu::dim3;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::fnemu::ctx.threadIdx)
#define blockIdx (::fnemu::ctx.blockIdx)
#define blockDim (::fnemu::ctx.blockDim)
#define gridDim (::fnemu::ctx.gridDim)
#define __syncthreads() ::fnemu::syncthreads()
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __shfl_xor_sync(mask, v, lane_mask) ::fnemu::shfl_xor((v), (lane_mask))
#define atomicAdd(p, v) ::fnemu::atomic_add((p), (v))
#define FN_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::fnemu::ctx.block->dynamic_smem.data())
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
