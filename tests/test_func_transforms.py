"""torch.func transforms over fusednorm modules, against the same transforms over torch.nn:
grad and vjp of functional_call (what meta-learning and functional training loops use) for
every norm, vmap(grad) per-sample gradients for LayerNorm and GroupNorm; and clear errors,
never wrong numbers, where fusednorm has no support (a second derivative, vmap over
BatchNorm and InstanceNorm)."""
import contextlib

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

import fusednorm
from helpers import (
    ACTIVATIONS,
    KINDS,
    SLOPE,
    TARGETS,
    activate,
    assert_close,
    assert_same_buffers,
    make_input,
    make_pair,
)


def _loss_fns(kind, activation, device, **kwargs):
    """(ours, ref, loss(module, params, buffers, x)) with a fixed random weighting of the
    output, so every output element's gradient differs; kwargs go to make_pair."""
    ours, ref = make_pair(kind, activation, device=device, **kwargs)
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


# Every kind with each activation on the CPU; the Triton interpreter (slow) with one.
CASES = [pytest.param(t.values[0], k, a, marks=t.marks, id=f"{t.id}-{k}-{a}")
         for t in TARGETS for k in KINDS
         for a in (["relu", None, "leaky_relu"] if t.id == "cpu" else ["leaky_relu"])]


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
    assert_same_buffers(buffers.items(), buffers_ref.items())


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
    assert_same_buffers(b.items(), b_ref.items())


# mode: (constructor arguments beside KIND_KWARGS, training). "train" keeps the running
# statistics: torch.func refuses training BatchNorm's update of the captured
# num_batches_tracked (torch.nn's and ours); test_vmap_running_statistics_like_torch covers
# the statistics themselves.
VMAP_MODES = {"train": ({}, True), "train-untracked": ({"track_running_stats": False}, True),
              "eval": ({}, False)}
FUNCTIONAL = {"batch_norm": lambda F, x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, 0.3),
              "instance_norm": lambda F, x, rm, rv, w, b: F.instance_norm(x, rm, rv, w, b, True, 0.3)}


@contextlib.contextmanager
def without_vmap_fallback():
    """vmap raises where it would run an op once per sample through torch's batched
    fallback (which gives the same numbers, slowly): the op's own rule must run."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


# LayerNorm, GroupNorm and RMSNorm have no running statistics: their one mode is "train".
VMAP_CASES = [pytest.param(t.values[0], k, m, marks=t.marks, id=f"{t.id}-{k}-{m}")
              for t in TARGETS for k in KINDS for m in VMAP_MODES
              if m == "train" or k not in ("LayerNorm", "GroupNorm", "RMSNorm")]


@pytest.mark.parametrize("target,kind,mode", VMAP_CASES)
def test_vmap_per_sample_gradients_match_torch(target, kind, mode):
    """vmap(grad(loss)) over a batch of samples: one parameter gradient per sample, each as
    from that sample's own forward (BatchNorm's statistics over each sample's batch). Where
    torch.nn refuses (running statistics updated in training), fusednorm must refuse too."""
    device, backend = target
    kwargs, train = VMAP_MODES[mode]
    ours, ref, loss = _loss_fns(kind, "relu", device, **kwargs)
    ours.train(train), ref.train(train)
    batch = torch.stack([make_input(KINDS[kind][3], torch.float32, "contiguous", seed=s, device=device)
                         for s in range(3)])

    def per_sample(module):
        f = grad(lambda p, x: loss(module, p, {}, x))
        return vmap(f, in_dims=(None, 0))(_params(module), batch)

    try:
        want = per_sample(ref)
    except RuntimeError:  # torch.func refuses num_batches_tracked.add_ on a captured buffer
        with fusednorm.use_backend(backend), pytest.raises(RuntimeError):
            per_sample(ours)
        return
    with fusednorm.use_backend(backend), without_vmap_fallback():  # every op by its own rule
        got = per_sample(ours)
        y = vmap(ours)(batch)
    for name in want:
        assert got[name].shape[0] == 3, name
        assert_close(got[name], want[name], torch.float32, name)
    assert_close(y, activate(vmap(ref)(batch), "relu"), torch.float32, "vmapped output")


def check_backward_rule(fwd, bwd, xs, dys, x_dim, mask, present, shared_stats=False):
    """A backward op's vmap rule against the op called once per sample. fwd(x): one
    sample's (mean, rstd); bwd(dy, x, mean, rstd): (dx, dweight, dbias); x_dim: x's batch
    dim (None: one input shared by the samples, as jacrev's); present: which gradients can
    exist (none for an absent parameter); shared_stats: one (mean, rstd) for every sample,
    unbatched (eval BatchNorm's running statistics, as its forward rule returns them)."""
    stats = [fwd(x) for x in xs]
    mean, rstd = torch.stack([m for m, _ in stats]), torch.stack([r for _, r in stats])
    want = [torch.stack(parts) for parts in zip(*(bwd(*a) for a in zip(dys, xs, mean, rstd)))]
    with without_vmap_fallback():
        if x_dim is None:
            got = vmap(bwd, in_dims=(0, None, None, None))(dys, xs[0], mean[0], rstd[0])
        elif shared_stats:
            got = vmap(bwd, in_dims=(0, x_dim, None, None))(dys, xs.movedim(0, x_dim), mean[0], rstd[0])
        else:
            got = vmap(bwd, in_dims=(0, x_dim, 0, 0))(dys, xs.movedim(0, x_dim), mean, rstd)
    for name, gv, wv, asked, there in zip(("dx", "dweight", "dbias"), got, want, mask, present):
        if asked and there:
            assert_close(gv, wv, torch.float32, name)
        else:
            assert gv.numel() == 0, name


# vmap over group_norm_bwd (GroupNorm's and InstanceNorm's backward): which arguments are
# batched, and how. The rule puts the samples side by side as channels (_vmap.py).
BWD_VMAP = {
    "one-row-samples": dict(n=1),  # per-sample gradients' usual x[None]: a view
    "three-row-samples": dict(n=3),
    "no-affine": dict(n=2, affine=False),
    "dx-only": dict(n=2, mask=[True, False, False]),
    "params-only": dict(n=2, mask=[False, True, True]),
    "channels-last": dict(n=2, channels_last=True),
    "batch-dim-2": dict(n=2, x_dim=2),
    "shared-input": dict(n=2, x_dim=None),  # jacrev: batched cotangents, one input
}


@pytest.mark.parametrize("case", list(BWD_VMAP))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_group_norm_backward_matches_per_sample_calls(target, case):
    """The vmap rule for group_norm_bwd against the op called once per sample."""
    device, backend = target
    cfg = {"affine": True, "mask": [True, True, True], "channels_last": False, "x_dim": 0, **BWD_VMAP[case]}
    B, n, C, G = 3, cfg["n"], 4, 2
    g = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    xs = rand(B, n, C, 3, 5)
    dys = rand(B, n, C, 3, 5)
    if cfg["channels_last"]:
        xs = torch.stack([x.to(memory_format=torch.channels_last) for x in xs])
    if cfg["x_dim"] is None:
        xs = xs[:1].expand(B, *xs.shape[1:])
    w, b = (rand(C), rand(C)) if cfg["affine"] else (None, None)
    with fusednorm.use_backend(backend):
        ops = fusednorm.backend.ops_for(xs)
        check_backward_rule(lambda x: ops.group_norm_fwd(x, G, w, b, 1e-5, 1, SLOPE, 0.0)[1:],
                            lambda dy, x, mean, rstd: ops.group_norm_bwd(dy, x, G, mean, rstd, w, b, 1, SLOPE, 0.0,
                                                                         cfg["mask"]),
                            xs, dys, cfg["x_dim"], cfg["mask"], (True, cfg["affine"], cfg["affine"]))


# vmap over batch_norm_bwd: the samples side by side as channels, as for group_norm_bwd.
BN_BWD_VMAP = {
    "train-one-row-samples": dict(n=1),
    "train-three-row-samples": dict(n=3),
    "eval": dict(n=2, training=False),
    "eval-shared-statistics": dict(n=2, training=False, shared_stats=True),
    "no-affine": dict(n=2, affine=False),
    "dx-only": dict(n=2, mask=[True, False, False]),
    "params-only": dict(n=2, mask=[False, True, True]),
    "channels-last": dict(n=2, channels_last=True),
    "batch-dim-2": dict(n=2, x_dim=2),
    "shared-input": dict(n=2, x_dim=None),
    "1-d": dict(n=3, spatial=()),  # BatchNorm1d on (N, C)
}


@pytest.mark.parametrize("case", list(BN_BWD_VMAP))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_batch_norm_backward_matches_per_sample_calls(target, case):
    """The vmap rule for batch_norm_bwd against the op called once per sample."""
    device, backend = target
    cfg = {"training": True, "affine": True, "mask": [True, True, True], "channels_last": False, "x_dim": 0,
           "spatial": (3, 5), "shared_stats": False, **BN_BWD_VMAP[case]}
    B, C = 3, 4
    g = torch.Generator().manual_seed(5)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    xs, dys = rand(B, cfg["n"], C, *cfg["spatial"]), rand(B, cfg["n"], C, *cfg["spatial"])
    if cfg["channels_last"]:
        xs = torch.stack([x.to(memory_format=torch.channels_last) for x in xs])
    if cfg["x_dim"] is None:
        xs = xs[:1].expand(B, *xs.shape[1:])
    w, b = (rand(C), rand(C)) if cfg["affine"] else (None, None)
    running = (rand(C), rand(C).abs() + 0.5) if not cfg["training"] else (None, None)
    with fusednorm.use_backend(backend):
        ops = fusednorm.backend.ops_for(xs)
        check_backward_rule(lambda x: ops.batch_norm_fwd(x, w, b, *running, cfg["training"], 0.1, 1e-5, 2, SLOPE,
                                                         0.0)[1:],
                            lambda dy, x, mean, rstd: ops.batch_norm_bwd(dy, x, w, b, mean, rstd, cfg["training"], 2,
                                                                         SLOPE, 0.0, cfg["mask"]),
                            xs, dys, cfg["x_dim"], cfg["mask"], (True, cfg["affine"], cfg["affine"]),
                            cfg["shared_stats"])


# vmap over layer_norm_bwd: the input gradient from one call on every sample's rows, the
# parameter gradients summed per sample from the saved statistics (_vmap.py).
LN_BWD_VMAP = {
    "one-row-samples": dict(rows=1),
    "three-row-samples": dict(rows=3),
    "2-d-normalized-shape": dict(rows=2, shape=(3, 4)),
    "no-activation": dict(rows=2, act=0),
    "relu": dict(rows=2, act=1),
    "no-affine": dict(rows=2, weight=False, bias=False),
    "weight-only": dict(rows=2, bias=False),
    "dx-only": dict(rows=2, mask=[True, False, False]),
    "params-only": dict(rows=2, mask=[False, True, True]),
    "batch-dim-1": dict(rows=2, x_dim=1),
    "shared-input": dict(rows=2, x_dim=None),  # jacrev: batched cotangents, one input
    # samples above _vmap._STACKED_LAYER_NORM_BWD_MAX elements (lowered here to keep the
    # interpreter quick) go one op call per sample
    "large-samples": dict(rows=2, stacked_max=8),
}


@pytest.mark.parametrize("case", list(LN_BWD_VMAP))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_layer_norm_backward_matches_per_sample_calls(target, case, monkeypatch):
    """The vmap rule for layer_norm_bwd against the op called once per sample."""
    device, backend = target
    if "stacked_max" in LN_BWD_VMAP[case]:
        monkeypatch.setattr(fusednorm._vmap, "_STACKED_LAYER_NORM_BWD_MAX", LN_BWD_VMAP[case]["stacked_max"])
    cfg = {"shape": (6,), "act": 2, "weight": True, "bias": True, "mask": [True, True, True],
           "x_dim": 0, **LN_BWD_VMAP[case]}
    B, shape = 3, list(cfg["shape"])
    g = torch.Generator().manual_seed(11)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    xs, dys = rand(B, cfg["rows"], *shape), rand(B, cfg["rows"], *shape)
    if cfg["x_dim"] is None:
        xs = xs[:1].expand(B, *xs.shape[1:])
    w = rand(*shape) if cfg["weight"] else None
    b = rand(*shape) if cfg["bias"] else None
    act = cfg["act"]
    with fusednorm.use_backend(backend):
        ops = fusednorm.backend.ops_for(xs)
        check_backward_rule(lambda x: ops.layer_norm_fwd(x, shape, w, b, 1e-5, act, SLOPE, 0.0)[1:],
                            lambda dy, x, mean, rstd: ops.layer_norm_bwd(dy, x, shape, mean, rstd, w, b, act,
                                                                         SLOPE, 0.0, cfg["mask"]),
                            xs, dys, cfg["x_dim"], cfg["mask"], (True, w is not None, b is not None))


# vmap over zero samples, or over samples that are empty themselves (a batch dim of 0
# inside each): the rules split the stacked results by explicit sizes (with B = 0,
# unflatten(0, (B, -1)) cannot size the empty result, and raised).
EMPTY_VMAP = {
    "layer_norm, zero samples": (lambda m: m.LayerNorm(6), (0, 3, 6)),
    "layer_norm, empty samples": (lambda m: m.LayerNorm(6), (3, 0, 6)),
    "group_norm, zero samples": (lambda m: m.GroupNorm(2, 4), (0, 2, 4, 5)),
    "group_norm, empty samples": (lambda m: m.GroupNorm(2, 4), (3, 0, 4, 5)),
}


@pytest.mark.parametrize("case", list(EMPTY_VMAP))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_over_empty_batches_matches_torch(target, case):
    device, backend = target
    make, shape = EMPTY_VMAP[case]
    ours, ref = make(fusednorm).to(device), make(torch.nn).to(device)
    x = torch.randn(shape, device=device)

    def per_sample_grads(module):
        return vmap(grad(lambda p, xi: functional_call(module, p, (xi,)).square().sum()), in_dims=(None, 0))(
            _params(module), x)
    with fusednorm.use_backend(backend):
        y, got = vmap(ours)(x), per_sample_grads(ours)
    want = per_sample_grads(ref)
    # torch.nn's GroupNorm over zero samples returns a (0, 0, ...) output: ours is (0, *sample)
    assert y.shape == x.shape
    for name in want:
        assert_close(got[name], want[name], torch.float32, name)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_over_parameters_matches_torch(target, kind):
    """Model ensembling: vmap over stacked parameters (eval mode, running statistics read
    only), one input: a batched weight and bias run once per sample (_vmap.py)."""
    device, backend = target
    ours, ref = make_pair(kind, "leaky_relu", device=device)
    ours.eval(), ref.eval()
    x = make_input(KINDS[kind][3], torch.float32, "contiguous", device=device)
    stacked = {k: torch.stack([v, v * 0.5 + 0.1, -v]) for k, v in _params(ours).items()}
    with fusednorm.use_backend(backend):
        got = vmap(lambda p: functional_call(ours, p, (x,)))(stacked)
    want = vmap(lambda p: activate(functional_call(ref, p, (x,)), "leaky_relu", SLOPE))(stacked)
    assert_close(got, want, torch.float32, "ensemble output")


@pytest.mark.parametrize("target", TARGETS)
def test_vmap_layer_norm_over_single_rows(target):
    """LayerNorm samples with no leading dims of their own (one row each)."""
    device, backend = target
    ours, ref = make_pair("LayerNorm", "relu", device=device)
    batch = make_input((4, 5, 6), torch.float32, "contiguous", device=device)
    with fusednorm.use_backend(backend):
        got = vmap(ours)(batch)
    assert_close(got, torch.relu(vmap(ref)(batch)), torch.float32, "output")


@pytest.mark.parametrize("batched_stats", [False, True], ids=["shared-stats", "batched-stats"])
@pytest.mark.parametrize("fn", list(FUNCTIONAL))
@pytest.mark.parametrize("target", TARGETS)
def test_vmap_running_statistics_like_torch(target, fn, batched_stats):
    """Training-mode statistics update running statistics in place (_vmap.py). Shared
    (unbatched) running statistics cannot take one update per sample: refused as torch
    refuses them. Batched ones: each sample updates its own, as torch's."""
    device, backend = target
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 2, 5, generator=gen).to(device)  # vmapped over 3 samples of (4, 2, 5)
    w, b = torch.rand(2, generator=gen).to(device) + 0.5, torch.randn(2, generator=gen).to(device)
    shape = (3, 2) if batched_stats else (2,)
    stats = [torch.randn(shape, generator=gen).to(device), torch.rand(shape, generator=gen).to(device) + 0.5]
    ours_stats, ref_stats = [t.clone() for t in stats], [t.clone() for t in stats]
    dims = (0, 0 if batched_stats else None, 0 if batched_stats else None)

    def run(F, st):
        return vmap(lambda x, rm, rv: FUNCTIONAL[fn](F, x, rm, rv, w, b), in_dims=dims)(x, *st)

    if not batched_stats:
        with pytest.raises(RuntimeError):
            run(torch.nn.functional, ref_stats)  # torch refuses: check that it still does
        with fusednorm.use_backend(backend), pytest.raises(RuntimeError, match="running_mean and running_var"):
            run(fusednorm.functional, ours_stats)
        return
    want = run(torch.nn.functional, ref_stats)
    with fusednorm.use_backend(backend):
        got = run(fusednorm.functional, ours_stats)
    assert_close(got, want, torch.float32, "output")
    for name, a, r in zip(("running_mean", "running_var"), ours_stats, ref_stats):
        assert_close(a, r, torch.float32, name)


# Nested torch.func differentiation of a scalar function f of x.
SECOND_ORDER = {
    "grad(grad)": lambda f, x: grad(lambda x: grad(f)(x).pow(2).sum())(x),
    # Reverse over reverse: the inner pullback runs after its own transform ended, under vmap.
    "jacrev(jacrev)": lambda f, x: jacrev(jacrev(f))(x),
    "grad(vjp)": lambda f, x: grad(lambda x: vjp(f, x)[1](torch.tensor(1.0))[0].pow(2).sum())(x),
    # Forward over reverse: the backward's recomputation under the Functions' jvp.
    "hessian": lambda f, x: torch.func.hessian(f)(x),
}
# Small inputs: jacrev(jacrev) and hessian build a numel x numel Hessian.
SMALL_SHAPES = {"BatchNorm2d": (2, 4, 2, 3), "InstanceNorm2d": (2, 4, 2, 3), "LayerNorm": (2, 5, 6),
                "GroupNorm": (2, 4, 2, 3)}


@pytest.mark.parametrize("transform", list(SECOND_ORDER))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("kind", list(SMALL_SHAPES))
def test_second_derivative_through_torch_func_matches_torch(kind, activation, transform):
    """Second derivatives by nested transforms: the backward ops have no derivative of
    their own; the backward recomputes the output in torch ops for the enclosing transform
    (torch's once_differentiable gives zeros here, silently: jacrev(jacrev) did so before)."""
    ours, ref = make_pair(kind, activation)
    ours.train(kind != "BatchNorm2d"), ref.train(kind != "BatchNorm2d")  # as in the vjp test
    x = make_input(SMALL_SHAPES[kind], torch.float32, "contiguous")

    def second(module, act):
        b = _buffers(module)
        return SECOND_ORDER[transform](
            lambda x: act(functional_call(module, {**_params(module), **b}, (x,))).pow(3).sum(), x)

    expected = second(ref, lambda y: activate(y, activation, SLOPE))
    assert expected.abs().sum() > 0  # the derivative exists and is not zero
    assert_close(second(ours, lambda y: y), expected, torch.float32, "second derivative")


# Forward mode: the tangent of the output along t (of the input) or tp (of the parameters).
FORWARD_MODES = {
    "func.jvp": lambda f, m, x, t, tp: torch.func.jvp(f, (x,), (t,))[1],
    "jvp-params": lambda f, m, x, t, tp: torch.func.jvp(
        lambda p: f(x, p), (_params(m),), ({k: tp[k] for k in _params(m)},))[1],
    "jacfwd": lambda f, m, x, t, tp: torch.func.jacfwd(f)(x),
    "forward_ad": lambda f, m, x, t, tp: _dual_tangent(f, x, t),
}


def _dual_tangent(f, x, t):
    with torch.autograd.forward_ad.dual_level():
        y = f(torch.autograd.forward_ad.make_dual(x, t))
        return torch.autograd.forward_ad.unpack_dual(y).tangent


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-eval"])
@pytest.mark.parametrize("mode", list(FORWARD_MODES))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("kind", list(SMALL_SHAPES))
def test_forward_mode_ad_matches_torch(kind, activation, mode, frozen):
    """Forward mode (the Functions' jvp), with batch statistics (BatchNorm without running
    statistics: torch.func refuses the captured buffers' update) and, frozen in eval
    mode, with running ones: the inputs then require no gradient, and the ops alone would
    drop the tangent."""
    kwargs = {"track_running_stats": False} if kind == "BatchNorm2d" and not frozen else {}
    ours, ref = make_pair(kind, activation, **kwargs)
    for m in (ours, ref):
        m.train(not frozen).requires_grad_(not frozen)
    x = make_input(SMALL_SHAPES[kind], torch.float32, "contiguous")
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    tp = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in _params(ours).items()}

    def tangent(module, act):
        def f(x, params=None):
            if params is None:
                return act(module(x))
            return act(functional_call(module, {**params, **_buffers(module)}, (x,)))
        return FORWARD_MODES[mode](f, module, x, t, tp)

    expected = tangent(ref, lambda y: activate(y, activation, SLOPE))
    assert expected.abs().sum() > 0  # torch.nn's tangent exists and is not zero
    assert_close(tangent(ours, lambda y: y), expected, torch.float32, "tangent")
