"""fusednorm: fused normalisation (+ activation) kernels for PyTorch.

Drop-in modules (fusednorm.BatchNorm2d, ...), a functional API (fusednorm.functional) and
the ops underneath (torch.ops.fusednorm.*; torch.ops.fusednorm_triton.* for the Triton
backend, chosen with fusednorm.set_backend / fusednorm.use_backend)."""
from importlib import metadata as _metadata

from . import _C, functional
from ._C import cpu_cache_info, cpu_isa, empty_cpu_cache
from ._ops import ops
from .backend import get_backend, set_backend, use_backend
from .convert import convert
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from .sync_batchnorm import SyncBatchNorm


def set_cpu_cache(megabytes):
    """Turns the CPU output cache on, holding at most `megabytes` MiB of freed output blocks
    (2 MiB and larger) for reuse by later outputs of the same size, or off with 0 (the
    default; also FUSEDNORM_CPU_CACHE_MB at import). A training loop that repeats its
    shapes then writes warm memory instead of page-faulting fresh memory: a gain only where
    the allocator returns large blocks to the system (glibc's default for big tensors).
    Turning it down frees what no longer fits. cpu_cache_info() reports its state."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"set_cpu_cache takes a non-negative number of MiB, got {megabytes!r}")
    _C.set_cpu_cache_limit(megabytes << 20)


try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("fusednorm")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "SyncBatchNorm", "functional", "ops", "cpu_isa", "empty_cpu_cache",
    "set_cpu_cache", "cpu_cache_info", "convert",
    "set_backend", "use_backend", "get_backend",
]
