"""Inputs in unusual memory layouts, against torch.nn: the same values and gradients, and an
output laid out as torch.nn lays it out (layout.h / _layout.py).

The strided inputs here are the ones whose layout is easy to misjudge: channels_last-dense
tensors whose size-1 dimensions make the strides ambiguous (a batch of one, H = 1), which
crashed every norm but LayerNorm before; channels_last tensors sliced so they are no longer
dense; a permuted NHCW tensor; an expanded batch."""
import pytest
import torch

import fusednorm
from helpers import TARGETS, activate, assert_close, assert_same_buffers

# name: (storage elements, view of that storage as an (N, C, ...) input).
LAYOUTS = {
    # channels_last-dense; suggest_memory_format() says contiguous for the first three.
    "cl-batch-of-one": (210, lambda b: b.as_strided((1, 6, 5, 7), (42, 1, 42, 6))),
    "cl-height-one": (18, lambda b: b.as_strided((3, 3, 1, 2), (6, 1, 18, 3))),
    "cl3d-size-ones": (90, lambda b: b.as_strided((3, 6, 1, 5, 1), (30, 1, 90, 6, 90))),
    "cl-sliced": (840, lambda b: b.view(2, 5, 14, 6).permute(0, 3, 1, 2)[..., :7]),
    "cl-channel-slice": (840, lambda b: b.view(2, 5, 7, 12).permute(0, 3, 1, 2)[:, :6]),
    "nhcw": (420, lambda b: b.view(2, 5, 6, 7).permute(0, 2, 1, 3)),
    "expanded": (210, lambda b: b.view(1, 6, 5, 7).expand(3, 6, 5, 7)),
}

# kind: ((class name in fusednorm and torch.nn for a 4-d input, kwargs), training mode).
KINDS = {
    "bn-train": (("BatchNorm2d", {}), True),
    "bn-eval": (("BatchNorm2d", {}), False),
    "gn": (("GroupNorm", {}), True),
    "in": (("InstanceNorm2d", {"affine": True}), True),
    "in-eval-running": (("InstanceNorm2d", {"affine": True, "track_running_stats": True}), False),
    "ln": (("LayerNorm", {}), True),
}


def _modules(kind, x):
    (name, kw), train = KINDS[kind]
    c = x.shape[1]
    args = {"GroupNorm": (3, c), "LayerNorm": (list(x.shape[2:]),)}.get(name, (c,))
    if x.dim() == 5:
        name = name.replace("2d", "3d")
    ours = getattr(fusednorm, name)(*args, activation="leaky_relu", negative_slope=0.2, **kw)
    ref = getattr(torch.nn, name)(*args, **kw)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1, 2)
        for b in ours.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    return ours.train(train), ref.train(train)


def _same_layout(y, yr):
    """Same memory order: the strides of every dimension longer than 1 agree (a size-1
    dimension's stride is never used to address anything)."""
    def used(t):
        return [s for n, s in zip(t.shape, t.stride()) if n > 1]
    assert used(y) == used(yr), f"strides {y.stride()}, torch.nn's {yr.stride()}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("target", TARGETS)
def test_strided_input_matches_torch(target, kind, layout):
    device, backend = target
    numel, view = LAYOUTS[layout]
    base = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    ours, ref = _modules(kind, view(base))
    ours.to(device)
    ref.to(device)
    base_o = base.clone().requires_grad_()
    base_r = base.clone().requires_grad_()
    with fusednorm.use_backend(backend):
        y = ours(view(base_o))
    yr = activate(ref(view(base_r)), "leaky_relu", 0.2)
    assert_close(y, yr, torch.float32, "output")
    _same_layout(y, yr)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    with fusednorm.use_backend(backend):
        grads = torch.autograd.grad(y, [base_o] + list(ours.parameters()), g)
    grads_ref = torch.autograd.grad(yr, [base_r] + list(ref.parameters()), g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, torch.float32, "gradient")
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())
