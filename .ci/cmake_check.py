"""CI: load the CMake developer build with torch.ops.load_library (in a process that never
imports fusednorm's own extension) and check one op of each family against torch."""
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = torch.ops.fusednorm
x = torch.randn(4, 6, 5, 5)
y, _, _ = ops.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, 1, 0.0, 0.0)
torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)))
y, _, _ = ops.layer_norm_fwd(x, [5, 5], None, None, 1e-5, 0, 0.0, 0.0)
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (5, 5)))
y, _, _ = ops.group_norm_fwd(x, 3, None, None, 1e-5, 0, 0.0, 0.0)
torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 3))
print("cmake build: ops load and match torch")
if len(sys.argv) > 2 and sys.argv[2] == "cuda":
    for op in ("batch_norm_fwd", "batch_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
               "group_norm_fwd", "group_norm_bwd", "instance_norm_fwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusednorm::{op}", "CUDA"), op
    print("cmake build: CUDA kernels registered for every op")
