import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton backend's tests run its kernels in Triton's interpreter on CPU
# tensors. The switch is read when a kernel is defined, so it must be set before anything
# imports triton (torch.compile does too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The interpreted Triton parity matrix is trimmed to keep CI well under its time limit
    (~1 s a case in the interpreter; the whole matrix was ~10 of the suite's ~16 minutes):
    float32 keeps every activation, the other dtypes keep leaky_relu only (the activation
    with a slope, i.e. every branch). The kernels' dtype and activation handling are
    independent (constexpr ACT, per-dtype loads/stores), so the pairs dropped test nothing
    the kept ones don't. On a GPU (triton-cuda) the full matrix runs."""
    kept, dropped = [], []
    for item in items:
        p = getattr(item, "callspec", None)
        p = p.params if p else {}
        if (item.originalname == "test_module_parity" and p.get("target") == ("cpu", "triton")
                and p.get("dtype") != torch.float32 and p.get("activation") != "leaky_relu"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=int(os.environ.get("FUSEDNORM_FUZZ_EXAMPLES", "150")),
                     help="examples of the CPU fuzz suite (tests/test_fuzz.py); the interpreted and "
                          "emulated backends run a tenth, at least 10")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower suite (interpreter, emulation, subprocess); "
                                       "run by .ci/run, deselect with -m 'not slow'")
