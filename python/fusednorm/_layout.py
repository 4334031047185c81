"""The memory format of a norm's output: what torch.nn gives for the same input, so a module
swap changes no strides downstream. The same rules as csrc/common/layout.h (the C++ and
CUDA ops); the Triton ops and the fake kernels use these.

- BatchNorm: contiguous input -> contiguous; dense channels_last -> channels_last; anything
  else follows suggest_memory_format (ATen's batch_norm); an empty input keeps its strides
  (preserve_format: torch clones it).
- GroupNorm, RMSNorm: suggest_memory_format (ATen's group_norm; rms_norm's). For a
  channels_last-dense input whose size-1 dimensions make its strides ambiguous, that can be
  contiguous. (The RMSNorm kernels write rows contiguously; functional.rms_norm restrides.)
- InstanceNorm, LayerNorm: always contiguous."""
import torch
from torch._prims_common import suggest_memory_format


def _channels_last_of_rank(x):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def batch_norm_format(x):
    if x.numel() == 0:  # torch clones an empty input: its strides are kept
        return torch.preserve_format
    if x.is_contiguous():
        return torch.contiguous_format
    fmt = _channels_last_of_rank(x)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return fmt
    return suggest_memory_format(x)


def group_norm_format(x):
    return suggest_memory_format(x)


rms_norm_format = group_norm_format
