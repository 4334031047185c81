"""Build script for fusednorm: one extension, fusednorm._C, holding the op schemas and the
CPU kernels (and, later, the CUDA kernels)."""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__.split("+")[0]


def cpu_sources():
    return sorted(
        [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))]
        + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))]
    )


def extension():
    # -fopenmp: at::parallel_for is OpenMP pragmas inlined from ATen's headers; without the
    # flag the kernels would silently run on one thread. Per-ISA kernels get their target
    # flags from pragmas in csrc/cpu/kernels_*.cpp.
    cxx = ["-O3", "-fopenmp", "-DTORCH_EXTENSION_NAME=_C"]
    return CppExtension(
        "fusednorm._C",
        cpu_sources(),
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="fusednorm",
    version="0.1.0",
    description="Fused normalisation (+ activation) kernels for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # The extension is built against one torch ABI: pin the runtime torch to it.
    install_requires=[f"torch=={TORCH_VERSION}"],
    extras_require={"test": ["pytest", "numpy"]},
    python_requires=">=3.9",
)
