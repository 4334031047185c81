"""The CUDA backend's ops compiled for the CPU under csrc/cuda/emulation.h
(emulated_ops.cpp), as torch.ops.fusednorm_emu.*; load_emulation() builds (once, cached in
build_dir) and loads them."""
import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _extra_flags():
    """FUSEDNORM_CXXFLAGS (CI's sanitizer run) applies to this build too."""
    return os.environ.get("FUSEDNORM_CXXFLAGS", "").split()


def build_dir():
    extra = _extra_flags()
    name = "emulation" + ("-" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8] if extra else "")
    return os.path.join(ROOT, "build", name)


def load_emulation(build=None):
    from torch.utils.cpp_extension import load
    build = build or build_dir()
    os.makedirs(build, exist_ok=True)
    extra = _extra_flags()
    return load(name="fusednorm_emu", sources=[os.path.join(HERE, "emulated_ops.cpp")],
                extra_cflags=["-O1", "-ffp-contract=off"] + extra,
                extra_ldflags=[f for f in extra if f.startswith("-fsanitize")],
                build_directory=build, verbose=False)
