"""Which kernels run an op: the compiled C++/CUDA ops (torch.ops.fusednorm) or the Triton
ones (torch.ops.fusednorm_triton). The autograd wrappers ask ops_for(input) and use the
namespace it returns for both forward and backward.

    fusednorm.set_backend("triton")          # "auto" (default), "cpu", "cuda", "triton"
    with fusednorm.use_backend("triton"):    # the same, for a block
        y = model(x)

"auto": the C++ kernels on CPU tensors, the CUDA kernels on GPU tensors (Triton when the
extension was built without CUDA). "cpu"/"cuda": the compiled kernels, for tensors on that
device. "triton": the Triton kernels, on CUDA tensors, or on CPU tensors when Triton's
interpreter is on (TRITON_INTERPRET=1 set before Triton is imported)."""
import contextlib

import torch

from . import _C
from ._ops import ops as compiled_ops

BACKENDS = ("auto", "cpu", "cuda", "triton")
_current = "auto"


def get_backend():
    return _current


def set_backend(name):
    """Selects the backend for every later call (see the module docstring)."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown fusednorm backend {name!r}: expected one of {BACKENDS}")
    if name == "triton":
        triton_ops()  # fail here, not at the first call, when Triton cannot be imported
    _current = name


@contextlib.contextmanager
def use_backend(name):
    """set_backend(name) for the duration of a with-block, then the previous backend again."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_ops():
    """torch.ops.fusednorm_triton, importing (and so registering) the Triton backend."""
    try:
        from . import triton as _  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"fusednorm's Triton backend needs the triton package, which failed to "
                           f"import: {e}") from e
    return torch.ops.fusednorm_triton


def _triton_for(x):
    ops = triton_ops()
    from .triton import kernels_interpreted
    if x.device.type == "cpu" and not kernels_interpreted():
        raise RuntimeError("fusednorm's Triton backend got a CPU tensor: Triton kernels run on CUDA "
                           "tensors, or on CPU tensors under Triton's interpreter (set "
                           "TRITON_INTERPRET=1 before triton is first imported)")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fusednorm's Triton backend runs on CUDA tensors, not {x.device.type}")
    return ops


def ops_for(x):
    """The op namespace that runs an op on input x under the current backend."""
    name = _current
    if name == "triton":
        return _triton_for(x)
    if name == "auto":
        # x.is_cuda, not x.device.type: it runs on every call and costs 0.1 µs, not 0.6.
        if x.is_cuda and not _C.with_cuda:
            return _triton_for(x)
        return compiled_ops
    if x.device.type != name:
        raise RuntimeError(f"fusednorm backend {name!r} was selected but the input is on "
                           f"{x.device.type}")
    if name == "cuda" and not _C.with_cuda:
        raise RuntimeError("fusednorm backend 'cuda' was selected but this fusednorm was built "
                           "without its CUDA kernels")
    return compiled_ops
