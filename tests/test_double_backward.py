"""Differentiating gradients (create_graph=True): gradient penalties, MAML-style
meta-gradients and Hessian-vector products against torch.nn's norms (which support them),
and gradgradcheck against finite differences. Nested torch.func transforms and forward
mode: tests/test_func_transforms.py. autograd.py recomputes the output in torch ops for this
(_differentiable.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fusednorm.functional as FF
from helpers import (
    ACTIVATIONS,
    DEVICES,
    KINDS,
    SLOPE,
    activate,
    assert_close,
    assert_same_buffers,
    make_input,
    make_pair,
)

# (kind, train): every norm, and the modes whose statistics differ (BatchNorm and
# InstanceNorm with running statistics in eval mode; their statistics are then constants).
MODES = [(kind, True) for kind in KINDS] + [("BatchNorm2d", False), ("InstanceNorm2d", False)]
MODE_IDS = [f"{kind}-{'train' if train else 'eval'}" for kind, train in MODES]


def _penalty_step(model, x, weights):
    """WGAN-GP's gradient penalty on a norm (the "critic"): the input gradient of a
    weighted sum of the output, its per-sample norm pushed towards 1, differentiated
    with respect to the input and the parameters."""
    x = x.detach().requires_grad_()
    params = list(model.parameters())
    out = model(x)
    (gx,) = torch.autograd.grad((out * weights).sum(), x, create_graph=True)
    penalty = (gx.flatten(1).norm(dim=1) - 1).pow(2).mean()
    # (Without an activation the penalty does not depend on the bias: a zero gradient.)
    return [gx] + list(torch.autograd.grad(penalty, [x] + params, allow_unused=True, materialize_grads=True))


def _modules(kind, train, activation, dtype, device="cpu"):
    ours, ref = make_pair(kind, activation, param_dtype=dtype, device=device)
    ours.train(train), ref.train(train)
    return ours, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("kind,train", MODES, ids=MODE_IDS)
def test_gradient_penalty_matches_torch(kind, train, activation, dtype, device):
    ours, ref = _modules(kind, train, activation, dtype, device)
    x = make_input(KINDS[kind][3], dtype, "contiguous", device=device)
    weights = make_input(KINDS[kind][3], dtype, "contiguous", seed=5, device=device)
    # The input gradient, then the penalty's input and parameter gradients.
    got = _penalty_step(ours, x, weights)
    expected = _penalty_step(_Wrapped(ref, activation), x, weights)
    names = ["input gradient", "penalty's input gradient"] + [n for n, _ in ours.named_parameters()]
    for g, e, name in zip(got, expected, names):
        assert g.dtype == e.dtype, name
        assert_close(g, e, dtype, name)
    # The recomputation must not touch the running statistics: the forward updated them once.
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())


class _Wrapped(torch.nn.Module):
    """torch.nn's norm and a separate activation, with the norm's parameters."""

    def __init__(self, norm, activation):
        super().__init__()
        self.norm, self.activation = norm, activation

    def forward(self, x):
        return activate(self.norm(x), self.activation)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("kind,train", MODES, ids=MODE_IDS)
def test_maml_meta_gradient_matches_torch(kind, train, activation):
    """MAML's second-order meta-gradient: an inner SGD step on the parameters with
    create_graph=True, the outer loss at the fast weights (functional_call), differentiated
    back to the initial parameters through the inner step's gradient."""
    dtype = torch.float64
    ours, ref = _modules(kind, train, activation, dtype)
    model = {"ours": ours, "ref": _Wrapped(ref, activation)}
    x_in = make_input(KINDS[kind][3], dtype, "contiguous", seed=2)
    x_out = make_input(KINDS[kind][3], dtype, "contiguous", seed=3)
    target = make_input(KINDS[kind][3], dtype, "contiguous", seed=4)
    meta = {}
    for which, m in model.items():
        names = [n for n, _ in m.named_parameters()]
        params = [p for _, p in m.named_parameters()]
        inner = F.mse_loss(m(x_in), target)
        grads = torch.autograd.grad(inner, params, create_graph=True)
        fast = {n: p - 0.5 * g for n, p, g in zip(names, params, grads)}
        outer = F.mse_loss(functional_call(m, fast, (x_out,)), target)
        meta[which] = torch.autograd.grad(outer, params)
    for g, e in zip(meta["ours"], meta["ref"]):
        assert_close(g, e, dtype, "meta-gradient")


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) + 0.3


# functional op -> (input shape, call with the input, weight, bias and an activation)
FUNCTIONAL = {
    "batch_norm-train": ((3, 2, 3, 2), lambda x, w, b, **a: FF.batch_norm(
        x, torch.zeros(2, dtype=x.dtype), torch.ones(2, dtype=x.dtype), w, b, True, **a)),
    "batch_norm-eval": ((3, 2, 3, 2), lambda x, w, b, **a: FF.batch_norm(
        x, torch.full((2,), 0.1, dtype=x.dtype), torch.full((2,), 0.7, dtype=x.dtype), w, b, False, **a)),
    "instance_norm": ((2, 3, 4), lambda x, w, b, **a: FF.instance_norm(x, None, None, w, b, **a)),
    "layer_norm": ((3, 2, 5), lambda x, w, b, **a: FF.layer_norm(x, (2, 5), w, b, **a)),
    "group_norm": ((2, 4, 3), lambda x, w, b, **a: FF.group_norm(x, 2, w, b, **a)),
}


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("op", list(FUNCTIONAL))
def test_gradgradcheck(op, activation):
    """Second derivatives against finite differences of the first (float64)."""
    shape, fn = FUNCTIONAL[op]
    x = _rand(*shape, seed=0).requires_grad_()
    pshape = (2, 5) if op == "layer_norm" else (shape[1],)
    w = (_rand(*pshape, seed=6) + 0.5).requires_grad_()
    b = _rand(*pshape, seed=7).requires_grad_()

    def f(x, w, b):
        return fn(x, w, b, activation=activation, negative_slope=SLOPE)
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_first_order_gradients_with_create_graph_match_the_kernels():
    """create_graph=True only for first derivatives (e.g. a Hessian-vector product's first
    step): the recomputed gradients equal the fused backward's."""
    ours, _ = make_pair("BatchNorm2d", "relu")
    x = make_input(KINDS["BatchNorm2d"][3], torch.float32, "contiguous").requires_grad_()
    dy = make_input(KINDS["BatchNorm2d"][3], torch.float32, "contiguous", seed=8)
    inputs = [x] + list(ours.parameters())
    plain = torch.autograd.grad(ours(x), inputs, dy)
    recorded = torch.autograd.grad(ours(x), inputs, dy, create_graph=True)
    for p, r in zip(plain, recorded):
        assert r.requires_grad
        assert_close(r, p, torch.float32, "gradient")


def test_hessian_vector_product_matches_torch():
    """torch.autograd.functional.hvp through a LayerNorm with a fused ReLU."""
    ours, ref = make_pair("LayerNorm", "relu", param_dtype=torch.float64)
    x = make_input(KINDS["LayerNorm"][3], torch.float64, "contiguous")
    v = make_input(KINDS["LayerNorm"][3], torch.float64, "contiguous", seed=9)
    w = make_input(KINDS["LayerNorm"][3], torch.float64, "contiguous", seed=10)

    def loss(model):
        return lambda x: (model(x).pow(2) * w).sum()
    _, got = torch.autograd.functional.hvp(loss(ours), x, v)
    _, expected = torch.autograd.functional.hvp(loss(_Wrapped(ref, "relu")), x, v)
    assert_close(got, expected, torch.float64, "hvp")
