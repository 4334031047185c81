"""Shared test helpers: the torch.nn reference (norm then a separate activation),
dtype-derived tolerances, and builders for paired fusednorm / torch.nn modules."""
import pytest
import torch
import torch.nn.functional as F
from reference import REFERENCE_MODULES, reference_activation

import fusednorm

ACTIVATIONS = [None, "relu", "leaky_relu"]

NO_GPU = ("no CUDA GPU on this machine: the CUDA kernels' logic is checked on the CPU by "
          "tests/test_cuda_emulation.py; run this suite (or python -m fusednorm.selftest) on a GPU")
# Parity, gradcheck and opcheck suites run on each device; CUDA cases skip (visibly) without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]


def triton_installed():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on_cpu():
    from fusednorm.triton import kernels_interpreted
    return kernels_interpreted()


NO_TRITON = "the triton package is not installed: the Triton backend's tests need it"
NO_INTERPRETER = ("the Triton kernels were compiled for the GPU (TRITON_INTERPRET is not 1), so they "
                  "cannot run on CPU tensors; the triton-cuda cases cover them")
# Triton's interpreter on CPU tensors; skipped (with the reason) without triton.
TRITON_CPU = (pytest.mark.skipif(not triton_runs_on_cpu(), reason=NO_INTERPRETER) if triton_installed()
              else pytest.mark.skip(reason=NO_TRITON))
# (device, backend) pairs: the compiled kernels on each device, and the Triton kernels in
# the interpreter on CPU tensors (the CI's way) or on the GPU.
TARGETS = [
    pytest.param(("cpu", "auto"), id="cpu"),
    pytest.param(("cuda", "auto"), id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
    pytest.param(("cpu", "triton"), id="triton-interpreter", marks=TRITON_CPU),
    pytest.param(("cuda", "triton"), id="triton-cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
]
SLOPE = 0.2  # a leaky slope far from 0 and 1, so a wrong derivative shows


# Every activation form: each name, and the module forms whose parameters differ from the
# name's defaults (so a parameter that is not honoured shows).
ALL_ACTIVATIONS = [*REFERENCE_MODULES, "leaky_relu",
                   torch.nn.GELU(approximate="tanh"), torch.nn.ELU(alpha=0.5), torch.nn.CELU(alpha=2.0),
                   torch.nn.Hardtanh(-0.5, 1.5), torch.nn.Softplus(beta=2.0, threshold=1.0),
                   torch.nn.LeakyReLU(0.3)]


def activation_id(activation):
    return repr(activation).replace(" ", "") if isinstance(activation, torch.nn.Module) else str(activation)


def activate(y, activation, negative_slope=SLOPE):
    """torch.nn's activation applied to y: a name (torch.nn's default module; leaky_relu with
    negative_slope) or a torch.nn module itself."""
    if activation is None:
        return y
    if isinstance(activation, torch.nn.Module):
        return activation(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return reference_activation(activation, y)


def tolerances(dtype):
    """(rtol, atol) for results stored in `dtype`, derived from its machine epsilon.

    float32/float64: DESIGN.md's 1e-4/1e-5 and a float64 analogue. Half types are compared
    against a float32 reference, so the tolerance is the rounding of the final store
    (half an ulp, relative) with a margin: one epsilon."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype == torch.float32:
        return 1e-4, 1e-5
    eps = torch.finfo(dtype).eps
    return eps, eps


def assert_close(actual, expected, dtype, what=""):
    """Compare `actual` (any dtype) with the reference; atol scales with the reference's
    magnitude so reductions (gradients of parameters) get the same relative precision."""
    rtol, atol = tolerances(dtype)
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(),
                               rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_same_buffers(ours, ref):
    """Two modules' buffers, as (name, tensor) pairs in the same order (named_buffers(), or
    a dict's items()): floating-point ones within their dtype's tolerance, the others
    (num_batches_tracked) equal."""
    for (name, b), (_, br) in zip(ours, ref):
        if b.is_floating_point():
            assert_close(b, br, b.dtype, name)
        else:
            assert torch.equal(b, br), name


# kind -> (fusednorm class, torch.nn class, constructor args, input shape)
KINDS = {
    "BatchNorm1d": (fusednorm.BatchNorm1d, torch.nn.BatchNorm1d, (3,), (4, 3, 5)),
    "BatchNorm2d": (fusednorm.BatchNorm2d, torch.nn.BatchNorm2d, (4,), (3, 4, 5, 6)),
    "BatchNorm3d": (fusednorm.BatchNorm3d, torch.nn.BatchNorm3d, (3,), (2, 3, 4, 3, 5)),
    "InstanceNorm1d": (fusednorm.InstanceNorm1d, torch.nn.InstanceNorm1d, (4,), (3, 4, 7)),
    "InstanceNorm2d": (fusednorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,), (3, 4, 5, 6)),
    "InstanceNorm3d": (fusednorm.InstanceNorm3d, torch.nn.InstanceNorm3d, (3,), (2, 3, 4, 3, 5)),
    "LayerNorm": (fusednorm.LayerNorm, torch.nn.LayerNorm, ((5, 6),), (3, 4, 5, 6)),
    "GroupNorm": (fusednorm.GroupNorm, torch.nn.GroupNorm, (2, 4), (3, 4, 5, 6)),
    "RMSNorm": (fusednorm.RMSNorm, torch.nn.RMSNorm, ((5, 6),), (3, 4, 5, 6)),
}

# Extra constructor arguments so every code path (affine, running statistics) is used.
KIND_KWARGS = {k: ({"affine": True, "track_running_stats": True} if k.startswith("Instance") else {})
               for k in KINDS}


def make_pair(kind, activation, param_dtype=torch.float32, seed=0, device="cpu", **kwargs):
    """A fusednorm module and a torch.nn module with the same random parameters/buffers."""
    ours_cls, ref_cls, args, _ = KINDS[kind]
    kw = dict(KIND_KWARGS[kind], **kwargs)
    ours = ours_cls(*args, **kw, activation=activation, negative_slope=SLOPE).to(param_dtype)
    ref = ref_cls(*args, **kw).to(param_dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():  # signs of both kinds, away from zero
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(p.dtype))
        for name, b in ours.named_buffers():
            if name == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype) * 0.3)
            elif name == "running_var":
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5).to(b.dtype))
    ref.load_state_dict(ours.state_dict())
    return ours.to(device), ref.to(device)


def make_input(shape, dtype, layout, seed=1, device="cpu"):
    """A random input in `layout`: contiguous, channels_last or non-contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontiguous":  # every other element of a wider tensor
        wide = list(shape[:-1]) + [shape[-1] * 2]
        x = (torch.randn(wide, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def layouts_for(kind):
    ndim = len(KINDS[kind][3])
    return ["contiguous", "noncontiguous"] + (["channels_last"] if ndim in (4, 5) else [])


def assert_same_where_finite(actual, expected, all_finite):
    """Gradients with inf/NaN inputs: finite at the same places as the reference and close
    there (float32 tolerances); all finite if all_finite."""
    rtol, atol = tolerances(torch.float32)
    for name, a, e in zip(["input", "weight", "bias"], actual, expected):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: finite at other places than the reference"
        torch.testing.assert_close(a[finite], e[finite].to(a.dtype), rtol=rtol, atol=atol, msg=name)
        assert bool(finite.all()) or not all_finite, f"{name}: non-finite values where the reference has none"


def add_norm_reference(x, residual, normalized_shape, weight, bias, rms, residual_in_fp32, activation, eps, dy,
                       ds):
    """torch.nn's composition for add_layer_norm / add_rms_norm (and, without a residual,
    layer_norm / rms_norm): (y, sum, dx, dresidual, dweight, dbias), y and the gradients in
    float64, the sum exactly as stored: x + r in float32 (float64 for float64), rounded
    once to its dtype. The norm normalises that stored sum (as F.layer_norm(x + r) does),
    and the gradients pass through the rounding unchanged. dy, ds: the gradients of y and
    of the sum (ds may be None)."""
    sum_dtype = torch.float32 if residual_in_fp32 else x.dtype
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    x64, r64, w64, b64 = leaves
    if residual is None:
        stored, s64 = None, x64
    else:
        stored = (x.to(wide) + residual.to(wide)).to(sum_dtype)
        exact = x64 + r64
        s64 = exact - exact.detach() + stored.double()  # the stored value, the sum's gradient
    shape = tuple(normalized_shape)
    if rms:
        y = F.rms_norm(s64, shape, w64, eps)
    else:
        y = F.layer_norm(s64, shape, w64, b64, eps)
    y = activate(y, activation)
    outs, grads_in = [y], [dy.double()]
    if stored is not None and ds is not None:
        outs.append(s64)
        grads_in.append(ds.double())
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, wanted, grads_in, allow_unused=True)
    by_leaf = iter(grads)
    full = [next(by_leaf) if t is not None else None for t in leaves]
    return (y.detach(), stored, *full)
