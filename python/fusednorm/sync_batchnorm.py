"""SyncBatchNorm (+ fused activation) over torch.distributed, on any backend it offers:
gloo on CPUs (where torch.nn.SyncBatchNorm refuses to run), nccl on GPUs.

Forward (training): each process computes its per-channel (count, mean, M2) with the
batch_norm_stats op; ONE all_gather shares them; every process merges them with Chan's
formula (uneven batches, empty ones included) and normalises with the global statistics
in the fused kernel. Backward: the local per-channel sums (sum dyhat, sum dyhat*xhat) from
batch_norm_bwd, ONE all_reduce, then the local input gradient. Parameter gradients stay
local, as torch.nn.SyncBatchNorm's: DistributedDataParallel's all-reduce combines them."""
import functools

import torch
import torch.distributed as dist

from ._activation import Activation
from .autograd import first_order_only
from .backend import ops_for
from .modules import _BatchNorm, fx_leaf

__all__ = ["SyncBatchNorm"]


def _merge_across(stats):
    """Chan's merge of per-process (count, mean, M2) rows: stats is (world, 3, C)."""
    count, mean, m2 = stats[0]
    for other in stats[1:]:
        n_b, mean_b, m2_b = other
        n = count + n_b
        w_b = torch.where(n > 0, n_b / n.clamp_min(1), torch.zeros_like(n))
        delta = mean_b - mean
        mean = mean + delta * w_b
        m2 = m2 + m2_b + delta * delta * count * w_b
        count = n
    return count, mean, m2


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, act_a, act_b, group):
        C = x.shape[1]
        ctx.ops = ops_for(x)
        mean_l, m2_l = ctx.ops.batch_norm_stats(x)
        count_l = torch.full_like(mean_l, x.numel() // C if C else 0)
        local = torch.stack([count_l, mean_l, m2_l])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)  # the forward's one collective
        count, mean, m2 = _merge_across(gathered)
        total = int(count[0].item()) if C else 0
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over the "
                             "process group")
        var = m2 / count
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_((m2 / (count - 1)).to(running_var.dtype), alpha=momentum)
        # Normalise with the global statistics: the kernel's eval path takes them as given.
        y, _, rstd = ctx.ops.batch_norm_fwd(x, weight, bias, mean, var, False, 0.0, eps, act, act_a, act_b)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.act, ctx.group, ctx.total = Activation(act, act_a, act_b), group, total
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        w = weight.to(mean.dtype) if weight is not None else torch.ones_like(mean)
        b = bias.to(mean.dtype) if bias is not None else torch.zeros_like(mean)
        want_dx = ctx.needs_input_grad[0]
        # The op in eval mode (statistics taken as given): local sums of dyhat and dyhat*xhat,
        # and dx_eval = rstd*w*dyhat, in float32 (in place below, rounded once at the end).
        xf = x.to(mean.dtype)  # a copy only for 16-bit inputs; used twice
        dx, sum_dy_xhat, sum_dy = ctx.ops.batch_norm_bwd(
            dy.to(mean.dtype), xf, w, b, mean, rstd, False, *ctx.act,
            [want_dx, True, True])
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        if not want_dx:
            return None, grad_weight, grad_bias, None, None, None, None, None, None, None, None
        sums = torch.stack([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)  # the backward's one collective
        # Training-mode dx = rstd*w*(dyhat - sum_dy/M - xhat*sum_dy_xhat/M) with the global
        # sums: dx_eval plus a per-channel a*x + c (xhat = (x - mean)*rstd).
        scale, k0, k1 = rstd * w, sums[0] / ctx.total, sums[1] / ctx.total
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        a = -scale * rstd * k1
        c = -scale * (k0 - mean * rstd * k1)
        dx.addcmul_(xf, a.view(shape)).add_(c.view(shape))
        return dx.to(x.dtype), grad_weight, grad_bias, None, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's signature, state_dict and semantics, on any
    torch.distributed backend (CPU with gloo too), plus a fused activation.

    Not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel refuses every
    torch.nn.SyncBatchNorm instance in a CPU model."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True, activation=None,
                 negative_slope=0.01):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias, activation=activation, negative_slope=negative_slope)
        self.process_group = process_group

    def _check_input_dim(self, input):  # as torch.nn.SyncBatchNorm
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    @fx_leaf
    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not (self.training and torch.distributed.is_available() and dist.is_initialized()):
            if self.training:
                raise RuntimeError(
                    "fusednorm.SyncBatchNorm: training needs an initialised torch.distributed "
                    "process group (torch.distributed.init_process_group); use BatchNorm for a "
                    "single process")
            return _BatchNorm.forward(self, input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return _BatchNorm.forward(self, input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats
        return SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if running else None,
            self.running_var if running else None, factor, self.eps,
            *self._act, group)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Like torch.nn.SyncBatchNorm.convert_sync_batchnorm; fusednorm BatchNorm modules keep
        their activation."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      activation=getattr(module, "activation", None),
                      negative_slope=getattr(module, "negative_slope", 0.01))
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


def _keep_activations_in_torch_convert():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), the usual DDP recipe, rebuilds
    every BatchNorm as a torch.nn.SyncBatchNorm, which has no activation: a fusednorm
    BatchNorm with one would silently lose it. Wrapped (once, on import) so that those become
    fusednorm.SyncBatchNorm, activation, parameters and buffers kept; every other module is
    converted by torch's own code, whose recursion into children comes back through here."""
    torch_convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm.__func__
    if getattr(torch_convert, "keeps_fusednorm_activations", False):
        return

    def convert_sync_batchnorm(cls, module, process_group=None):
        if isinstance(module, _BatchNorm) and module.activation is not None:
            return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return torch_convert(cls, module, process_group)

    functools.update_wrapper(convert_sync_batchnorm, torch_convert)
    convert_sync_batchnorm.keeps_fusednorm_activations = True
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)


_keep_activations_in_torch_convert()
