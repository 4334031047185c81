"""torch.autograd.Function wrappers over the fusednorm ops: forward calls the *_fwd op,
setup_context saves what its backward op needs; backward calls the *_bwd op of the same
backend (backend.ops_for picks torch.ops.fusednorm or torch.ops.fusednorm_triton). No torch
normalisation kernel is called on this path. What the kernels do not compute — the
gradient of a backward whose result is differentiated again, and forward mode (jvp) — comes
from the output recomputed in torch ops (_differentiable.py). apply() is the entry point: it
picks the op alone, the norm's C++ autograd node (csrc/autograd.cpp, plain eager calls), the
Function, its classic form (_classic) or its forward-mode form (_with_jvp) for each call."""
import functools
import math
import types

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import _C, _differentiable
from ._activation import Activation
from ._ops import ops as compiled_ops
from .backend import ops_for


def _backward(backward, recompute=None):
    """backward, with the cases around it:
    - an absent output gradient: no input gradients;
    - a plain backward: as it is, without once_differentiable's no_grad block and output
      wrapping (about 6 % of a tiny module's forward+backward, bench.py's per-call overhead);
    - a backward whose result will be differentiated again (_second_derivative_wanted):
      the gradients of the output recomputed by recompute(ctx, x, weight, bias, mean,
      rstd) in differentiable torch ops (_differentiable.py); without recompute
      (SyncBatchNorm), an error;
    - any other recorded backward (first derivatives under torch.func, whose transforms
      always record): once_differentiable, so that differentiating the result raises
      instead of giving wrong zeros."""
    first_order = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if grads[0] is None:  # the output's gradient is undefined, i.e. zero: so are the inputs'
            return (None,) * len(ctx.needs_input_grad)
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        if _second_derivative_wanted(ctx):
            if recompute is not None:
                return _recomputed_grads(recompute, ctx, grads[0])
            if torch._C._functorch.peek_interpreter_stack() is not None:
                # once_differentiable cannot see a torch.func transform differentiate its
                # result: the second derivative would come out as zeros.
                raise RuntimeError("fusednorm: trying to differentiate twice a backward that has no "
                                   "derivative (nested torch.func.grad / jacrev)")
        return first_order(ctx, *grads)

    return wrapper


def _second_derivative_wanted(ctx):
    """Whether this (recorded) backward's result may be differentiated again.
    - Under torch.autograd: always (grad mode is on in backward only with create_graph=True).
    - Under torch.func, whose transforms record every backward: when a grad (or jvp)
      transform encloses the one that recorded this norm, i.e. is active at a lower level
      than the saved tensors' own: grad(grad(f)); jacrev(jacrev(f)), whose inner pullback
      runs after its own transform ended, under a vmap; not vmap(grad(f)) or jacrev(f).
    - A torch.func.vjp pullback called after every transform ended: no (its saved
      tensors are the finished transform's; nothing can differentiate the result through
      them)."""
    # The saved tensors' transform level: -1 for plain tensors, -2 for a finished
    # transform's (a dead wrapper: everything active encloses it).
    levels = [torch._C._functorch.maybe_get_level(t) for t in ctx.saved_tensors[:3] if t is not None]
    own = math.inf if min(levels) == -2 else max(levels)
    stack = torch._C._functorch.get_interpreter_stack()  # None outside torch.func
    if stack:
        differentiating = (TransformType.Grad, TransformType.Jvp)
        return any(i.key() in differentiating and i.level() < own for i in stack)
    return own == -1


def first_order_only(backward):
    """For a backward op with no derivative of its own and nothing to recompute it with
    (SyncBatchNorm's): see _backward."""
    return _backward(backward)


def differentiable_by_recompute(kind):
    """For the norms' backward (kind: _differentiable's name for the norm): see _backward."""
    def recompute(ctx, *tensors):  # a closure, not functools.partial: Dynamo traces backward
        return _differentiable.output(kind, ctx, *tensors)
    return lambda backward: _backward(backward, recompute)


def _recomputed_grads(recompute, ctx, dy):
    """The gradients of (x, weight, bias) that need one, from the output recomputed in
    differentiable torch ops: a graph that torch.autograd, or an enclosing torch.func
    transform, differentiates again (torch.func.vjp works under both)."""
    mask = _grad_mask(ctx, *ctx.saved_tensors[1:3])
    return _grads(mask, *_recomputed(recompute, ctx, dy, mask), len(ctx.needs_input_grad) - 3)


def _recomputed(recompute, ctx, dy, mask):
    """[dx, dweight, dbias] from the recomputed output, None where mask is False; x,
    weight, bias, mean, rstd are the first five saved tensors."""
    x, weight, bias, mean, rstd = ctx.saved_tensors[:5]
    saved = (x, weight, bias)
    wanted = [i for i in range(3) if mask[i]]

    def output(*tensors):
        args = list(saved)
        for i, t in zip(wanted, tensors):
            args[i] = t
        return recompute(ctx, *args, mean, rstd)

    grads = [None, None, None]
    if wanted:
        _, pullback = torch.func.vjp(output, *(saved[i] for i in wanted))
        for i, g in zip(wanted, pullback(dy)):
            grads[i] = g
    return grads


def _native_recompute(kind, dy, x, weight, bias, mean, rstd, mask, eps, act, act_a, act_b, extra):
    """The gradients [dx, dweight, dbias] (None where mask is False) of a C++ node's
    backward whose result will be differentiated again (csrc/autograd.cpp calls this):
    from the output recomputed in differentiable torch ops, as the Functions' backward.
    extra: the norm's own argument (BatchNorm's training, LayerNorm's and RMSNorm's
    normalized_shape, GroupNorm's num_groups, InstanceNorm's channels)."""
    ctx = types.SimpleNamespace(saved_tensors=(x, weight, bias, mean, rstd), eps=eps,
                                act=Activation(act, act_a, act_b))
    setattr(ctx, _EXTRA_NAME.get(kind, "extra"), extra)
    return _recomputed(lambda ctx, *t: _differentiable.output(kind, ctx, *t), ctx, dy, mask)


_EXTRA_NAME = {"batch_norm": "training", "layer_norm": "normalized_shape", "rms_norm": "normalized_shape",
               "group_norm": "num_groups"}
_C.set_recompute(_native_recompute)


def _forward_mode():
    """Forward-mode AD is active: a dual_level, or a torch.func jvp transform (jvp, jacfwd,
    hessian). Not while Dynamo traces, which sees an interpreter stack of its own."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return forward_ad._current_level >= 0 or any(i.key() == TransformType.Jvp for i in stack)


def _forward_mode_or_torch_func():
    """A dual_level (forward-mode AD) or a torch.func transform is active: both can
    differentiate tensors that do not require grad."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def native_path(x):
    """Whether a call on input x takes the C++ entries (csrc/autograd.cpp): plain eager
    (not while Dynamo traces), a plain tensor, and the compiled ops run it. Callers check
    forward-mode AD and torch.func first (_forward_mode_or_torch_func)."""
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor and ops_for(x) is compiled_ops


def apply(function, x, weight, bias, *rest):
    """The output of a norm: function.apply(x, weight, bias, *rest)[0], in one of five
    ways that give the same result.
    - Plain eager calls (no forward-mode AD, torch.func transform or torch.compile; a plain
      tensor input that the compiled ops run): the norm's C++ entry (function.native,
      csrc/autograd.cpp), the forward op with a backward node in C++ when an input
      requires a gradient, without autograd.Function's per-call cost.
    - Otherwise, nothing can differentiate the call (grad mode off or no input requiring a
      gradient, no forward-mode AD or torch.func transform): the forward op alone.
      Under forward-mode AD the op alone would drop the tangents silently.
    - Otherwise outside torch.func (the Triton backend, Dynamo tracing): the Function in
      torch's classic form (_classic), since torch binds a setup_context Function's
      arguments with inspect.signature on every call.
    - Under torch.func transforms, which need the setup_context form: the Function.
    - Under forward-mode AD: the Function with a jvp (_with_jvp)."""
    if not _forward_mode_or_torch_func():
        if function.native is not None and native_path(x):
            return function.native(x, weight, bias, *rest)
        if not torch.is_grad_enabled() or not any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, bias, *rest)
        ):
            return function.forward(x, weight, bias, *rest)[0]
        return function.classic.apply(x, weight, bias, *rest)
    if _forward_mode():
        return function.forward_mode.apply(x, weight, bias, *rest)[0]
    return function.apply(x, weight, bias, *rest)[0]


def _classic(function, outputs=1):
    """`function` with torch's classic forward(ctx, *args), returning y alone (or its first
    `outputs` outputs): the same forward, setup_context and backward, without the
    setup_context form's per-call argument binding, which made a tiny BatchNorm's
    forward+backward 1.9x as slow (in one process, against the Function before the split;
    this form: 1.03x). torch.func transforms refuse this form; apply() picks the form."""
    def forward(ctx, *args):
        out = function.forward(*args)
        function.setup_context(ctx, args, out)
        # The statistics are saved, and fewer outputs cost less.
        return out[0] if outputs == 1 else out[:outputs]

    return type(function.__name__, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                 "__doc__": function.__doc__, "__module__": function.__module__})


class _NormFunction(torch.autograd.Function):
    """The pattern of the four norms below. forward is the op alone and returns what the
    op returns, (y, mean, rstd); setup_context saves what the backward op needs. Keeping
    ctx out of forward (torch's "separate setup_context" form) is what lets torch.func
    transforms (grad, vjp, functional_call + grad) differentiate through the norms, as
    they do through torch.nn's. mean and rstd are outputs only to be saved: they are
    marked non-differentiable, and no gradients are materialised as zeros (an absent output
    gradient means no input gradients: _backward).

    generate_vmap_rule: under torch.func.vmap (per-sample gradients: vmap(grad(f))) torch
    vmaps forward and backward through the ops' own vmap rules (_vmap.py), not torch's
    batched fallback (one call per sample, with a performance warning).

    kind: the norm's name in _differentiable.py (recomputed output and tangent).

    backward takes the gradients of (y, mean, rstd), or of y alone in the classic form
    (_classic); the statistics' are always absent."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs[:3]
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.ops = ops_for(x)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = inputs[-4]  # every norm's last four arguments: eps, then the activation
        ctx.act = Activation(*inputs[-3:])


def _grad_mask(ctx, weight, bias):
    """Which of (input, weight, bias) need a gradient; weight/bias at argument 1 and 2."""
    return [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    ]


def _grads(mask, dx, dw, db, n_other):
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None) + (None,) * n_other


class BatchNormFunction(_NormFunction):
    kind = "batch_norm"

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.training = inputs[5]

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, act_a, act_b):
        return ops_for(x).batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum,
                                         eps, act, act_a, act_b)

    @staticmethod
    @differentiable_by_recompute(kind)
    def backward(ctx, dy, _dmean=None, _drstd=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.batch_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.training, *ctx.act,
                                            mask)
        return _grads(mask, dx, dw, db, 8)


class InstanceNormFunction(_NormFunction):
    """InstanceNorm with input statistics; backward is GroupNorm's with one group per channel."""

    kind = "instance_norm"

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps, act, act_a, act_b):
        return ops_for(x).instance_norm_fwd(x, weight, bias, running_mean, running_var, momentum, eps, act,
                                            act_a, act_b)

    @staticmethod
    @differentiable_by_recompute(kind)
    def backward(ctx, dy, _dmean=None, _drstd=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, x.shape[1], mean, rstd, weight, bias, *ctx.act, mask)
        return _grads(mask, dx, dw, db, 7)


class LayerNormFunction(_NormFunction):
    kind = "layer_norm"

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.normalized_shape = inputs[3]

    @staticmethod
    def forward(x, weight, bias, normalized_shape, eps, act, act_a, act_b):
        return ops_for(x).layer_norm_fwd(x, normalized_shape, weight, bias, eps, act, act_a, act_b)

    @staticmethod
    @differentiable_by_recompute(kind)
    def backward(ctx, dy, _dmean=None, _drstd=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.layer_norm_bwd(
            dy, x, ctx.normalized_shape, mean, rstd, weight, bias, *ctx.act, mask
        )
        return _grads(mask, dx, dw, db, 5)


class GroupNormFunction(_NormFunction):
    kind = "group_norm"

    @staticmethod
    def setup_context(ctx, inputs, output):
        _NormFunction.setup_context(ctx, inputs, output)
        ctx.num_groups = inputs[3]

    @staticmethod
    def forward(x, weight, bias, num_groups, eps, act, act_a, act_b):
        return ops_for(x).group_norm_fwd(x, num_groups, weight, bias, eps, act, act_a, act_b)

    @staticmethod
    @differentiable_by_recompute(kind)
    def backward(ctx, dy, _dmean=None, _drstd=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias)
        dx, dw, db = ctx.ops.group_norm_bwd(dy, x, ctx.num_groups, mean, rstd, weight, bias, *ctx.act,
                                            mask)
        return _grads(mask, dx, dw, db, 5)


def _with_jvp(function, kind):
    """`function` with a jvp (forward mode): the output's tangent in torch ops
    (_differentiable.tangent; the statistics have none), from the tensors setup_context
    also saves for it. A separate class, used only under forward-mode AD (apply()):
    Dynamo refuses to trace a Function that defines jvp."""
    def setup_context(ctx, inputs, output):
        function.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3], *output[1:])  # x, weight, bias, mean, rstd

    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight, bias, mean, rstd = ctx.saved_tensors  # those saved for forward
        y_t = _differentiable.tangent(kind, ctx, x, weight, bias, mean, rstd, x_t, weight_t, bias_t)
        return y_t, None, None

    return type(function.__name__ + "ForwardMode", (function,),
                {"setup_context": staticmethod(setup_context), "jvp": staticmethod(jvp),
                 "__module__": function.__module__})


for _function, _native in ((BatchNormFunction, _C.batch_norm), (InstanceNormFunction, _C.instance_norm),
                           (LayerNormFunction, _C.layer_norm), (GroupNormFunction, _C.group_norm)):
    _function.native = _native
    _function.classic = _classic(_function)
    _function.forward_mode = _with_jvp(_function, _function.kind)
