// Picks, once, the kernel table of the best instruction set this CPU supports.
// FUSEDNORM_CPU_ISA=default|avx2|avx512 forces one (tests use it to run every variant).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace fusednorm {
namespace cpu {
namespace {

struct Selected {
  AllKernels kernels;
  const char* name;
};

bool cpu_has(const char* isa) {
#if defined(__x86_64__)
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return std::strcmp(isa, "default") == 0;
}

Selected select() {
  Selected s;
  const char* forced = std::getenv("FUSEDNORM_CPU_ISA");
  std::string want = forced ? forced : "";
  if (!want.empty() && want != "default" && want != "avx2" && want != "avx512")
    throw std::invalid_argument("FUSEDNORM_CPU_ISA must be default, avx2 or avx512, got " + want);
  if (!want.empty() && !cpu_has(want.c_str()))
    throw std::invalid_argument("FUSEDNORM_CPU_ISA=" + want + " is not supported by this CPU");
  if (want == "avx512" || (want.empty() && cpu_has("avx512"))) {
    isa_avx512::fill(&s.kernels);
    s.name = "avx512";
  } else if (want == "avx2" || (want.empty() && cpu_has("avx2"))) {
    isa_avx2::fill(&s.kernels);
    s.name = "avx2";
  } else {
    isa_default::fill(&s.kernels);
    s.name = "default";
  }
  return s;
}

const Selected& selected() {
  static const Selected s = select();
  return s;
}

}  // namespace

const AllKernels& kernels() { return selected().kernels; }
const char* isa_name() { return selected().name; }

}  // namespace cpu
}  // namespace fusednorm
