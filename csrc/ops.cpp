// The fusednorm operator schemas: defined once here, implemented per backend
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA), with fake kernels for torch.compile
// registered from Python (python/fusednorm/_ops.py).
//
// Conventions
// - activation: norm_math.h's Activation code, with its parameters act_a and act_b.
// - Forward ops return (y, mean, rstd) with statistics in float32 (float64 for float64
//   input); backward ops take what forward saved and return (dx, dweight, dbias), where
//   an output whose output_mask entry is false comes back as an empty tensor.
// - Running statistics are updated in place (Tensor(a!)?), never returned.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(fusednorm, m) { fusednorm::define_schemas(m); }
