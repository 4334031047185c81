"""fusednorm.convert: swap a model's torch.nn normalisation layers for fusednorm's, and fuse
a following activation (ReLU, SiLU, GELU, ... any fusednorm accepts) into them.

Swapping keeps every parameter and buffer object (state_dict keys and values unchanged,
optimisers that hold the parameters keep working) and each module's training mode. Only
modules of exactly a torch.nn norm type are swapped: SyncBatchNorm and user subclasses are
left alone. Fusing needs the dataflow, so the model is traced with torch.fx; a norm whose
only use is an activation (module, functional, torch.* or tensor method, inplace or not,
with constant arguments) gets that activation, and the activation disappears from the graph.
A LayerNorm or RMSNorm of a sum, norm(x + r) (pre-norm transformer blocks), becomes the
fused residual add, whose second output replaces the sum's other uses; a BatchNorm whose
only use is a sum, act(bn(x) + z) (ResNet tails, act ReLU, LeakyReLU or none), becomes
BatchNorm's fused residual add. Models that torch.fx cannot trace are swapped without
fusing, with a warning."""
import warnings
from operator import add as operator_add
from operator import getitem as operator_getitem

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import _activation
from . import modules as fm
from ._activation import MODULE_NAMES, readable_from_output, resolve

__all__ = ["convert"]

# torch.nn type -> fusednorm type (exact types only).
SWAPS = {
    nn.BatchNorm1d: fm.BatchNorm1d, nn.BatchNorm2d: fm.BatchNorm2d, nn.BatchNorm3d: fm.BatchNorm3d,
    nn.InstanceNorm1d: fm.InstanceNorm1d, nn.InstanceNorm2d: fm.InstanceNorm2d,
    nn.InstanceNorm3d: fm.InstanceNorm3d, nn.LayerNorm: fm.LayerNorm, nn.GroupNorm: fm.GroupNorm,
    nn.RMSNorm: fm.RMSNorm,
}
FUSEDNORM_TYPES = tuple(SWAPS.values())
# Every norm (subclasses and SyncBatchNorm too) is a leaf when tracing: never traced into.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Norms that take a fused residual add: norm(x + r) -> norm(x, residual=r); and the
# BatchNorms of act(bn(x) + z), torch.nn's and ours.
RESIDUAL_TYPES = (fm.LayerNorm, fm.RMSNorm)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, fm.BatchNorm1d, fm.BatchNorm2d, fm.BatchNorm3d)


def convert(model, *, fuse_activations=True, sync=False):
    """Return `model` with its torch.nn norms replaced by fusednorm's (in place where the
    model is not traced; a torch.fx.GraphModule when activations were fused). sync=True
    also turns torch.nn.SyncBatchNorm into fusednorm.SyncBatchNorm."""
    if sync:
        from .sync_batchnorm import SyncBatchNorm
        model = _swap(model, {nn.SyncBatchNorm: SyncBatchNorm})
    if fuse_activations and not isinstance(model, NORM_TYPES):
        try:
            traced = _trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: swap only
            warnings.warn(f"fusednorm.convert: torch.fx could not trace {type(model).__name__} "
                          f"({type(e).__name__}: {e}); norms are swapped without fusing activations")
        else:
            fused = [_fuse(traced), _fuse_residual_adds(traced), _fuse_bn_residual_adds(traced)]
            if any(fused):
                model = traced
    return _swap(model)


def _swap(model, swaps=None):
    """Replace every module of exactly a type in `swaps` (default SWAPS), `model` included."""
    swaps = SWAPS if swaps is None else swaps
    if type(model) in swaps:
        return _swapped(model, cls=swaps[type(model)])
    for name, child in list(model.named_children()):
        new = _swap(child, swaps)
        if new is not child:
            setattr(model, name, new)
    return model


def _swapped(m, activation=None, negative_slope=0.01, cls=None):
    """The fusednorm module with m's state: same parameter/buffer objects, flags and hooks."""
    cls = cls or SWAPS[type(m)]
    new = cls.__new__(cls)
    state = dict(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    new.__dict__.update(state)
    new.activation, new.negative_slope = activation, negative_slope
    return new


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, NORM_TYPES) or super().is_leaf_module(m, qualname)


def _trace(model):
    graph = _Tracer().trace(model)
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    gm.training = model.training  # submodules keep their own modes
    return gm


# torch functions and Tensor methods that apply an activation to their first argument ->
# (the torch.nn module of the same activation, the names of its parameters in the
# function's positional order). `inplace` is dropped: the norm's output is fresh.
_FUNCTIONS = {}
for _fns, _module, _params in [
    ((F.relu, F.relu_, torch.relu, torch.relu_), nn.ReLU, ()),
    ((F.leaky_relu, F.leaky_relu_), nn.LeakyReLU, ("negative_slope",)),
    ((F.silu,), nn.SiLU, ()),
    ((F.gelu,), nn.GELU, ("approximate",)),
    ((F.elu, F.elu_), nn.ELU, ("alpha",)),
    ((F.celu, F.celu_), nn.CELU, ("alpha",)),
    ((F.selu, F.selu_, torch.selu, torch.selu_), nn.SELU, ()),
    ((F.relu6,), nn.ReLU6, ()),
    ((F.hardtanh, F.hardtanh_), nn.Hardtanh, ("min_val", "max_val")),
    ((F.hardswish,), nn.Hardswish, ()),
    ((F.hardsigmoid,), nn.Hardsigmoid, ()),
    ((torch.sigmoid, torch.sigmoid_, F.sigmoid), nn.Sigmoid, ()),
    ((torch.tanh, torch.tanh_, F.tanh), nn.Tanh, ()),
    ((F.softplus,), nn.Softplus, ("beta", "threshold")),
    ((F.mish,), nn.Mish, ()),
]:
    for _fn in _fns:
        _FUNCTIONS[_fn] = (_module, _params)
_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid,
            "tanh": nn.Tanh, "tanh_": nn.Tanh}


def _activation_module(node, gm):
    """The torch.nn activation module equivalent to node when node applies one to its first
    input with constant arguments, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return m if type(m) in MODULE_NAMES else None
    if node.op == "call_method":
        cls = _METHODS.get(node.target)
        return cls() if cls is not None and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    cls, names = _FUNCTIONS[node.target]
    given = dict(zip(names + ("inplace",), node.args[1:]), **node.kwargs)
    given.pop("inplace", None)
    if set(given) - set(names) or len(node.args) > len(names) + 2:
        return None
    if any(isinstance(v, torch.fx.Node) for v in given.values()):
        return None  # a parameter computed at run time
    return cls(**given)


def _activation_of(node, gm):
    """(activation, negative_slope) for the norm when node applies an activation to its
    first input, else None: a name where torch.nn's defaults apply (repr activation=silu),
    the module otherwise (its parameters kept)."""
    m = _activation_module(node, gm)
    if m is None:
        return None
    name = MODULE_NAMES[type(m)]
    if name == "leaky_relu":
        return name, m.negative_slope
    if resolve(name) == resolve(m):
        return name, 0.01
    return m, 0.01


def _module_calls(gm):
    """{module target: its call nodes, in graph order}."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _fuse(gm):
    """Fuse activations into norm modules of gm's graph; True if any was fused."""
    calls = _module_calls(gm)
    fused = False
    for target, nodes in calls.items():
        norm = gm.get_submodule(target)
        if type(norm) not in SWAPS and not isinstance(norm, FUSEDNORM_TYPES):
            continue
        if getattr(norm, "activation", None) is not None:
            continue
        # Every call of this module must feed only the same activation (a module called
        # twice, once before a ReLU and once not, cannot take the ReLU in).
        acts = []
        for node in nodes:
            users = list(node.users)
            act = _activation_of(users[0], gm) if len(users) == 1 else None
            if act is None or users[0].args[0] is not node:
                break
            acts.append((node, users[0], act))
        if len(acts) != len(nodes) or len({resolve(*a) for _, _, a in acts}) != 1:
            continue
        activation, slope = acts[0][2]
        new = _swapped(norm, activation, slope) if type(norm) in SWAPS else norm
        new.activation, new.negative_slope = activation, slope
        _set_submodule(gm, target, new)
        for node, act_node, _ in acts:
            act_node.replace_all_uses_with(node)
            gm.graph.erase_node(act_node)
        fused = True
    return _recompiled(gm, fused)


def _recompiled(gm, changed):
    """changed, with gm's code regenerated from its edited graph if it is."""
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _set_submodule(root, target, module):
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _is_add(node):
    """node is x + r of two graph values (operator.add, torch.add or Tensor.add, no alpha)."""
    if node.op == "call_function" and node.target in (operator_add, torch.add):
        pass
    elif not (node.op == "call_method" and node.target == "add"):
        return False
    return len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)


def norm_of_sum(norm, x, r):
    """(norm(x + r), x + r): fused where the sum keeps x's dtype and shape; otherwise (type
    promotion or broadcasting would change the sum) as torch computes it."""
    if isinstance(x, torch.Tensor) and isinstance(r, torch.Tensor) and x.dtype == r.dtype and x.shape == r.shape:
        return norm(x, residual=r)
    total = x + r
    return norm(total), total


def _fuse_residual_adds(gm):
    """norm(x + r) -> norm_of_sum(norm, x, r) for LayerNorm/RMSNorm calls; True if any."""
    fused = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not _is_add(node.args[0]):
            continue
        norm = gm.get_submodule(node.target)
        if type(norm) in SWAPS and issubclass(SWAPS[type(norm)], RESIDUAL_TYPES):
            norm = _swapped(norm, getattr(norm, "activation", None), getattr(norm, "negative_slope", 0.01))
            _set_submodule(gm, node.target, norm)
        if not isinstance(norm, RESIDUAL_TYPES):
            continue
        add = node.args[0]
        # Right after the sum (before its other uses), each new node after the last.
        with gm.graph.inserting_after(add):
            module = gm.graph.get_attr(node.target)
        with gm.graph.inserting_after(module):
            pair = gm.graph.call_function(norm_of_sum, (module, *add.args))
        with gm.graph.inserting_after(pair):
            y = gm.graph.call_function(operator_getitem, (pair, 0))
        with gm.graph.inserting_after(y):
            total = gm.graph.call_function(operator_getitem, (pair, 1))
        node.replace_all_uses_with(y)
        add.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        gm.graph.erase_node(add)
        fused = True
    return _recompiled(gm, fused)


def bn_residual(norm, x, z):
    """act(norm(x) + z) for a BatchNorm `norm` holding the activation: fused where z has x's
    dtype and shape; otherwise (type promotion or broadcasting) as torch computes it."""
    if isinstance(z, torch.Tensor) and z.dtype == x.dtype and z.shape == x.shape:
        return norm(x, residual=z)
    return _activation.forward(norm._forward(x, None, _activation.NONE) + z, norm._act)


def _fuse_bn_residual_adds(gm):
    """act(bn(x) + z) -> bn_residual(bn, x, z), the activation (if any) moved into bn, for
    BatchNorm modules called once, whose output's only use is the sum; True if any."""
    fused = False
    for target, nodes in _module_calls(gm).items():
        node = nodes[0]
        norm = gm.get_submodule(target)
        if type(norm) not in BN_TYPES or len(nodes) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if getattr(norm, "activation", None) is not None or len(node.users) != 1:
            continue
        add = next(iter(node.users))
        if not _is_add(add) or add.args[0] is add.args[1]:
            continue
        z = add.args[1] if add.args[0] is node else add.args[0]
        act, tail = (None, 0.01), add
        if len(add.users) == 1:
            found = _activation_of(next(iter(add.users)), gm)
            if found is not None and readable_from_output(resolve(*found)):
                act, tail = found, next(iter(add.users))
        new = _swapped(norm, *act) if type(norm) in SWAPS else norm
        new.activation, new.negative_slope = act
        _set_submodule(gm, target, new)
        with gm.graph.inserting_after(tail):
            module = gm.graph.get_attr(target)
        with gm.graph.inserting_after(module):
            fused_node = gm.graph.call_function(bn_residual, (module, node.args[0], z))
        tail.replace_all_uses_with(fused_node)
        for dead in ([tail] if tail is not add else []) + [add, node]:
            gm.graph.erase_node(dead)
        fused = True
    return _recompiled(gm, fused)
