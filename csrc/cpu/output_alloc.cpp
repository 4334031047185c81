// Output tensors of the CPU ops (y, dx), allocated so that writing a large output costs
// the write and not the operating system's first touch of fresh memory.
//
// Measured on a 2-core VM: writing a fresh 32 MB glibc allocation took 8 ms (one page
// fault and page clearing per 4 KiB page), 1.7 ms with 2 MiB pages, 0.6 ms for memory that
// was written before; glibc hands large tensors fresh memory whenever its dynamic mmap
// threshold says so, which made the same op flip between 4 and 15 ms. So outputs of 2 MiB
// or more:
//  - are 2 MiB-aligned and marked MADV_HUGEPAGE (what torch's opt-in THP_MEM_ALLOC_ENABLE=1
//    does for every allocation): fresh memory is mapped 2 MiB at a time;
//  - can go, when freed, to a cache of blocks kept for the next output of the same rounded
//    size (like CUDA's caching allocator): a training loop, which repeats its shapes,
//    writes warm memory. Opt-in, off by default: it holds memory, and it makes comparisons
//    with torch.nn measure allocation rather than kernels. FUSEDNORM_CPU_CACHE_MB at load
//    or fusednorm.set_cpu_cache(MiB) sets its limit; cpu_cache_info() reports it;
//    fusednorm.empty_cpu_cache() frees it.
// Each block handed out and given back is reported to torch's profiler, as torch's own CPU
// allocator reports its allocations, so memory profiles (profile_memory=True) count it.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct Block {
  void* data;
  size_t size;
};

size_t cache_limit_from_env() {
  const char* v = std::getenv("FUSEDNORM_CPU_CACHE_MB");
  const long mb = v ? std::atol(v) : 0;
  return mb > 0 ? size_t(mb) << 20 : 0;
}

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    Block* b = take_cached(size);
    if (b == nullptr) {
      void* p = nullptr;
      TORCH_CHECK(posix_memalign(&p, kHugePage, size) == 0,
                  "fusednorm: can't allocate memory: you tried to allocate ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, size, MADV_HUGEPAGE);  // advice: where huge pages are off, nothing changes
#endif
      b = new Block{p, size};
    }
    report(b, int64_t(size));
    return {b->data, b, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty_cache() { trim(0); }

  // A new limit; blocks beyond it are freed.
  void set_limit(size_t bytes) {
    limit_.store(bytes);
    trim(bytes);
  }

  CacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_.load(), cached_bytes_};
  }

  static OutputAllocator& get() {
    static auto* allocator = new OutputAllocator();  // never destroyed: outputs may outlive us
    return *allocator;
  }

 private:
  Block* take_cached(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cached_.find(size);
    if (it == cached_.end() || it->second.empty()) return nullptr;
    Block* b = it->second.back();
    it->second.pop_back();
    cached_bytes_ -= size;
    return b;
  }

  // Frees cached blocks until at most `keep` bytes are cached.
  void trim(size_t keep) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, blocks] : cached_)
      while (!blocks.empty() && cached_bytes_ > keep) {
        destroy(blocks.back());
        blocks.pop_back();
        cached_bytes_ -= size;
      }
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    OutputAllocator& self = get();
    self.report(b, -int64_t(b->size));
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      if (self.cached_bytes_ + b->size <= self.limit_.load()) {
        self.cached_[b->size].push_back(b);
        self.cached_bytes_ += b->size;
        return;
      }
    }
    destroy(b);
  }

  // delta: +size handed out, -size given back (to the cache or the system).
  void report(Block* b, int64_t delta) {
    const size_t live = live_bytes_.fetch_add(size_t(delta)) + size_t(delta);  // modulo 2^64
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(b->data, delta, live, live, c10::Device(c10::DeviceType::CPU));
  }

  static void destroy(Block* b) {
    std::free(b->data);
    delete b;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> cached_;
  size_t cached_bytes_ = 0;
  std::atomic<size_t> live_bytes_{0};  // handed out and not yet given back
  std::atomic<size_t> limit_{cache_limit_from_env()};
};

}  // namespace

at::Tensor empty_output_like(const at::Tensor& x, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(x.sizes(), &OutputAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, format);
}

at::Tensor empty_output_like(const at::Tensor& x, at::MemoryFormat format) {
  return empty_output_like(x, x.scalar_type(), format);
}

void empty_output_cache() { OutputAllocator::get().empty_cache(); }

void set_output_cache_limit(size_t bytes) { OutputAllocator::get().set_limit(bytes); }

CacheInfo output_cache_info() { return OutputAllocator::get().info(); }

}  // namespace cpu
}  // namespace fusednorm
