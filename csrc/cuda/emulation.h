// CPU emulation of the small part of CUDA our kernels use, so the same kernel source runs
// on the host in tests (no GPU is available to this project's CI).
//
// A launch runs its blocks in a shuffled order on several "teams" at once (Settings): each
// team is one host thread per CUDA thread of a block and takes the next block of the
// shuffled list when its current one ends, so blocks run concurrently and in
// no particular order, as on a GPU: the last-block (ticket) reductions and any ordering
// assumption are exercised. __syncthreads() is a barrier of the team's threads; warp
// shuffles go through a per-warp buffer between two warp barriers; static shared memory
// (FN_SHARED) and dynamic shared memory are per team; atomics are std::atomic_ref
// operations. Kernels must keep barriers and shuffles uniform (no early return before
// them): on a GPU that is undefined behaviour, here it is a deadlock, so the tests catch it.
//
// The launch is refused as the CUDA runtime refuses it (threads per block, grid limits,
// static + dynamic shared memory over 48 KiB: static memory is counted as the kernel
// declares it), and every launch is recorded (kernel, element type, multi-split grid,
// static shared bytes) for the tests' coverage table.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace fnemu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarpSize = 32;
constexpr int64_t kSharedPerBlock = 48 * 1024;  // static + dynamic, without opt-in

// How launches run: blocks at once (teams) and the shuffle's seed (set_emulation()).
struct Settings {
  int teams = 2;  // the tests of test_cuda_emulation.py run 3
  uint64_t seed = 0;
  int64_t sms = 132;  // the device the launch plans are made for (an H100 SXM)
  bool dry_run = false;  // record launches without running them (launch-plan tests)
};
inline Settings& settings() {
  static Settings s;
  return s;
}

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  alignas(16) unsigned char buf[kWarpSize][16];
};

// One team: the threads, barriers and shared memory of the block it is running.
struct Block {
  Block(int threads, size_t smem) : barrier(threads), dynamic_smem(smem + 16) {
    for (int t = 0; t < threads; t += kWarpSize)
      warps.emplace_back(std::make_unique<Warp>(std::min(kWarpSize, threads - t)));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic_smem;
  // FN_SHARED variables by declaration (a static tag per declaration and instantiation).
  std::mutex shared_mutex;
  std::map<const void*, std::unique_ptr<std::max_align_t[]>> shared;
  int64_t static_smem = 0;
  uint64_t current = 0;  // index into the launch's shuffled block list
};

struct ThreadContext {
  dim3 threadIdx, blockIdx, blockDim, gridDim;
  Block* block = nullptr;
  int linear = 0;
};
inline thread_local ThreadContext ctx;

inline void syncthreads() { ctx.block->barrier.arrive_and_wait(); }

// The calling block's copy of a __shared__ variable of type U (uninitialised on first use,
// as shared memory is; kept while the team runs later blocks, which must not rely on it).
template <typename U>
U& block_shared(const void* tag) {
  Block& b = *ctx.block;
  std::lock_guard<std::mutex> lock(b.shared_mutex);
  auto& slot = b.shared[tag];
  if (!slot) {
    slot.reset(new std::max_align_t[(sizeof(U) + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)]);
    b.static_smem += int64_t(sizeof(U));
  }
  return *reinterpret_cast<U*>(slot.get());
}

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

// Global-memory traffic of the tensors the kernels stream (device.h's load_pack and
// store_pack), summed over launches since the last reset; each thread counts its own and
// adds it in when the launch ends.
struct Traffic {
  std::atomic<int64_t> read{0}, written{0}, misaligned{0};
};
inline Traffic& traffic() {
  static Traffic t;
  return t;
}
inline thread_local int64_t tl_read = 0, tl_written = 0;

inline void count_access(const void* p, size_t bytes, bool write) {
  // An access of 2, 4, 8 or 16 bytes must be aligned to its size on a GPU.
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) traffic().misaligned.fetch_add(1);
  (write ? tl_written : tl_read) += int64_t(bytes);
}

template <typename T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}

// ---- coverage: what the launches ran ---------------------------------------------------
struct LaunchRecord {
  int64_t launches = 0;
  int64_t static_smem = 0;  // the most a launch of it used
  int64_t in_flight = 0;    // the most blocks of one launch seen running at once
};
inline std::mutex& coverage_mutex() {
  static std::mutex m;
  return m;
}
// "kernel|op|element type|one-split, multi-split or - (not a reduction)" -> record
inline std::map<std::string, LaunchRecord>& coverage() {
  static std::map<std::string, LaunchRecord> c;
  return c;
}

template <typename U>
constexpr const char* element_name() {
  if constexpr (std::is_same_v<U, float>) return "float32";
  else if constexpr (std::is_same_v<U, double>) return "float64";
  else if constexpr (std::is_same_v<U, c10::Half>) return "float16";
  else if constexpr (std::is_same_v<U, c10::BFloat16>) return "bfloat16";
  else return nullptr;
}

// The element type of a launch: the type its first data pointer points to (every kernel
// takes its input first; a reduction's Op comes before it and is not a pointer).
template <typename... Args>
const char* first_element_name() {
  const char* name = nullptr;
  ((name = name                          ? name
           : std::is_pointer_v<Args>     ? element_name<std::remove_cv_t<std::remove_pointer_t<Args>>>()
                                         : nullptr),
   ...);
  return name ? name : "?";
}

// A reduction kernel's or elementwise pass's operation (its kName), or "".
template <typename First, typename... Rest>
const char* op_name() {
  if constexpr (requires { First::kName; }) return First::kName;
  else return "";
}

// A reduction (an Op with a State) on one or several blocks per column ("-" for others:
// their grid's y dimension is not a split).
template <typename First, typename... Rest>
const char* split_label(dim3 grid) {
  if constexpr (requires { typename First::State; }) return grid.y > 1 ? "multi-split" : "one-split";
  else return "-";
}

inline std::string kernel_label(const char* spelled) {
  std::string s(spelled);  // "(row_fwd_block<T, true>)" as FN_LAUNCH spells it
  s.erase(std::remove_if(s.begin(), s.end(), [](char ch) { return ch == '(' || ch == ')' || ch == ' '; }),
          s.end());
  return s;
}

// Launches recorded in a dry run: kernel label, grid, block, dynamic shared memory.
struct PlannedLaunch {
  std::string kernel;
  dim3 grid, block;
  int64_t smem;
};
inline std::vector<PlannedLaunch>& planned_launches() {
  static std::vector<PlannedLaunch> p;
  return p;
}

// Runs kernel(args...) over the grid: the blocks in a shuffled order, `teams` at a time.
template <typename Kernel, typename... Args>
void launch(const char* spelled, Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  // The runtime's own launch checks (launch.h's check_launch does them too, before).
  if (uint64_t(block.x) * block.y * block.z > 1024 || block.x * block.y * block.z == 0 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535 || int64_t(smem) > kSharedPerBlock)
    throw std::runtime_error("emulated CUDA launch outside the runtime's limits");
  if (settings().dry_run) {
    std::lock_guard<std::mutex> lock(coverage_mutex());
    planned_launches().push_back({kernel_label(spelled), grid, block, int64_t(smem)});
    return;
  }
  const int threads = int(block.x * block.y * block.z);
  const uint64_t total = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(total);
  for (uint64_t i = 0; i < total; ++i) order[i] = i;
  static std::atomic<uint64_t> launch_count{0};
  std::mt19937_64 rng(settings().seed * 1000003u + launch_count.fetch_add(1));
  std::shuffle(order.begin(), order.end(), rng);

  const int teams = int(std::min<uint64_t>(uint64_t(std::max(1, settings().teams)), total));
  std::vector<std::unique_ptr<Block>> blocks;
  for (int k = 0; k < teams; ++k) blocks.push_back(std::make_unique<Block>(threads, smem));
  std::atomic<uint64_t> next{0};
  std::atomic<int64_t> running{0}, peak{0};
  // Every team enters its first block before any runs kernel code: blocks overlap.
  std::barrier<> start(std::ptrdiff_t(threads) * teams);
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads) * teams);
  for (int k = 0; k < teams; ++k)
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, k, t] {
        Block& b = *blocks[k];
        ctx.blockDim = block;
        ctx.gridDim = grid;
        ctx.block = &b;
        ctx.linear = t;
        ctx.threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (bool first = true;; first = false) {
          if (t == 0) b.current = next.fetch_add(1);
          b.barrier.arrive_and_wait();  // every thread sees this block's index
          const uint64_t i = b.current;
          if (i >= total) break;  // uniform: the whole team stops
          const uint64_t id = order[i];
          ctx.blockIdx = dim3(unsigned(id % grid.x), unsigned(id / grid.x % grid.y),
                              unsigned(id / (uint64_t(grid.x) * grid.y)));
          if (t == 0) {
            const int64_t now = running.fetch_add(1) + 1;
            int64_t seen = peak.load();
            while (now > seen && !peak.compare_exchange_weak(seen, now)) {}
          }
          if (first) start.arrive_and_wait();  // (teams <= blocks: every team has a first)
          kernel(args...);
          b.barrier.arrive_and_wait();  // the block ends before the team takes the next
          if (t == 0) running.fetch_sub(1);
        }
        traffic().read.fetch_add(tl_read);
        traffic().written.fetch_add(tl_written);
        tl_read = tl_written = 0;
      });
    }
  for (auto& th : pool) th.join();

  int64_t static_smem = 0;
  for (auto& b : blocks) static_smem = std::max(static_smem, b->static_smem);
  {
    std::lock_guard<std::mutex> lock(coverage_mutex());
    std::string key = kernel_label(spelled) + "|" + op_name<Args...>() + "|" + first_element_name<Args...>() +
                      "|" + split_label<Args...>(grid);
    LaunchRecord& r = coverage()[key];
    r.launches += 1;
    r.static_smem = std::max(r.static_smem, static_smem);
    r.in_flight = std::max(r.in_flight, peak.load());
  }
  if (traffic().misaligned.exchange(0) > 0)
    throw std::runtime_error("emulated CUDA launch " + kernel_label(spelled) +
                             " made a global-memory access not aligned to its size");
  // Shared memory as the kernel declared it, against the same per-block limit (known only
  // after the run here; a GPU refuses such a launch up front).
  if (static_smem + int64_t(smem) > kSharedPerBlock)
    throw std::runtime_error("emulated CUDA launch used " + std::to_string(static_smem) + " bytes of static and " +
                             std::to_string(smem) + " of dynamic shared memory: over CUDA's 48 KiB per block");
}

}  // namespace fnemu

// ---- the CUDA spellings our kernels use ------------------------------------------------
using fnemu::dim3;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
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
// `type name dims;` in the running block's shared memory (dims: array bounds or nothing).
#define FN_SHARED(type, name, dims) \
  static const char name##_tag_ = 0;   \
  auto& name = ::fnemu::block_shared<type dims>(&name##_tag_)
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
