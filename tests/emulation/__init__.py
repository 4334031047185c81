"""The CUDA backend's ops compiled for the CPU under csrc/cuda/emulation.h
(emulated_ops.cpp), as torch.ops.fusednorm_emu.*; load_emulation() builds (once, cached in
build_dir) and loads them."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build_dir():
    return os.path.join(ROOT, "build", "emulation")


def load_emulation(build=None, extra_cflags=("-O1", "-ffp-contract=off")):
    from torch.utils.cpp_extension import load
    build = build or build_dir()
    os.makedirs(build, exist_ok=True)
    return load(name="fusednorm_emu", sources=[os.path.join(HERE, "emulated_ops.cpp")],
                extra_cflags=list(extra_cflags), build_directory=build, verbose=False)
