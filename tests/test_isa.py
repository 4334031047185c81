"""The CPU kernels are compiled once per instruction set and one is picked at run time.
Run a parity check against torch.nn with each variant this CPU supports, forced through
FUSEDNORM_CPU_ISA, in a subprocess (the choice is made once per process)."""
import os
import subprocess
import sys

import pytest

import fusednorm

SCRIPT = r"""
import sys, torch, torch.nn as nn, torch.nn.functional as F, fusednorm
assert fusednorm.cpu_isa() == sys.argv[1], (fusednorm.cpu_isa(), sys.argv[1])
torch.manual_seed(0)
cases = [
    (fusednorm.BatchNorm2d(8, activation="relu"), nn.BatchNorm2d(8), (4, 8, 9, 7)),
    (fusednorm.BatchNorm2d(8, activation="leaky_relu"), nn.BatchNorm2d(8), "cl"),
    (fusednorm.LayerNorm(37, activation="relu"), nn.LayerNorm(37), (6, 37)),
    (fusednorm.GroupNorm(2, 8, activation="relu"), nn.GroupNorm(2, 8), (3, 8, 5, 5)),
    (fusednorm.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, affine=True), (3, 8, 5, 5)),
    # Several cache blocks per thread, rows not a multiple of the vector or 1 KiB piece:
    # the kernels that prefetch the next block while writing (kernels.h, Ahead).
    (fusednorm.InstanceNorm2d(8, affine=True, activation="relu"), nn.InstanceNorm2d(8, affine=True), (3, 8, 37, 41)),
    (fusednorm.GroupNorm(2, 8, activation="leaky_relu"), nn.GroupNorm(2, 8), (2, 8, 40, 50)),
    (fusednorm.LayerNorm(300), nn.LayerNorm(300), (200, 300)),
    # channels_last with 70 channels: whole register blocks of column sums plus a tail.
    (fusednorm.BatchNorm2d(70, activation="relu"), nn.BatchNorm2d(70), "cl70"),
    (fusednorm.GroupNorm(5, 70, activation="leaky_relu"), nn.GroupNorm(5, 70), "cl70"),
    # Activations with a loop of their own on AVX2/AVX-512 and one run-time switch on the
    # baseline set (and for float16), in the backward that keeps dyhat in dx (float32).
    (fusednorm.BatchNorm2d(8, activation="silu"), nn.BatchNorm2d(8), (3, 8, 37, 41)),
    (fusednorm.GroupNorm(2, 8, activation="gelu"), nn.GroupNorm(2, 8), (3, 8, 5, 5)),
    (fusednorm.LayerNorm(300, activation="mish"), nn.LayerNorm(300), (200, 300)),
    (fusednorm.BatchNorm2d(70, activation="hardswish"), nn.BatchNorm2d(70), "cl70"),
]
for ours, ref, shape in cases:
    with torch.no_grad():
        for p in ours.parameters(): p.uniform_(-1, 2)
    ref.load_state_dict(ours.state_dict())
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        if isinstance(shape, str):
            x = torch.randn(4, 8 if shape == "cl" else 70, 9, 7).to(memory_format=torch.channels_last)
        else:
            x = torch.randn(shape)
        x = x.to(dtype).requires_grad_()
        xr = x.detach().float().requires_grad_()
        y = ours(x)
        yr = ref(xr)
        if ours.activation == "relu": yr = F.relu(yr)
        if ours.activation == "leaky_relu": yr = F.leaky_relu(yr, ours.negative_slope)
        more = {"silu": F.silu, "gelu": F.gelu, "mish": F.mish, "hardswish": F.hardswish}
        yr = more.get(ours.activation, lambda t: t)(yr)
        g = torch.randn(y.shape).to(dtype)
        (gx,) = torch.autograd.grad(y, x, g)
        (gxr,) = torch.autograd.grad(yr, xr, g.float())
        torch.testing.assert_close(y.float(), yr, rtol=tol, atol=tol)
        torch.testing.assert_close(gx.float(), gxr, rtol=tol, atol=tol * max(1, gxr.abs().max().item()))
print("ok", fusednorm.cpu_isa())
"""


def supported():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["default"]
    if all(f in flags for f in (" avx2", " fma", " f16c")):
        isas.append("avx2")
    if all(f in flags for f in (" avx512f", " avx512bw", " avx512vl", " avx512dq")):
        isas.append("avx512")
    return isas


@pytest.mark.slow
@pytest.mark.parametrize("isa", supported())
def test_every_instruction_set_variant_matches_torch(isa):
    env = dict(os.environ, FUSEDNORM_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", SCRIPT, isa], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok {isa}" in out.stdout


def test_best_variant_is_picked_by_default():
    if "FUSEDNORM_CPU_ISA" in os.environ:
        pytest.skip("FUSEDNORM_CPU_ISA is set in this environment")
    assert fusednorm.cpu_isa() == supported()[-1]


@pytest.mark.slow
def test_unknown_isa_request_is_an_error():
    env = dict(os.environ, FUSEDNORM_CPU_ISA="sse9")
    code = "import torch, fusednorm; fusednorm.LayerNorm(4)(torch.randn(2, 4))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FUSEDNORM_CPU_ISA" in out.stderr
