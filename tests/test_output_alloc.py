"""The CPU ops' large outputs (csrc/cpu/output_alloc.cpp): huge-page blocks, reused through
an opt-in cache. Reuse must never show stale data or share memory between live tensors, and
the tensors must behave like any other (resize, free, cache release)."""
import os
import subprocess
import sys

import pytest
import torch

import fusednorm
from helpers import assert_close

BIG = (64, 128, 32, 32)  # 32 MiB of float32: well above the 2 MiB threshold


@pytest.fixture
def cache_on():
    """The output cache turned on (256 MiB) for the test, off again after it."""
    before = fusednorm.cpu_cache_info()["limit_bytes"]
    fusednorm.set_cpu_cache(256)
    yield
    fusednorm.set_cpu_cache(before >> 20)


def _reference(x, bn):
    return torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)


def test_reused_blocks_hold_fresh_results_and_live_tensors_never_share(cache_on):
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


def test_outputs_behave_like_ordinary_tensors(cache_on):
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


def test_cache_is_off_by_default_and_reports_what_it_holds():
    """Off unless turned on (FUSEDNORM_CPU_CACHE_MB is not set in the test environment);
    set_cpu_cache turns it on and down, freeing what no longer fits; bad limits are a
    ValueError."""
    assert "FUSEDNORM_CPU_CACHE_MB" not in os.environ, "run without FUSEDNORM_CPU_CACHE_MB"
    bn = fusednorm.BatchNorm2d(BIG[1])
    x = torch.randn(BIG)
    assert fusednorm.cpu_cache_info() == {"limit_bytes": 0, "cached_bytes": 0}
    y = bn(x)
    del y  # freed with the cache off: not kept
    assert fusednorm.cpu_cache_info()["cached_bytes"] == 0
    try:
        fusednorm.set_cpu_cache(64)
        y = bn(x)
        nbytes = y.numel() * y.element_size()
        del y
        assert fusednorm.cpu_cache_info() == {"limit_bytes": 64 << 20, "cached_bytes": nbytes}
        fusednorm.set_cpu_cache(16)  # below what it holds: the block is freed
        assert fusednorm.cpu_cache_info() == {"limit_bytes": 16 << 20, "cached_bytes": 0}
    finally:
        fusednorm.set_cpu_cache(0)
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="non-negative number of MiB"):
            fusednorm.set_cpu_cache(bad)


@pytest.mark.slow
def test_environment_variable_turns_the_cache_on():
    code = ("import torch, fusednorm\n"
            "bn = fusednorm.BatchNorm2d(128)\n"
            "x = torch.randn(64, 128, 32, 32)\n"
            "ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)\n"
            "for _ in range(3):\n"
            "    y = bn(x)\n"
            "    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)\n"
            "    del y\n"
            "print(fusednorm.cpu_cache_info())\n")
    env = dict(os.environ, FUSEDNORM_CPU_CACHE_MB="64")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{{'limit_bytes': {64 << 20}, 'cached_bytes': {32 << 20}}}" in out.stdout, out.stdout
