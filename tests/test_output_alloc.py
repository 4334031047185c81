"""The CPU ops' large outputs (csrc/cpu/output_alloc.cpp): huge-page blocks reused through
a small cache. Reuse must never show stale data or share memory between live tensors, and
the tensors must behave like any other (resize, free, cache release)."""
import os
import subprocess
import sys

import pytest
import torch

import fusednorm
from helpers import assert_close

BIG = (64, 128, 32, 32)  # 32 MiB of float32: well above the 2 MiB threshold


def _reference(x, bn):
    return torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)


def test_reused_blocks_hold_fresh_results_and_live_tensors_never_share():
    bn = fusednorm.BatchNorm2d(BIG[1])
    x1 = torch.randn(BIG)
    y1 = bn(x1)
    ptr1 = y1.data_ptr()
    del y1  # its block goes to the cache ...
    x2 = torch.randn(BIG) * 3 + 1
    y2 = bn(x2)  # ... and is reused, fully overwritten
    assert y2.data_ptr() == ptr1, "the freed block was not reused"
    assert_close(y2, _reference(x2, bn), torch.float32, "output in a reused block")
    y3 = bn(x1)  # y2 is alive: y3 needs a block of its own
    assert y3.data_ptr() != y2.data_ptr()
    assert_close(y3, _reference(x1, bn), torch.float32, "second live output")
    assert_close(y2, _reference(x2, bn), torch.float32, "first output left intact")


def test_outputs_behave_like_ordinary_tensors():
    ln = fusednorm.LayerNorm(1024)
    x = torch.randn(1024, 1024, requires_grad=True)
    y = ln(x)
    y.sum().backward()  # dx also comes from the cache
    assert_close(x.grad, torch.zeros_like(x), torch.float32, "d(sum LN)/dx")
    z = y.detach().clone()
    y2 = ln(x).detach()
    y2.resize_(2048, 1024)  # storage can grow (copied into an ordinary allocation)
    assert_close(y2[:1024], z, torch.float32, "resized output keeps its data")
    del y, y2
    fusednorm.empty_cpu_cache()
    assert_close(ln(x), z, torch.float32, "after emptying the cache")


@pytest.mark.slow
def test_cache_can_be_disabled():
    code = ("import torch, fusednorm\n"
            "bn = fusednorm.BatchNorm2d(128)\n"
            "x = torch.randn(64, 128, 32, 32)\n"
            "ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)\n"
            "for _ in range(3):\n"
            "    y = bn(x)\n"
            "    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)\n"
            "    del y\n"
            "print('ok')\n")
    env = dict(os.environ, FUSEDNORM_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
