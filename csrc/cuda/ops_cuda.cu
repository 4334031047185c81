// The CUDA backend: the ops of bindings.h registered for the CUDA dispatch key.
#include <torch/library.h>

#include "bindings.h"

FN_REGISTER_GPU_OPS(fusednorm, CUDA)

namespace fusednorm {
namespace cuda {
// For fusednorm._C (python_module.cpp, compiled without nvcc): the selftest's tier edges.
std::vector<int64_t> row_tier_edges_for(bool backward, bool double_precision) {
  return double_precision ? row_tier_edges<double>(backward) : row_tier_edges<float>(backward);
}
}  // namespace cuda
}  // namespace fusednorm
