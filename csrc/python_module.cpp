// The Python module fusednorm._C: importing it registers the ops (TORCH_LIBRARY in
// ops.cpp and the backend files). Through pybind11: the norms' C++ autograd nodes
// (autograd.cpp), build information and the CPU output cache's controls.
#include <torch/extension.h>

#include "autograd.h"

#include "cpu/cpu_utils.h"
#include "cpu/kernels.h"

#ifdef FUSEDNORM_WITH_CUDA
namespace fusednorm {
namespace cuda {
std::vector<int64_t> row_tier_edges_for(bool backward, bool double_precision);  // ops_cuda.cu
}  // namespace cuda
}  // namespace fusednorm
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusednorm's compiled kernels; use them through torch.ops.fusednorm";
  fusednorm::bind_autograd(m);
  m.def("cpu_isa", &fusednorm::cpu::isa_name,
        "Instruction set of the CPU kernels in use (default, avx2 or avx512)");
  m.def("empty_cpu_cache", &fusednorm::cpu::empty_output_cache,
        "Frees the CPU output blocks (2 MiB and larger) kept for reuse by later outputs");
  m.def("set_cpu_cache_limit", &fusednorm::cpu::set_output_cache_limit, py::arg("bytes"),
        "Limit of the CPU output cache in bytes (0: off); use fusednorm.set_cpu_cache");
  m.def("cpu_cache_info", [] {
    const auto info = fusednorm::cpu::output_cache_info();
    py::dict d;
    d["limit_bytes"] = info.limit_bytes;
    d["cached_bytes"] = info.cached_bytes;
    return d;
  }, "The CPU output cache: {'limit_bytes': its limit (0: off), 'cached_bytes': what it holds}");
#ifdef FUSEDNORM_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_row_tier_edges", &fusednorm::cuda::row_tier_edges_for, py::arg("backward"),
        py::arg("double_precision"),
        "Row lengths where the CUDA row kernels change tier, and one above each (selftest)");
#else
  m.attr("with_cuda") = false;
#endif
}
