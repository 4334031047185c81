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

int64_t splits(bool nhwc, int64_t N, int64_t C, int64_t S) {
  return fusednorm::cuda::plan_channels(nhwc, N, C, S).splits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_limits", &set_limits);
  m.def("row_tier", &tier_name);
  m.def("splits", &splits);
  m.def("row_static_smem", &row_static_smem);
}
