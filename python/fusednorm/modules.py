"""Drop-in replacements for torch.nn's normalisation modules, with a fused activation.

Each class subclasses its torch.nn counterpart, so constructor arguments, defaults,
parameters, buffers, state_dict keys and isinstance checks are torch.nn's; it adds the
keyword-only `activation` (None, a name such as "silu", or a torch.nn activation module)
and `negative_slope` (for "leaky_relu") and computes forward with fusednorm's kernels.
Module semantics (num_batches_tracked, momentum=None, eval vs train) follow
torch.nn's code exactly and live only here."""
import functools

import torch

from . import functional as F
from ._activation import activation_repr, resolve

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm",
]


def fx_leaf(forward):
    """torch.fx.symbolic_trace records a torch.nn norm as one call of the module (torch.nn
    modules are its default tracer's leaves) and would trace into ours, failing on their
    input checks. Record ours the same way: a call_module node, so the traced model still
    runs the module (and its current train/eval mode) at call time."""
    @functools.wraps(forward)
    def wrapper(self, input, *args, **kwargs):
        if isinstance(input, torch.fx.Proxy):
            tracer = input.tracer
            path = tracer.path_of_module(self)
            if not path:  # the norm is the traced root: no module around it to call it from
                raise torch.fx.proxy.TraceError(
                    f"fusednorm.{type(self).__name__} is traced as one call of the module, which "
                    "needs a model around it: trace e.g. torch.nn.Sequential(norm)")
            return tracer.create_proxy("call_module", path, (input, *args), kwargs)
        return forward(self, input, *args, **kwargs)
    return wrapper


class _FusedActivation:
    """Mixin: the activation attributes. `activation` is what the user gave (None, a name or
    a torch.nn activation module) and `negative_slope` leaky_relu's slope; setting either
    checks it (ValueError) and resolves the pair into `_act`, what the kernels take. A
    module given as the activation is a plain attribute, not a submodule, so the norm's
    children, state_dict and repr stay torch.nn's."""

    def _set_activation(self, activation, negative_slope):
        self.__dict__["negative_slope"] = negative_slope
        self.activation = activation

    def __setattr__(self, name, value):
        if name not in ("activation", "negative_slope"):
            return super().__setattr__(name, value)
        pair = {"activation": self.__dict__.get("activation"),
                "negative_slope": self.__dict__.get("negative_slope", 0.01), name: value}
        self.__dict__["_act"] = resolve(pair["activation"], pair["negative_slope"])
        self.__dict__[name] = value

    def extra_repr(self):
        return super().extra_repr() + activation_repr(self.activation, self.negative_slope)


class _BatchNorm(_FusedActivation):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self._set_activation(activation, negative_slope)

    @fx_leaf
    def forward(self, input, residual=None):
        """act(bn(input)); with `residual`, act(bn(input) + residual) (a ResNet block's tail,
        activation None, relu or leaky_relu), fused (functional.batch_norm)."""
        return self._forward(input, residual, self._act)

    def _forward(self, input, residual, act):
        """forward with the activation `act` (convert's fallback takes the norm alone)."""
        self._check_input_dim(input)
        # As torch.nn.modules.batchnorm._BatchNorm.forward.
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                # (an empty batch leaves the running statistics as they are, as torch.nn's)
                if self.running_mean is not None and self.running_var is not None and input.numel():
                    return self._cumulative_average_forward(input, residual, act)
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps,
            activation=act, residual=residual,
        )

    def _cumulative_average_forward(self, input, residual, act):
        """momentum=None: running = (1 - f) * running + f * batch, f = 1 / num_batches_tracked,
        as torch.nn. The factor stays a tensor (torch.nn's float(num_batches_tracked) is a host
        sync, and a data-dependent value torch.compile cannot pass to an op): the kernel writes
        the batch statistics into zeroed buffers (momentum 1) and the blend is done here. Not
        running + (batch - running) * f: at f = 1 that is 1 + (var - 1) in float32, which lost
        a small batch variance entirely (relative error up to 1)."""
        fresh_mean = torch.zeros_like(self.running_mean)
        fresh_var = torch.zeros_like(self.running_var)
        y = F.batch_norm(input, fresh_mean, fresh_var, self.weight, self.bias, True, 1.0, self.eps,
                         activation=act, residual=residual)
        with torch.no_grad():
            factor = (1.0 / self.num_batches_tracked.double())
            self.running_mean.copy_(self.running_mean * (1.0 - factor) + fresh_mean * factor)
            self.running_var.copy_(self.running_var * (1.0 - factor) + fresh_var * factor)
        return y


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d + fused activation."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d + fused activation."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d + fused activation."""


class _InstanceNorm(_FusedActivation):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self._set_activation(activation, negative_slope)

    @fx_leaf
    def forward(self, input):
        return super().forward(input)  # torch.nn's: input checks, unbatched input

    # torch.nn's _InstanceNorm.forward calls this.
    def _apply_instance_norm(self, input):
        return F.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps,
            activation=self._act,
        )


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d + fused activation."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d + fused activation."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d + fused activation."""


class LayerNorm(_FusedActivation, torch.nn.LayerNorm):
    """torch.nn.LayerNorm + fused activation (and fused residual add: forward(x, residual))."""

    residual_in_fp32 = False  # (a class default too: convert() builds modules without __init__)

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, *, activation=None, negative_slope=0.01, residual_in_fp32=False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self._set_activation(activation, negative_slope)
        self.residual_in_fp32 = residual_in_fp32  # the sum's dtype in forward(x, residual)

    @fx_leaf
    def forward(self, input, residual=None):
        """act(layer_norm(input)); with `residual`, the pair (act(layer_norm(input + residual)),
        input + residual), fused (functional.add_layer_norm)."""
        if residual is not None:
            return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                    activation=self._act, residual_in_fp32=self.residual_in_fp32)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                            activation=self._act)


class RMSNorm(_FusedActivation, torch.nn.RMSNorm):
    """torch.nn.RMSNorm + fused activation (and fused residual add: forward(x, residual))."""

    residual_in_fp32 = False  # (a class default too: convert() builds modules without __init__)

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 activation=None, negative_slope=0.01, residual_in_fp32=False):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self._set_activation(activation, negative_slope)
        self.residual_in_fp32 = residual_in_fp32

    @fx_leaf
    def forward(self, input, residual=None):
        """act(rms_norm(input)); with `residual`, the pair (act(rms_norm(input + residual)),
        input + residual), fused (functional.add_rms_norm)."""
        if residual is not None:
            return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                                  activation=self._act, residual_in_fp32=self.residual_in_fp32)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, activation=self._act)


class GroupNorm(_FusedActivation, torch.nn.GroupNorm):
    """torch.nn.GroupNorm + fused activation."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 *, bias=True, activation=None, negative_slope=0.01):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        self._set_activation(activation, negative_slope)

    @fx_leaf
    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                            activation=self._act)
