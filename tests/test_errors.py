"""Bad input raises the exception type torch.nn raises for it (never a crash)."""
import pytest
import torch
import torch.nn.functional as F

import fusednorm
import fusednorm.functional as FF
from helpers import TARGETS


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare the exception types
        return e
    return None


x4 = torch.randn(2, 4, 5, 5)
xi = torch.randint(0, 3, (2, 4, 5, 5))

CASES = {
    "bn wrong channels": (lambda m: m.BatchNorm2d(3)(x4)),
    "bn wrong ndim": (lambda m: m.BatchNorm2d(4)(torch.randn(2, 4, 5))),
    "bn1d wrong ndim": (lambda m: m.BatchNorm1d(4)(torch.randn(2, 4, 5, 5))),
    "bn3d wrong ndim": (lambda m: m.BatchNorm3d(4)(x4)),
    "bn integer input": (lambda m: m.BatchNorm2d(4)(xi)),
    "bn one value per channel": (lambda m: m.BatchNorm1d(4)(torch.randn(1, 4))),
    "bn float64 input, float32 params": (lambda m: m.BatchNorm2d(4)(x4.double())),
    "in wrong channels affine": (lambda m: m.InstanceNorm2d(3, affine=True)(x4)),
    "in one spatial element": (lambda m: m.InstanceNorm2d(4)(torch.randn(2, 4, 1, 1))),
    "in wrong ndim": (lambda m: m.InstanceNorm2d(4)(torch.randn(2, 4, 5, 5, 5))),
    "in integer input": (lambda m: m.InstanceNorm2d(4)(xi)),
    "ln shape mismatch": (lambda m: m.LayerNorm(6)(x4)),
    "ln integer input": (lambda m: m.LayerNorm(5)(xi)),
    "ln float64 input, float32 params": (lambda m: m.LayerNorm(5)(x4.double())),
    "gn channels not divisible": (lambda m: m.GroupNorm(3, 4)),
    "gn wrong channels": (lambda m: m.GroupNorm(2, 6)(x4)),
    "gn 1-d input": (lambda m: m.GroupNorm(2, 4)(torch.randn(4))),
    "gn integer input": (lambda m: m.GroupNorm(2, 4)(xi)),
    "gn one value per group": (lambda m: m.GroupNorm(4, 4)(torch.randn(1, 4))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_module_errors_match_torch(case):
    expected = raised(lambda: CASES[case](torch.nn))
    assert expected is not None, "torch.nn accepts this input; the case is wrong"
    got = raised(lambda: CASES[case](fusednorm))
    assert got is not None, f"fusednorm accepted it; torch.nn raised {expected!r}"
    assert type(got) is type(expected), f"{got!r} vs torch.nn's {expected!r}"
    assert str(got), "the message must say what is wrong"


FUNCTIONAL = {
    "batch_norm eval without running stats": (
        lambda f: f.batch_norm(x4, None, None, training=False)),
    "batch_norm running_mean size": (
        lambda f: f.batch_norm(x4, torch.zeros(3), torch.ones(4), training=True)),
    "batch_norm weight size": (
        lambda f: f.batch_norm(x4, None, None, torch.ones(5), training=True)),
    "layer_norm weight shape": (lambda f: f.layer_norm(x4, (5,), torch.ones(4))),
    "group_norm bias size": (lambda f: f.group_norm(x4, 2, torch.ones(4), torch.ones(3))),
    "instance_norm bad spatial": (lambda f: f.instance_norm(torch.randn(2, 3, 1))),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL))
def test_functional_errors_match_torch(case):
    expected = raised(lambda: FUNCTIONAL[case](F))
    assert expected is not None
    got = raised(lambda: FUNCTIONAL[case](FF))
    assert got is not None, f"fusednorm accepted it; torch raised {expected!r}"
    assert type(got) is type(expected), f"{got!r} vs torch's {expected!r}"


@pytest.mark.parametrize("cls,args", [
    (fusednorm.BatchNorm2d, (3,)), (fusednorm.InstanceNorm1d, (3,)),
    (fusednorm.LayerNorm, (3,)), (fusednorm.GroupNorm, (1, 3)),
])
def test_unknown_activation_is_refused_by_name(cls, args):
    with pytest.raises(ValueError, match="swish"):
        cls(*args, activation="swish")
    with pytest.raises(ValueError, match="unknown activation"):
        FF.layer_norm(torch.randn(2, 3), (3,), activation="Tanh")


# The backward ops' own arguments. The saved statistics and grad_out must fit the input:
# the kernels index them by the input's shape, so wrong ones were read out of bounds (a
# gradient of garbage or NaN and no error). torch's native backward ops raise RuntimeError
# for such arguments, as these do now. mask: every gradient.
ALL = [True, True, True]
BACKWARD_ARGS = {
    "batch_norm_bwd mean size": lambda ops, x, s: ops.batch_norm_bwd(
        x, x, None, None, s(1), s(4), True, 0, 0.01, 0.0, ALL),
    "batch_norm_bwd rstd size": lambda ops, x, s: ops.batch_norm_bwd(
        x, x, None, None, s(4), s(8), True, 0, 0.01, 0.0, ALL),
    "batch_norm_bwd grad_out shape": lambda ops, x, s: ops.batch_norm_bwd(
        x[:2], x, None, None, s(4), s(4), True, 0, 0.01, 0.0, ALL),
    "layer_norm_bwd mean size": lambda ops, x, s: ops.layer_norm_bwd(
        x, x, [16], s(1), s(32), None, None, 0, 0.01, 0.0, ALL),
    "layer_norm_bwd rstd size": lambda ops, x, s: ops.layer_norm_bwd(
        x, x, [16], s(32), s(31), None, None, 0, 0.01, 0.0, ALL),
    "layer_norm_bwd grad_out shape": lambda ops, x, s: ops.layer_norm_bwd(
        x[:2], x, [16], s(32), s(32), None, None, 0, 0.01, 0.0, ALL),
    "group_norm_bwd mean size": lambda ops, x, s: ops.group_norm_bwd(
        x, x, 2, s(2), s(16), None, None, 0, 0.01, 0.0, ALL),
    # InstanceNorm's backward (one group per channel) given per-channel statistics
    "instance norm backward, per-channel statistics": lambda ops, x, s: ops.group_norm_bwd(
        x, x, 4, s(4), s(4), None, None, 0, 0.01, 0.0, ALL),
    "group_norm_bwd grad_out shape": lambda ops, x, s: ops.group_norm_bwd(
        x[:, :2], x, 2, s(16), s(16), None, None, 0, 0.01, 0.0, ALL),
}


@pytest.mark.parametrize("case", list(BACKWARD_ARGS))
@pytest.mark.parametrize("target", TARGETS)
def test_backward_ops_refuse_arguments_that_do_not_fit_the_input(target, case):
    device, backend = target
    x = torch.randn(8, 4, 16, device=device)  # 8 samples x 4 channels; LayerNorm: 32 rows of 16
    with fusednorm.use_backend(backend):
        ops = fusednorm.backend.ops_for(x)
        with pytest.raises(RuntimeError, match="grad_out|mean|rstd"):
            BACKWARD_ARGS[case](ops, x, lambda n: torch.ones(n, device=device))
        if device == "cuda":  # statistics left on the host beside a GPU input
            with pytest.raises(RuntimeError, match="mean is on cpu"):
                ops.group_norm_bwd(x, x, 2, torch.ones(16), torch.ones(16, device=device), None, None,
                                   0, 0.01, 0.0, ALL)
