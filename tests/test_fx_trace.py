"""torch.fx.symbolic_trace of models holding fusednorm modules (what FX passes, FX
quantisation and feature extractors run): each norm becomes one call of the module, as a
torch.nn norm does, and the traced model matches torch.nn's in train and in eval mode
(switched after tracing)."""
import pytest
import torch

import fusednorm
from helpers import ACTIVATIONS, KINDS, SLOPE, activate, assert_close, assert_same_buffers, make_input, make_pair


class Around(torch.nn.Module):
    """A norm between two traced operations."""

    def __init__(self, norm, activation=None):
        super().__init__()
        self.norm, self.activation = norm, activation

    def forward(self, x):
        return activate(self.norm(x * 2.0), self.activation, SLOPE) + 1.0


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_symbolic_trace_calls_the_module(kind, activation):
    ours, ref = make_pair(kind, activation)
    traced = torch.fx.symbolic_trace(Around(ours))
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == ["norm"], f"the norm was traced into: {traced.graph}"
    reference = Around(ref, activation)
    x = make_input(KINDS[kind][3], torch.float32, "contiguous")
    for train in (True, False):  # switched after tracing: the module's mode applies
        traced.train(train), reference.train(train)
        assert_close(traced(x), reference(x), torch.float32, f"output, train={train}")
    assert_same_buffers(ours.named_buffers(), ref.named_buffers())


def test_fx_conv_bn_fusion_keeps_the_activation():
    """torch.fx's conv+BatchNorm fusion (inference) matches modules of exactly torch.nn's
    types: it leaves a fusednorm BatchNorm (and its fused activation) in place."""
    from torch.fx.experimental.optimization import fuse
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fusednorm.BatchNorm2d(4, activation="relu")).eval()
    with torch.no_grad():
        model[1].bias.uniform_(-2, 0)  # so that the ReLU clips
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert_close(fuse(model)(x), model(x), torch.float32, "fused model")


def test_tracing_a_norm_alone_is_refused_clearly():
    """Traced as the root there is no module to call it from: a TraceError saying what to
    do, not a graph that calls itself."""
    with pytest.raises(torch.fx.proxy.TraceError, match="Sequential"):
        torch.fx.symbolic_trace(fusednorm.BatchNorm2d(4))
    model = torch.fx.symbolic_trace(torch.nn.Sequential(fusednorm.BatchNorm2d(4)))
    x = torch.randn(2, 4, 3, 3)
    assert_close(model(x), torch.nn.BatchNorm2d(4)(x), torch.float32, "wrapped")
