"""BatchNorm with a fused residual add, act(bn(x) + z) (ResNet tails): against torch.nn's
composition relu(bn(x) + z) in float64 (outputs, the gradients of x, z and the parameters,
running statistics) for every layout, train/eval, dtype and the accepted activations;
gradcheck, double backward, forward mode, vmap, torch.compile; the errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm
from fusednorm import functional as FN
from helpers import SLOPE, TARGETS, activate, assert_close, assert_same_buffers, make_input

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ACTS = [None, "relu", "leaky_relu"]
SHAPES = {"nchw": (3, 4, 5, 6), "channels_last": (3, 4, 5, 6), "2d": (7, 4)}
TARGETS = [pytest.param(*t.values, id=t.id, marks=list(t.marks) + ([pytest.mark.slow] if "interpreter" in t.id else []))
           for t in TARGETS]


def _modules(shape, dtype, activation, device):
    cls, ref_cls = (fusednorm.BatchNorm1d, nn.BatchNorm1d) if len(shape) == 2 else (fusednorm.BatchNorm2d,
                                                                                     nn.BatchNorm2d)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    ours = cls(shape[1], activation=activation, negative_slope=SLOPE).to(param)
    ref = ref_cls(shape[1]).to(torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(p.dtype))
    ref.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    return ours.to(device), ref


@pytest.mark.parametrize("activation", ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("target", TARGETS)
def test_matches_composition(target, layout, train, dtype, activation):
    device, backend = target
    shape = SHAPES[layout]
    ours, ref = _modules(shape, dtype, activation, device)
    ours.train(train), ref.train(train)
    fmt = "channels_last" if layout == "channels_last" else "contiguous"
    x = make_input(shape, dtype, fmt, seed=1, device=device)
    z = make_input(shape, dtype, fmt, seed=2, device=device)
    dy = make_input(shape, dtype, "contiguous", seed=4, device=device)
    for step in range(2):
        xi, zi = (x * (1 + 0.25 * step)).requires_grad_(), z.clone().requires_grad_()
        with fusednorm.use_backend(backend):
            y = ours(xi, residual=zi)
            grads = torch.autograd.grad(y, [xi, zi, *ours.parameters()], dy)
        x64, z64 = xi.detach().cpu().double().requires_grad_(), zi.detach().cpu().double().requires_grad_()
        yr = activate(ref(x64) + z64, activation)
        ref_grads = torch.autograd.grad(yr, [x64, z64, *ref.parameters()], dy.cpu().double())
        assert y.dtype == dtype
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, yr, dtype, "output")
        for name, a, e in zip(("input", "residual", "weight", "bias"), grads, ref_grads):
            assert_close(a, e, dtype, name)  # (dz is rounded to the input dtype, as torch rounds it)
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())


def _fn(training, activation):
    rm, rv = torch.zeros(3, dtype=torch.float64) + 0.1, torch.ones(3, dtype=torch.float64) * 0.7

    def fn(x, z, w, b):
        return FN.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, activation=activation,
                             negative_slope=SLOPE, residual=z)
    return fn


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((4, 3, 2, 2), (4, 3, 2, 2), (3,), (3,))
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("activation", ACTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_double_backward(training, activation):
    inputs = _inputs()
    assert torch.autograd.gradcheck(_fn(training, activation), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(_fn(training, activation), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ACTS, ids=str)
def test_forward_mode(activation):
    primals = tuple(t.detach() for t in _inputs())
    tangents = tuple(t.detach() for t in _inputs(1))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def ref(x, z, w, b):
        return activate(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5) + z, activation)
    out, out_t = torch.func.jvp(_fn(True, activation), primals, tangents)
    ref_out, ref_t = torch.func.jvp(ref, primals, tangents)
    assert_close(out, ref_out, torch.float64, "output")
    assert_close(out_t, ref_t, torch.float64, "tangent")


def test_vmap_per_sample_gradients():
    """vmap(grad) in eval mode (running statistics, read only): each sample's gradients as
    from its own call."""
    m = fusednorm.BatchNorm2d(3, activation="relu").eval()
    x, z = torch.randn(5, 2, 3, 4, 4), torch.randn(5, 2, 3, 4, 4)
    params = dict(m.named_parameters())

    def loss(params, x, z):
        return torch.func.functional_call(m, params, (x,), {"residual": z}).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(None, 0, 0))(params, x, z)
    for i in range(x.shape[0]):
        one = torch.func.grad(loss, argnums=(0, 1, 2))(params, x[i], z[i])
        for name in params:
            assert_close(per_sample[0][name][i], one[0][name], torch.float32, name)
        assert_close(per_sample[1][i], one[1], torch.float32, "input")
        assert_close(per_sample[2][i], one[2], torch.float32, "residual")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = fusednorm.BatchNorm2d(4, activation="relu")

    def forward(self, x):
        return self.bn(self.conv(x), residual=x)


@pytest.mark.slow
def test_compile_fullgraph():
    torch.manual_seed(0)
    eager = Block()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    ge = torch.autograd.grad(ye.square().sum(), [xe, *eager.parameters()])
    gc = torch.autograd.grad(yc.square().sum(), [xc, *compiled.parameters()])
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


def test_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="residual"):
        FN.batch_norm(x, None, None, training=True, activation="silu", residual=x)
    with pytest.raises(ValueError, match="non-negative slope"):
        FN.batch_norm(x, None, None, training=True, activation="leaky_relu", negative_slope=-0.5, residual=x)
    with pytest.raises(RuntimeError, match="residual has shape"):
        FN.batch_norm(x, None, None, training=True, residual=x[:2])
    with pytest.raises(RuntimeError, match="residual has dtype"):
        FN.batch_norm(x, None, None, training=True, residual=x.double())
