// The CUDA backend: the ops of bindings.h registered for the CUDA dispatch key.
#include <torch/library.h>

#include "bindings.h"

FN_REGISTER_GPU_OPS(fusednorm, CUDA)
