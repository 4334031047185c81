"""Compiles every Triton kernel variant the ops launch for an NVIDIA GPU (sm_90) without
one: Triton's compiler runs ahead of time (ASTSource + GPUTarget, its bundled ptxas), so
type errors that the interpreter tolerates fail here. Run as a script, without
TRITON_INTERPRET (tests/test_triton.py does). Prints one line per compiled variant."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fusednorm.triton.ops as tops  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
seen = {}


def _type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64"
    raise TypeError(f"unexpected kernel argument {v!r}")


def record(kernel, grid, *args, **meta):
    """Stands in for ops._launch: compiles instead of launching."""
    num_warps = meta.pop("num_warps", 4)
    runtime = [p for p in kernel.params if not p.is_constexpr]
    assert len(runtime) == len(args), (kernel.__name__, len(runtime), len(args))
    signature = {p.name: _type(a) for p, a in zip(runtime, args)}
    signature.update({p.name: "constexpr" for p in kernel.params if p.is_constexpr})
    key = (kernel.__name__, tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in meta.items())), num_warps)
    if key in seen:
        return
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=meta),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **tops.COMPILE_OPTIONS})
    seen[key] = compiled
    print(kernel.__name__, {k: v for k, v in meta.items()}, "warps", num_warps,
          "shared", compiled.metadata.shared, flush=True)


def main():
    tops._launch = record
    ops = torch.ops.fusednorm_triton
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        for act in (0, 1, 2):
            c = 4
            w, b = torch.ones(c, dtype=pd), torch.zeros(c, dtype=pd)
            rm, rv = torch.zeros(c, dtype=pd), torch.ones(c, dtype=pd)
            x = torch.randn(2, c, 3, 3).to(dtype)
            for xi in (x, x.to(memory_format=torch.channels_last)):
                for training in (True, False):
                    ops.batch_norm_fwd(xi, w, b, rm, rv, training, 0.1, 1e-5, act, 0.2)
                    ops.batch_norm_bwd(xi, xi, w, b, rm, rv, training, act, 0.2, [True, True, True])
            ops.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, act, 0.2)
            ops.batch_norm_bwd(x, x, None, None, rm, rv, True, act, 0.2, [True, False, False])
            ops.batch_norm_stats(x)
            lw, lb = torch.ones(3, 3, dtype=pd), torch.zeros(3, 3, dtype=pd)
            ops.layer_norm_fwd(x, [3, 3], lw, lb, 1e-5, act, 0.2)
            ops.layer_norm_bwd(x, x, [3, 3], torch.zeros(8, dtype=pd), torch.ones(8, dtype=pd), lw, lb, act, 0.2, [True, True, True])
            ops.group_norm_fwd(x, 2, w, b, 1e-5, act, 0.2)
            ops.group_norm_bwd(x, x, 2, torch.zeros(2, 2, dtype=pd), torch.ones(2, 2, dtype=pd), w, b, act, 0.2, [True, True, True])
            ops.instance_norm_fwd(x, w, b, rm, rv, 0.1, 1e-5, act, 0.2)
    big = torch.randn(2, 5000)  # a row longer than one block: the largest BLOCK, more warps
    ops.layer_norm_fwd(big, [5000], None, None, 1e-5, 0, 0.0)
    ops.layer_norm_bwd(big, big, [5000], torch.zeros(2), torch.ones(2), None, None, 0, 0.0, [True, False, False])
    print(f"compiled {len(seen)} kernel variants for sm_90")
    names = {k[0] for k in seen}
    expected = {"channel_moments_kernel", "channel_finish_kernel", "channel_apply_kernel",
                "channel_grad_sums_kernel", "channel_input_grad_kernel", "row_fwd_kernel",
                "row_bwd_kernel", "instance_running_kernel"}
    assert names == expected, names ^ expected


if __name__ == "__main__":
    sys.exit(main())
