"""GPU-only checks (skipped, with the reason, where no CUDA GPU is visible) and the CUDA
build's registration, which is checked wherever the extension was built with CUDA."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm
from helpers import NO_GPU, assert_close

OPS = ["batch_norm_fwd", "batch_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
       "group_norm_fwd", "group_norm_bwd", "instance_norm_fwd"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def test_cuda_kernels_registered_for_every_op():
    if not fusednorm._C.with_cuda:
        if os.environ.get("FUSEDNORM_CUDA") == "1":
            pytest.fail("FUSEDNORM_CUDA=1 but the extension was built without CUDA kernels")
        pytest.skip("this build has no CUDA kernels (torch without CUDA, or no nvcc at build time)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusednorm::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusednorm::{op}", "CPU"), op


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("cls,ref_cls,args,shape", [
    (fusednorm.BatchNorm2d, nn.BatchNorm2d, (8,), (4, 8, 16, 16)),
    (fusednorm.LayerNorm, nn.LayerNorm, (64,), (32, 64)),
    (fusednorm.GroupNorm, nn.GroupNorm, (4, 8), (4, 8, 16, 16)),
    (fusednorm.InstanceNorm2d, nn.InstanceNorm2d, (8,), (4, 8, 16, 16)),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_second_gpu(backend, cls, ref_cls, args, shape):
    """On cuda:1 while cuda:0 is current: the device guard and stream must follow the input
    (CUDA kernels and Triton launches alike)."""
    ours, ref = cls(*args, activation="relu").to("cuda:1"), ref_cls(*args).to("cuda:1")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0), fusednorm.use_backend(backend):
        y = ours(x)
        yr = F.relu(ref(x))
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gr,) = torch.autograd.grad(yr.sum(), x)
        torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("make", ["bn", "bn_cl", "ln", "gn", "in"])
def test_half_against_float32_reference(make, dtype):
    x = torch.randn(8, 32, 24, 24, device="cuda") * 3 + 1
    if make == "bn_cl":
        x = x.to(memory_format=torch.channels_last)
    ours, ref = {
        "bn": (fusednorm.BatchNorm2d(32, activation="relu"), nn.BatchNorm2d(32)),
        "bn_cl": (fusednorm.BatchNorm2d(32, activation="relu"), nn.BatchNorm2d(32)),
        "ln": (fusednorm.LayerNorm(24, activation="relu"), nn.LayerNorm(24)),
        "gn": (fusednorm.GroupNorm(8, 32, activation="relu"), nn.GroupNorm(8, 32)),
        "in": (fusednorm.InstanceNorm2d(32, affine=True, activation="relu"), nn.InstanceNorm2d(32, affine=True)),
    }[make]
    ours, ref = ours.cuda(), ref.cuda()
    ref.load_state_dict(ours.state_dict())
    xh = x.to(dtype).requires_grad_()
    xr = xh.detach().float().requires_grad_()
    y, yr = ours(xh), F.relu(ref(xr))
    assert_close(y, yr, dtype, "output")
    g = torch.randn_like(yr).to(dtype)
    (gx,) = torch.autograd.grad(y, xh, g)
    (gr,) = torch.autograd.grad(yr, xr, g.float())
    assert_close(gx, gr, dtype, "input grad")


@gpu
def test_more_than_2_31_elements():
    """64-bit indexing: a LayerNorm and a BatchNorm over > 2^31 elements (needs ~10 GB)."""
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 2**20
    if free < n * 2 * 5:
        pytest.skip(f"needs about {n * 2 * 5 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.randn(n // 1024, 1024, device="cuda", dtype=torch.float16)
    y = fusednorm.functional.layer_norm(x, (1024,))
    tail = slice(-4, None)
    torch.testing.assert_close(y[tail].float(), F.layer_norm(x[tail].float(), (1024,)), rtol=1e-2, atol=1e-2)
    del y
    xb = x.view(n // 1024, 1, 1024)
    yb = fusednorm.functional.batch_norm(xb, None, None, training=True)
    ref = (xb.float() - xb.float().mean()) / (xb.float().var(unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(yb[tail].float(), ref[tail], rtol=1e-2, atol=1e-2)


def test_selftest_runs_and_passes_here():
    # Without the interpreted Triton cases (96 of them, ~5 of CI's minutes): test_triton.py
    # and the parity suites cover those kernels.
    from fusednorm import selftest
    assert selftest.main(["--no-speed", "--no-interpreter"]) == 0


def test_selftest_covers_the_cuda_tier_edges():
    """On a GPU the selftest adds LayerNorm at every CUDA row-tier edge (from the built
    kernels' own limits); the cases build and match torch.nn here on the CPU kernels."""
    from fusednorm import selftest
    edges = selftest.tier_edge_lengths()
    assert {6144, 12288} <= set(edges)
    if fusednorm._C.with_cuda:  # warp4/warp16 tops and one above, block tops per direction/precision
        assert {128, 129, 512, 513} <= set(edges) and len(edges) >= 10, edges
    edge_cases = [c for c in selftest.cases("cuda") if "edge" in c[0]]
    assert [c[3][1] for c in edge_cases] == edges
    assert not [c for c in selftest.cases("cpu") if "edge" in c[0]]
    for name, make, make_ref, shape, cl in edge_cases[:: max(1, len(edge_cases) // 3)]:
        ok, worst = selftest.check(name, make, make_ref, shape, cl, "cpu", torch.float32, "relu", True)
        assert ok, (name, worst)


def test_bandwidth_table_measures_each_case_at_its_pass_model():
    """selftest --bench's rows (here on the CPU, batch / 32): every case forward and backward
    in both dtypes, bytes from the pass model the emulation holds the CUDA kernels to,
    positive times on both sides."""
    from fusednorm import bandwidth
    rows = bandwidth.measure("cpu", dtypes=(torch.float32,), reps=1, batch_scale=32)
    assert len(rows) == 2 * len(bandwidth.CASES)
    for (name, dtype, direction, nbytes, t_ours, t_ref), case in zip(rows, [c for c in bandwidth.CASES for _ in "fb"]):
        shape = (max(1, case[3][0] // 32),) + case[3][1:]
        op = case[5] if direction == "fwd" else case[6]
        assert nbytes == sum(bandwidth.PASS_MODEL[op]) * torch.Size(shape).numel() * 4, (name, direction)
        assert t_ours > 0 and t_ref > 0
