"""The two autograd paths of a norm outside torch.func (fusednorm/autograd.py's apply): the
C++ node (csrc/autograd.cpp) that plain eager calls take, and the Python Function in its
classic form (the Triton backend, Dynamo). They run the same ops, so they must agree bit for
bit; both are checked against torch.nn. Every weight/bias/input combination that requires a
gradient is covered: an absent weight shifts the bias's autograd edge."""
import pytest
import torch
import torch.nn.functional as F

import fusednorm.functional as FF
from fusednorm.autograd import BatchNormFunction, GroupNormFunction, InstanceNormFunction, LayerNormFunction
from helpers import assert_close


def _full(value):
    """Running statistics of three channels (fresh each call: training updates them)."""
    return torch.full((3,), value, dtype=torch.float64)


# name: (input shape, parameter shape, fusednorm call, its Function and classic arguments, torch.nn call)
NORMS = {
    "batch_norm_train": ((4, 3, 5), (3,),
                         lambda x, w, b, act: FF.batch_norm(x, _full(0.0), _full(1.0), w, b, True,
                                                            activation=act),
                         lambda x, w, b: (BatchNormFunction, x, w, b, _full(0.0), _full(1.0), True, 0.1,
                                          1e-5),
                         lambda x, w, b: F.batch_norm(x, _full(0.0), _full(1.0), w, b, True)),
    "batch_norm_eval": ((4, 3, 5), (3,),
                        lambda x, w, b, act: FF.batch_norm(x, _full(0.5), _full(2.0), w, b,
                                                           False, activation=act),
                        lambda x, w, b: (BatchNormFunction, x, w, b, _full(0.5), _full(2.0),
                                         False, 0.1, 1e-5),
                        lambda x, w, b: F.batch_norm(x, _full(0.5), _full(2.0), w, b, False)),
    "instance_norm": ((2, 3, 6), (3,),
                      lambda x, w, b, act: FF.instance_norm(x, weight=w, bias=b, activation=act),
                      lambda x, w, b: (InstanceNormFunction, x, w, b, None, None, 0.1, 1e-5),
                      lambda x, w, b: F.instance_norm(x, weight=w, bias=b)),
    "layer_norm": ((3, 4, 6), (6,),
                   lambda x, w, b, act: FF.layer_norm(x, (6,), w, b, activation=act),
                   lambda x, w, b: (LayerNormFunction, x, w, b, [6], 1e-5),
                   lambda x, w, b: F.layer_norm(x, (6,), w, b)),
    "group_norm": ((3, 4, 5), (4,),
                   lambda x, w, b, act: FF.group_norm(x, 2, w, b, activation=act),
                   lambda x, w, b: (GroupNormFunction, x, w, b, 2, 1e-5),
                   lambda x, w, b: F.group_norm(x, 2, w, b)),
}
# (which of x, weight, bias exist and require a gradient): "-" absent, "c" a constant, "g" requires grad.
PARAMS = ["ggg", "gcc", "gcg", "cgg", "ccg", "g-g", "c-g", "gg-", "g--"]
ACTS = {None: (0, 0.0, 0.0), "relu": (1, 0.0, 0.0), "leaky_relu": (2, 0.01, 0.0), "silu": (3, 0.0, 0.0)}


def _inputs(name, spec):
    shape, pshape = NORMS[name][:2]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.rand(pshape, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(pshape, generator=gen, dtype=torch.float64)
    out = []
    for t, s in zip((x, w, b), spec):
        out.append(None if s == "-" else t.requires_grad_(s == "g"))
    return out


def _grads(y, x, w, b, dy):
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, dy)


@pytest.mark.parametrize("act", [None, "leaky_relu", "silu"])
@pytest.mark.parametrize("spec", PARAMS)
@pytest.mark.parametrize("name", list(NORMS))
def test_native_node_matches_classic_function_and_torch(name, spec, act):
    _, _, fused, classic_args, reference = NORMS[name]
    x, w, b = _inputs(name, spec)
    y = fused(x, w, b, act)
    assert y.grad_fn.name().startswith("fusednorm::"), y.grad_fn.name()  # the C++ node, not the Function
    function, *args = classic_args(x, w, b)
    y_classic = function.classic.apply(*args, *ACTS[act])
    assert type(y_classic.grad_fn).__name__ == function.__name__ + "Backward"
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    native, classic = _grads(y, x, w, b, dy), _grads(y_classic, x, w, b, dy)
    assert torch.equal(y, y_classic)
    for g, h in zip(native, classic):
        assert torch.equal(g, h)
    y_ref = reference(x, w, b)
    y_ref = {None: y_ref, "leaky_relu": F.leaky_relu(y_ref, 0.01), "silu": F.silu(y_ref)}[act]
    assert_close(y, y_ref, torch.float64, "output")
    for g, h in zip(native, _grads(y_ref, x, w, b, dy)):
        assert_close(g, h, torch.float64, "gradient")


@pytest.mark.parametrize("name", list(NORMS))
def test_native_node_second_derivative(name):
    """create_graph=True: the node's backward hands over to the recompute in torch ops
    (autograd._native_recompute); its gradients are differentiated again, as torch.nn's."""
    _, _, fused, _, reference = NORMS[name]
    results = []
    for call in (lambda x, w, b: fused(x, w, b, "silu"), lambda x, w, b: F.silu(reference(x, w, b))):
        x, w, b = _inputs(name, "ggg")
        y = call(x, w, b)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), (x, w, b)))
    for g, h in zip(*results):
        assert_close(g, h, torch.float64, "gradient")


def test_native_node_saved_tensors_checked_and_freed():
    """As torch.nn's: the input modified in place after the forward is an error in the
    backward, and a second backward without retain_graph is refused."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = FF.layer_norm(x * 1.0, (5,))
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    h = x * 1.0
    y = FF.layer_norm(h, (5,))
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("spec", ["gggg", "cccg", "gccc", "g-gg", "ccgc"])
def test_native_residual_node_matches_classic_function_and_torch(spec, act):
    """BatchNorm's residual add, act(bn(x) + z): the node's four edges (x, weight, bias, z),
    against the classic Function bit for bit and against torch.nn."""
    from fusednorm.autograd_bn_add import BatchNormAddFunction

    x, w, b = _inputs("batch_norm_train", spec[:3])
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype).requires_grad_(spec[3] == "g")
    y = FF.batch_norm(x, _full(0.0), _full(1.0), w, b, True, activation=act, residual=z)
    assert y.grad_fn.name() == "fusednorm::BatchNormAddBackward"
    y_classic = BatchNormAddFunction.classic.apply(x, w, b, _full(0.0), _full(1.0), True, 0.1, 1e-5, *ACTS[act], z)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    wanted = [t for t in (x, w, b, z) if t is not None and t.requires_grad]
    native, classic = torch.autograd.grad(y, wanted, dy), torch.autograd.grad(y_classic, wanted, dy)
    assert torch.equal(y, y_classic)
    for g, h in zip(native, classic):
        assert torch.equal(g, h)
    pre = F.batch_norm(x, _full(0.0), _full(1.0), w, b, True) + z
    y_ref = {None: pre, "relu": F.relu(pre), "leaky_relu": F.leaky_relu(pre, 0.01)}[act]
    assert_close(y, y_ref, torch.float64, "output")
    for g, h in zip(native, torch.autograd.grad(y_ref, wanted, dy)):
        assert_close(g, h, torch.float64, "gradient")


def test_native_residual_node_second_derivative():
    results = []
    for fused in (True, False):
        x, w, b = _inputs("batch_norm_train", "ggg")
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype, requires_grad=True)
        if fused:
            y = FF.batch_norm(x, _full(0.0), _full(1.0), w, b, True, activation="relu", residual=z)
        else:
            y = F.relu(F.batch_norm(x, _full(0.0), _full(1.0), w, b, True) + z)
        gx, gz = torch.autograd.grad((y * y).sum(), (x, z), create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum() + (gz * gz).sum(), (x, w, b, z)))
    for g, h in zip(*results):
        assert_close(g, h, torch.float64, "gradient")


def _add_norm_inputs(spec, rms, dtype=torch.float64):
    """x, residual, weight, bias from spec (x, residual, weight, bias: "-" absent, "c"
    constant, "g" requires grad); RMSNorm has no bias."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64).to(dtype)
    r = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    out = [None if s == "-" else t.requires_grad_(s == "g") for t, s in zip((x, r, w, b), spec)]
    if rms:
        out[3] = None
    return out


# (spec, which outputs the loss uses): without a residual (spec[1] == "-") the output alone.
ADD_NORM_CASES = [(spec, use) for spec in ["gggg", "g-gg", "ggcc", "cg-g", "g---", "gc--", "c-g-"]
                  for use in (["both", "output", "sum"] if spec[1] != "-" else ["both"])]


@pytest.mark.parametrize("spec,use", ADD_NORM_CASES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_native_add_norm_node_matches_classic_function_and_torch(rms, spec, use):
    """LayerNorm/RMSNorm of x + residual (of x alone without one): the node's edges (x,
    residual, weight, bias) and its two outputs, used together or one at a time."""
    from fusednorm.autograd_add import AddNormFunction

    x, r, w, b = _add_norm_inputs(spec, rms)
    args = (x, r, w, b, [6], rms, False, 1e-5, 2, 0.01, 0.0)
    wanted = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
    dy = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ds = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    if r is None:
        native = (FF.rms_norm(x, 6, w, 1e-5, activation="leaky_relu") if rms else
                  FF.layer_norm(x, 6, w, b, 1e-5, activation="leaky_relu"),)
        classic = (AddNormFunction.classic_y.apply(*args),)
    else:
        call = FF.add_rms_norm if rms else FF.add_layer_norm
        extra = () if rms else (b,)
        native = call(x, r, 6, w, *extra, eps=1e-5, activation="leaky_relu")
        classic = AddNormFunction.classic_ys.apply(*args)
    # (LayerNorm without a residual is the plain LayerNorm node: the same ops underneath.)
    node = "LayerNormBackward" if r is None and not rms else "AddNormBackward"
    assert native[0].grad_fn.name() == "fusednorm::" + node
    pick = {"both": slice(None), "output": slice(0, 1), "sum": slice(1, 2)}[use]
    grads_out = [dy, ds][pick][:len(native)]
    g_native = torch.autograd.grad(native[pick], wanted, grads_out, allow_unused=True, materialize_grads=True)
    g_classic = torch.autograd.grad(classic[pick], wanted, grads_out, allow_unused=True, materialize_grads=True)
    for u, v in zip(native, classic):
        assert torch.equal(u, v)
    for g, h in zip(g_native, g_classic):
        assert torch.equal(g, h)
    s_ref = x + r if r is not None else x
    pre = F.rms_norm(s_ref, (6,), w, 1e-5) if rms else F.layer_norm(s_ref, (6,), w, b, 1e-5)
    ref = (F.leaky_relu(pre, 0.01), s_ref)[:len(native)]
    assert_close(native[0], ref[0], torch.float64, "output")
    g_ref = torch.autograd.grad(ref[pick], wanted, grads_out, allow_unused=True, materialize_grads=True)
    for g, h in zip(g_native, g_ref):
        assert_close(g, h, torch.float64, "gradient")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_native_add_norm_node_mixed_dtypes_and_second_derivative(rms):
    """bfloat16 input with a float32 sum (residual_in_fp32) and float32 parameters: the
    gradients in each input's dtype, as the classic Function; then create_graph=True
    through the node against torch.nn in float64."""
    from fusednorm.autograd_add import AddNormFunction

    x, r, w, b = _add_norm_inputs("gggg", rms, torch.bfloat16)
    w, b = w.detach().float().requires_grad_(), None if b is None else b.detach().float().requires_grad_()
    call = FF.add_rms_norm if rms else FF.add_layer_norm
    extra = () if rms else (b,)
    y, s = call(x, r, 6, w, *extra, eps=1e-5, activation="relu", residual_in_fp32=True)
    y_c, s_c = AddNormFunction.classic_ys.apply(x, r, w, b, [6], rms, True, 1e-5, 1, 0.0, 0.0)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    wanted = [t for t in (x, r, w, b) if t is not None]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    for g, h in zip(torch.autograd.grad((y, s), wanted, (dy, dy.float())),
                    torch.autograd.grad((y_c, s_c), wanted, (dy, dy.float()))):
        assert g.dtype == h.dtype and torch.equal(g, h)

    results = []
    for fused in (True, False):
        x, r, w, b = _add_norm_inputs("gggg", rms)
        if fused:
            y, s = call(x, r, 6, w, *(() if rms else (b,)), eps=1e-5, activation="silu")
        else:
            s = x + r
            y = F.silu(F.rms_norm(s, (6,), w, 1e-5) if rms else F.layer_norm(s, (6,), w, b, 1e-5))
        gx, gr = torch.autograd.grad((y * y).sum() + (s * s * s).sum(), (x, r), create_graph=True)
        results.append(torch.autograd.grad((gx * gr).sum(), [t for t in (x, r, w, b) if t is not None]))
    for g, h in zip(*results):
        assert_close(g, h, torch.float64, "gradient")


def test_native_path_ops_reach_dispatch_modes_and_meta():
    """The C++ entry dispatches its ops as a Python call would: a TorchDispatchMode sees the
    forward and backward ops, and meta tensors get the fake kernels' shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fusednorm

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3, 5, requires_grad=True)
    with Log() as log:
        FF.group_norm(x, 3).sum().backward()
    assert [op for op in log.ops if op.startswith("fusednorm.")] == ["fusednorm.group_norm_fwd.default",
                                                                      "fusednorm.group_norm_bwd.default"]
    m = fusednorm.BatchNorm2d(3, device="meta")
    y = m(torch.randn(2, 3, 4, 4, device="meta", requires_grad=True))
    assert y.device.type == "meta" and y.shape == (2, 3, 4, 4) and y.grad_fn.name() == "fusednorm::BatchNormBackward"
