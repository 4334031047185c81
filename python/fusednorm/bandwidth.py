"""Achieved memory bandwidth of each op, fusednorm beside torch.nn, for
`python -m fusednorm.selftest --bench` on a GPU (it also runs on the CPU, where
bench/bench.py is the measurement). Bytes are the pass model of docs/design.md: the fewest
passes over input-sized tensors each op makes (reads + writes), so "GB/s" is the same work
over each side's time and "% peak" says how close an op is to the memory floor."""
import time

import torch
import torch.nn as nn

import fusednorm

# The pass model of the CUDA kernels: (reads, writes) of input-sized tensors per op.
# tests/test_cuda_emulation.py holds the kernels' counted traffic to it.
PASS_MODEL = {
    "layer_norm_fwd": (1, 1),             # warp and block tiers: the row is read once
    "layer_norm_fwd_long": (2, 1),        # long tier: statistics pass, then the output pass
    "layer_norm_bwd": (2 + 2, 1),         # dx: x, dy; parameter gradients: x, dy again
    "layer_norm_bwd_long": (4 + 2, 1),    # long tier: x and dy read in both passes
    "add_norm_fwd": (2, 2),               # x, residual -> sum, y
    "add_norm_bwd": (3 + 2, 1),           # x, dy, dres -> dx; parameter gradients
    "batch_norm_fwd": (1 + 1, 1),         # statistics; apply
    "batch_norm_fwd_eval": (1, 1),
    "batch_norm_bwd": (2 + 2, 1),         # gradient sums; input gradient
    "group_norm_fwd": (1, 1),
    "group_norm_bwd": (2 + 2, 1),
    "group_norm_fwd_split": (1 + 1, 1),   # rows split over blocks: statistics; apply
    "group_norm_bwd_split": (2 + 2, 1),   # plane sums; input gradient
}

# name, fusednorm module, torch.nn reference, shape, channels_last, pass-model ops of the
# training forward and of the backward (dx and the parameter gradients)
CASES = [
    ("BatchNorm2d+ReLU", lambda: fusednorm.BatchNorm2d(64, activation="relu"),
     lambda: nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()), (32, 64, 56, 56), False, "batch_norm_fwd", "batch_norm_bwd"),
    ("BatchNorm2d+ReLU NHWC", lambda: fusednorm.BatchNorm2d(64, activation="relu"),
     lambda: nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()), (32, 64, 56, 56), True, "batch_norm_fwd", "batch_norm_bwd"),
    ("GroupNorm(32)+SiLU", lambda: fusednorm.GroupNorm(32, 64, activation="silu"),
     lambda: nn.Sequential(nn.GroupNorm(32, 64), nn.SiLU()), (32, 64, 56, 56), False, "group_norm_fwd",
     "group_norm_bwd"),
    ("LayerNorm(1024)", lambda: fusednorm.LayerNorm(1024), lambda: nn.LayerNorm(1024), (8192, 1024), False,
     "layer_norm_fwd", "layer_norm_bwd"),
    ("RMSNorm(4096)", lambda: fusednorm.RMSNorm(4096), lambda: nn.RMSNorm(4096), (4096, 4096), False,
     "layer_norm_fwd", "layer_norm_bwd"),
]


def median_time(fn, device, reps):
    """Median seconds of fn() over `reps` calls after 3 warm-up calls (CUDA events on a GPU)."""
    times = []
    for i in range(reps + 3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    return sorted(times)[len(times) // 2]


def peak(device, numel=1 << 26):
    """(theoretical GB/s from the device's memory clock and bus width, or None; measured
    GB/s of a device-to-device copy of numel floats, read + write)."""
    theoretical = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            theoretical = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    x = torch.empty(numel, device=device)
    y = torch.empty_like(x)
    copy = 2 * x.numel() * x.element_size() / median_time(lambda: y.copy_(x), device, 10) / 1e9
    return theoretical, copy


def measure(device, dtypes=(torch.float32, torch.bfloat16), reps=20, batch_scale=1):
    """Rows (case, dtype, direction, bytes, fusednorm s, torch.nn s) for every case, the
    leading dimension divided by batch_scale (tests run small shapes)."""
    rows = []
    for name, make, make_ref, shape, channels_last, fwd_op, bwd_op in CASES:
        shape = (max(1, shape[0] // batch_scale),) + shape[1:]
        for dtype in dtypes:
            x = torch.randn(shape, device=device, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            g = torch.randn_like(x)
            times = {}
            for side, module in (("ours", make()), ("ref", make_ref())):
                module = module.to(device=device, dtype=dtype)
                y = module(x)
                wrt = [x, *module.parameters()]  # dx and the parameter gradients
                times[side] = (median_time(lambda m=module: m(x), device, reps),
                               median_time(lambda y=y, wrt=wrt: torch.autograd.grad(y, wrt, g, retain_graph=True),
                                           device, reps))
            tensor = x.numel() * x.element_size()
            for k, (direction, op) in enumerate((("fwd", fwd_op), ("bwd", bwd_op))):
                rows.append((name, dtype, direction, sum(PASS_MODEL[op]) * tensor, times["ours"][k], times["ref"][k]))
    return rows


def report(device, reps=20):
    """Prints the table; returns its rows."""
    theoretical, copy = peak(device)
    ref_peak = theoretical or copy
    print(f"memory: copy {copy:.0f} GB/s" + (f", theoretical peak {theoretical:.0f} GB/s" if theoretical else "")
          + f"; % peak of {'the theoretical peak' if theoretical else 'the copy'}")
    print(f"{'op':24} {'dtype':9} {'dir':4} {'MB':>7}  {'fusednorm ms':>12} {'GB/s':>6} {'%peak':>5}  "
          f"{'torch.nn ms':>11} {'GB/s':>6} {'%peak':>5}")
    rows = measure(device, reps=reps)
    for name, dtype, direction, nbytes, t_ours, t_ref in rows:
        bw = [nbytes / t / 1e9 for t in (t_ours, t_ref)]
        print(f"{name:24} {str(dtype)[6:]:9} {direction:4} {nbytes / 1e6:7.1f}  {t_ours * 1e3:12.3f} {bw[0]:6.0f} "
              f"{100 * bw[0] / ref_peak:5.1f}  {t_ref * 1e3:11.3f} {bw[1]:6.0f} {100 * bw[1] / ref_peak:5.1f}")
    return rows
