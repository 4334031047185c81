"""Every fused activation against torch.nn (the norm, then the activation module): outputs,
input and parameter gradients and running buffers for every norm kind x activation x
train/eval x dtype; gradcheck, double backward and forward mode per activation; the
accepted forms and the ValueError for the rest."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_parity import check_module_parity

import fusednorm
from helpers import (
    ALL_ACTIVATIONS,
    SLOPE,
    TARGETS,
    activate,
    activation_id,
    make_input,
)

# One kind per kernel family: channel kernels (BatchNorm), per-instance rows with running
# statistics (InstanceNorm), LayerNorm's own kernels, grouped rows (GroupNorm).
PARITY_KINDS = ["BatchNorm2d", "InstanceNorm2d", "LayerNorm", "GroupNorm", "RMSNorm"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def parity_params():
    """CPU: every kind x activation x train/eval x dtype (and channels_last BatchNorm). The
    Triton interpreter (about a second a case, slow tier): float32 training, BatchNorm and
    LayerNorm (channel and row kernels), every activation."""
    for target in TARGETS:
        device, backend = target.values[0]
        interpreted = target.id == "triton-interpreter"
        for kind in PARITY_KINDS:
            layouts = ["contiguous"] + (["channels_last"] if kind == "BatchNorm2d" else [])
            for layout in layouts:
                for train in (True, False):
                    for dtype in DTYPES:
                        for act in ALL_ACTIVATIONS:
                            if layout == "channels_last" and dtype != torch.float32:
                                continue
                            if interpreted and not (train and dtype == torch.float32 and layout == "contiguous"
                                                    and kind in ("BatchNorm2d", "LayerNorm")):
                                continue
                            marks = list(target.marks) + ([pytest.mark.slow] if interpreted else [])
                            ident = (f"{target.id}-{kind}-{layout}-{'train' if train else 'eval'}-"
                                     f"{str(dtype).split('.')[-1]}-{activation_id(act)}")
                            yield pytest.param(target.values[0], kind, layout, train, dtype, act, marks=marks,
                                               id=ident)


@pytest.mark.parametrize("target,kind,layout,train,dtype,activation", list(parity_params()))
def test_activation_parity(target, kind, layout, train, dtype, activation):
    check_module_parity(target, kind, layout, train, dtype, activation)


def _norm_fn(kind, activation):
    """(x, weight, bias) -> act(norm(x)) through fusednorm.functional, training statistics."""
    FN = fusednorm.functional
    act = {"activation": activation, "negative_slope": SLOPE}
    if kind == "batch_norm":
        return lambda x, w, b: FN.batch_norm(x, None, None, w, b, True, **act)
    if kind == "group_norm":
        return lambda x, w, b: FN.group_norm(x, 2, w, b, **act)
    return lambda x, w, b: FN.layer_norm(x, x.shape[-1:], w, b, **act)


def _gradcheck_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 5, dtype=torch.float64, generator=g) * 2).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = (torch.randn(4, dtype=torch.float64, generator=g)).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS, ids=activation_id)
@pytest.mark.parametrize("kind", ["batch_norm", "group_norm"])
def test_gradcheck_each_activation(kind, activation):
    """First and second derivatives (the backward op, then the recomputed graph that
    create_graph differentiates) against finite differences, in float64. Hardsigmoid's
    second derivative too, which torch.nn's own Hardsigmoid does not have."""
    x, w, b = _gradcheck_inputs()
    fn = _norm_fn(kind, activation)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS, ids=activation_id)
def test_forward_mode_each_activation(activation):
    """torch.func.jvp through the fused LayerNorm against torch.nn's composition."""
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w = torch.rand(6, dtype=torch.float64) + 0.5
    b = torch.randn(6, dtype=torch.float64)
    y, y_t = torch.func.jvp(_norm_fn("layer_norm", activation), (x, w, b), (t, w * 0.1, b * 0.1))
    yr, yr_t = torch.func.jvp(lambda x, w, b: activate(F.layer_norm(x, (6,), w, b), activation),
                              (x, w, b), (t, w * 0.1, b * 0.1))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(y_t, yr_t)


def test_kinks_as_torch_defines_them():
    """Pre-activations exactly at each activation's kinks: the gradient torch.nn gives there
    (relu 0 at 0, hardtanh 0 at both ends, hardswish 0 at -3 and 1 at 3, hardsigmoid 0 at
    +-3). Eval BatchNorm with mean 0, var 1 - eps, weight 1 makes
    z = x + bias exactly."""
    points = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0, 6.0])
    for activation in ALL_ACTIVATIONS:
        bn = fusednorm.BatchNorm1d(1, eps=0.0, activation=activation, negative_slope=0.2).eval()
        x = points.reshape(-1, 1).clone().requires_grad_()
        y = bn(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        xr = points.reshape(-1, 1).clone().requires_grad_()
        yr = activate(xr, activation, 0.2)
        (gr,) = torch.autograd.grad(yr.sum(), xr)
        torch.testing.assert_close(y, yr, msg=f"{activation}: output")
        torch.testing.assert_close(g, gr, msg=f"{activation}: gradient at the kinks")


@pytest.mark.parametrize("name,module", [
    ("relu", nn.ReLU()), ("silu", nn.SiLU()), ("gelu", nn.GELU()), ("elu", nn.ELU()), ("celu", nn.CELU()),
    ("selu", nn.SELU()), ("relu6", nn.ReLU6()), ("hardtanh", nn.Hardtanh()), ("hardswish", nn.Hardswish()),
    ("hardsigmoid", nn.Hardsigmoid()), ("sigmoid", nn.Sigmoid()), ("tanh", nn.Tanh()),
    ("softplus", nn.Softplus()), ("mish", nn.Mish()), ("leaky_relu", nn.LeakyReLU(0.01)),
])
def test_name_is_the_default_module(name, module):
    """A name means torch.nn's module with its default arguments: the same output."""
    x = make_input((3, 4, 5, 6), torch.float32, "contiguous")
    a = fusednorm.BatchNorm2d(4, activation=name)(x)
    b = fusednorm.BatchNorm2d(4, activation=module)(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["swish", "GELU", "gelu_tanh", nn.PReLU(), nn.Softmax(dim=1), nn.Identity(),
                                 nn.GELU(approximate="none"), 3, nn.CELU(alpha=0.0)],
                         ids=lambda a: activation_id(a))
def test_unknown_activation_is_a_value_error(bad):
    if isinstance(bad, nn.GELU):  # a valid module: the error is for a corrupted approximate
        bad.approximate = "erf"
    with pytest.raises(ValueError, match="activation|alpha|approximate"):
        fusednorm.LayerNorm(8, activation=bad)
    with pytest.raises(ValueError, match="activation|alpha|approximate"):
        fusednorm.functional.layer_norm(torch.randn(2, 8), (8,), activation=bad)
    m = fusednorm.LayerNorm(8)
    with pytest.raises(ValueError):
        m.activation = bad
    assert m.activation is None  # a refused value leaves the module as it was


def test_unknown_code_reaches_no_kernel():
    """The ops refuse an activation code outside the table (ValueError), on every backend."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown activation code"):
        torch.ops.fusednorm.layer_norm_fwd(x, [8], None, None, 1e-5, 99, 0.0, 0.0)


def test_module_activation_is_not_a_submodule():
    """An activation module is a plain attribute: children, state_dict and the repr's
    lines stay torch.nn's; extra_repr names it with its parameters."""
    act = nn.Softplus(beta=2.0, threshold=10.0)
    ours = fusednorm.GroupNorm(2, 4, activation=act)
    ref = nn.GroupNorm(2, 4)
    assert list(ours.children()) == [] and list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)[:-1] + ", activation=Softplus(beta=2.0, threshold=10.0))"
    assert ours.activation is act
    clone = copy.deepcopy(ours)
    assert isinstance(clone.activation, nn.Softplus) and clone.activation.beta == 2.0
    assert fusednorm.LayerNorm(4, activation="silu").extra_repr().endswith("activation=silu")


def test_parameters_of_module_forms_are_honoured():
    """Changing a module form's parameter changes the output as torch.nn's does."""
    x = make_input((3, 4, 5, 6), torch.float32, "contiguous")
    for a, b in [(nn.ELU(0.5), nn.ELU(2.0)), (nn.Hardtanh(-0.5, 0.5), nn.Hardtanh(-2.0, 2.0)),
                 (nn.Softplus(1.0, 20.0), nn.Softplus(3.0, 20.0)), (nn.GELU(), nn.GELU(approximate="tanh")),
                 (nn.CELU(0.5), nn.CELU(2.0))]:
        ya = fusednorm.BatchNorm2d(4, activation=a)(x)
        yb = fusednorm.BatchNorm2d(4, activation=b)(x)
        ref = nn.BatchNorm2d(4)(x)
        torch.testing.assert_close(ya, a(ref))
        torch.testing.assert_close(yb, b(ref))
        assert not torch.equal(ya, yb)


@pytest.mark.parametrize("make,ref,shape", [
    (lambda: fusednorm.BatchNorm2d(16, activation="silu"), lambda: nn.Sequential(nn.BatchNorm2d(16), nn.SiLU()),
     (8, 16, 32, 32)),
    (lambda: fusednorm.GroupNorm(4, 16, activation="silu"), lambda: nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU()),
     (8, 16, 32, 32)),
    (lambda: fusednorm.LayerNorm(256, activation="gelu"), lambda: nn.Sequential(nn.LayerNorm(256), nn.GELU()),
     (512, 256)),
], ids=["BatchNorm2d+SiLU", "GroupNorm+SiLU", "LayerNorm+GELU"])
def test_fused_activation_keeps_one_tensor_less(make, ref, shape):
    """Peak memory of forward+backward (the benchmark's measure: the allocations torch's
    profiler records, ours included) at least one activation-sized tensor below eager's:
    the backward recomputes the pre-activation instead of keeping it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench import peak_memory, step_fn
    x = torch.randn(shape)
    g = torch.randn(shape)
    peaks = {}
    for name, m in (("fusednorm", make()), ("eager", ref())):
        fn = step_fn(m, x, g, True)
        fn()
        peaks[name] = peak_memory(fn, "cpu")
    tensor = x.numel() * x.element_size()
    assert peaks["fusednorm"] >= tensor, "the profiler did not see fusednorm's outputs"
    assert peaks["fusednorm"] <= peaks["eager"] - tensor, peaks


@pytest.mark.parametrize("kind", ["layer_norm", "group_norm"])
def test_per_sample_gradients_under_vmap(kind):
    """vmap(grad) (per-sample gradients) through a fused SiLU and a module-form GELU: the
    ops' vmap rules and the per-sample parameter sums take the activation as torch.nn's."""
    from torch.func import functional_call, grad, vmap
    for activation in ("silu", nn.GELU(approximate="tanh")):
        if kind == "layer_norm":
            ours, ref = fusednorm.LayerNorm(6, activation=activation), nn.LayerNorm(6)
            x = torch.randn(5, 3, 6, dtype=torch.float64)
        else:
            ours, ref = fusednorm.GroupNorm(2, 4, activation=activation), nn.GroupNorm(2, 4)
            x = torch.randn(5, 1, 4, 3, dtype=torch.float64)
        ours, ref = ours.double(), ref.double()
        with torch.no_grad():
            for p in ours.parameters():
                p.uniform_(0.5, 1.5)
        ref.load_state_dict(ours.state_dict())
        params = {k: v.detach() for k, v in ours.named_parameters()}

        def loss(module, act):
            return lambda p, xi: act(functional_call(module, p, (xi,))).square().sum()

        got = vmap(grad(loss(ours, lambda t: t)), in_dims=(None, 0))(params, x)
        want = vmap(grad(loss(ref, lambda t: activate(t, activation))), in_dims=(None, 0))(params, x)
        for k in params:
            torch.testing.assert_close(got[k], want[k], msg=k)
