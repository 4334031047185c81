// The CPU kernels compiled for the default instruction set (see kernels_impl.h).
// Shared headers first, so their code is not compiled under the target flags below.
#include <cmath>
#include <cstdint>
#include "../common/norm_math.h"
#include "kernels.h"
#if defined(__x86_64__)

#endif
#define FN_ISA isa_default
#define FN_VECTOR_BYTES 16  // one vector register
#include "kernels_impl.h"
