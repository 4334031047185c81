"""torch.autograd.gradcheck (float64) on every functional op x activation x affine x
training mode, and torch.library.opcheck on every op."""
import pytest
import torch

import fusednorm
import fusednorm.functional as FF
from helpers import ACTIVATIONS, SLOPE, TARGETS

DEVICE = "cpu"
FAST = False


@pytest.fixture(params=TARGETS, autouse=True)
def device(request):
    """Every test here runs once per (device, backend); rand() makes its tensors on the
    device and the backend is selected for the test's duration. The Triton interpreter is
    slow: there gradcheck uses fast mode (random projections of the same Jacobians)."""
    global DEVICE, FAST
    DEVICE, backend = request.param
    FAST = backend == "triton" and DEVICE == "cpu"
    with fusednorm.use_backend(backend):
        yield DEVICE
    DEVICE, FAST = "cpu", False


def rand(*shape, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(DEVICE).requires_grad_(requires_grad)


def affine_params(c, affine):
    if not affine:
        return None, None
    return (rand(c, seed=6, requires_grad=False) + 0.5).requires_grad_(), rand(c, seed=7)


def check(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=FAST)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_batch_norm(activation, affine, training, layout):
    shape = {"nchw": (3, 2, 3, 2), "channels_last": (3, 2, 3, 2), "2d": (5, 3)}[layout]
    x = rand(*shape)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b = affine_params(shape[1], affine)
    rm = torch.zeros(shape[1], dtype=torch.float64, device=DEVICE) + 0.1
    rv = torch.ones(shape[1], dtype=torch.float64, device=DEVICE) * 0.7

    def fn(x, w, b):
        return FF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                             activation=activation, negative_slope=SLOPE)
    check(fn, (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("use_input_stats", [True, False], ids=["train", "eval"])
def test_instance_norm(activation, affine, use_input_stats):
    x = rand(2, 3, 4)
    w, b = affine_params(3, affine)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE) + 0.1
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE) * 0.7

    def fn(x, w, b):
        return FF.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats, 0.1, 1e-5,
                                activation=activation, negative_slope=SLOPE)
    check(fn, (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm(activation, affine):
    x = rand(3, 2, 5)
    w = rand(2, 5, seed=3) if affine else None
    b = rand(2, 5, seed=4) if affine else None
    check(lambda x, w, b: FF.layer_norm(x, (2, 5), w, b, 1e-5, activation=activation, negative_slope=SLOPE), (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm(activation, affine, groups):
    x = rand(2, 4, 3)
    w, b = affine_params(4, affine)
    check(lambda x, w, b: FF.group_norm(x, groups, w, b, 1e-5, activation=activation, negative_slope=SLOPE), (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS + ["silu"], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm(activation, affine):
    x = rand(3, 2, 5)
    w = rand(2, 5, seed=3) if affine else None
    check(lambda x, w: FF.rms_norm(x, (2, 5), w, 1e-5, activation=activation, negative_slope=SLOPE), (x, w))


@pytest.mark.parametrize("activation", [None, "silu"], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_add_norm(rms, activation):
    """Both outputs (the normalised sum and the sum itself) differentiated."""
    x, r, w, b = rand(3, 2, 5), rand(3, 2, 5, seed=1), rand(2, 5, seed=3), rand(2, 5, seed=4)

    def fn(x, r, w, b):
        if rms:
            return FF.add_rms_norm(x, r, (2, 5), w, 1e-5, activation=activation)
        return FF.add_layer_norm(x, r, (2, 5), w, b, 1e-5, activation=activation)
    check(fn, (x, r, w, b if not rms else b.detach()))


# ---- torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch ----

def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def opcheck_cases():
    """(name, op name, arguments) for torch.ops.<backend namespace>.<op name>."""
    c = 3
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    x = _x(4, c, 5, 2)
    xcl = x.to(memory_format=torch.channels_last)
    for act in (0, 1, 2):
        for xi in (x, xcl):
            yield "bn_stats", "batch_norm_stats", (xi,)
            yield "bn_fwd_train", "batch_norm_fwd", (xi, w, b, torch.zeros(c), torch.ones(c), True, 0.1, 1e-5, act, 0.2, 0.0)
            yield "bn_fwd_eval", "batch_norm_fwd", (xi, w, b, torch.zeros(c), torch.ones(c), False, 0.1, 1e-5, act, 0.2, 0.0)
            yield "bn_fwd_residual", "batch_norm_fwd", (xi, w, b, torch.zeros(c), torch.ones(c), True, 0.1, 1e-5, act, 0.2, 0.0, torch.randn_like(xi))
            mean, rstd = torch.randn(c), torch.rand(c) + 0.5
            yield "bn_bwd", "batch_norm_bwd", (torch.randn_like(xi), xi, w, b, mean, rstd, True, act, 0.2, 0.0, [True, True, True])
        yield "bn_bwd_partial", "batch_norm_bwd", (torch.randn_like(x), x, w, None, torch.randn(c), torch.rand(c) + 0.5, False, act, 0.2, 0.0, [False, True, False])
        lw, lb = torch.rand(5, 2) + 0.5, torch.randn(5, 2)
        yield "ln_fwd", "layer_norm_fwd", (x, [5, 2], lw, lb, 1e-5, act, 0.2, 0.0)
        yield "ln_bwd", "layer_norm_bwd", (torch.randn_like(x), x, [5, 2], torch.randn(12), torch.rand(12) + 0.5, lw, lb, act, 0.2, 0.0, [True, True, True])
        xg = _x(4, 6, 5)
        gw, gb = torch.rand(6) + 0.5, torch.randn(6)
        yield "gn_fwd", "group_norm_fwd", (xg, 3, gw, gb, 1e-5, act, 0.2, 0.0)
        yield "gn_fwd_cl", "group_norm_fwd", (_x(2, 6, 3, 3).to(memory_format=torch.channels_last), 3, gw, gb, 1e-5, act, 0.2, 0.0)
        yield "gn_bwd", "group_norm_bwd", (torch.randn_like(xg), xg, 3, torch.randn(4, 3), torch.rand(4, 3) + 0.5, gw, gb, act, 0.2, 0.0, [True, True, True])
        yield "in_fwd", "instance_norm_fwd", (xg, gw, gb, torch.zeros(6), torch.ones(6), 0.1, 1e-5, act, 0.2, 0.0)
        yield "in_fwd_nostats", "instance_norm_fwd", (xg, None, None, None, None, 0.1, 1e-5, act, 0.2, 0.0)
    # RMSNorm and the residual add (add_norm_fwd/bwd), with each residual dtype.
    x16 = x.bfloat16()
    for rms, bias in ((False, lb), (True, None)):
        name = "rms" if rms else "ln"
        yield f"{name}_add_fwd", "add_norm_fwd", (x, torch.randn_like(x), [5, 2], lw, bias, 1e-5, rms, False, 3, 0.0, 0.0)
        yield f"{name}_fwd", "add_norm_fwd", (x, None, [5, 2], lw, bias, 1e-5, rms, False, 1, 0.0, 0.0)
        yield f"{name}_add_fwd_fp32", "add_norm_fwd", (x16, torch.randn_like(x), [5, 2], lw, bias, 1e-5, rms, True, 0, 0.0, 0.0)
        yield f"{name}_add_fwd_fp32_first", "add_norm_fwd", (x16, torch.randn_like(x16), [5, 2], lw, bias, 1e-5, rms, True, 0, 0.0, 0.0)
        stats = (torch.zeros(12) if rms else torch.randn(12), torch.rand(12) + 0.5)
        yield f"{name}_add_bwd", "add_norm_bwd", (torch.randn_like(x), torch.randn_like(x), x, [5, 2], *stats, lw, bias, rms, 3, 0.0, 0.0, [True] * 3)
        yield f"{name}_bwd", "add_norm_bwd", (torch.randn_like(x), None, x, [5, 2], *stats, lw, bias, rms, 0, 0.0, 0.0, [True, True, False])
    # LayerNorm over a dim of size 0: one (empty) row per leading index, as the fake kernel
    # and torch count them (the compiled ops once returned no statistics at all there).
    e = _x(4, 3, 0)
    yield "ln_fwd_empty_rows", "layer_norm_fwd", (e, [3, 0], None, None, 1e-5, 0, 0.2, 0.0)
    yield "ln_bwd_empty_rows", "layer_norm_bwd", (torch.randn_like(e), e, [3, 0], torch.zeros(4), torch.zeros(4), None, None, 0, 0.2, 0.0, [True] * 3)
    # Layouts whose memory format is easy to misjudge (test_layouts.py): channels_last-dense
    # with ambiguous strides, and channels_last sliced out of density.
    ambiguous = torch.randn(18).as_strided((3, 3, 1, 2), (6, 1, 18, 3))
    sliced = _x(2, c, 5, 8).to(memory_format=torch.channels_last)[..., :4]
    for name, xi in (("ambiguous_cl", ambiguous), ("sliced_cl", sliced)):
        n = xi.shape[0]
        yield f"bn_fwd_{name}", "batch_norm_fwd", (xi, w, b, torch.zeros(c), torch.ones(c), True, 0.1, 1e-5, 1, 0.2, 0.0)
        yield f"bn_bwd_{name}", "batch_norm_bwd", (torch.randn(xi.shape), xi, w, b, torch.randn(c), torch.rand(c) + 0.5, True, 1, 0.2, 0.0, [True] * 3)
        yield f"gn_fwd_{name}", "group_norm_fwd", (xi, 3, w, b, 1e-5, 1, 0.2, 0.0)
        yield f"gn_bwd_{name}", "group_norm_bwd", (torch.randn(xi.shape), xi, 3, torch.randn(n, 3), torch.rand(n, 3) + 0.5, w, b, 1, 0.2, 0.0, [True] * 3)
        yield f"in_fwd_{name}", "instance_norm_fwd", (xi, w, b, None, None, 0.1, 1e-5, 1, 0.2, 0.0)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("op,args", [pytest.param(op, args, id=name) for name, op, args in opcheck_cases()])
def test_opcheck(op, args, device):
    args = _to(args, device)
    torch.library.opcheck(getattr(fusednorm.backend.ops_for(args[0]), op), args)
