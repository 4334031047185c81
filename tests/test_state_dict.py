"""Drop-in: same constructor defaults, parameters, buffers and state_dict as torch.nn;
checkpoints load both ways; extra_repr is torch.nn's plus the activation."""
import inspect

import pytest
import torch

import fusednorm
from helpers import KIND_KWARGS, KINDS, make_pair


def test_public_api():
    for name in KINDS:
        assert hasattr(fusednorm, name)
    for fn in ("batch_norm", "instance_norm", "layer_norm", "group_norm"):
        assert callable(getattr(fusednorm.functional, fn))


@pytest.mark.parametrize("kind", list(KINDS))
def test_constructor_matches_torch(kind):
    ours_cls, ref_cls, _, _ = KINDS[kind]
    ours = inspect.signature(ours_cls.__init__).parameters
    ref = inspect.signature(ref_cls.__init__).parameters
    for name, p in ref.items():
        assert name in ours, name
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name
    assert ours["activation"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["activation"].default is None
    assert ours["negative_slope"].default == 0.01


def variants():
    for kind in KINDS:
        if kind == "LayerNorm":
            options = [{}, {"elementwise_affine": False}, {"bias": False}]
        elif kind == "RMSNorm":
            options = [{}, {"elementwise_affine": False}, {"eps": 1e-6}]
        elif kind == "GroupNorm":
            options = [{}, {"affine": False}, {"bias": False}]
        else:
            options = [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}]
        for kwargs in options:
            yield kind, kwargs


@pytest.mark.parametrize("kind,kwargs", list(variants()))
def test_state_dict_round_trip(kind, kwargs):
    ours, ref = make_pair(kind, "relu", **kwargs)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for k in sd_ours:
        assert sd_ours[k].shape == sd_ref[k].shape and sd_ours[k].dtype == sd_ref[k].dtype, k
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    # torch.nn -> fusednorm -> torch.nn
    ours_cls, ref_cls, args, _ = KINDS[kind]
    kw = dict(KIND_KWARGS[kind], **kwargs)
    fresh = ours_cls(*args, **kw, activation="relu")
    fresh.load_state_dict(sd_ref)
    back = ref_cls(*args, **kw)
    back.load_state_dict(fresh.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd_ref[k]), k


@pytest.mark.parametrize("kind", list(KINDS))
def test_extra_repr(kind):
    ours_cls, ref_cls, args, _ = KINDS[kind]
    assert ours_cls(*args).extra_repr() == ref_cls(*args).extra_repr()
    assert ours_cls(*args, activation="relu").extra_repr() == ref_cls(*args).extra_repr() + ", activation=relu"
    leaky = ours_cls(*args, activation="leaky_relu", negative_slope=0.2)
    assert leaky.extra_repr().endswith(", activation=leaky_relu, negative_slope=0.2")
    assert leaky.activation == "leaky_relu" and leaky.negative_slope == 0.2


@pytest.mark.parametrize("kind", list(KINDS))
def test_isinstance_of_torch_class(kind):
    ours_cls, ref_cls, args, _ = KINDS[kind]
    assert isinstance(ours_cls(*args), ref_cls)
