"""Each norm's forward in torch ops, and its tangent, for the derivatives the fused kernels
do not have.

- Second derivatives. The backward ops have no derivative of their own. When a backward's
  result is to be differentiated again (create_graph=True: gradient penalties, MAML-style
  meta-gradients, Hessian-vector products; nested torch.func transforms), autograd.py
  recomputes the norm's output with `output` and returns its gradients, which autograd can
  differentiate again, as torch.nn's.
- Forward mode (torch.func.jvp / jacfwd / hessian, forward_ad dual tensors): `tangent`,
  the output's directional derivative, for the Functions' jvp.
- Per-sample parameter gradients of LayerNorm under vmap: `layer_norm_param_grads`, for
  _vmap.py's rule (the backward op sums them over every sample's rows).
Slower than the fused kernels and holding more memory, so they run only then.

Statistics as the kernels compute them: in float32 (float64 for float64 input), two-pass
(the mean, then the mean of the squared deviations). Each norm is described by `_Norm`:
which dims of which view of x its statistics reduce, and how its parameters broadcast.
"""
import math

import torch

from . import _activation


def _acc(t):
    """t in the statistics' dtype."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


class _Norm:
    """How a norm normalises x: `view(x)` is reduced over `dims` (with batch statistics) or
    normalised with the saved ones (`stats`, broadcastable to the view, or None), then
    reshaped back to x's shape, and the parameters broadcast as `param_shape`."""

    def __init__(self, ctx, kind, x, mean, rstd):
        channels = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # per channel (dim 1)
        self.shape, self.param_shape, self.stats = x.shape, channels, None
        if kind == "batch_norm":
            self.dims = [0] + list(range(2, x.dim()))
            if not ctx.training:  # running statistics, as the forward read them: constants
                self.stats = (mean.reshape(channels), rstd.reshape(channels))
        elif kind == "instance_norm":
            self.dims = list(range(2, x.dim()))
        elif kind in ("layer_norm", "rms_norm"):
            k = len(ctx.normalized_shape)
            self.dims, self.param_shape = list(range(x.dim() - k, x.dim())), tuple(ctx.normalized_shape)
        elif kind == "group_norm":
            self.groups = ctx.num_groups
            self.dims = [2]
        else:
            raise ValueError(kind)
        self.kind = kind
        self.centered = kind != "rms_norm"  # RMSNorm: statistics about zero

    def view(self, t):
        if self.kind != "group_norm":
            return t
        per_group = self.shape[1] // self.groups * math.prod(self.shape[2:])  # not -1: N may be 0
        return t.reshape(self.shape[0], self.groups, per_group)

    def normalized(self, x, eps, x_t=None):
        """xhat = (x - mean) * rstd, and its tangent along x_t (None: no tangent)."""
        xs = _acc(self.view(x))
        if self.stats is None:
            mean = xs.mean(self.dims, keepdim=True) if self.centered else xs.new_zeros(())
            rstd = torch.rsqrt((xs - mean).square().mean(self.dims, keepdim=True) + eps)
        else:
            mean, rstd = self.stats
        xhat = (xs - mean) * rstd
        xhat_t = None
        if x_t is not None:
            ts = _acc(self.view(x_t))
            if self.stats is None:
                # d xhat = rstd * (dx - mean(dx) - xhat * mean(xhat * dx)): the mean's and
                # the variance's tangents folded in (RMSNorm: no mean, no mean(dx) term).
                centred = ts - ts.mean(self.dims, keepdim=True) if self.centered else ts
                xhat_t = rstd * (centred - xhat * (xhat * ts).mean(self.dims, keepdim=True))
            else:
                xhat_t = ts * rstd
            xhat_t = xhat_t.reshape(self.shape)
        return xhat.reshape(self.shape), xhat_t


def _param(p, shape):
    return None if p is None else p.reshape(shape)


def _affine(norm, xhat, weight, bias):
    """xhat * weight + bias, the parameters (None: absent) broadcast as the norm's."""
    if weight is not None:
        xhat = xhat * _param(weight, norm.param_shape)
    if bias is not None:
        xhat = xhat + _param(bias, norm.param_shape)
    return xhat


def layer_norm_param_grads(dy, x, normalized_shape, mean, rstd, weight, bias, act):
    """Per-sample LayerNorm parameter gradients from the forward's saved statistics (the
    backward op's, whose sums run over every row): dy and x (B, *rows, *normalized_shape),
    mean and rstd (B, rows); act: the _activation.Activation. Returns dweight, dbias of
    shape (B, *normalized_shape) in the parameters' dtype, None for an absent parameter.
    float32 sums (float64 for float64)."""
    batch, rows, length = x.shape[0], mean.shape[1], math.prod(normalized_shape)  # sizes, not -1: any may be 0
    # One temporary, updated in place: these tensors are as large as the whole batch.
    xhat = _acc(x).reshape(batch, rows, length) - _acc(mean).reshape(batch, rows, 1)
    xhat.mul_(_acc(rstd).reshape(batch, rows, 1))
    g = _acc(dy).reshape(batch, rows, length)
    if act.code:
        z = xhat
        if weight is not None:
            z = z * _acc(weight).reshape(length)
        if bias is not None:
            z = z + _acc(bias).reshape(length)
        g = _activation.backward(g, z, act)
    shape = (batch, *normalized_shape)
    dbias = None if bias is None else g.sum(1).reshape(shape).to(bias.dtype)
    dweight = None if weight is None else xhat.mul_(g).sum(1).reshape(shape).to(weight.dtype)
    return dweight, dbias


def output(kind, ctx, x, weight, bias, mean, rstd):
    """act(norm(x)) in x's dtype, in differentiable torch ops."""
    norm = _Norm(ctx, kind, x, mean, rstd)
    xhat, _ = norm.normalized(x, ctx.eps)
    return _activation.forward(_affine(norm, xhat, weight, bias), ctx.act).to(x.dtype)


def tangent(kind, ctx, x, weight, bias, mean, rstd, x_t, weight_t, bias_t):
    """The tangent of act(norm(x)) along the inputs' tangents (None: zero), in x's dtype."""
    norm = _Norm(ctx, kind, x, mean, rstd)
    xhat, xhat_t = norm.normalized(x, ctx.eps, x_t)
    z = _affine(norm, xhat, weight, bias)
    # z = xhat * w + b, so z_t = xhat_t * w + xhat * w_t + b_t (absent tangents: no term).
    z_t = torch.zeros_like(xhat)
    if xhat_t is not None:
        z_t = z_t + _affine(norm, xhat_t, weight, None)
    if weight_t is not None:
        z_t = z_t + _affine(norm, xhat, weight_t, None)
    if bias_t is not None:
        z_t = z_t + _param(bias_t, norm.param_shape)
    return _activation.backward(z_t, z, ctx.act).to(x.dtype)
