"""Randomised comparison of every fusednorm module with torch.nn.

A case is a plain dict (JSON-serialisable, so a worker process can run it: see worker.py):
the norm and its flags, the activation, train/eval, dtype, shape, memory layout and value
distribution. run_case() builds the fusednorm module and its torch.nn twin with the same
parameters and buffers, runs a few steps and compares, step by step:
- exceptions: where torch.nn raises, fusednorm must raise the same type (and vice versa);
- outputs, input and parameter gradients and running buffers against torch.nn run in
  float64 on the same values (the arbiter): every element within the dtype's tolerance
  (its absolute part scaled by the case's condition number, see condition()), or the
  largest error at most four times torch.nn's in the case's dtype (where torch.nn is itself
  inexact: ill-conditioned inputs, half types);
- NaN and inf where torch.nn in the case's dtype has them, and nowhere else;
- the output's strides (on dims of size > 1), i.e. its memory layout.
"""
import copy
import math

import torch
import torch.nn.functional as F
from reference import REFERENCE_MODULES, reference_activation

SIZES = (0, 1, 2, 3, 5, 7, 16)
MAX_NUMEL = 3000  # small: the Triton interpreter and the CUDA emulation run these too
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
KINDS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
         "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm")
ROW_KINDS = ("LayerNorm", "RMSNorm")  # statistics over the trailing normalized_shape
VALUES = ("standard", "offset", "constant", "tiny")
LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "offset")


def strategy():
    """The hypothesis strategy of cases."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        kind = draw(st.sampled_from(KINDS))
        size = st.sampled_from(SIZES)
        c = draw(size)
        if kind.startswith(("BatchNorm", "InstanceNorm")):
            spatial_dims = int(kind[-2])
            if kind == "BatchNorm1d":
                ndim = draw(st.sampled_from((2, 3)))
            elif kind.startswith("InstanceNorm"):  # batched, or unbatched as torch allows
                ndim = spatial_dims + draw(st.sampled_from((2, 2, 1)))
            else:
                ndim = spatial_dims + 2
        elif kind == "GroupNorm":
            ndim = draw(st.integers(2, 5))
        else:
            ndim = draw(st.integers(1, 4))
        shape = [draw(size) for _ in range(ndim)]
        channel_dim = 0 if kind.startswith("InstanceNorm") and ndim == int(kind[-2]) + 1 else 1
        if kind not in ROW_KINDS:
            shape[channel_dim] = c
        shape = _bounded(shape)
        case = {"kind": kind, "shape": shape, "seed": draw(st.integers(0, 2 ** 31 - 1)),
                "dtype": draw(st.sampled_from(tuple(DTYPES))),
                "train": draw(st.booleans()),
                "activation": draw(st.sampled_from((None, "leaky_relu", *REFERENCE_MODULES))),
                "slope": draw(st.sampled_from((0.01, 0.2, -0.5))),
                "values": draw(st.sampled_from(VALUES)),
                "layout": draw(st.sampled_from(LAYOUTS)),
                "eps": draw(st.sampled_from((1e-5, 1e-3)))}
        case["float32_params"] = case["dtype"] in ("bfloat16", "float16") and draw(st.booleans())
        if kind.startswith(("BatchNorm", "InstanceNorm")):
            case["affine"] = draw(st.booleans())
            case["track_running_stats"] = draw(st.booleans())
            case["momentum"] = draw(st.sampled_from((0.1, 0.5, 1.0, None)))
        elif kind == "GroupNorm":
            cs = shape[1]
            divisors = [g for g in range(1, max(cs, 1) + 1) if cs % g == 0] if cs else [1, 2]
            case["groups"] = draw(st.sampled_from(divisors))
            case["affine"] = draw(st.booleans())
        else:
            k = draw(st.integers(1, min(2, ndim)))
            case["normalized_shape"] = shape[ndim - k:]
            case["affine"] = draw(st.booleans())
            case["bias"] = kind == "LayerNorm" and draw(st.booleans())
            if kind == "RMSNorm" and draw(st.booleans()):
                case["eps"] = None  # torch's default: the compute type's epsilon
        return case

    return cases()


def _bounded(shape):
    """shape with its largest sizes cut to 3 until it holds at most MAX_NUMEL elements."""
    shape = list(shape)
    while math.prod(shape) > MAX_NUMEL:
        i = max(range(len(shape)), key=lambda d: shape[d])
        shape[i] = 3
    return shape


# ---- building the modules and inputs ----------------------------------------------------


def _modules(case, nn, **extra):
    kind = case["kind"]
    cls = getattr(nn, kind)
    if kind.startswith(("BatchNorm", "InstanceNorm")):
        c = case["shape"][1 if len(case["shape"]) > int(kind[-2]) + 1 or kind == "BatchNorm1d" else 0]
        return cls(c, eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                   track_running_stats=case["track_running_stats"], **extra)
    if kind == "GroupNorm":
        return cls(case["groups"], case["shape"][1], eps=case["eps"], affine=case["affine"], **extra)
    if kind == "RMSNorm":
        return cls(case["normalized_shape"], eps=case["eps"], elementwise_affine=case["affine"], **extra)
    return cls(case["normalized_shape"], eps=case["eps"], elementwise_affine=case["affine"],
               bias=case["bias"], **extra)


def build(case, fusednorm):
    """(ours, reference in the case's dtype, float64 arbiter), same parameters and buffers."""
    dtype = DTYPES[case["dtype"]]
    param_dtype = torch.float32 if case["float32_params"] else dtype
    ours = _modules(case, fusednorm, activation=case["activation"], negative_slope=case["slope"])
    ref = _modules(case, torch.nn)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for p in ours.parameters():  # both signs, and exact zeros where a kink can show
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 3 - 1).round(decimals=1))
        for name, b in ours.named_buffers():
            if name == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.3)
            elif name == "running_var":
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
    ours = ours.to(param_dtype)
    ref = ref.to(param_dtype)
    ref.load_state_dict(ours.state_dict())
    arbiter = _modules(case, torch.nn).double()
    arbiter.load_state_dict(ref.state_dict())
    if case["eps"] is None:  # the case dtype's default, not float64's
        arbiter.eps = _eps(case)
    return ours, ref, arbiter


def _eps(case):
    """The case's eps; RMSNorm's None: the epsilon torch computes the case's dtype in."""
    if case["eps"] is not None:
        return case["eps"]
    return torch.finfo(torch.float64 if case["dtype"] == "float64" else torch.float32).eps


def make_input(case, step):
    """The case's input for `step`: values in float64, then the dtype and memory layout."""
    shape = case["shape"]
    dtype = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"] + 100 * step)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    kind = case["values"]
    if kind == "standard":
        values = values * 2 + 0.5
    elif kind == "offset":  # large mean, unit spread: cancellation in E[x^2] - E[x]^2
        values = values + 300
    elif kind == "tiny":  # variance far below eps
        values = 1 + 1e-3 * values
    elif kind == "constant" and values.numel():
        # Some channels (rows, for LayerNorm) constant at a value every implementation sums
        # exactly (a multiple of 1/2): they normalise to exactly 0, on the activation's kink.
        dim = values.dim() - 1 if case["kind"] in ROW_KINDS else min(1, values.dim() - 1)
        if case["kind"].startswith("InstanceNorm") and values.dim() == int(case["kind"][-2]) + 1:
            dim = 0
        pick = torch.rand(values.shape[dim], generator=g) < 0.5
        const = (torch.arange(values.shape[dim], dtype=torch.float64) % 5 - 2) * 0.5
        view = [1] * values.dim()
        view[dim] = -1
        values = torch.where(pick.view(view), const.view(view).expand_as(values), values)
    return _layout(values.to(dtype), case["layout"])


def _layout(x, layout):
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "permuted" and x.dim() >= 2:  # the same values in reversed dim order in memory
        dims = list(range(x.dim()))[::-1]
        return x.permute(dims).contiguous().permute(dims)
    if layout == "sliced" and x.dim() >= 1:  # every other element of a wider tensor, offset by one
        wide = x.new_zeros(list(x.shape[:-1]) + [2 * x.shape[-1] + 1])
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if layout == "offset":  # contiguous, but one element past the storage's start (misaligned)
        flat = x.new_zeros(x.numel() + 1)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    return x.contiguous()


# ---- running and comparing ----------------------------------------------------------------


class Mismatch(AssertionError):
    pass


def _activate(case, y):
    if case["activation"] is None:
        return y
    if case["activation"] == "leaky_relu":
        return F.leaky_relu(y, case["slope"])
    return reference_activation(case["activation"], y)


def _snap_kinks(z):
    """z with values within rounding of 0 set to exactly 0, its gradient unchanged: where the
    exact pre-activation is 0 (a constant set; dyadic data whose mean is exact), float64
    still rounds it to +-1e-15 and takes the activation's derivative on either side."""
    near = z.abs() <= 1e-9 * (1 + z.detach().abs().max())
    return z - torch.where(near, z.detach(), torch.zeros_like(z))


def _step(module, x, grad, case, act, snap=False):
    """Output, [input grad, parameter grads...] of one step, or the exception raised."""
    try:
        x = x.detach().requires_grad_()
        y = module(x)
        if snap:
            y = _snap_kinks(y)
        if act:
            y = _activate(case, y)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad((y * grad.to(y.dtype)).sum(), [x] + params, allow_unused=True,
                                    materialize_grads=True)
        return y.detach(), list(grads)
    except Exception as e:  # noqa: BLE001 - any exception is compared with torch.nn's
        return e, None


def tolerance(dtype):
    """(rtol, atol) of a result stored in dtype, against the float64 arbiter."""
    if dtype == torch.float64:
        return 1e-9, 1e-9
    if dtype == torch.float32:
        return 1e-4, 1e-5
    eps = torch.finfo(dtype).eps
    return 2 * eps, 2 * eps


def condition(case, x):
    """max|x| / min sqrt(var + eps) over the case's normalised sets: how much a rounding of a
    statistic (the mean, stored in float32 or float64) can move the result, relative to the
    result's scale. Large for a big offset or a variance far below eps."""
    x = x.detach().double()
    kind = case["kind"]
    if x.numel() == 0:
        return 1.0
    if kind in ROW_KINDS:
        sets = x.reshape(-1, math.prod(case["normalized_shape"]))
    elif kind.startswith("BatchNorm"):
        sets = x.transpose(0, 1).reshape(x.shape[1], -1)
    elif kind.startswith("InstanceNorm"):
        sets = x.reshape(-1, math.prod(x.shape[-int(kind[-2]):]))
    else:
        sets = x.reshape(x.shape[0] * case["groups"], -1)
    var = sets.square().mean(dim=1) if kind == "RMSNorm" else sets.var(dim=1, unbiased=False)
    return (x.abs().max() / (var.min() + _eps(case)).sqrt()).item()


def compare_either(what, ours, ref, arbiters, dtype, cond=1.0):
    """compare() against any of the arbiters (float64, and float64 with exact kinks)."""
    errors = []
    for arbiter in arbiters:
        try:
            return compare(what, ours, ref, arbiter, dtype, cond)
        except Mismatch as e:
            errors.append(str(e))
    raise Mismatch(errors[0])


def compare(what, ours, ref, arbiter, dtype, cond=1.0):
    """ours within the dtype's tolerance of the arbiter (its absolute part scaled by the
    condition number when the statistics are rounded to dtype's accumulation type), or its
    largest error at most four times torch.nn's (ref); NaN/inf exactly where torch.nn has
    them."""
    if ours.shape != ref.shape:
        raise Mismatch(f"{what}: shape {tuple(ours.shape)}, torch.nn {tuple(ref.shape)}")
    if ours.dtype != ref.dtype:
        raise Mismatch(f"{what}: dtype {ours.dtype}, torch.nn {ref.dtype}")
    if ours.numel() == 0:
        return
    o, r, a = ours.double(), ref.double(), arbiter.double()
    for name, fn in (("NaN", torch.isnan), ("inf", torch.isinf)):
        if not torch.equal(fn(o), fn(r)):
            raise Mismatch(f"{what}: {name} at {fn(o).sum().item()} places, torch.nn at "
                           f"{fn(r).sum().item()} (ours {o.flatten()[:8].tolist()}, torch.nn "
                           f"{r.flatten()[:8].tolist()})")
    inf = torch.isinf(r)
    if not torch.equal(o[inf], r[inf]):
        raise Mismatch(f"{what}: infinities of other signs than torch.nn's")
    finite = torch.isfinite(o) & torch.isfinite(a)
    o, r, a = o[finite], r[finite], a[finite]
    if o.numel() == 0:
        return
    rtol, atol = tolerance(dtype)
    scale = max(1.0, a.abs().max().item())
    stat_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    err = (o - a).abs()
    bad = err > rtol * a.abs() + max(atol, 8 * stat_eps * cond) * scale
    # Where torch.nn is itself inexact (cancellation in ill-conditioned input, half types),
    # which elements its roundings hit is luck: compare the largest errors.
    torch_err = (r - a).abs().max().item()
    if bad.any() and err.max().item() > 4 * torch_err:
        i = int(torch.argmax(err))
        raise Mismatch(f"{what}: {int(bad.sum())} of {o.numel()} elements off; worst: ours "
                       f"{o.flatten()[i].item()!r}, torch.nn {r.flatten()[i].item()!r}, float64 "
                       f"{a.flatten()[i].item()!r} (torch.nn's largest error {torch_err:.3g})")


def _strides(t):
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def run_case(case, fusednorm, steps=2):
    """Runs the case; raises Mismatch on the first difference from torch.nn."""
    dtype = DTYPES[case["dtype"]]
    ours, ref, arbiter = build(case, fusednorm)
    for m in (ours, ref, arbiter):
        m.train(case["train"])
    for step in range(steps):
        x = make_input(case, step)
        g = torch.Generator().manual_seed(case["seed"] + 7 + step)
        # The upstream gradient in the case's dtype, so that every side gets the same values.
        grad = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        y, grads = _step(ours, x, grad, case, act=False)
        yr, grads_r = _step(ref, x, grad, case, act=True)
        # Contiguous: the arbiter gives values, not layouts (torch.nn's own CPU BatchNorm
        # backward is wrong for some strides: a (1, 3, 1, 5) input with strides (1, 1, 3, 3)).
        x64 = x.double().contiguous()
        ya, grads_a = _step(arbiter, x64, grad, case, act=True)
        # The same with pre-activations within rounding of 0 taken as exactly 0 (the derivative
        # at the kink as torch defines it); the running buffers are the first call's.
        state = copy.deepcopy(arbiter.state_dict())
        snapped = _step(arbiter, x64, grad, case, act=True, snap=True) if case["activation"] else None
        arbiter.load_state_dict(state)
        if isinstance(yr, Exception) or isinstance(y, Exception):
            if type(y) is not type(yr):
                raise Mismatch(f"step {step}: fusednorm gave {y!r}, torch.nn {yr!r}")
            return
        if isinstance(ya, Exception):
            raise Mismatch(f"step {step}: the float64 arbiter raised {ya!r}")
        cond = condition(case, x)
        compare(f"step {step} output", y, yr, ya, dtype, cond)
        if y.numel() and y.dim() and _strides(y) != _strides(yr):
            raise Mismatch(f"step {step} output strides {y.stride()}, torch.nn {yr.stride()}")
        names = ["input grad"] + [f"{n} grad" for n, _ in ours.named_parameters()]
        for i, (name, a, b, c) in enumerate(zip(names, grads, grads_r, grads_a)):
            arbiters = [c] + ([snapped[1][i]] if snapped and not isinstance(snapped[0], Exception) else [])
            compare_either(f"step {step} {name}", a, b, arbiters, b.dtype, cond)
        for (name, b), (_, br), (_, ba) in zip(ours.named_buffers(), ref.named_buffers(),
                                              arbiter.named_buffers()):
            if b.is_floating_point():
                compare(f"step {step} {name}", b, br, ba, b.dtype)
            elif not torch.equal(b, br):
                raise Mismatch(f"step {step} {name}: {b.tolist()}, torch.nn {br.tolist()}")
