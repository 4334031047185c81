"""The CUDA kernels' logic, run on the CPU: csrc/cuda (bindings, launch code, kernels)
compiled for the host under csrc/cuda/emulation.h and registered as
torch.ops.fusednorm_emu.*, compared with torch.nn on shapes small enough for the emulator
but chosen (with lowered limits) to reach every row tier, both BatchNorm layouts, the
vectorised and scalar elementwise paths, and the multi-block (grid-level) reductions."""

import os

import cubin
import pytest
import torch
import torch.nn.functional as F

from emulation import load_emulation
from fusednorm.bandwidth import PASS_MODEL
from helpers import (
    ALL_ACTIVATIONS,
    SLOPE,
    activate,
    activation_id,
    add_norm_reference,
    assert_close,
    assert_same_where_finite,
)

# The emulation build takes a minute or two: the slow tier (the fuzz suite's default run
# covers no emulation either; CI runs every tier).
pytestmark = pytest.mark.slow

ACTS = {0: None, 1: "relu", 2: "leaky_relu"}


@pytest.fixture(scope="module")
def emu():
    mod = load_emulation()
    mod.set_emulation(3, int(os.environ.get("FUSEDNORM_EMU_SEED", "0")))  # 3 blocks at once, shuffled
    mod.reset_coverage()
    yield mod
    mod.set_limits(32, 48 * 1024, 16384, 1024, 65535, 256)


def limits(emu, warp_cols=16, smem=48 * 1024, per_split=16384, max_splits=1024, max_blocks=65535, threads=64):
    emu.set_limits(warp_cols, smem, per_split, max_splits, max_blocks, threads)


def ops():
    return torch.ops.fusednorm_emu


def tol_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def reference_grads(fn, x, params, g):
    """Output and gradients of fn (a torch.nn.functional composition) in float64."""
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    y = fn(x64, *p64)
    grads = torch.autograd.grad(y, [x64] + [p for p in p64 if p is not None], g.double())
    return y, grads


# ---- BatchNorm -----------------------------------------------------------------------------

BN_CASES = [
    # shape, layout, description
    ((3, 4, 5, 5), "nchw", "scalar path (S=25 not a multiple of the pack)"),
    ((3, 4, 4, 8), "nchw", "vectorised path"),
    ((4, 5, 3, 3), "nhwc", "NHWC, C=5 columns in one 32-column group"),
    ((2, 40, 3, 2), "nhwc", "NHWC, two column groups"),
    ((6, 3), "nchw", "2-D input (S = 1, read as NHWC)"),
]


def check_batch_norm_train(x, act):
    """BatchNorm training forward (output, running statistics) and backward of x against
    torch.nn in float64; returns the output."""
    dtype, C = x.dtype, x.shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = data((C,), pdt, 1) + 1, data((C,), pdt, 2)
    rm, rv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
    y, mean, rstd = ops().batch_norm_fwd(x, w, b, rm, rv, True, 0.1, 1e-5, act, SLOPE, 0.0)
    ref = lambda x, w, b: activate(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5), ACTS[act])
    g = data(x.shape, dtype, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    assert_close(y, yr.to(tol_dtype(dtype)) if dtype != torch.float64 else yr, dtype, "output")
    xr64 = x.double()
    rm_ref = 0.9 * 0 + 0.1 * xr64.transpose(0, 1).reshape(C, -1).mean(1)
    rv_ref = 0.9 * 1 + 0.1 * xr64.transpose(0, 1).reshape(C, -1).var(1, unbiased=True)
    assert_close(rm, rm_ref.to(pdt), torch.float32, "running_mean")
    assert_close(rv, rv_ref.to(pdt), torch.float32, "running_var")
    dx, dw, db = ops().batch_norm_bwd(g, x, w, b, mean, rstd, True, act, SLOPE, 0.0, [True, True, True])
    assert_close(dx, dxr.to(dx.dtype) if dtype == torch.float64 else dxr.float(), dtype, "dx")
    assert_close(dw, dwr.to(pdt), pdt, "dweight")
    assert_close(db, dbr.to(pdt), pdt, "dbias")
    return y


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("shape,layout,what", BN_CASES, ids=[c[2] for c in BN_CASES])
@pytest.mark.parametrize("splits", ["one-block", "grid-reduction"])
def test_batch_norm_train(emu, shape, layout, what, dtype, act, splits):
    limits(emu, per_split=16384 if splits == "one-block" else 2)
    N, C = shape[0], shape[1]
    S = 1
    for d in shape[2:]:
        S *= d
    if splits == "grid-reduction":
        assert emu.splits(layout == "nhwc" or S == 1, N, C, S) > 1
    x = data(shape, dtype)
    if layout == "nhwc" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    y = check_batch_norm_train(x, act)
    if x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_norm_eval(emu, act, layout):
    limits(emu, per_split=5)
    x = data((3, 4, 4, 4), torch.float32)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w, b = data((4,), torch.float32, 1) + 1, data((4,), torch.float32, 2)
    rm, rv = data((4,), torch.float32, 4), data((4,), torch.float32, 5).abs() + 0.5
    y, mean, rstd = ops().batch_norm_fwd(x, w, b, rm, rv, False, 0.1, 1e-5, act, SLOPE, 0.0)
    g = data(x.shape, torch.float32, 3)
    ref = lambda x, w, b: activate(F.batch_norm(x, rm.double(), rv.double(), w, b, False, 0.1, 1e-5), ACTS[act])
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    assert_close(y, yr.float(), torch.float32, "output")
    dx, dw, db = ops().batch_norm_bwd(g, x, w, b, mean, rstd, False, act, SLOPE, 0.0, [True, True, True])
    for a, e, what in ((dx, dxr, "dx"), (dw, dwr, "dweight"), (db, dbr, "dbias")):
        assert_close(a, e.float(), torch.float32, what)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("shape", [(3, 4, 4, 4), (3, 4, 5, 5), (12, 4)], ids=["vectorised", "scalar", "2d"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_batch_norm_residual_forward(emu, dtype, layout, shape, act):
    """act(bn(x) + z): the apply kernel's residual in both layouts, packed and scalar."""
    limits(emu, per_split=5)
    x, z = data(shape, dtype), data(shape, dtype, 6)
    if layout == "nhwc" and x.dim() == 4:
        x, z = x.to(memory_format=torch.channels_last), z.contiguous()  # z in another layout than x
    w, b = data((4,), torch.float32, 1) + 1, data((4,), torch.float32, 2)
    y, mean, rstd = ops().batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5, act, SLOPE, 0.0, z)
    yr = activate(F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5) + z.double(),
                  ACTS[act])
    assert_close(y, yr if dtype == torch.float64 else yr.float(), dtype, "output")


# ---- row norms ------------------------------------------------------------------------------

# (L, limits) -> the tier it must select (checked through emu.row_tier).
LN_TIERS = [
    (40, {}, "warp4"),
    (300, {}, "warp16"),
    (704, {"warp_cols": 32}, "warp32"),  # (float statistics; float64 rows take the block tier)
    (700, {}, "block"),
    (700, {"smem": 1024}, "long"),
    (300, {"warp_cols": 4, "smem": 1024}, "long"),
]


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("L,lim,tier", LN_TIERS, ids=[f"L={c[0]}-{c[2]}" for c in LN_TIERS])
def test_layer_norm_tiers(emu, L, lim, tier, dtype, act):
    limits(emu, per_split=50, max_blocks=3, **lim)
    assert emu.row_tier(L, False, dtype == torch.float64) == tier or tier.startswith("warp")
    R = 6
    x = data((2, 3, L), dtype)
    w, b = data((L,), torch.float32, 1) + 1, data((L,), torch.float32, 2)
    if dtype == torch.float64:
        w, b = w.double(), b.double()
    y, mean, rstd = ops().layer_norm_fwd(x, [L], w, b, 1e-5, act, SLOPE, 0.0)
    ref = lambda x, w, b: activate(F.layer_norm(x, (L,), w, b, 1e-5), ACTS[act])
    g = data(x.shape, dtype, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    td = tol_dtype(dtype)
    assert_close(y, yr.to(td), dtype, "output")
    assert mean.shape == (R,) and rstd.shape == (R,)
    dx, dw, db = ops().layer_norm_bwd(g, x, [L], mean, rstd, w, b, act, SLOPE, 0.0, [True, True, True])
    assert_close(dx, dxr.to(td), dtype, "dx")
    assert_close(dw, dwr.to(w.dtype), w.dtype, "dweight")
    assert_close(db, dbr.to(w.dtype), w.dtype, "dbias")


# (residual dtype, residual_in_fp32) beside a bfloat16 input: fused into the row kernels
# (same dtype), or summed by ATen first (the other combinations).
RESIDUALS = [(None, False), ("same", False), ("same", True), (torch.float32, False)]


@pytest.mark.parametrize("residual,residual_in_fp32", RESIDUALS, ids=["none", "fused", "fp32-sum", "fp32-residual"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("L,lim,tier", LN_TIERS, ids=[f"L={c[0]}-{c[2]}" for c in LN_TIERS])
def test_add_norm_tiers(emu, L, lim, tier, dtype, rms, residual, residual_in_fp32):
    """add_norm_fwd/bwd (RMSNorm, the residual add) in every row tier against torch.nn's
    composition: the sum bit for bit, the output and every gradient within tolerance."""
    limits(emu, per_split=50, max_blocks=3, **lim)
    x = data((2, 3, L), dtype)
    r = None if residual is None else data((2, 3, L), dtype if residual == "same" else residual, 4)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = data((L,), param, 1) + 1, None if rms else data((L,), param, 2)
    sum_dtype = torch.float32 if residual_in_fp32 else dtype
    dy, ds = data(x.shape, dtype, 3), data(x.shape, sum_dtype, 5) if r is not None else None
    y, s, mean, rstd = ops().add_norm_fwd(x, r, [L], w, b, 1e-5, rms, residual_in_fp32, 3, 0.0, 0.0)  # SiLU
    ref = add_norm_reference(x, r, (L,), w, b, rms, residual_in_fp32, "silu", 1e-5, dy, ds)
    yr, sr, dxr, _, dwr, dbr = ref
    normalised = s if r is not None else x
    if r is not None:
        assert torch.equal(s, sr), "sum"
    # computed in the sum's precision, stored in the input's dtype
    coarser = dtype if torch.finfo(dtype).eps >= torch.finfo(normalised.dtype).eps else normalised.dtype
    assert_close(y, yr, coarser, "output")
    # (the backward op takes parameters in the normalised tensor's dtype: autograd_add._param_in)
    wb = [p if p is None or normalised.dtype != torch.float32 else p.float() for p in (w, b)]
    dx, dw, db = ops().add_norm_bwd(dy, ds, normalised, [L], mean, rstd, *wb, rms, 3, 0.0, 0.0, [True, True, True])
    assert_close(dx, dxr, normalised.dtype, "dx")
    assert_close(dw, dwr, normalised.dtype, "dweight")
    if not rms:
        assert_close(db, dbr, normalised.dtype, "dbias")


GN_CASES = [
    # (N, C, spatial, groups, limits)
    (2, 4, (3, 3), 2, {}),                       # rows of 18: warp4
    (2, 6, (7, 7), 3, {}),                       # rows of 98: warp4
    (3, 4, (10, 10), 2, {}),                     # rows of 200: warp16
    (2, 4, (10, 10), 1, {"warp_cols": 4}),       # rows of 400: block
    (2, 4, (10, 10), 2, {"warp_cols": 4, "smem": 256}),  # long
]


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("case", GN_CASES, ids=[f"C{c[1]}-G{c[3]}-{c[2][0]}x{c[2][1]}-{c[4]}" for c in GN_CASES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm(emu, case, act, layout):
    N, C, sp, G, lim = case
    limits(emu, per_split=20, max_blocks=3, **lim)
    x = data((N, C) + sp, torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = data((C,), torch.float32, 1) + 1, data((C,), torch.float32, 2)
    y, mean, rstd = ops().group_norm_fwd(x, G, w, b, 1e-5, act, SLOPE, 0.0)
    ref = lambda x, w, b: activate(F.group_norm(x, G, w, b, 1e-5), ACTS[act])
    g = data(x.shape, torch.float32, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    assert_close(y, yr.float(), torch.float32, "output")
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    dx, dw, db = ops().group_norm_bwd(g, x, G, mean, rstd, w, b, act, SLOPE, 0.0, [True, True, True])
    for a, e, what in ((dx, dxr, "dx"), (dw, dwr, "dweight"), (db, dbr, "dbias")):
        assert_close(a, e.float(), torch.float32, what)


@pytest.mark.parametrize("act", [0, 1, 2])
def test_instance_norm_with_running_stats(emu, act):
    limits(emu, per_split=10)
    x = data((3, 4, 5, 6), torch.float32)
    w, b = data((4,), torch.float32, 1) + 1, data((4,), torch.float32, 2)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, rstd = ops().instance_norm_fwd(x, w, b, rm, rv, 0.1, 1e-5, act, SLOPE, 0.0)
    F.instance_norm(x, rm_ref, rv_ref, None, None, True, 0.1, 1e-5)
    ref = lambda x, w, b: activate(F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5), ACTS[act])
    g = data(x.shape, torch.float32, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    assert_close(y, yr.float(), torch.float32, "output")
    assert_close(rm, rm_ref, torch.float32, "running_mean")
    assert_close(rv, rv_ref, torch.float32, "running_var")
    dx, dw, db = ops().group_norm_bwd(g, x, 4, mean, rstd, w, b, act, SLOPE, 0.0, [True, True, True])
    for a, e, what in ((dx, dxr, "dx"), (dw, dwr, "dweight"), (db, dbr, "dbias")):
        assert_close(a, e.float(), torch.float32, what)


SPLIT_CASES = [  # (N, C, spatial, groups): rows fewer than the SMs, split over blocks
    (2, 6, (4, 8), 3),   # GroupNorm, planes of 32 (vectorised in every dtype)
    (3, 4, (5, 5), 4),   # InstanceNorm (G = C), planes of 25 (scalar)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=["groupnorm", "instancenorm"])
def test_group_norm_rows_split_over_blocks(emu, case, act, dtype):
    """GroupNorm/InstanceNorm with fewer rows than SMs and long rows (bindings.h's
    split_rows): statistics by a multi-split reduction over the rows, gradient sums over
    the planes, BatchNorm's elementwise kernels with per-plane coefficients. The launches
    are those (no row kernel), the results torch.nn's; InstanceNorm's running statistics
    too."""
    N, C, sp, G = case
    limits(emu, per_split=8)
    emu.set_split_plane_min(8)
    try:
        x = data((N, C) + sp, dtype)
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = data((C,), pdt, 1) + 1, data((C,), pdt, 2)
        g = data(x.shape, dtype, 3)
        emu.set_dry_run(True)
        try:
            y, mean, rstd = ops().group_norm_fwd(x, G, w, b, 1e-5, act, SLOPE, 0.0)
            ops().group_norm_bwd(g, x, G, mean, rstd, w, b, act, SLOPE, 0.0, [True, True, True])
        finally:
            emu.set_dry_run(False)
        launches = emu.take_launches()
        kernels = [k for k, *_ in launches]
        assert not any(k.startswith("row_") for k in kernels), kernels
        assert "plane_coefficients_kernel<A>" in kernels, kernels
        assert any(k.startswith("channel_reduce_nchw") and splits > 1 for k, _, splits, *_ in launches), launches
        y, mean, rstd = ops().group_norm_fwd(x, G, w, b, 1e-5, act, SLOPE, 0.0)
        ref = lambda x, w, b: activate(F.group_norm(x, G, w, b, 1e-5), ACTS[act])
        yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
        td = tol_dtype(dtype)
        assert_close(y, yr.to(td), dtype, "output")
        dx, dw, db = ops().group_norm_bwd(g, x, G, mean, rstd, w, b, act, SLOPE, 0.0, [True, True, True])
        assert_close(dx, dxr.to(td), dtype, "dx")
        assert_close(dw, dwr.to(pdt), pdt, "dweight")
        assert_close(db, dbr.to(pdt), pdt, "dbias")
        if G == C:
            rm, rv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
            rm_ref, rv_ref = rm.clone(), rv.clone()
            ops().instance_norm_fwd(x, w, b, rm, rv, 0.1, 1e-5, act, SLOPE, 0.0)
            F.instance_norm(x.to(pdt), rm_ref, rv_ref, None, None, True, 0.1, 1e-5)
            assert_close(rm, rm_ref, pdt, "running_mean")
            assert_close(rv, rv_ref, pdt, "running_var")
    finally:
        emu.set_split_plane_min(1024)


EVERY_KERNEL = {  # kernel family -> (float32 input shape, emulator limits that reach it)
    "batch_norm NCHW": ((3, 4, 4, 8), {"per_split": 2}),
    "batch_norm NHWC": ((4, 5, 3, 3), {"per_split": 2}),
    "layer_norm warp": ((2, 3, 40), {}),
    "layer_norm block": ((2, 3, 700), {}),
    "group_norm": ((2, 6, 7, 7), {"per_split": 20}),
}


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS, ids=activation_id)
@pytest.mark.parametrize("kernel", list(EVERY_KERNEL))
def test_every_activation_in_every_kernel_family(emu, kernel, activation):
    """Each activation (its code and parameters, a runtime argument of the CUDA kernels)
    through the elementwise, channel-reduction and row kernels, forward and backward."""
    from fusednorm._activation import resolve
    shape, lim = EVERY_KERNEL[kernel]
    limits(emu, **lim)
    act = resolve(activation, SLOPE)
    x = data(shape, torch.float32)
    C = shape[-1] if kernel.startswith("layer") else shape[1]
    w, b = data((C,), torch.float32, 1) + 1, data((C,), torch.float32, 2)
    if kernel.startswith("batch"):
        if "NHWC" in kernel:
            x = x.to(memory_format=torch.channels_last)
        y, mean, rstd = ops().batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5, *act)
        backward = lambda g: ops().batch_norm_bwd(g, x, w, b, mean, rstd, True, *act, [True] * 3)
        norm = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    elif kernel.startswith("layer"):
        y, mean, rstd = ops().layer_norm_fwd(x, [C], w, b, 1e-5, *act)
        backward = lambda g: ops().layer_norm_bwd(g, x, [C], mean, rstd, w, b, *act, [True] * 3)
        norm = lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-5)
    else:
        y, mean, rstd = ops().group_norm_fwd(x, 3, w, b, 1e-5, *act)
        backward = lambda g: ops().group_norm_bwd(g, x, 3, mean, rstd, w, b, *act, [True] * 3)
        norm = lambda x, w, b: F.group_norm(x, 3, w, b, 1e-5)
    g = data(x.shape, torch.float32, 3)
    yr, grads_ref = reference_grads(lambda x, w, b: activate(norm(x, w, b), activation, SLOPE), x, [w, b], g)
    assert_close(y, yr.float(), torch.float32, "output")
    for a, e, what in zip(backward(g), grads_ref, ("dx", "dweight", "dbias")):
        assert_close(a, e.float(), torch.float32, what)


def test_shared_statistics_maths_agree_with_cpu_backend(emu):
    """The same inputs through the CPU kernels and the emulated CUDA kernels."""
    limits(emu, per_split=9)
    x = data((4, 3, 6, 5), torch.float32)
    cpu = torch.ops.fusednorm.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, 1, 0.0, 0.0)
    gpu = ops().batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, 1, 0.0, 0.0)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_norm_stats(emu, layout):
    """SyncBatchNorm's local statistics: mean and M2 per channel, multi-block reduction."""
    limits(emu, per_split=3)
    x = data((5, 3, 4, 3), torch.float32)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    mean, m2 = ops().batch_norm_stats(x)
    flat = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2.double(), flat.var(1, unbiased=False) * flat.shape[1], rtol=1e-5, atol=1e-5)


EMU_INF_CASES = ["bn-nchw", "bn-nhwc", "bn-eval", "ln", "gn-contiguous", "gn-channels_last"]


@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("case", EMU_INF_CASES)
def test_inf_and_nan_gradients_through_the_activation(emu, case, act):
    """An inf or NaN upstream gradient where the pre-activation is negative, in every CUDA
    backward kernel (grid reduction, elementwise dx, row kernels): relu gives 0 there as
    torch does (a select, not dy * 0 = NaN), leaky_relu scales it by the slope (the
    channel's gradients are then non-finite: compared where finite, as in test_edge_cases)."""
    limits(emu, per_split=5, max_blocks=3)
    x = data((3, 4, 5, 5), torch.float32)
    if case.endswith(("nhwc", "channels_last")):
        x = x.to(memory_format=torch.channels_last)
    C = x.shape[1]
    w, b = data((C,), torch.float32, 1) + 1, data((C,), torch.float32, 2)
    rm, rv = data((C,), torch.float32, 4), data((C,), torch.float32, 5).abs() + 0.5
    kind = case.split("-")[0]
    if kind == "ln":
        w, b = data((5, 5), torch.float32, 1) + 1, data((5, 5), torch.float32, 2)
        norm = lambda x, w, b: F.layer_norm(x, (5, 5), w, b, 1e-5)
        y, mean, rstd = ops().layer_norm_fwd(x, [5, 5], w, b, 1e-5, act, SLOPE, 0.0)
        backward = lambda g: ops().layer_norm_bwd(g, x, [5, 5], mean, rstd, w, b, act, SLOPE, 0.0, [True] * 3)
    elif kind == "gn":
        norm = lambda x, w, b: F.group_norm(x, 2, w, b, 1e-5)
        y, mean, rstd = ops().group_norm_fwd(x, 2, w, b, 1e-5, act, SLOPE, 0.0)
        backward = lambda g: ops().group_norm_bwd(g, x, 2, mean, rstd, w, b, act, SLOPE, 0.0, [True] * 3)
    else:
        train = case != "bn-eval"
        norm = lambda x, w, b: F.batch_norm(x, None if train else rm.double(), None if train else rv.double(),
                                            w, b, train, 0.1, 1e-5)
        y, mean, rstd = ops().batch_norm_fwd(x, w, b, rm.clone(), rv.clone(), train, 0.1, 1e-5, act, SLOPE, 0.0)
        backward = lambda g: ops().batch_norm_bwd(g, x, w, b, mean, rstd, train, act, SLOPE, 0.0, [True] * 3)
    with torch.no_grad():
        z = norm(x.double(), w.double(), b.double())
    g = data(x.shape, torch.float32, 3).contiguous()
    negative = (z < 0).flatten().nonzero().flatten()
    g.view(-1)[negative[:3]] = float("inf")
    g.view(-1)[negative[3]] = float("nan")
    _, expected = reference_grads(lambda x, w, b: activate(norm(x, w, b), ACTS[act]), x, [w, b], g)
    assert_same_where_finite(backward(g), [e.float() for e in expected], all_finite=act == 1)


# ---- production launch parameters at every row-tier boundary ---------------------------------

PRODUCTION = dict(warp_cols=32, smem=48 * 1024, per_split=16384, max_splits=1024, max_blocks=65535, threads=256)


def tier_edges(emu, dtype, backward):
    """Row lengths at and one above each tier's top for the limits in force (launch.h's
    row_tier_edges: the warp tiers, and the block tier whose row cache plus static
    reduction slots must fit CUDA's 48 KiB), and the common hidden sizes 6144 and 12288
    that a block tier counting only the cache admitted at the limit."""
    return sorted(set(emu.row_tier_edges(backward, dtype == torch.float64)) | {6144, 12288})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_layer_norm_tier_edges_at_production_limits(emu, dtype, backward):
    """LayerNorm rows at every tier edge, with the production launch parameters (the
    emulation's launch checks are CUDA's): each launch must be accepted and the results
    match torch.nn."""
    limits(emu, **PRODUCTION)
    tiers = [emu.row_tier(L, backward, dtype == torch.float64)
             for L in emu.row_tier_edges(backward, dtype == torch.float64)]
    warp32 = [] if dtype == torch.float64 else ["warp32", "warp32"]
    assert tiers == ["warp4", "warp16", "warp16"] + warp32 + ["block", "block", "long"]
    for L in tier_edges(emu, dtype, backward):
        x = data((2, L), dtype)
        w, b = data((L,), torch.float32, 1) + 1, data((L,), torch.float32, 2)
        if dtype == torch.float64:
            w, b = w.double(), b.double()
        y, mean, rstd = ops().layer_norm_fwd(x, [L], w, b, 1e-5, 1, SLOPE, 0.0)
        ref = lambda x, w, b: activate(F.layer_norm(x, (L,), w, b, 1e-5), "relu")
        g = data(x.shape, dtype, 3)
        yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
        td = tol_dtype(dtype)
        assert_close(y, yr.to(td), dtype, f"L={L} output ({emu.row_tier(L, False, dtype == torch.float64)})")
        if backward:
            dx, dw, db = ops().layer_norm_bwd(g, x, [L], mean, rstd, w, b, 1, SLOPE, 0.0, [True, True, True])
            assert_close(dx, dxr.to(td), dtype, f"L={L} dx ({emu.row_tier(L, True, dtype == torch.float64)})")
            assert_close(dw, dwr.to(w.dtype), w.dtype, f"L={L} dweight")


def test_over_limit_launch_is_refused(emu):
    """A block tier allowed more than CUDA's 48 KiB per block (its row cache counted, its
    static slots not: the rule before the fix) is refused at launch, as a GPU refuses it."""
    limits(emu, **dict(PRODUCTION, smem=48 * 1024 + 4096))
    x = data((2, 12280), torch.float32)
    with pytest.raises(RuntimeError, match="shared memory"):
        ops().layer_norm_fwd(x, [12280], None, None, 1e-5, 0, 0.0, 0.0)


# sm_80 and newer reserve 1 KiB of shared memory per block for the system; cuobjdump counts
# it in SHARED, the 48 KiB a launch may use without opting in does not.
RESERVED_SMEM = 1024


def test_static_shared_memory_matches_the_cubin(emu):
    """What launch.h counts as the block-tier row kernels' static shared memory (and the
    emulation checks launches with) is what the compiler allotted them in the CUDA build."""
    usage = cubin.shared_memory(cubin.extension_or_skip())
    checked = 0
    for name, shared in usage.items():
        for direction, backward in (("row_fwd_block<", False), ("row_bwd_block<", True)):
            if direction in name:
                double = "<double," in name
                assert shared - RESERVED_SMEM == emu.row_static_smem(backward, double), (name, shared)
                checked += 1
    assert checked >= 16, usage  # 4 dtypes x cache on/off x 2 directions


def test_emulation_runs_blocks_out_of_order_and_at_once(emu):
    """A kernel whose highest-index block sums the others' partials without a ticket is
    right when blocks run one after another in index order (the emulation before it
    shuffled them) and wrong here, as it can be on a GPU."""
    expected = sum(range(64))
    results = [emu.ordering_probe(64) for _ in range(5)]
    assert any(r != expected for r in results), results


# ---- 5-D inputs, misaligned views ------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]


def misaligned(t):
    """t's values in a view starting one element past a 16-byte boundary: the vectorised
    paths must fall back to scalar loads."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def input_5d(shape, dtype, layout):
    """A 5-D input in `layout`: contiguous, channels_last_3d or misaligned (contiguous)."""
    x = data(shape, dtype)
    if layout == "channels_last_3d":
        return x.to(memory_format=torch.channels_last_3d)
    return misaligned(x) if layout == "misaligned" else x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "misaligned"])
def test_batch_norm_5d(emu, dtype, layout):
    """BatchNorm3d input (N, C, D, H, W): NCDHW and NDHWC (channels_last_3d) layouts, and a
    contiguous view off a 16-byte boundary (S = 32 is a multiple of every pack, so only the
    alignment decides the path). Multi-split reductions."""
    limits(emu, per_split=16)
    y = check_batch_norm_train(input_5d((3, 5, 2, 4, 4), dtype, layout), 1)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last_3d")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "misaligned"])
def test_group_norm_5d(emu, dtype, layout):
    """GroupNorm over a 5-D input, three layouts; rows of 2*2*3*4 = 48 elements."""
    limits(emu, per_split=16)
    x = input_5d((2, 4, 2, 3, 4), dtype, layout)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = data((4,), pdt, 1) + 1, data((4,), pdt, 2)
    y, mean, rstd = ops().group_norm_fwd(x, 2, w, b, 1e-5, 1, SLOPE, 0.0)
    ref = lambda x, w, b: activate(F.group_norm(x, 2, w, b, 1e-5), "relu")
    g = data(x.shape, dtype, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    td = tol_dtype(dtype)
    assert_close(y, yr.to(td), dtype, "output")
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last_3d")
    dx, dw, db = ops().group_norm_bwd(g, x, 2, mean, rstd, w, b, 1, SLOPE, 0.0, [True, True, True])
    assert_close(dx, dxr.to(td), dtype, "dx")
    assert_close(dw, dwr.to(pdt), pdt, "dweight")
    assert_close(db, dbr.to(pdt), pdt, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("L", [40, 300, 1000, 700, 900], ids=["warp4", "warp16", "warp32", "block", "long"])
def test_layer_norm_rows_every_dtype(emu, dtype, L):
    """Every row kernel (each tier, both directions) in every dtype, on a misaligned input,
    with more rows than the capped grid (warp tiers: blocks walk the rows grid-stride)."""
    limits(emu, smem=2048 if L == 900 else 48 * 1024, max_blocks=2, warp_cols=32 if L == 1000 else 16)
    x = misaligned(data((11, L), dtype))
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = data((L,), pdt, 1) + 1, data((L,), pdt, 2)
    y, mean, rstd = ops().layer_norm_fwd(x, [L], w, b, 1e-5, 2, SLOPE, 0.0)
    ref = lambda x, w, b: activate(F.layer_norm(x, (L,), w, b, 1e-5), "leaky_relu", SLOPE)
    g = data(x.shape, dtype, 3)
    yr, (dxr, dwr, dbr) = reference_grads(ref, x, [w, b], g)
    td = tol_dtype(dtype)
    assert_close(y, yr.to(td), dtype, f"output ({emu.row_tier(L, False, dtype == torch.float64)})")
    dx, dw, db = ops().layer_norm_bwd(g, x, [L], mean, rstd, w, b, 2, SLOPE, 0.0, [True, True, True])
    assert_close(dx, dxr.to(td), dtype, f"dx ({emu.row_tier(L, True, dtype == torch.float64)})")
    assert_close(dw, dwr.to(pdt), pdt, "dweight")
    assert_close(db, dbr.to(pdt), pdt, "dbias")


# ---- bytes moved, launch plans ------------------------------------------------------------
# The pass model: the fewest passes over the streamed tensors (inputs, outputs, gradients,
# residuals) each op's kernels make, in units of one tensor of the input's size. The
# emulation counts every streamed access (device.h's load_pack/store_pack); parameters and
# statistics (per channel, row or group) are cache-resident on a GPU and not counted.
# (reads, writes) per op: fusednorm.bandwidth.PASS_MODEL (selftest --bench uses it too).


def check_traffic(emu, key, numel, itemsize, what):
    read, written = emu.take_traffic()
    r, w = PASS_MODEL[key]
    unit = numel * itemsize
    assert abs(read / (r * unit) - 1) <= 0.05 and abs(written / (w * unit) - 1) <= 0.05, (
        f"{what}: read {read / unit:.3f} and wrote {written / unit:.3f} tensors, pass model {r} and {w}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("L", [256, 1024, 16384])
def test_layer_norm_traffic_meets_the_pass_model(emu, dtype, L):
    """LayerNorm (and its residual add) at production limits: warp tier (256), block tier
    (1024) and long tier (16384 floats: 64 KiB, over the block tier's shared memory)."""
    limits(emu, **PRODUCTION)
    R = 64 if L < 16384 else 4
    x, g, r = data((R, L), dtype), data((R, L), dtype, 3), data((R, L), dtype, 4)
    w, b = data((L,), torch.float32, 1) + 1, data((L,), torch.float32, 2)
    long = emu.row_tier(L, False, False) == "long"
    emu.take_traffic()
    y, mean, rstd = ops().layer_norm_fwd(x, [L], w, b, 1e-5, 1, 0.0, 0.0)
    check_traffic(emu, "layer_norm_fwd_long" if long else "layer_norm_fwd", x.numel(), x.element_size(), "fwd")
    ops().layer_norm_bwd(g, x, [L], mean, rstd, w, b, 1, 0.0, 0.0, [True, True, True])
    check_traffic(emu, "layer_norm_bwd_long" if long else "layer_norm_bwd", x.numel(), x.element_size(), "bwd")
    if long:
        return
    y, s, mean, rstd = ops().add_norm_fwd(x, r, [L], w, b, 1e-5, False, False, 0, 0.0, 0.0)
    check_traffic(emu, "add_norm_fwd", x.numel(), x.element_size(), "residual fwd")
    ops().add_norm_bwd(g, g, s, [L], mean, rstd, w, b, False, 0, 0.0, 0.0, [True, True, True])
    check_traffic(emu, "add_norm_bwd", x.numel(), x.element_size(), "residual bwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_and_group_norm_traffic_meets_the_pass_model(emu, dtype, layout):
    """BatchNorm (train and eval) and GroupNorm at production limits, both layouts."""
    limits(emu, **PRODUCTION)
    x = data((8, 64, 8, 16), dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    g = data(x.shape, dtype, 3).to(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    w, b = data((64,), torch.float32, 1) + 1, data((64,), torch.float32, 2)
    rm, rv = torch.zeros(64), torch.ones(64)
    n, size = x.numel(), x.element_size()
    emu.take_traffic()
    y, mean, rstd = ops().batch_norm_fwd(x, w, b, rm, rv, True, 0.1, 1e-5, 1, 0.0, 0.0, None)
    check_traffic(emu, "batch_norm_fwd", n, size, "BatchNorm train fwd")
    ops().batch_norm_bwd(g, x, w, b, mean, rstd, True, 1, 0.0, 0.0, [True, True, True])
    check_traffic(emu, "batch_norm_bwd", n, size, "BatchNorm train bwd")
    ops().batch_norm_fwd(x, w, b, rm, rv, False, 0.1, 1e-5, 1, 0.0, 0.0, None)
    check_traffic(emu, "batch_norm_fwd_eval", n, size, "BatchNorm eval fwd")
    y, mean, rstd = ops().group_norm_fwd(x, 32, w, b, 1e-5, 1, 0.0, 0.0)
    if layout == "nchw":  # (channels_last GroupNorm is normalised as a contiguous copy)
        check_traffic(emu, "group_norm_fwd", n, size, "GroupNorm fwd")
        ops().group_norm_bwd(g, x, 32, mean, rstd, w, b, 1, 0.0, 0.0, [True, True, True])
        check_traffic(emu, "group_norm_bwd", n, size, "GroupNorm bwd")


def test_split_group_norm_traffic_meets_the_pass_model(emu):
    """GroupNorm with 2 rows of 65536 elements (fewer rows than SMs): split over blocks."""
    limits(emu, **PRODUCTION)
    x, g = data((1, 32, 64, 64), torch.float32), data((1, 32, 64, 64), torch.float32, 3)
    w, b = data((32,), torch.float32, 1) + 1, data((32,), torch.float32, 2)
    emu.take_traffic()
    y, mean, rstd = ops().group_norm_fwd(x, 2, w, b, 1e-5, 1, 0.0, 0.0)
    check_traffic(emu, "group_norm_fwd_split", x.numel(), 4, "fwd")
    ops().group_norm_bwd(g, x, 2, mean, rstd, w, b, 1, 0.0, 0.0, [True, True, True])
    check_traffic(emu, "group_norm_bwd_split", x.numel(), 4, "bwd")
    yr = F.relu(F.group_norm(x.double(), 2, w.double(), b.double(), 1e-5))
    assert_close(y, yr.float(), torch.float32, "output")


def test_misaligned_16_byte_access_is_refused(emu):
    """A 16-byte load off a 16-byte boundary faults on a GPU; the emulation refuses it."""
    with pytest.raises(RuntimeError, match="not aligned"):
        emu.misaligned_probe()


# The benchmark's large shapes (bench/bench.py): every launch of each op, for a 132-SM H100.
H100_SMS = 132
PLAN_CASES = {
    "BatchNorm2d 32x64x56x56": ("bn", (32, 64, 56, 56), "nchw"),
    "BatchNorm2d 32x64x56x56 channels_last": ("bn", (32, 64, 56, 56), "nhwc"),
    "BatchNorm2d 32x2048x7x7 channels_last": ("bn", (32, 2048, 7, 7), "nhwc"),
    "GroupNorm(32) 32x64x56x56": ("gn", (32, 64, 56, 56), "nchw"),
    "GroupNorm(32) 1x64x128x128 (32 rows)": ("gn", (1, 64, 128, 128), "nchw"),
    "LayerNorm(1024) 8192x1024": ("ln", (8192, 1024), "nchw"),
    "LayerNorm(4096) 4096x4096": ("ln", (4096, 4096), "nchw"),
    "LayerNorm(8) 262144x8": ("ln", (262144, 8), "nchw"),
}


def planned_launches(emu, kind, shape, layout):
    """The launches (kernel, blocks) of forward and backward of one case, not run."""
    limits(emu, **PRODUCTION)
    emu.set_sm_count(H100_SMS)
    x = torch.empty(shape)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1] if kind != "ln" else shape[-1]
    w, b = torch.ones(C), torch.zeros(C)
    emu.set_dry_run(True)
    try:
        if kind == "bn":
            y, mean, rstd = ops().batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5, 1, 0.0, 0.0, None)
            ops().batch_norm_bwd(x, x, w, b, mean, rstd, True, 1, 0.0, 0.0, [True, True, True])
        elif kind == "gn":
            y, mean, rstd = ops().group_norm_fwd(x, 32, w, b, 1e-5, 1, 0.0, 0.0)
            ops().group_norm_bwd(x, x, 32, mean, rstd, w, b, 1, 0.0, 0.0, [True, True, True])
        else:
            y, mean, rstd = ops().layer_norm_fwd(x, [C], w, b, 1e-5, 1, 0.0, 0.0)
            ops().layer_norm_bwd(x, x, [C], mean, rstd, w, b, 1, 0.0, 0.0, [True, True, True])
    finally:
        emu.set_dry_run(False)
    return [(k, gx * gy, bx * by) for k, gx, gy, bx, by, smem in emu.take_launches()]


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_launch_plans_fill_an_h100(emu, case):
    """Every launch of the benchmark's large shapes has at least one block per SM of a
    132-SM H100; the channel reductions (statistics, gradient sums) 4 waves of blocks, or
    as many blocks of 4096 elements as the tensor has (launch.h's min_block_work)."""
    kind, shape, layout = PLAN_CASES[case]
    launches = planned_launches(emu, kind, shape, layout)
    assert len(launches) >= 3, launches
    numel = 1
    for n in shape:
        numel *= n
    for kernel, blocks, threads in launches:
        if kernel.startswith("plane_coefficients"):
            continue  # N*C coefficients, not a pass over the tensor
        need = H100_SMS
        if kernel.startswith("channel_reduce"):
            need = max(need, min(4 * H100_SMS, numel // 4096))
        assert blocks >= need, f"{case}: {kernel} launches {blocks} blocks (< {need}): {launches}"


# ---- what the emulated suite ran --------------------------------------------------------------

def expected_paths():
    """Every kernel x tier x path of the CUDA backend (launch.h): the row kernels' four
    tiers per direction, the channel reductions (both layouts, both operations) with one
    and with several splits, the elementwise passes (apply, input gradient) in both
    layouts, each of them reading 16-byte packs (P elements; the packed 4-column warp
    tier holds C4 = max(4, P) a lane) and single elements; each in every element type."""
    kernels = [f"row_{d}_warp<T,{c}>||-" for d in ("fwd", "bwd")
               for c in ("4,1", "C4,P", "16,1", "16,P", "32,1", "32,P")]
    kernels += [f"row_{d}_block<T,{c},{w}>||-" for d in ("fwd", "bwd") for c in ("true", "false")
                for w in ("1", "P")]
    kernels += [f"channel_reduce_{lay}<T,Op,{w}>|{op}|{splits}" for lay in ("nchw", "nhwc") for w in ("1", "P")
                for op in ("moments", "grad_sums") for splits in ("one-split", "multi-split")]
    kernels += [f"elementwise_{lay}<T,Pass,{w}>|{op}|-" for lay in ("nchw", "nhwc") for w in ("1", "P")
                for op in ("apply", "input_grad")]
    out = set()
    for k in kernels:
        name, op, splits = k.split("|")
        for dtype in ("float32", "float64", "bfloat16", "float16"):
            if not (dtype == "float64" and "_warp<T,32," in name):  # (no warp32 tier for float64)
                out.add(f"{name}|{op}|{dtype}|{splits}")
    # GroupNorm's split rows: per-plane coefficients, in the accumulation type
    out |= {f"plane_coefficients_kernel<A>||{acc}|-" for acc in ("float32", "float64")}
    return out


def coverage_table(records):
    lines = ["| kernel | op | dtype | grid | launches | static smem B | blocks at once |",
             "|---|---|---|---|---:|---:|---:|"]
    for key, n, smem, at_once in sorted(records):
        lines.append("| " + " | ".join(key.split("|")) + f" | {n} | {smem} | {at_once} |")
    return "\n".join(lines)


def test_coverage_of_every_kernel_path(emu, request):
    """Runs last in this file: every kernel x tier x path x dtype of expected_paths() was
    launched by the tests above (a path nobody runs fails here), blocks of multi-block
    launches ran concurrently, and the static shared memory the block-tier row kernels
    declared is what launch.h counts (and test_static_shared_memory_matches_the_cubin
    checks against the compiled kernels). The table is written to build/emulation-coverage.md."""
    this_file = [i for i in request.session.items if i.path == request.node.path]
    ran_all = {i.originalname for i in this_file} >= {
        n for n, f in globals().items() if n.startswith("test_") and callable(f)}
    if not ran_all:
        pytest.skip("part of test_cuda_emulation.py was deselected: coverage is judged on the whole file")
    records = [r for r in emu.coverage() if not r[0].startswith("probe_")]  # not a backend kernel
    table = coverage_table(records)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "emulation-coverage.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(table + "\n")
    ran = {key for key, *_ in records}
    missing = expected_paths() - ran
    assert not missing, f"kernel paths no emulation test ran: {sorted(missing)}\n{table}"
    unexpected = ran - expected_paths()
    assert not unexpected, f"launches the coverage table does not list: {sorted(unexpected)}"
    multi = [(key, at_once) for key, n, smem, at_once in records if "multi-split" in key]
    assert multi and all(at_once > 1 for _, at_once in multi), multi
    for key, n, smem, at_once in records:
        if key.startswith("row_") and "_block<" in key:
            backward, double = key.startswith("row_bwd"), "|float64|" in key
            assert smem == emu.row_static_smem(backward, double), (key, smem)
