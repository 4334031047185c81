"""Parity with torch.nn: every module x train/eval x dtype x memory layout x activation.
Outputs, input and parameter gradients, and running buffers after several steps."""
import pytest
import torch

import fusednorm
from helpers import (
    ACTIVATIONS,
    KINDS,
    TARGETS,
    TRITON_CPU,
    activate,
    assert_close,
    assert_same_buffers,
    layouts_for,
    make_input,
    make_pair,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STEPS = 3


def cases():
    for kind in KINDS:
        for layout in layouts_for(kind):
            yield kind, layout


def run_steps(ours, ref, x, activation, dtype, train):
    """STEPS forward/backward steps of both modules on the same data; compare each."""
    ours.train(train)
    ref.train(train)
    # Half inputs: torch.nn in float32 on the same (rounded) values is the reference.
    ref_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for step in range(STEPS):
        xi = (x * (1 + 0.25 * step)).detach().requires_grad_()
        xr = xi.detach().to(ref_dtype).requires_grad_()
        y = ours(xi)
        yr = activate(ref(xr), ours.activation)
        assert y.dtype == x.dtype and y.shape == yr.shape
        assert_close(y, yr, dtype, f"output, step {step}")
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        g = g.to(dtype).to(x.device)
        params = [p for p in ours.parameters()]
        grads = torch.autograd.grad(y, [xi] + params, g)
        grads_ref = torch.autograd.grad(yr, [xr] + list(ref.parameters()), g.to(ref_dtype))
        assert_close(grads[0], grads_ref[0], dtype, f"input grad, step {step}")
        for (name, _), gp, gr in zip(ours.named_parameters(), grads[1:], grads_ref[1:]):
            assert gp.dtype == dict(ours.named_parameters())[name].dtype
            assert_close(gp, gr, gp.dtype, f"{name} grad, step {step}")
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())


def parity_params():
    """Every target x kind/layout x train/eval x dtype x activation, except that in Triton's
    interpreter (about a second a case) float32 keeps every activation and the other dtypes
    keep leaky_relu (the activation with a slope: every branch); the kernels' dtype and
    activation handling are independent (constexpr ACT, per-dtype loads and stores). On a
    GPU (triton-cuda) the whole matrix runs. The default tier keeps the interpreter's
    float32 leaky_relu training cases; the rest of its matrix is in the slow tier."""
    for target in TARGETS:
        interpreted = target.id == "triton-interpreter"
        for kind, layout in cases():
            for train in (True, False):
                for dtype in DTYPES:
                    for activation in ACTIVATIONS:
                        if interpreted and dtype != torch.float32 and activation != "leaky_relu":
                            continue
                        marks = list(target.marks)
                        if interpreted and not (train and dtype == torch.float32 and activation == "leaky_relu"):
                            marks.append(pytest.mark.slow)
                        name = f"{target.id}-{kind}-{layout}-{'train' if train else 'eval'}-" \
                               f"{str(dtype).split('.')[-1]}-{activation}"
                        yield pytest.param(target.values[0], kind, layout, train, dtype, activation, marks=marks,
                                           id=name)


@pytest.mark.parametrize("target,kind,layout,train,dtype,activation", list(parity_params()))
def test_module_parity(target, kind, layout, train, dtype, activation):
    check_module_parity(target, kind, layout, train, dtype, activation)


def check_module_parity(target, kind, layout, train, dtype, activation):
    """run_steps on a fresh pair of modules (float64 parameters for float64, else float32)."""
    device, backend = target
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours, ref = make_pair(kind, activation, param_dtype, device=device)
    x = make_input(KINDS[kind][3], dtype, layout, device=device)
    with fusednorm.use_backend(backend):
        run_steps(ours, ref, x, activation, dtype, train)


@pytest.mark.parametrize("kind,layout", [c for c in cases() if c[1] == "channels_last"])
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=TRITON_CPU)])
def test_channels_last_output_format_matches_torch(backend, kind, layout):
    ours, ref = make_pair(kind, None)
    x = make_input(KINDS[kind][3], torch.float32, layout)
    with fusednorm.use_backend(backend):
        y = ours(x)
    yr = ref(x)
    for fmt in (torch.channels_last, torch.channels_last_3d, torch.contiguous_format):
        try:
            expected = yr.is_contiguous(memory_format=fmt)
        except RuntimeError:  # channels_last on the wrong rank
            continue
        assert y.is_contiguous(memory_format=fmt) == expected, fmt


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: str(a))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("target", TARGETS)
def test_half_parameters_match_torch_half_module(target, kind, dtype, activation):
    """The whole module in a half type (params and buffers too) against torch.nn's in
    float32 on the same values."""
    device, backend = target
    ours, ref = make_pair(kind, activation, dtype, device=device)
    ref = ref.float()
    x = make_input(KINDS[kind][3], dtype, "contiguous", device=device)
    with fusednorm.use_backend(backend):
        run_steps(ours, ref, x, activation, dtype, True)


@pytest.mark.parametrize("mode", ["no_grad", "frozen"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("target", TARGETS)
def test_forward_without_autograd(target, kind, train, mode):
    """When no gradient can flow (torch.no_grad, or frozen parameters and an input without
    grad) the forward op runs without autograd.Function: the same output as the autograd
    path, bit for bit, torch.nn's output and running buffers, and no grad_fn."""
    device, backend = target
    ours, ref = make_pair(kind, "relu", device=device)
    twin, _ = make_pair(kind, "relu", device=device)  # takes the autograd path
    for m in (ours, ref, twin):
        m.train(train)
    if mode == "frozen":
        ours.requires_grad_(False)
    x = make_input(KINDS[kind][3], torch.float32, "contiguous", device=device)
    with fusednorm.use_backend(backend):
        for step in range(STEPS):
            xi = x * (1 + 0.25 * step)
            with torch.set_grad_enabled(mode != "no_grad"):
                y = ours(xi)
            y_twin = twin(xi.detach().requires_grad_())
            assert y.grad_fn is None and not y.requires_grad
            assert torch.equal(y, y_twin.detach()), f"step {step}: differs from the autograd path"
            assert_close(y, activate(ref(xi), "relu").detach(), torch.float32, f"output, step {step}")
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())


# NCHW BatchNorm's three schedules (csrc/cpu/batch_norm.cpp): short rows (statistics from
# gathered rows, here over several gather chunks: 48 rows of 7x7), rows of one element or
# more below by_channel's conditions (3 channels of 32x32), and by_channel (16 channels of
# 32x32). Forward and backward against the float64 torch.nn reference.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(48, 6, 7, 7), (3, 5, 2, 2), (2, 3, 32, 32), (2, 16, 32, 32)],
                         ids=["short-rows-chunks", "short-rows-tiny", "long-rows", "by-channel"])
def test_batch_norm_nchw_schedules_match_float64_torch(shape, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    ours = fusednorm.BatchNorm2d(shape[1], activation="relu")
    ref = torch.nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-0.2, 0.2, shape[1]))
    xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y = ours(xo)
    y_ref = torch.relu(ref(xr))
    gx, gw, gb = torch.autograd.grad(y, [xo, ours.weight, ours.bias], dy)
    rx, rw, rb = torch.autograd.grad(y_ref, [xr, ref.weight, ref.bias], dy.double())
    assert_close(y, y_ref, dtype, "output")
    assert_close(gx, rx, dtype, "input gradient")
    assert_close(gw, rw, torch.float32, "weight gradient")  # float32 parameters, float32 sums
    assert_close(gb, rb, torch.float32, "bias gradient")
    assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
