import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton backend's tests run its kernels in Triton's interpreter on CPU
# tensors. The switch is read when a kernel is defined, so it must be set before anything
# imports triton (torch.compile does too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=int(os.environ.get("FUSEDNORM_FUZZ_EXAMPLES", "150")),
                     help="examples of the CPU fuzz suite (tests/test_fuzz.py); the interpreted and "
                          "emulated backends run a tenth, at least 10")

