"""torch.compile (fullgraph, no graph breaks) and autocast with fusednorm modules: the
same outputs and gradients as eager / as torch.nn under autocast."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm
from helpers import KINDS, NO_GPU, assert_close, assert_same_buffers, make_input, make_pair


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = fusednorm.BatchNorm2d(8, activation="silu")
        self.gn = fusednorm.GroupNorm(2, 8, activation="leaky_relu", negative_slope=0.2)
        self.inorm = fusednorm.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.ln = fusednorm.LayerNorm(8, activation=nn.GELU(approximate="tanh"))  # a module form
        self.bn1d = fusednorm.BatchNorm1d(8, momentum=None)

    def forward(self, x):
        x = self.gn(self.bn(self.conv(x)))
        x = self.inorm(self.ln(x))  # LayerNorm over the last dim (W = 8)
        return self.bn1d(x.flatten(2))  # (N, C, H*W)


def step(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    names = [n.replace("_orig_mod.", "") for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(y.square().sum(), [x] + [p for _, p in model.named_parameters()])
    return y, dict(zip(["input"] + names, grads))


def assert_same_steps(eager, compiled, shape):
    """Two steps of each: the same outputs and gradients (input and parameters)."""
    for i in range(2):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        y, g = step(eager, x)
        yc, gc = step(compiled, x)
        torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
        for name in g:
            atol = 1e-4 * max(1.0, g[name].abs().max().item())
            torch.testing.assert_close(gc[name], g[name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(train):
    torch.manual_seed(0)
    eager = Net().train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    assert_same_steps(eager, compiled, (4, 3, 8, 8))
    for (name, b), (_, bc) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(bc, b, msg=name)


class PreNormBlock(nn.Module):
    """Two pre-norm transformer sublayers: RMSNorm and LayerNorm with the residual add
    fused (the second takes the first's sum as its residual)."""

    def __init__(self):
        super().__init__()
        self.norm1 = fusednorm.RMSNorm(16)
        self.fc1 = nn.Linear(16, 16)
        self.norm2 = fusednorm.LayerNorm(16, activation="gelu", residual_in_fp32=True)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc1(self.norm1(x))
        h, residual = self.norm2(h, residual=x)
        return self.fc2(h) + residual


@pytest.mark.slow
def test_compile_fullgraph_add_norm_matches_eager():
    torch.manual_seed(0)
    eager = PreNormBlock()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    assert_same_steps(eager, compiled, (2, 5, 16))


def pairs():
    """(name, fusednorm module, torch.nn norm, activation applied after the torch.nn norm)."""
    yield "bn", fusednorm.BatchNorm2d(8, activation="relu"), nn.BatchNorm2d(8), F.relu
    yield "in", fusednorm.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, affine=True), None
    yield "ln", fusednorm.LayerNorm(6, activation="relu"), nn.LayerNorm(6), F.relu
    yield "gn", fusednorm.GroupNorm(2, 8), nn.GroupNorm(2, 8), None
    yield "rms", fusednorm.RMSNorm(6, activation="relu"), nn.RMSNorm(6), F.relu


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["f32-in", "bf16-in"])
@pytest.mark.parametrize("name,ours,ref,act", list(pairs()), ids=[p[0] for p in pairs()])
def test_cpu_autocast_bfloat16_like_torch(name, ours, ref, act, input_dtype):
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 8, 6, 6).to(input_dtype)
    # A conv before the norm, as in a real network: autocast makes its output bfloat16.
    conv = nn.Conv2d(8, 8, 1)
    with torch.autocast("cpu", torch.bfloat16):
        y = ours(conv(x))
        yr = ref(conv(x))
        yr = act(yr) if act else yr
    assert y.dtype == yr.dtype
    assert_close(y.float(), yr.float(), y.dtype, "output under autocast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name,ours,ref,act", list(pairs()), ids=[p[0] for p in pairs()])
def test_cuda_autocast_like_torch(name, ours, ref, act, dtype):
    ours, ref = ours.cuda(), ref.cuda()
    ref.load_state_dict(ours.state_dict())
    conv = nn.Conv2d(8, 8, 1).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda")
    with torch.autocast("cuda", dtype):
        y = ours(conv(x))
        yr = ref(conv(x))
        yr = act(yr) if act else yr
    assert y.dtype == yr.dtype  # float32 for LayerNorm/GroupNorm (autocast's float32 list)
    assert_close(y.float(), yr.float(), dtype, "output under autocast")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_export_with_a_dynamic_batch_matches_eager(kind, train):
    """torch.export with a dynamic batch dim (the fake kernels keep sizes symbolic), run
    at another batch size: the same output and running statistics as the module."""
    ours, _ = make_pair(kind, "relu")
    ours.train(train)
    shape = KINDS[kind][3]
    x = make_input(shape, torch.float32, "contiguous")
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(copy.deepcopy(ours), (x,), dynamic_shapes={"input": {0: batch}})
    x2 = make_input((shape[0] + 3,) + tuple(shape[1:]), torch.float32, "contiguous", seed=7)
    program = exported.module()
    assert_close(program(x2), ours(x2), torch.float32, "output")
    assert_same_buffers(program.named_buffers(), ours.named_buffers())
