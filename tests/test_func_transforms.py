"""torch.func transforms over fusednorm modules, against the same transforms over torch.nn:
grad and vjp of functional_call (what meta-learning and functional training loops use) for
every norm, vmap(grad) per-sample gradients for LayerNorm and GroupNorm; and clear errors,
never wrong numbers, where fusednorm has no support (a second derivative, vmap over
BatchNorm and InstanceNorm)."""
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vjp, vmap

import fusednorm
from helpers import KINDS, TARGETS, activate, assert_close, make_input, make_pair, SLOPE


def _loss_fns(kind, activation, device):
    """(ours, ref, loss(module, params, x)) with a fixed random weighting of the output, so
    every output element's gradient differs."""
    ours, ref = make_pair(kind, activation, device=device)
    shape = KINDS[kind][3]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float().to(device)

    def loss(module, params, buffers, x):
        y = functional_call(module, {**params, **buffers}, (x,))
        if module is ref:
            y = activate(y, activation, SLOPE)
        return (y * w).sum()

    return ours, ref, loss


def _params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def _buffers(module):
    """Copies of the buffers, passed to the transformed function as an argument: torch.func
    refuses in-place updates of tensors the function captures (torch.nn's too)."""
    return {k: v.clone() for k, v in module.named_buffers()}


def _compare_buffers(ours, ref):
    for name in ref:
        if ref[name].is_floating_point():
            assert_close(ours[name], ref[name], ref[name].dtype, name)
        else:
            assert torch.equal(ours[name], ref[name]), name


# Every kind with each activation on the CPU; the Triton interpreter (slow) with one.
CASES = [pytest.param(t.values[0], k, a, marks=t.marks, id=f"{t.id}-{k}-{a}")
         for t in TARGETS for k in KINDS
         for a in (["relu", None, "leaky_relu"] if "cpu" in t.values[0] and t.id == "cpu" else ["leaky_relu"])]


@pytest.mark.parametrize("target,kind,activation", CASES)
def test_func_grad_matches_torch(target, kind, activation):
    """torch.func.grad w.r.t. parameters and input, in training mode (running statistics
    updated as torch.nn updates them)."""
    device, backend = target
    ours, ref, loss = _loss_fns(kind, activation, device)
    x = make_input(KINDS[kind][3], torch.float32, "contiguous", device=device)
    buffers, buffers_ref = _buffers(ours), _buffers(ref)
    with fusednorm.use_backend(backend):
        got = grad(lambda p, b, x: loss(ours, p, b, x), argnums=(0, 2))(_params(ours), buffers, x)
    want = grad(lambda p, b, x: loss(ref, p, b, x), argnums=(0, 2))(_params(ref), buffers_ref, x)
    for name in want[0]:
        assert_close(got[0][name], want[0][name], torch.float32, name)
    assert_close(got[1], want[1], torch.float32, "input gradient")
    _compare_buffers(buffers, buffers_ref)


@pytest.mark.parametrize("kind", list(KINDS))
def test_func_vjp_matches_torch(kind):
    """torch.func.vjp: the output, and the pullback of a random cotangent."""
    ours, ref = make_pair(kind, "leaky_relu")
    if kind.startswith("BatchNorm"):
        # Training BatchNorm adds to num_batches_tracked, which the function captures here
        # and torch.func refuses to mutate (torch.nn's too). test_func_grad_matches_torch
        # covers training mode; this covers the running-statistics path.
        ours.eval(), ref.eval()
    x = make_input(KINDS[kind][3], torch.float32, "contiguous")
    b, b_ref = _buffers(ours), _buffers(ref)
    y, pull = vjp(lambda p, x: functional_call(ours, {**p, **b}, (x,)), _params(ours), x)
    yr, pull_r = vjp(lambda p, x: activate(functional_call(ref, {**p, **b_ref}, (x,)), "leaky_relu", SLOPE),
                     _params(ref), x)
    assert_close(y, yr, torch.float32, "output")
    ct = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (gp, gx), (gp_r, gx_r) = pull(ct), pull_r(ct)
    for name in gp_r:
        assert_close(gp[name], gp_r[name], torch.float32, name)
    assert_close(gx, gx_r, torch.float32, "input gradient")
    _compare_buffers(b, b_ref)


@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm"])
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_per_sample_gradients_match_torch(target, kind):
    """vmap(grad(loss)) over a batch of samples: one parameter gradient per sample, each
    from a one-sample forward (torch's batched fallback runs the op once per sample)."""
    device, backend = target
    ours, ref, loss = _loss_fns(kind, "relu", device)
    batch = torch.stack([make_input(KINDS[kind][3], torch.float32, "contiguous", seed=s, device=device)
                         for s in range(3)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        with fusednorm.use_backend(backend):
            got = vmap(grad(lambda p, x: loss(ours, p, {}, x)), in_dims=(None, 0))(_params(ours), batch)
    want = vmap(grad(lambda p, x: loss(ref, p, {}, x)), in_dims=(None, 0))(_params(ref), batch)
    for name in want:
        assert got[name].shape[0] == 3, name
        assert_close(got[name], want[name], torch.float32, name)


@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d"])
def test_vmap_over_batch_and_instance_norm_is_refused(kind):
    """Their forward ops update running statistics in place, which torch's batched fallback
    cannot run: a RuntimeError naming the function, not a result."""
    ours, _ = make_pair(kind, None)
    batch = torch.randn((2,) + KINDS[kind][3]).requires_grad_()
    with pytest.raises(RuntimeError, match="NormFunction"):
        vmap(ours)(batch)


@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d", "LayerNorm", "GroupNorm"])
def test_second_derivative_through_torch_func_is_refused_not_wrong(kind):
    """grad(grad(f)): the backward ops have no derivative. torch's once_differentiable
    would return zeros here, silently; fusednorm raises (torch.nn computes it)."""
    ours, ref = make_pair(kind, None)
    ours.train(kind != "BatchNorm2d"), ref.train(kind != "BatchNorm2d")  # as in the vjp test
    x = make_input(KINDS[kind][3], torch.float32, "contiguous")

    def second(module):
        b = _buffers(module)
        first = grad(lambda x: functional_call(module, {**_params(module), **b}, (x,)).pow(3).sum())
        return grad(lambda x: first(x).pow(2).sum())(x)

    assert second(ref).abs().sum() > 0  # the derivative exists and is not zero
    with pytest.raises(RuntimeError, match="differentiate twice"):
        second(ours)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-eval"])
@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d", "LayerNorm", "GroupNorm"])
def test_forward_mode_ad_is_refused_not_wrong(kind, mode, frozen):
    """Forward-mode AD has no rule here: a NotImplementedError, also for a frozen model in
    eval mode, whose inputs require no gradient (the ops alone would drop the tangent and
    return zero or none)."""
    ours, ref = make_pair(kind, None)
    for m in (ours, ref):
        # Training BatchNorm's num_batches_tracked: see test_func_vjp_matches_torch.
        m.train(not frozen and kind != "BatchNorm2d").requires_grad_(not frozen)
    x = make_input(KINDS[kind][3], torch.float32, "contiguous")
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    def tangent(module):
        if mode == "func.jvp":
            return torch.func.jvp(module, (x,), (t,))[1]
        with torch.autograd.forward_ad.dual_level():
            y = module(torch.autograd.forward_ad.make_dual(x, t))
            return torch.autograd.forward_ad.unpack_dual(y).tangent

    assert tangent(ref).abs().sum() > 0  # torch.nn's tangent exists and is not zero
    with pytest.raises(NotImplementedError, match="jvp"):
        tangent(ours)
