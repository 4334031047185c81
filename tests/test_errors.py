"""Bad input raises the exception type torch.nn raises for it (never a crash)."""
import pytest
import torch
import torch.nn.functional as F

import fusednorm
import fusednorm.functional as FF


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
    with pytest.raises(ValueError, match="gelu"):
        cls(*args, activation="gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        FF.layer_norm(torch.randn(2, 3), (3,), activation="tanh")
