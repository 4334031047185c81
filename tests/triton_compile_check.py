"""Compiles every Triton kernel variant the ops launch for NVIDIA GPUs (sm_90 and sm_80)
without one, as Triton's runtime would compile it: the signature, the constants and the
divisibility hints come from Triton's own specialisation of the launch's real arguments
(the binder JITFunction.run uses: an int equal to 1 becomes a constant, other ints are typed
i32 or i64 by value, pointers and ints divisible by 16 get hints), not a hand-written
signature. Then Triton's compiler runs ahead of time (ASTSource + GPUTarget, its bundled
ptxas): type errors the interpreter tolerates fail here. Run as a script, without
TRITON_INTERPRET (tests/test_triton.py does). Prints one line per compiled variant."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import fusednorm.triton.ops as tops  # noqa: E402
from fusednorm.triton.checks import NUM_ACTIVATIONS  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
seen = {}


def record(kernel, grid, *args, **meta):
    """Stands in for ops._launch: compiles instead of launching, for each target."""
    meta = dict(meta, **tops.COMPILE_OPTIONS)
    assert all(0 < g < 2 ** 31 for g in grid), (kernel.__name__, grid)  # CUDA's grid limits
    assert len(grid) < 2 or all(g < 65536 for g in grid[1:]), (kernel.__name__, grid)
    for target in TARGETS:
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **meta)
        options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
        key = (target.arch, kernel.__name__, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(map(str, attrs.items()))), options.num_warps)
        if key in seen:
            continue
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        seen[key] = compiled
        consts = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
        print(f"sm_{target.arch}", kernel.__name__, consts, "warps", options.num_warps,
              "shared", compiled.metadata.shared, flush=True)


def edge_sizes(ops):
    """Real calls at the sizes where the runtime's specialisation changes: 1-element rows, a
    batch of one, one channel, spatial size one; every dtype, NCHW and channels_last, with
    and without parameters, running statistics and an activation."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        for shape in ((1, 1, 1, 1), (1, 3, 1, 1), (2, 1, 1, 3), (1, 1, 2, 2), (3, 2, 1, 1), (2, 2)):
            c = shape[1]
            x = torch.randn(shape).to(dtype)
            layouts = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
            for xi in layouts:
                # float32 every combination; the other dtypes (their own pointer types, the
                # same integer specialisation) with parameters and an activation.
                for affine in (True, False) if dtype == torch.float32 else (True,):
                    w = torch.ones(c, dtype=pd) if affine else None
                    b = torch.zeros(c, dtype=pd) if affine else None
                    rm, rv = torch.zeros(c, dtype=pd), torch.ones(c, dtype=pd)
                    for act in (0, 2) if dtype == torch.float32 else (2,):
                        for training in (True, False):
                            ops.batch_norm_fwd(xi, w, b, rm, rv, training, 0.1, 1e-5, act, 0.2, 0.0)
                            ops.batch_norm_bwd(xi, xi, w, b, rm, rv, training, act, 0.2, 0.0, [True, affine, affine])
                        ops.batch_norm_stats(xi)
                        ops.instance_norm_fwd(xi, w, b, rm, rv, 0.1, 1e-5, act, 0.2, 0.0)
                        ops.instance_norm_fwd(xi, w, b, None, None, 0.1, 1e-5, act, 0.2, 0.0)
                        n = xi.shape[0]
                        st = torch.zeros(n, c, dtype=pd)
                        ops.group_norm_bwd(xi, xi, c, st, st + 1, w, b, act, 0.2, 0.0, [True, affine, affine])
                        ops.group_norm_fwd(xi, 1, w, b, 1e-5, act, 0.2, 0.0)
                        last = list(xi.shape[-1:])
                        lw = torch.ones(last, dtype=pd) if affine else None
                        lb = torch.zeros(last, dtype=pd) if affine else None
                        rows = xi.numel() // last[0]
                        ops.layer_norm_fwd(xi, last, lw, lb, 1e-5, act, 0.2, 0.0)
                        ops.layer_norm_bwd(xi, xi, last, torch.zeros(rows, dtype=pd), torch.ones(rows, dtype=pd),
                                           lw, lb, act, 0.2, 0.0, [True, affine, affine])
                        add_norms(ops, xi.contiguous(), last, lw, lb, act, pd)


def beyond_int32(ops):
    """The row kernels with 2^31 or more rows, or a row of 2^31 or more elements: the
    runtime types those ints i64, the grid is capped below CUDA's 2^31 - 1 programs and the
    rows are walked grid-stride. No such tensors here: small ones stand in for the pointers
    (the binder reads only their dtype and alignment) in the argument order of
    ops._rows_fwd / _rows_bwd."""
    import triton.language as tl

    from fusednorm.triton import row_kernels as rk
    for rows, length in ((2 ** 31 + 7, 8), (2, 2 ** 31 + 3)):
        for dtype, acc, pd in ((torch.float32, tl.float32, torch.float32), (torch.bfloat16, tl.float32, torch.float32),
                               (torch.float64, tl.float64, torch.float64)):
            x, st = torch.zeros(16, dtype=dtype), torch.zeros(16, dtype=pd)
            block, warps, one_block = tops._row_config(length)
            meta = dict(ACT=2, HAS_W=True, HAS_B=True, RMS=False, HAS_RES=True, ACC=acc, BLOCK=block,
                        ONE_BLOCK=one_block, num_warps=warps)
            scalars = tops._scalars(x, pd, eps=1e-5, act=(0.2, 0.0))
            tops._launch(rk.row_fwd_kernel, tops._row_grid(rows), x, x, x, x, st, st, st, st, st, rows, length, 1,
                         length, 1, scalars, STORE_M2=False, **meta)
            tops._launch(rk.row_bwd_kernel, tops._row_grid(rows), x, x, x, x, st, st, st, st, rows, length, 1,
                         length, 1, scalars, **meta)


def add_norms(ops, x, last, w, b, act, pd):
    """RMSNorm and the residual add (add_norm_fwd/bwd): with and without a residual, each
    residual dtype and residual_in_fp32."""
    rows = x.numel() // last[0]
    for rms in (False, True):
        bias = None if rms else b
        residuals = [(None, False), (x, False), (x, True)]
        if x.dtype in (torch.bfloat16, torch.float16):
            residuals.append((x.float(), True))
        for r, fp32 in residuals:
            y, s, mean, rstd = ops.add_norm_fwd(x, r, last, w, bias, 1e-5, rms, fp32, act, 0.2, 0.0)
            normalised = s if r is not None else x
            wn = w if w is None or normalised.dtype != torch.float32 or w.dtype != torch.float64 else w.float()
            bn = bias if bias is None or normalised.dtype != torch.float32 or bias.dtype != torch.float64 else bias.float()
            ops.add_norm_bwd(y.to(x.dtype), None if r is None else normalised, normalised, last,
                             torch.zeros(rows, dtype=mean.dtype), torch.ones(rows, dtype=rstd.dtype), wn, bn, rms,
                             act, 0.2, 0.0, [True, w is not None, bias is not None])


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
                    ops.batch_norm_fwd(xi, w, b, rm, rv, training, 0.1, 1e-5, act, 0.2, 0.0)
                    ops.batch_norm_fwd(xi, w, b, rm, rv, training, 0.1, 1e-5, act, 0.2, 0.0, xi)  # residual
                    ops.batch_norm_bwd(xi, xi, w, b, rm, rv, training, act, 0.2, 0.0, [True, True, True])
            ops.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, act, 0.2, 0.0)
            ops.batch_norm_bwd(x, x, None, None, rm, rv, True, act, 0.2, 0.0, [True, False, False])
            ops.batch_norm_stats(x)
            lw, lb = torch.ones(3, 3, dtype=pd), torch.zeros(3, 3, dtype=pd)
            ops.layer_norm_fwd(x, [3, 3], lw, lb, 1e-5, act, 0.2, 0.0)
            ops.layer_norm_bwd(x, x, [3, 3], torch.zeros(8, dtype=pd), torch.ones(8, dtype=pd), lw, lb, act, 0.2, 0.0, [True, True, True])
            ops.group_norm_fwd(x, 2, w, b, 1e-5, act, 0.2, 0.0)
            ops.group_norm_bwd(x, x, 2, torch.zeros(2, 2, dtype=pd), torch.ones(2, 2, dtype=pd), w, b, act, 0.2, 0.0, [True, True, True])
            ops.instance_norm_fwd(x, w, b, rm, rv, 0.1, 1e-5, act, 0.2, 0.0)
    # Every other activation (its maths is all in the kernels that apply or differentiate
    # it), in float32, and in float64 those whose float64 maths differs (expm1's series).
    for act in range(3, NUM_ACTIVATIONS):
        for dtype in (torch.float32,) + ((torch.float64,) if act in (5, 6, 7, 8, 13) else ()):
            x = torch.randn(2, 4, 3, 3, dtype=dtype)
            w, b = torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype)
            st, lw = torch.ones(4, dtype=dtype), torch.ones(3, 3, dtype=dtype)
            ops.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5, act, 0.5, 2.0)
            ops.batch_norm_bwd(x, x, w, b, st, st, True, act, 0.5, 2.0, [True, True, True])
            ops.layer_norm_fwd(x, [3, 3], lw, lw, 1e-5, act, 0.5, 2.0)
            ops.layer_norm_bwd(x, x, [3, 3], torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype), lw, lw, act,
                               0.5, 2.0, [True, True, True])
    big = torch.randn(2, 5000)  # a row longer than one block: the largest BLOCK, more warps
    ops.layer_norm_fwd(big, [5000], None, None, 1e-5, 0, 0.0, 0.0)
    ops.layer_norm_bwd(big, big, [5000], torch.zeros(2), torch.ones(2), None, None, 0, 0.0, 0.0, [True, False, False])
    edge_sizes(ops)
    beyond_int32(ops)
    print(f"compiled {len(seen)} kernel variants for sm_90 and sm_80")
    names = {k[1] for k in seen}
    expected = {"channel_moments_kernel", "channel_finish_kernel", "channel_apply_kernel",
                "channel_grad_sums_kernel", "channel_input_grad_kernel", "row_fwd_kernel",
                "row_bwd_kernel", "instance_running_kernel"}
    assert names == expected, names ^ expected


if __name__ == "__main__":
    sys.exit(main())
