"""fusednorm's Triton backend: kernels (channel_kernels.py, row_kernels.py, sharing math.py)
behind the ops torch.ops.fusednorm_triton.* (ops.py). Importing this package registers the
ops; fusednorm.backend imports it on first use of the "triton" backend."""
from . import ops  # noqa: F401  (registers torch.ops.fusednorm_triton.*)
from .ops import kernels_interpreted, launches, limits

__all__ = ["kernels_interpreted", "launches", "limits"]
