// Test-only extension: the CUDA backend's ops (csrc/cuda/bindings.h, launch.h and the
// kernels) compiled for the host under the CPU emulation of CUDA (csrc/cuda/emulation.h),
// registered as torch.ops.fusednorm_emu.* for CPU tensors. set_limits() lowers the tier
// thresholds so small test shapes reach every tier and the multi-block reductions.
#include <torch/extension.h>

#define FN_EMULATE
#include "../../csrc/cuda/bindings.h"
#include "../../csrc/schemas.h"

TORCH_LIBRARY(fusednorm_emu, m) { fusednorm::define_schemas(m); }
FN_REGISTER_GPU_OPS(fusednorm_emu, CPU)

namespace {

void set_limits(int64_t warp_cols, int64_t smem_bytes, int64_t elements_per_split,
                int64_t max_splits, int64_t max_blocks, int64_t threads) {
  auto& l = fusednorm::cuda::limits();
  l.warp_cols = warp_cols;
  l.smem_bytes = smem_bytes;
  l.elements_per_split = elements_per_split;
  l.max_splits = max_splits;
  l.max_blocks = max_blocks;
  l.threads = int(threads);
}

std::string tier_name(int64_t L, bool backward, bool double_precision) {
  using namespace fusednorm::cuda;
  return row_tier_name(double_precision ? row_tier<double>(L, backward) : row_tier<float>(L, backward));
}

// The static shared memory launch.h counts for a block-tier row kernel (row_kernels.cuh).
int64_t row_static_smem(bool backward, bool double_precision) {
  using namespace fusednorm::cuda;
  if (double_precision) return int64_t(backward ? kRowBwdStaticSmem<double> : kRowFwdStaticSmem<double>);
  return int64_t(backward ? kRowBwdStaticSmem<float> : kRowFwdStaticSmem<float>);
}

std::vector<int64_t> tier_edges(bool backward, bool double_precision) {
  using namespace fusednorm::cuda;
  return double_precision ? row_tier_edges<double>(backward) : row_tier_edges<float>(backward);
}

// Blocks run at once, and the seed of the launches' shuffled block order.
void set_emulation(int64_t teams, int64_t seed) {
  fnemu::settings().teams = int(teams);
  fnemu::settings().seed = uint64_t(seed);
}

// GroupNorm rows split over blocks (bindings.h's split_rows) from planes of this many
// elements (small test shapes reach the path with a low one).
void set_split_plane_min(int64_t n) { fusednorm::cuda::limits().split_plane_min = n; }

// The device the launch plans are made for (streaming multiprocessors).
void set_sm_count(int64_t sms) { fnemu::settings().sms = sms; }

// Dry runs: the ops compute their launches (grid, block, shared memory) and record them
// instead of running the kernels; take_launches() returns and clears the record.
void set_dry_run(bool on) { fnemu::settings().dry_run = on; }

std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t>> take_launches() {
  std::lock_guard<std::mutex> lock(fnemu::coverage_mutex());
  std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t>> out;
  for (const auto& l : fnemu::planned_launches())
    out.emplace_back(l.kernel, l.grid.x, l.grid.y, l.block.x, l.block.y, l.smem);
  fnemu::planned_launches().clear();
  return out;
}

// Every launch since the last reset: (kernel|op|element type|splits, launches, the most
// static shared memory a launch used, the most blocks seen running at once).
std::vector<std::tuple<std::string, int64_t, int64_t, int64_t>> coverage() {
  std::lock_guard<std::mutex> lock(fnemu::coverage_mutex());
  std::vector<std::tuple<std::string, int64_t, int64_t, int64_t>> out;
  for (const auto& [key, r] : fnemu::coverage()) out.emplace_back(key, r.launches, r.static_smem, r.in_flight);
  return out;
}

void reset_coverage() {
  std::lock_guard<std::mutex> lock(fnemu::coverage_mutex());
  fnemu::coverage().clear();
}

// A kernel with an ordering bug, for the test that the emulation exposes one: the block with
// the highest index sums every block's partial, assuming the others ran before it (what a
// sequential, in-order emulation makes true). Returns the sum of 0..blocks-1 it computed.
__global__ void probe_last_index_sums(float* partial, float* out) {
  if (threadIdx.x == 0) partial[blockIdx.x] = float(blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x == gridDim.x - 1) {
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
    *out = s;
  }
}

double ordering_probe(int64_t blocks) {
  std::vector<float> partial(size_t(blocks), 0.0f);
  float out = 0;
  FN_LAUNCH(probe_last_index_sums, dim3(unsigned(blocks)), dim3(32), 0, nullptr, partial.data(), &out);
  return out;
}

// A 16-byte load one float past a 16-byte boundary (a GPU faults on it): the emulation must
// refuse it too.
__global__ void probe_misaligned_pack(const float* p, float* out) {
  if (threadIdx.x == 0) *out = fusednorm::cuda::load_pack<4>(p + 1, 0).v[0];
}

void misaligned_probe() {
  alignas(16) float buf[8] = {};
  float out = 0;
  FN_LAUNCH(probe_misaligned_pack, dim3(1), dim3(32), 0, nullptr, buf, &out);
}

int64_t splits(bool nhwc, int64_t N, int64_t C, int64_t S) {
  return fusednorm::cuda::plan_channels(nhwc, N, C, S).splits;
}

// Global-memory bytes (read, written) the kernels streamed since the last call.
std::tuple<int64_t, int64_t> take_traffic() {
  auto& t = fnemu::traffic();
  return {t.read.exchange(0), t.written.exchange(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_limits", &set_limits);
  m.def("row_tier", &tier_name);
  m.def("splits", &splits);
  m.def("take_traffic", &take_traffic);
  m.def("row_static_smem", &row_static_smem);
  m.def("row_tier_edges", &tier_edges);
  m.def("set_emulation", &set_emulation);
  m.def("set_sm_count", &set_sm_count);
  m.def("set_split_plane_min", &set_split_plane_min);
  m.def("set_dry_run", &set_dry_run);
  m.def("take_launches", &take_launches);
  m.def("coverage", &coverage);
  m.def("reset_coverage", &reset_coverage);
  m.def("ordering_probe", &ordering_probe);
  m.def("misaligned_probe", &misaligned_probe);
}
