"""Named regressions of the zero-size and numerics defects found by the fuzz suite
(tests/test_fuzz.py), each against torch.nn. The cases that once crashed the process run in
a fuzz worker process (crash-safe), on the CPU kernels and, in the slow tier, the Triton
interpreter and the CUDA emulation. The emulation is built at -O1 and CI's sanitizer run
(.ci/sanitize) runs the CPU cases from an -O1 build too: the forward and backward must
agree at a kink whatever the optimisation level."""
import pytest
import torch

import fusednorm
from helpers import TRITON_CPU
from test_fuzz import make_worker

# Each: a fuzz case (tests/fuzz/cases.py) that failed before the fix.
BASE = {"seed": 3, "dtype": "float32", "train": True, "activation": "relu", "slope": 0.2,
        "values": "standard", "layout": "contiguous", "eps": 1e-5, "float32_params": False}
BN = dict(BASE, affine=True, track_running_stats=True, momentum=0.1)
CASES = {
    # SIGFPE: a zero-size spatial dim (backward divided by it), BatchNorm1d(0) (torch.nn:
    # IndexError), eval BatchNorm over an empty spatial dim.
    "bn2d-spatial0-crash": dict(BN, kind="BatchNorm2d", shape=[2, 4, 0, 3]),
    "bn1d-C0-indexerror": dict(BN, kind="BatchNorm1d", shape=[3, 0]),
    "bn2d-eval-spatial0-crash": dict(BN, kind="BatchNorm2d", shape=[2, 4, 0, 3], train=False),
    "bn3d-all0-crash": dict(BN, kind="BatchNorm3d", shape=[0, 0, 0, 0, 0], affine=False),
    "in3d-spatial0-crash": dict(BN, kind="InstanceNorm3d", shape=[7, 7, 2, 0, 3]),
    # momentum=None on an empty batch: running statistics untouched.
    "bn-momentum-none-empty": dict(BN, kind="BatchNorm2d", shape=[0, 3, 2, 2], momentum=None),
    "bn-momentum-none-spatial0": dict(BN, kind="BatchNorm1d", shape=[4, 3, 0], momentum=None),
    # GroupNorm refuses HxW = 0 and C = 0 (RuntimeError), as torch.nn.
    "gn-hxw0-refused": dict(BASE, kind="GroupNorm", shape=[2, 4, 0], groups=2, affine=True),
    "gn-c0-refused": dict(BASE, kind="GroupNorm", shape=[3, 0], groups=1, affine=False),
    # InstanceNorm: no channels is fine; no samples with affine is torch's IndexError; no
    # samples with running statistics makes them NaN in training.
    "in-c0": dict(BN, kind="InstanceNorm1d", shape=[2, 0, 5], affine=False),
    "in-n0-affine-indexerror": dict(BN, kind="InstanceNorm1d", shape=[0, 3, 5]),
    "in-n0-running-nan": dict(BN, kind="InstanceNorm2d", shape=[0, 3, 2, 5], affine=False),
    "in-n0-eval-affine": dict(BN, kind="InstanceNorm2d", shape=[0, 3, 2, 5], train=False),
    # LayerNorm over a normalized_shape holding a 0: parameter gradients of that shape
    # (the CUDA bindings returned them flat).
    "ln-empty-normalized-shape": dict(BASE, kind="LayerNorm", shape=[3, 0, 2], normalized_shape=[0, 2],
                                      affine=True, bias=True, dtype="float16", float32_params=True),
    # Empty channels_last batch: torch.nn keeps its strides.
    "bn-empty-channels-last": dict(BN, kind="BatchNorm2d", shape=[2, 4, 0, 3], layout="channels_last"),
    # Numerics: the folded forward / backward cancelled for a large offset or a tiny
    # variance; a constant channel sits on the activation's kink.
    "gn-one-element-groups-offset": dict(BASE, kind="GroupNorm", shape=[16, 3], groups=3, affine=True,
                                         values="offset", train=False),
    "gn-tiny-channels-last": dict(BASE, kind="GroupNorm", shape=[5, 3, 5], groups=3, affine=False,
                                  values="tiny", layout="channels_last"),
    "in-offset-bf16": dict(BASE, kind="InstanceNorm2d", shape=[5, 7, 5, 7], dtype="bfloat16",
                           values="offset", layout="offset", affine=False, track_running_stats=False,
                           momentum=0.1, activation="leaky_relu"),
    "bn-eval-f16-tiny": dict(BN, kind="BatchNorm1d", shape=[3, 5, 3], dtype="float16", values="tiny",
                             layout="permuted", train=False, affine=False, track_running_stats=False),
    "in1d-f64-constant-rows": dict(BN, kind="InstanceNorm1d", shape=[4, 6, 7], dtype="float64",
                                   values="constant", affine=False, track_running_stats=False),
}


@pytest.fixture(scope="module")
def cpu_worker():
    w = make_worker("cpu")
    yield w
    w.close()


@pytest.mark.parametrize("name", list(CASES))
def test_regression_case_matches_torch(cpu_worker, name):
    error = cpu_worker.run(CASES[name])
    assert error is None, error


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "emulation"])
def test_regression_cases_other_backends(backend):
    w = make_worker(backend)
    try:
        errors = {name: w.run(case) for name, case in CASES.items()}
    finally:
        w.close()
    assert not {k: v for k, v in errors.items() if v}, errors


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=TRITON_CPU)],
                         ids=["cpu", "triton-interpreter"])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm"])
def test_constant_sets_give_exact_results(kind, activation, backend):
    """A constant channel / row / group normalises to exactly 0: the output is exactly the
    bias through the activation (here 0), and the input gradient is torch.nn's (the
    activation's derivative taken at the same side of the kink), in float64 and float32."""
    for dtype in (torch.float64, torch.float32):
        x = torch.full((4, 6, 3, 3), 300.5, dtype=dtype)
        gen = torch.Generator().manual_seed(0)  # fixed: no varying value lands within rounding of a kink
        x[:, ::2] = torch.randn(4, 3, 3, 3, generator=gen, dtype=dtype) + 300  # every other channel varies
        if kind == "LayerNorm":
            x[1] = 2.5  # one constant row
        mods = {"BatchNorm2d": lambda m: m.BatchNorm2d(6), "InstanceNorm2d": lambda m: m.InstanceNorm2d(6),
                "GroupNorm": lambda m: m.GroupNorm(6, 6), "LayerNorm": lambda m: m.LayerNorm([6, 3, 3])}
        ours = mods[kind](fusednorm).to(dtype)
        ours.activation, ours.negative_slope = activation, 0.2
        ref = mods[kind](torch.nn).double()  # float64: torch.nn's float32 is off the kink (0.002)
        xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
        g = torch.randn(x.shape, generator=gen, dtype=dtype)
        with fusednorm.use_backend(backend):
            y = ours(xo)
            (y * g).sum().backward()
        yr = ref(xr)
        yr = {None: yr, "relu": torch.relu(yr), "leaky_relu": torch.nn.functional.leaky_relu(yr, 0.2)}[activation]
        (yr * g.double()).sum().backward()
        const = (x == 300.5) if kind != "LayerNorm" else torch.zeros_like(x, dtype=torch.bool)
        const[1] = const[1] | (kind == "LayerNorm")
        # Exactly act(bias) = 0 (torch.nn's BatchNorm is off by rounding there: 3e-12).
        assert torch.equal(y[const], torch.zeros_like(y[const])), f"{dtype}: constant sets not exactly 0"
        # float32 statistics of values near 300: the gradient's rounding is ~300 * 2^-24 * rstd.
        torch.testing.assert_close(xo.grad.double(), xr.grad, atol=1e-3 if dtype == torch.float32 else 1e-9,
                                   rtol=1e-4)


def test_meta_input_to_cpu_module_raises_as_torch():
    x = torch.randn(2, 4, 3, 3, device="meta")
    for ours, ref in ((fusednorm.BatchNorm2d(4), torch.nn.BatchNorm2d(4)),
                      (fusednorm.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)),
                      (fusednorm.LayerNorm(3), torch.nn.LayerNorm(3))):
        with pytest.raises(RuntimeError):
            ref(x)
        with pytest.raises(RuntimeError, match="expected device meta"):
            ours(x)
