// The Python module fusednorm._C: importing it registers the ops (TORCH_LIBRARY in
// ops.cpp and the backend files). Only build information goes through pybind11.
#include <torch/extension.h>

#include "cpu/kernels.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusednorm's compiled kernels; use them through torch.ops.fusednorm";
  m.def("cpu_isa", &fusednorm::cpu::isa_name,
        "Instruction set of the CPU kernels in use (default, avx2 or avx512)");
#ifdef FUSEDNORM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
