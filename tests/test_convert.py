"""fusednorm.convert on models written the usual ways: torch.nn norms swapped (same
parameters and buffers, state_dict unchanged, training modes kept), a norm feeding only an
activation fused with it, residual additions fused into the norm where it allows (BatchNorm's
act(bn(x) + z), LayerNorm/RMSNorm of a sum), shared uses left alone, untraceable
models swapped with a warning; the converted model computes what the original did."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (no torchvision dependency)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # reused twice, as torchvision does
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.LeakyReLU(0.2))
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ln = nn.LayerNorm(8)
        self.bn1d = nn.BatchNorm1d(8)
        self.shared = nn.BatchNorm2d(8)  # feeds a ReLU and something else: not fusible

    def forward(self, x):
        x = self.seq(x)
        x = F.relu(self.inorm(x))
        s = self.shared(x)
        x = torch.relu(s) + s
        v = x.mean((2, 3))
        v = self.ln(v).relu()
        return F.leaky_relu(self.bn1d(v), negative_slope=0.3)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.relu(self.bn(x))
        return self.bn(x)


def run(model, x, train):
    model.train(train)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    names = sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(y, [x] + [params[n] for n in names], g)
    return y, dict(zip(["input"] + names, grads))


def assert_same_function(original, converted, x):
    for train in (True, False):
        y, g = run(original, x, train)
        yc, gc = run(converted, x, train)
        torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
        assert g.keys() == gc.keys()
        # Whole-model gradients sum thousands of float32 products: float32's 1e-4 relative
        # to each gradient's magnitude.
        for name in g:
            a, b = gc[name], g[name]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=name)
    sd, sdc = original.state_dict(), converted.state_dict()
    assert sorted(sd) == sorted(sdc)
    for k in sd:
        torch.testing.assert_close(sdc[k], sd[k])


def norms(model):
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return {n: m for n, m in model.named_modules() if isinstance(m, norms)}


def test_resnet_basic_block():
    torch.manual_seed(0)
    block = nn.Sequential(BasicBlock(4, 8, stride=2), BasicBlock(8, 8))
    original = copy.deepcopy(block)
    keys = list(block.state_dict())
    converted = fusednorm.convert(block)
    assert list(converted.state_dict()) == keys
    found = norms(converted)
    assert all(type(m).__module__ == "fusednorm.modules" for m in found.values())
    assert found["0.bn1"].activation == "relu" and found["1.bn1"].activation == "relu"
    # bn2 feeds the residual addition and the ReLU after it: relu(bn2(x) + identity) fused
    # (BatchNorm's residual add); the downsample BN, the identity there, is left alone.
    assert found["0.bn2"].activation == "relu" and found["1.bn2"].activation == "relu"
    assert found["0.downsample.1"].activation is None
    from fusednorm.convert import bn_residual
    assert sum(n.target is bn_residual for n in converted.graph.nodes) == 2
    assert_same_function(original, converted, torch.randn(2, 4, 8, 8))


def test_mixed_functional_and_method_activations():
    torch.manual_seed(0)
    model = Mixed()
    original = copy.deepcopy(model)
    converted = fusednorm.convert(model)
    found = norms(converted)
    assert found["seq.1"].activation == "leaky_relu" and found["seq.1"].negative_slope == 0.2
    assert found["inorm"].activation == "relu"
    assert found["ln"].activation == "relu"
    assert found["bn1d"].activation == "leaky_relu" and found["bn1d"].negative_slope == 0.3
    assert found["shared"].activation is None
    assert_same_function(original, converted, torch.randn(4, 3, 10, 10))


def test_parameters_are_the_same_objects_and_modes_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model[1].eval()  # a frozen BN inside a training model
    weight, running_mean = model[1].weight, model[1].running_mean
    converted = fusednorm.convert(model)
    bn = norms(converted)["1"]
    assert bn.weight is weight and bn.running_mean is running_mean
    assert not bn.training and converted.training


def test_swap_only_without_fusing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    converted = fusednorm.convert(model, fuse_activations=False)
    assert converted is model and isinstance(model[1], fusednorm.BatchNorm2d)
    assert model[1].activation is None and isinstance(model[2], nn.ReLU)


def test_sync_batchnorm_and_subclasses_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.SyncBatchNorm(4), nn.ReLU(), MyBN(4), nn.ReLU())
    converted = fusednorm.convert(model)
    kinds = [type(m) for m in converted.modules()]
    assert nn.SyncBatchNorm in kinds and MyBN in kinds
    assert not any(isinstance(m, fusednorm.BatchNorm2d) for m in converted.modules())


def test_untraceable_model_is_swapped_with_a_warning():
    model = Untraceable()
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="could not trace"):
        converted = fusednorm.convert(model)
    assert isinstance(converted.bn, fusednorm.BatchNorm2d) and converted.bn.activation is None
    x = torch.rand(2, 4, 3, 3) + 0.1
    assert_same_function(original, converted, x)


def test_a_norm_module_alone():
    bn = nn.BatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fusednorm.convert(bn)
    assert isinstance(converted, fusednorm.BatchNorm2d)


class LookAlikes(nn.Module):
    """The norm -> activation pairs of common models, each written the way they write it:
    EfficientNet / YOLO (BatchNorm2d -> nn.SiLU(inplace=True)), MobileNetV3 (BatchNorm ->
    nn.Hardswish, F.hardswish), diffusion UNets (GroupNorm(32) -> F.silu), ViT/ConvNeXt-style
    LayerNorm -> F.gelu(approximate="tanh"), and the other activations as torch functions,
    Tensor methods and inplace variants with non-default arguments."""

    def __init__(self):
        super().__init__()
        # Convolutions before a training-mode BatchNorm without a bias, as those models have
        # them (the bias's true gradient is 0, and both sides' rounding noise would be compared).
        self.effnet = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                    nn.SiLU(inplace=True))
        self.mobile = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.bn_hs = nn.BatchNorm2d(32)
        self.unet = nn.GroupNorm(8, 32)
        self.vit = nn.LayerNorm(32)
        self.others = nn.ModuleList(nn.BatchNorm1d(32) for _ in range(11))

    def forward(self, x):
        x = self.mobile(self.effnet(x))
        x = F.hardswish(self.bn_hs(x))
        x = F.silu(self.unet(x))
        v = F.gelu(self.vit(x.mean((2, 3))), approximate="tanh")
        o = self.others
        v = torch.sigmoid(o[0](v)) + o[1](v).tanh() + F.elu(o[2](v), alpha=0.5) + F.hardtanh(o[3](v), -2.0, 2.0)
        v = v + F.softplus(o[4](v), beta=2.0) + F.mish(o[5](v)) + F.relu6(o[6](v)) + F.selu(o[7](v))
        v = v + F.celu(o[8](v), alpha=2.0) + F.hardsigmoid(o[9](v)) + F.elu_(o[10](v))
        return v


def test_every_activation_is_fused_in_look_alike_models():
    torch.manual_seed(0)
    model = LookAlikes()
    original = copy.deepcopy(model)
    converted = fusednorm.convert(model)
    found = {n: m.activation for n, m in norms(converted).items()}
    assert found["effnet.1"] == "silu" and found["mobile.1"] == "hardswish" and found["bn_hs"] == "hardswish"
    assert found["unet"] == "silu"
    assert isinstance(found["vit"], nn.GELU) and found["vit"].approximate == "tanh"
    assert [found[f"others.{i}"] if isinstance(found[f"others.{i}"], str) else repr(found[f"others.{i}"])
            for i in range(11)] == [
        "sigmoid", "tanh", "ELU(alpha=0.5)", "Hardtanh(min_val=-2.0, max_val=2.0)",
        "Softplus(beta=2.0, threshold=20.0)", "mish", "relu6", "selu", "CELU(alpha=2.0)", "hardsigmoid", "elu"]
    assert not any(n.op != "call_module" and n.target in (F.silu, F.gelu, torch.sigmoid)
                   for n in converted.graph.nodes), "a fused activation is still in the graph"
    assert_same_function(original, converted, torch.randn(4, 3, 6, 6))


def test_activation_with_a_runtime_argument_is_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return F.elu(self.bn(x), alpha=x.shape[0] * 0.5)  # a graph node under torch.fx

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced, not swapped-only
        converted = fusednorm.convert(M())
    assert converted.bn.activation is None
    assert_same_function(M(), converted, torch.randn(4, 4))


class PreNormTransformer(nn.Module):
    """Llama-style pre-norm blocks (RMSNorm -> attention-like mixing -> residual add ->
    RMSNorm -> SiLU-gated MLP -> residual add) followed by a ViT-style LayerNorm block, all
    written with `+`: each norm(x + r) becomes the fused residual add and the sum's other use
    (the next residual) takes the fused op's second output."""

    def __init__(self, d=16):
        super().__init__()
        self.norm_in = nn.RMSNorm(d)
        self.mix = nn.Linear(d, d)
        self.norm_mlp = nn.RMSNorm(d, eps=1e-6)
        self.up, self.gate, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)

    def forward(self, x):
        h = self.mix(self.norm_in(x))
        x = x + h
        m = self.norm_mlp(x)
        x = x + self.down(F.silu(self.gate(m)) * self.up(m))
        y = F.gelu(self.ln(x + self.head(x)))
        return y + x


def test_pre_norm_residual_adds_are_fused():
    torch.manual_seed(0)
    model = PreNormTransformer()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted = fusednorm.convert(model)
    assert sorted(converted.state_dict()) == sorted(keys)  # (torch.fx orders modules by first use)
    found = norms(converted)
    assert found["norm_mlp"].eps == 1e-6
    assert type(found["norm_in"]) is fusednorm.RMSNorm and type(found["ln"]) is fusednorm.LayerNorm
    assert found["ln"].activation == "gelu"
    from fusednorm.convert import norm_of_sum
    fused = [n for n in converted.graph.nodes if n.target is norm_of_sum]
    assert len(fused) == 2, converted.graph  # norm_mlp(x + h) and ln(x + head(x))
    assert_same_function(original, converted, torch.randn(2, 5, 16))
    # Mixed dtypes (a float32 residual stream beside bfloat16): the sum as torch promotes it.
    y, s = norm_of_sum(found["norm_mlp"], torch.randn(3, 16).bfloat16(), torch.randn(3, 16))
    assert s.dtype == torch.float32


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (ResNet-50's block), written out."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width, out = planes, planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


def test_resnet_bottleneck_tail_is_fused():
    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(8, 4, stride=2))
    original = copy.deepcopy(model)
    converted = fusednorm.convert(model)
    found = norms(converted)
    assert [found[f"0.bn{i}"].activation for i in (1, 2, 3)] == ["relu"] * 3
    assert found["0.downsample.1"].activation is None
    assert_same_function(original, converted, torch.randn(2, 8, 8, 8))
    original.eval(), converted.eval()
    assert_same_function(original, converted, torch.randn(2, 8, 8, 8))
    # A residual in another dtype: the sum as torch promotes it, not fused.
    from fusednorm.convert import bn_residual
    bn = fusednorm.BatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(bn_residual(bn, x, x.double()),
                               torch.relu(nn.functional.batch_norm(x, None, None, training=True) + x.double()))
