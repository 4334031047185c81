// The norms' C++ autograd nodes (autograd.cpp), bound into fusednorm._C.
#pragma once
#include <torch/extension.h>

namespace fusednorm {

void bind_autograd(py::module_& m);

}  // namespace fusednorm
