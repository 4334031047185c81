"""fusednorm: fused normalisation (+ activation) kernels for PyTorch.

Drop-in modules (fusednorm.BatchNorm2d, ...), a functional API (fusednorm.functional) and
the ops underneath (torch.ops.fusednorm.*; torch.ops.fusednorm_triton.* for the Triton
backend, chosen with fusednorm.set_backend / fusednorm.use_backend)."""
from importlib import metadata as _metadata

from . import functional
from ._C import cpu_isa, empty_cpu_cache
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

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("fusednorm")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "SyncBatchNorm", "functional", "ops", "cpu_isa", "empty_cpu_cache", "convert",
    "set_backend", "use_backend", "get_backend",
]
