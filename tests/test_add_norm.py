"""RMSNorm's and the fused residual add's own tests (RMSNorm also runs through every suite
that iterates over helpers.KINDS): add_layer_norm / add_rms_norm and the modules' residual
form against torch.nn's composition (F.layer_norm(x + r) ...), both outputs and every
gradient, each dtype and residual dtype, residual_in_fp32; torch.nn.RMSNorm's eps default
and output dtype; the errors."""
import pytest
import torch
import torch.nn.functional as F

import fusednorm
from fusednorm import functional as FN
from helpers import SLOPE, TARGETS, activate, add_norm_reference, assert_close, make_input

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter's cases in the slow tier (about a second each).
TARGETS = [pytest.param(*t.values, id=t.id, marks=list(t.marks) + ([pytest.mark.slow] if "interpreter" in t.id else []))
           for t in TARGETS]
SHAPE, NORMALIZED = (3, 5, 24), (24,)


def _case(dtype, residual_dtype, device, seed=0):
    x = make_input(SHAPE, dtype, "contiguous", seed=seed, device=device)
    r = make_input(SHAPE, residual_dtype, "contiguous", seed=seed + 1, device=device)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    w = make_input(NORMALIZED, param, "contiguous", seed=seed + 2, device=device)
    b = make_input(NORMALIZED, param, "contiguous", seed=seed + 3, device=device)
    dy = make_input(SHAPE, dtype, "contiguous", seed=seed + 4, device=device)
    return x, r, w, b, dy


def _coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _check(target, rms, dtype, residual_dtype, residual_in_fp32, activation, use_sum=True):
    device, backend = target
    x, r, w, b, dy = _case(dtype, residual_dtype, device)
    bias = None if rms else b
    sum_dtype = torch.float32 if residual_in_fp32 else dtype
    ds = make_input(SHAPE, sum_dtype, "contiguous", seed=9, device=device) if use_sum else None
    eps = 1e-5
    leaves = [t.clone().requires_grad_() for t in (x, r, w)] + ([b.clone().requires_grad_()] if not rms else [])
    with fusednorm.use_backend(backend):
        if rms:
            y, s = FN.add_rms_norm(leaves[0], leaves[1], NORMALIZED, leaves[2], eps, activation=activation,
                                   negative_slope=SLOPE, residual_in_fp32=residual_in_fp32)
        else:
            y, s = FN.add_layer_norm(leaves[0], leaves[1], NORMALIZED, leaves[2], leaves[3], eps,
                                     activation=activation, negative_slope=SLOPE, residual_in_fp32=residual_in_fp32)
        outs, grads = [y], [dy]
        if use_sum:
            outs.append(s)
            grads.append(ds)
        got = torch.autograd.grad(outs, leaves, grads)
    yr, sr, dxr, drr, dwr, dbr = add_norm_reference(x, r, NORMALIZED, w, bias, rms, residual_in_fp32, activation,
                                                    eps, dy, ds)
    assert y.dtype == dtype and s.dtype == sum_dtype
    assert torch.equal(s, sr), "the sum is x + r rounded once to its dtype"
    assert_close(y, yr, _coarser(dtype, sum_dtype), "output")
    # The inputs' gradient is computed in the sum's dtype, then rounded to each input's.
    assert got[0].dtype == dtype and got[1].dtype == residual_dtype
    assert_close(got[0], dxr, _coarser(dtype, sum_dtype), "d input")
    assert_close(got[1], drr, _coarser(residual_dtype, sum_dtype), "d residual")
    assert_close(got[2], dwr, _coarser(dtype, sum_dtype), "d weight")
    if not rms:
        assert_close(got[3], dbr, _coarser(dtype, sum_dtype), "d bias")


@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("target", TARGETS)
def test_add_norm_matches_composition(target, rms, dtype, activation):
    _check(target, rms, dtype, dtype, False, activation)


@pytest.mark.parametrize("use_sum", [True, False], ids=["sum-used", "sum-unused"])
@pytest.mark.parametrize("dtype,residual_dtype,residual_in_fp32", [
    (torch.bfloat16, torch.float32, True),    # a float32 residual stream beside bfloat16 activations
    (torch.bfloat16, torch.bfloat16, True),   # its first block: the residual still bfloat16
    (torch.bfloat16, torch.float32, False),   # a float32 residual summed into bfloat16
    (torch.float16, torch.float32, True),
    (torch.float64, torch.float64, True),     # a float64 input summed into float32
    (torch.float64, torch.float32, False),    # a float32 residual summed into float64
], ids=["fp32-stream", "first-block", "fp32-into-bf16", "fp16-fp32-stream", "f64-into-fp32", "fp32-into-f64"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("target", TARGETS)
def test_residual_dtypes(target, rms, dtype, residual_dtype, residual_in_fp32, use_sum):
    _check(target, rms, dtype, residual_dtype, residual_in_fp32, "silu", use_sum)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_module_residual_form(rms):
    """LayerNorm(...)(x, residual=r) and RMSNorm(...)(x, residual=r) return the functional
    pair; without a residual, the plain norm."""
    cls = fusednorm.RMSNorm if rms else fusednorm.LayerNorm
    m = cls(NORMALIZED, activation="gelu")
    x, r, *_ = _case(torch.float32, torch.float32, "cpu")
    y, s = m(x, residual=r)
    if rms:
        ye, se = FN.add_rms_norm(x, r, NORMALIZED, m.weight, m.eps, activation="gelu")
        plain = FN.rms_norm(x, NORMALIZED, m.weight, m.eps, activation="gelu")
    else:
        ye, se = FN.add_layer_norm(x, r, NORMALIZED, m.weight, m.bias, m.eps, activation="gelu")
        plain = FN.layer_norm(x, NORMALIZED, m.weight, m.bias, m.eps, activation="gelu")
    assert torch.equal(y, ye) and torch.equal(s, se)
    assert torch.equal(m(x), plain)
    m32 = cls(NORMALIZED, residual_in_fp32=True)
    assert m32(x.bfloat16(), residual=r.bfloat16())[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["same-weight", "float32-weight"])
def test_rms_norm_default_eps_and_dtype(dtype, weight_dtype):
    """eps=None is torch's default (the epsilon of the type torch computes in), visible on
    rows of tiny values; the output has the input's dtype, also beside a float32 weight."""
    x = torch.full((2, 4), 1e-4, dtype=dtype)
    x[1] = torch.tensor([3e-4, -1e-4, 2e-4, 0.0], dtype=dtype)
    w = torch.tensor([1.5, -0.5, 2.0, 1.0], dtype=weight_dtype or dtype)
    y = FN.rms_norm(x, (4,), w)
    yr = F.rms_norm(x, (4,), w)
    assert y.dtype == yr.dtype
    assert_close(y, yr.double(), dtype, "output")
    m, mr = fusednorm.RMSNorm(4, dtype=dtype), torch.nn.RMSNorm(4, dtype=dtype)
    assert m.eps is None and repr(m).startswith("RMSNorm((4,), eps=None")
    assert_close(m(x), mr(x).double(), dtype, "module output")


def test_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="residual has shape"):
        FN.add_layer_norm(x, torch.randn(2, 3, 7), (8,))
    with pytest.raises(RuntimeError, match="residual has dtype"):
        FN.add_rms_norm(x.bfloat16(), torch.randn(2, 3, 8, dtype=torch.float16), (8,))
    with pytest.raises(RuntimeError, match="RMSNorm has no bias"):
        torch.ops.fusednorm.add_norm_fwd(x, None, [8], None, torch.zeros(8), 1e-5, True, False, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="activation"):
        fusednorm.RMSNorm(8, activation="swish2")
    with pytest.raises(RuntimeError, match="normalized_shape"):
        FN.rms_norm(x, (5,))


def _fn64(rms, activation):
    """add_{rms,layer}_norm on float64 (x, r, w, b), both outputs returned."""
    def fn(x, r, w, b):
        if rms:
            return FN.add_rms_norm(x, r, NORMALIZED, w, 1e-5, activation=activation)
        return FN.add_layer_norm(x, r, NORMALIZED, w, b, 1e-5, activation=activation)
    return fn


def _ref64(rms, activation):
    def fn(x, r, w, b):
        s = x + r
        y = F.rms_norm(s, NORMALIZED, w, 1e-5) if rms else F.layer_norm(s, NORMALIZED, w, b, 1e-5)
        return activate(y, activation), s
    return fn


def _inputs64(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
            for s in ((2, 3, 24), (2, 3, 24), NORMALIZED, NORMALIZED)]


@pytest.mark.parametrize("activation", [None, "silu"], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_double_backward(rms, activation):
    """gradgradcheck through both outputs (the backward recomputed in torch ops)."""
    x, r, w, b = _inputs64()
    inputs = (x, r, w, b) if not rms else (x, r, w, b.detach())
    assert torch.autograd.gradgradcheck(_fn64(rms, activation), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", [None, "silu"], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_forward_mode(rms, activation):
    """torch.func.jvp of both outputs against torch.nn's composition."""
    primals = _inputs64()
    tangents = _inputs64(seed=1)
    primals, tangents = [p.detach() for p in primals], [t.detach() for t in tangents]
    out, out_t = torch.func.jvp(_fn64(rms, activation), tuple(primals), tuple(tangents))
    ref, ref_t = torch.func.jvp(_ref64(rms, activation), tuple(primals), tuple(tangents))
    for a, e, what in zip((*out, *out_t), (*ref, *ref_t), ("y", "sum", "y tangent", "sum tangent")):
        assert_close(a, e, torch.float64, what)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_vmap_per_sample_gradients(rms):
    """vmap(grad) over samples: each sample's gradients as from its own call."""
    x, r, w, b = (t.detach().float() for t in _inputs64())
    fn = _fn64(rms, "silu")

    def loss(w, b, x, r):
        y, s = fn(x, r, w, b)
        return (y * s).sum()
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2, 3)), in_dims=(None, None, 0, 0))(w, b, x, r)
    for i in range(x.shape[0]):
        one = torch.func.grad(loss, argnums=(0, 1, 2, 3))(w, b, x[i], r[i])
        for a, e, what in zip(per_sample, one, ("weight", "bias", "input", "residual")):
            if rms and what == "bias":
                continue
            assert_close(a[i], e, torch.float32, what)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,normalized", [((0, 8), (8,)), ((3, 0), (0,)), ((2, 3, 0), (3, 0)), ((0, 0), (0,))],
                         ids=["no-rows", "empty-rows", "empty-rows-2d", "nothing"])
@pytest.mark.parametrize("target", TARGETS)
def test_zero_size(target, shape, normalized, rms):
    """No rows or empty rows: torch.nn's shapes, the sum, and gradients of the right shapes."""
    device, backend = target
    x = torch.randn(shape, device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(normalized, device=device, requires_grad=True)
    with fusednorm.use_backend(backend):
        if rms:
            y, s = FN.add_rms_norm(x, r, normalized, w)
            yr = F.rms_norm(x + r, normalized, w)
        else:
            y, s = FN.add_layer_norm(x, r, normalized, w)
            yr = F.layer_norm(x + r, normalized, w)
        grads = torch.autograd.grad(y.sum() + s.sum(), [x, r, w])
    assert y.shape == yr.shape and torch.equal(s, (x + r).detach())
    assert [g.shape for g in grads] == [x.shape, r.shape, w.shape]
