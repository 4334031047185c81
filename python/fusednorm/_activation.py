"""The fused activations: what a user names (a string or a torch.nn module) <-> what the ops
take (csrc/common/norm_math.h's Activation code and its two parameters), and each
activation in torch ops for the derivatives the kernels do not compute (_differentiable.py).

One row of _TABLE per activation; the kernels' formulas are norm_math.h's (CPU, CUDA) and
fusednorm/triton/math.py's."""
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# torch's SELU constants (ATen's Activation.cpp).
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


class Activation(NamedTuple):
    """What the ops take: norm_math.h's code and the parameters act_a, act_b."""
    code: int
    a: float = 0.0
    b: float = 0.0


NONE = Activation(0)


class _Entry(NamedTuple):
    code: int
    module: type  # the torch.nn module of the same activation
    params: Callable  # module instance -> (a, b); {} for the name's defaults
    forward: Callable  # (z, a, b) -> act(z), differentiable torch ops
    backward: Callable  # (g, z, a, b) -> dL/dz from g = dL/dy: aten's *_backward (torch's own derivative)


def _none(_m):
    return 0.0, 0.0


def _celu_params(m):
    if m.alpha == 0:
        raise ValueError("CELU's alpha cannot be 0")
    return float(m.alpha), 1.0 / float(m.alpha)  # b: ATen's 1/alpha, computed in double


def _hardtanh_params(m):
    return float(m.min_val), float(m.max_val)


_TABLE = {
    "relu": _Entry(1, nn.ReLU, _none, lambda z, a, b: torch.relu(z),
                   lambda g, z, a, b: aten.threshold_backward(g, z, 0)),
    "leaky_relu": _Entry(2, nn.LeakyReLU, lambda m: (float(m.negative_slope), 0.0),
                         lambda z, a, b: F.leaky_relu(z, a),
                         lambda g, z, a, b: aten.leaky_relu_backward(g, z, a, False)),
    "silu": _Entry(3, nn.SiLU, _none, lambda z, a, b: F.silu(z), lambda g, z, a, b: aten.silu_backward(g, z)),
    "gelu": _Entry(4, nn.GELU, _none, lambda z, a, b: F.gelu(z), lambda g, z, a, b: aten.gelu_backward(g, z)),
    # GELU(approximate="tanh"): no name of its own; code 5 comes from the module form.
    "gelu_tanh": _Entry(5, nn.GELU, _none, lambda z, a, b: F.gelu(z, approximate="tanh"),
                        lambda g, z, a, b: aten.gelu_backward(g, z, approximate="tanh")),
    "elu": _Entry(6, nn.ELU, lambda m: (float(m.alpha), 0.0), lambda z, a, b: F.elu(z, a),
                  lambda g, z, a, b: aten.elu_backward(g, a, 1, 1, False, z)),
    "celu": _Entry(7, nn.CELU, _celu_params, lambda z, a, b: F.celu(z, a),
                   lambda g, z, a, b: aten.elu_backward(g, a, 1, b, False, z)),
    "selu": _Entry(8, nn.SELU, _none, lambda z, a, b: F.selu(z),
                   lambda g, z, a, b: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1, False, z)),
    "hardtanh": _Entry(9, nn.Hardtanh, _hardtanh_params, lambda z, a, b: F.hardtanh(z, a, b),
                       lambda g, z, a, b: aten.hardtanh_backward(g, z, a, b)),
    "hardswish": _Entry(10, nn.Hardswish, _none, lambda z, a, b: F.hardswish(z),
                        lambda g, z, a, b: aten.hardswish_backward(g, z)),
    # Written as relu6(z + 3) / 6 and a select: aten's hardsigmoid_backward (F.hardsigmoid's
    # derivative) has no derivative of its own, and these have torch's values and kinks.
    "hardsigmoid": _Entry(11, nn.Hardsigmoid, _none, lambda z, a, b: F.relu6(z + 3) / 6,
                          lambda g, z, a, b: torch.where((z > -3) & (z < 3), g / 6, torch.zeros_like(g))),
    "sigmoid": _Entry(12, nn.Sigmoid, _none, lambda z, a, b: torch.sigmoid(z),
                      lambda g, z, a, b: aten.sigmoid_backward(g, torch.sigmoid(z))),
    "tanh": _Entry(13, nn.Tanh, _none, lambda z, a, b: torch.tanh(z),
                   lambda g, z, a, b: aten.tanh_backward(g, torch.tanh(z))),
    "softplus": _Entry(14, nn.Softplus, lambda m: (float(m.beta), float(m.threshold)),
                       lambda z, a, b: F.softplus(z, a, b), lambda g, z, a, b: aten.softplus_backward(g, z, a, b)),
    "mish": _Entry(15, nn.Mish, _none, lambda z, a, b: F.mish(z), lambda g, z, a, b: aten.mish_backward(g, z)),
}
_BY_CODE = {e.code: e for e in _TABLE.values()}
_TABLE["relu6"] = _TABLE["hardtanh"]._replace(module=nn.ReLU6)  # Hardtanh(0, 6), as in torch
MODULE_NAMES = {e.module: name for name, e in _TABLE.items() if name != "gelu_tanh"}
NAMES = tuple(n for n in _TABLE if n != "gelu_tanh")
NUM_CODES = 1 + max(_BY_CODE)  # codes 0 (none) .. NUM_CODES - 1: norm_math.h's kNumActivations
# Each name's Activation: its torch.nn module with torch.nn's defaults (leaky_relu's slope is
# the negative_slope argument instead).
_BY_NAME = {name: Activation(e.code, *e.params(e.module())) for name, e in _TABLE.items() if name in NAMES}


def _unknown(activation):
    return ValueError(
        f"unknown activation {activation!r}: expected None, one of {', '.join(map(repr, NAMES))}, or an "
        f"instance of torch.nn's {', '.join(sorted(t.__name__ for t in MODULE_NAMES))}")


def resolve(activation, negative_slope=0.01):
    """The Activation the ops take for a module's or functional's `activation` argument:
    None, a name (torch.nn's default form; "leaky_relu" takes negative_slope) or a torch.nn
    activation module, whose parameters are honoured. ValueError for anything else."""
    if activation is None:
        return NONE
    if isinstance(activation, Activation):  # already resolved (the modules pass theirs)
        return activation
    if isinstance(activation, str):
        act = _BY_NAME.get(activation)
        if act is None:
            raise _unknown(activation)
        return act._replace(a=float(negative_slope)) if activation == "leaky_relu" else act
    name = MODULE_NAMES.get(type(activation))
    if name is None:
        raise _unknown(activation)
    if name == "gelu":
        if activation.approximate not in ("none", "tanh"):
            raise ValueError(f"GELU's approximate must be 'none' or 'tanh', got {activation.approximate!r}")
        name = "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    return Activation(_TABLE[name].code, *_TABLE[name].params(activation))


def readable_from_output(act):
    """Whether act's derivative can be read off its output, as torch's ReLU backward reads
    it: none, ReLU, LeakyReLU with a non-negative slope (output > 0 exactly where the input
    is). BatchNorm's residual add takes these."""
    return act.code in (0, 1) or (act.code == 2 and act.a >= 0)


def forward(z, act):
    """act(z) in differentiable torch ops (torch.nn's own functions)."""
    if act.code == 0:
        return z
    return _BY_CODE[act.code].forward(z, act.a, act.b)


def backward(g, z, act):
    """g * act'(z), torch's derivative (its *_backward ops, kinks included); with g a
    tangent, the jvp. Differentiable again."""
    if act.code == 0:
        return g
    return _BY_CODE[act.code].backward(g, z, act.a, act.b)


def activation_repr(activation, negative_slope):
    """The extra_repr suffix for a module's activation ("" when there is none)."""
    if activation is None:
        return ""
    if activation == "leaky_relu":
        return f", activation={activation}, negative_slope={negative_slope}"
    if isinstance(activation, str):
        return f", activation={activation}"
    return f", activation={activation!r}"

