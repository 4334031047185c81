"""Build script for fusednorm: one extension, fusednorm._C, holding the op schemas, the CPU
kernels and (when torch is a CUDA build and nvcc is found) the CUDA kernels.

Environment:
  FUSEDNORM_CUDA=0        skip the CUDA kernels; =1 makes their absence an error
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" when no GPU is visible
  FUSEDNORM_PTXAS_STRICT=1  fail the build if any kernel spills registers (CI)
  FUSEDNORM_PTXAS_VERBOSE=1 print each kernel's register and shared-memory use
  FUSEDNORM_CXXFLAGS      extra C++ flags, e.g. "-O1" or "-fsanitize=address,undefined"
  MAX_JOBS                parallel compile jobs
"""
import glob
import os
import re
import shutil
import subprocess


def find_cuda_home():
    """CUDA_HOME, or the toolkit root nvcc reports (`nvcc --dryrun` prints TOP=...). The
    nvcc on PATH may be a wrapper outside the toolkit, where torch's own guess fails."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return os.path.realpath(m.group(1)) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


WANT_CUDA = os.environ.get("FUSEDNORM_CUDA", "auto")
CUDA_HOME = find_cuda_home() if WANT_CUDA != "0" else None
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__.split("+")[0]
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100, and PTX for newer GPUs


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def build_cuda():
    if WANT_CUDA == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if reasons:
        if WANT_CUDA == "1":
            raise RuntimeError("FUSEDNORM_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("fusednorm: building without CUDA kernels: " + "; ".join(reasons))
        return False
    return True


def extension():
    # -fopenmp: at::parallel_for is OpenMP pragmas inlined from ATen's headers; without the
    # flag the kernels would silently run on one thread. Per-ISA CPU kernels get their
    # target flags from pragmas in csrc/cpu/kernels_*.cpp. -fno-trapping-math: without it
    # GCC may not compute `z * slope` in lanes where it is not selected (it could raise a
    # floating-point exception nobody listens to), so the activation selects became a
    # branch per element in the AVX2 and baseline kernels, 5-8x slower; results unchanged.
    # -ffp-contract=off: no fused multiply-adds the source does not ask for, so the
    # forward and backward passes compute the pre-activation to the same bits (norm_math.h).
    # FUSEDNORM_CXXFLAGS: extra flags, last (CI's low-optimisation and sanitizer builds).
    cxx = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    cxx += os.environ.get("FUSEDNORM_CXXFLAGS", "").split()
    link = ["-fopenmp"] + [f for f in cxx if f.startswith("-fsanitize")]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not build_cuda():
        print("fusednorm: building CPU kernels only")
        return CppExtension("fusednorm._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    ptxas = ["-warn-spills", "-warn-lmem-usage"]
    if os.environ.get("FUSEDNORM_PTXAS_STRICT") == "1":
        ptxas.append("--warning-as-error")
    if os.environ.get("FUSEDNORM_PTXAS_VERBOSE") == "1":
        ptxas.append("-v")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-Xptxas=" + ",".join(ptxas)]
    print(f"fusednorm: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    return CUDAExtension(
        "fusednorm._C",
        srcs + sources("csrc/cuda/*.cu"),
        define_macros=[("FUSEDNORM_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


# Name, version, extras and the rest of the metadata: pyproject.toml.
setup(
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # The extension is built against one torch ABI: pin the runtime torch to it.
    install_requires=[f"torch=={TORCH_VERSION}"],
)
