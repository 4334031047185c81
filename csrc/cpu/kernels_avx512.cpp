// The CPU kernels compiled for the avx512 instruction set (see kernels_impl.h).
// Shared headers first, so their code is not compiled under the target flags below.
#include <cmath>
#include <cstdint>
#define FN_FMA 1  // norm_math.h's polynomials in fused multiply-adds (this ISA has them)
#include "../common/norm_math.h"
#include "kernels.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define FN_ISA isa_avx512
#define FN_VECTOR_BYTES 64  // one vector register
#include "kernels_impl.h"
