"""fusednorm's self-test: parity of every op with torch.nn on every available device, then
a short speed comparison. Run it first on a new machine (especially a GPU one: this
project's CI has no GPU and checks the CUDA kernels only under CPU emulation):

    python -m fusednorm.selftest            # exits non-zero on any mismatch
    python -m fusednorm.selftest --bench    # GB/s and % of peak per op, beside torch.nn

Backends: the compiled kernels on each device, and the Triton kernels on the GPU (or on
the CPU in Triton's interpreter when TRITON_INTERPRET=1 is set: slow, small cases only).
"""
import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm

# Every fused activation: its torch.nn reference. Every one in float32; the common ones in
# the other dtypes (the kernels' activation and dtype handling are independent).
ACTS = {None: lambda y: y, "leaky_relu": lambda y: F.leaky_relu(y, 0.1),
        **{name: module() for name, module in [
            ("relu", nn.ReLU), ("silu", nn.SiLU), ("gelu", nn.GELU), ("elu", nn.ELU), ("celu", nn.CELU),
            ("selu", nn.SELU), ("relu6", nn.ReLU6), ("hardtanh", nn.Hardtanh), ("hardswish", nn.Hardswish),
            ("hardsigmoid", nn.Hardsigmoid), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh),
            ("softplus", nn.Softplus), ("mish", nn.Mish)]}}
COMMON_ACTS = (None, "relu", "leaky_relu", "silu", "gelu")


class AddNorm(nn.Module):
    """A pre-norm block's residual add checked as one output, act(norm(x + r)) + (x + r)
    with r = x reversed along the last dim: fusednorm's fused form, or torch.nn's norm
    after a separate add with the activation applied here, on the sum rounded to the
    dtype fusednorm stores it in (sum_dtype, set by check())."""

    sum_dtype = None

    def __init__(self, norm, fused, act=None):
        super().__init__()
        self.norm, self.fused, self.act = norm, fused, act

    def forward(self, x):
        r = x.flip(-1)
        if self.fused:
            y, total = self.norm(x, residual=r)
        else:
            total = x + r
            if self.sum_dtype is not None:  # rounded as stored; the gradient passes through
                total = total + (total.to(self.sum_dtype).to(total.dtype) - total).detach()
            y = ACTS[self.act](self.norm(total))
        return y + total


def tier_edge_lengths():
    """LayerNorm row lengths at and one above each CUDA row tier's top (warp, block-cached,
    long rows: launch.h), both directions and both statistics types, and the common hidden
    sizes 6144 and 12288 whose shared memory sits at the limit."""
    edges = {6144, 12288}
    if fusednorm._C.with_cuda:
        for backward in (False, True):
            for double in (False, True):
                edges.update(fusednorm._C.cuda_row_tier_edges(backward, double))
    return sorted(edges)


EDGE_ACTS = (None, "relu")


def cases(device="cpu"):
    """(name, fusednorm module, torch.nn module, input shape, channels_last); on a GPU also
    the row-tier edges (tier_edge_lengths, activations EDGE_ACTS only)."""
    yield "RMSNorm(96)", lambda a: fusednorm.RMSNorm(96, activation=a, negative_slope=0.1), lambda: nn.RMSNorm(96), (64, 96), False
    yield "RMSNorm(3000)", lambda a: fusednorm.RMSNorm(3000, activation=a, negative_slope=0.1), lambda: nn.RMSNorm(3000), (8, 3000), False
    yield "add+RMSNorm(1024)", lambda a: AddNorm(fusednorm.RMSNorm(1024, activation=a, negative_slope=0.1), True), lambda a: AddNorm(nn.RMSNorm(1024), False, a), (64, 1024), False
    yield "add+LayerNorm(96)", lambda a: AddNorm(fusednorm.LayerNorm(96, activation=a, negative_slope=0.1), True), lambda a: AddNorm(nn.LayerNorm(96), False, a), (64, 96), False
    yield "BatchNorm2d", lambda a: fusednorm.BatchNorm2d(16, activation=a, negative_slope=0.1), lambda: nn.BatchNorm2d(16), (8, 16, 12, 12), False
    yield "BatchNorm2d NHWC", lambda a: fusednorm.BatchNorm2d(16, activation=a, negative_slope=0.1), lambda: nn.BatchNorm2d(16), (8, 16, 12, 12), True
    yield "BatchNorm1d", lambda a: fusednorm.BatchNorm1d(16, activation=a, negative_slope=0.1), lambda: nn.BatchNorm1d(16), (64, 16), False
    yield "InstanceNorm2d", lambda a: fusednorm.InstanceNorm2d(16, affine=True, activation=a, negative_slope=0.1), lambda: nn.InstanceNorm2d(16, affine=True), (8, 16, 12, 12), False
    yield "LayerNorm(96)", lambda a: fusednorm.LayerNorm(96, activation=a, negative_slope=0.1), lambda: nn.LayerNorm(96), (64, 96), False
    yield "LayerNorm(3000)", lambda a: fusednorm.LayerNorm(3000, activation=a, negative_slope=0.1), lambda: nn.LayerNorm(3000), (8, 3000), False
    yield "GroupNorm(4)", lambda a: fusednorm.GroupNorm(4, 16, activation=a, negative_slope=0.1), lambda: nn.GroupNorm(4, 16), (8, 16, 12, 12), False
    yield "GroupNorm(4) NHWC", lambda a: fusednorm.GroupNorm(4, 16, activation=a, negative_slope=0.1), lambda: nn.GroupNorm(4, 16), (8, 16, 12, 12), True
    if device != "cpu":
        for n in tier_edge_lengths():
            yield f"LayerNorm({n}) edge", *_layer_norm_pair(n), (4, n), False


def _layer_norm_pair(n):
    return (lambda a: fusednorm.LayerNorm(n, activation=a)), (lambda: nn.LayerNorm(n))


def tolerance(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        return eps, eps
    return 1e-4, 1e-5


def check(name, make, make_ref, shape, cl, device, dtype, act, train):
    torch.manual_seed(0)
    ours = make(act).to(device).train(train)
    act_inside = make_ref.__code__.co_argcount == 1  # the reference applies the activation itself
    ref = (make_ref(act) if act_inside else make_ref()).to(device).train(train)
    if isinstance(ref, AddNorm):
        ref.sum_dtype = dtype
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
        for n, b in ours.named_buffers():
            if n == "running_var":
                b.uniform_(0.5, 1.5)
            elif n == "running_mean":
                b.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape, device=device) * 2 + 0.5
    if cl:
        x = x.to(memory_format=torch.channels_last)
    xh = x.to(dtype).requires_grad_()
    xr = xh.detach().float().requires_grad_()
    y = ours(xh)
    yr = ref(xr) if act_inside else ACTS[act](ref(xr))
    g = torch.randn_like(yr)
    gx, *gp = torch.autograd.grad(y, [xh] + list(ours.parameters()), g.to(dtype))
    grx, *grp = torch.autograd.grad(yr, [xr] + list(ref.parameters()), g)
    rtol, atol = tolerance(dtype)
    worst = 0.0
    for a, b in [(y, yr), (gx, grx)] + list(zip(gp, grp)):
        b = b.to(a.dtype).float()
        scale = max(1.0, b.abs().max().item())
        err = ((a.float() - b).abs() - rtol * b.abs()).max().item() / (atol * scale)
        worst = max(worst, err)
    return worst <= 1.0, worst


def targets(interpreter=True):
    """(device, backend) pairs this machine can run; the Triton interpreter on the CPU
    only if `interpreter`."""
    out = [("cpu", "auto")]
    if torch.cuda.is_available():
        out += [("cuda", "auto"), ("cuda", "triton")]
    try:
        from fusednorm.triton import kernels_interpreted
        if interpreter and kernels_interpreted():
            out.append(("cpu", "triton"))
    except ImportError as e:
        print(f"Triton backend unavailable: {e}")
        out = [t for t in out if t[1] != "triton"]
    return out


def speed(device, rounds=15):
    """fwd+bwd time of BatchNorm2d+ReLU, LayerNorm and RMSNorm: fusednorm and torch.nn alternate
    call by call (allocator and cache states hit both alike); medians. Indicative only:
    bench/bench.py is the measurement."""
    out = []
    for name, ours, ref, shape in [
        ("BatchNorm2d+ReLU 16x64x56x56", fusednorm.BatchNorm2d(64, activation="relu"),
         nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()), (16, 64, 56, 56)),
        ("LayerNorm(1024) 4096 rows", fusednorm.LayerNorm(1024), nn.LayerNorm(1024), (4096, 1024)),
        ("RMSNorm(4096) 4096 rows", fusednorm.RMSNorm(4096), nn.RMSNorm(4096), (4096, 4096)),
    ]:
        x = torch.randn(shape, device=device, requires_grad=True)
        g = torch.randn(shape, device=device)
        mods = (ours.to(device), ref.to(device))
        times = ([], [])
        for i in range(rounds + 3):
            for k, m in enumerate(mods):
                if device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                torch.autograd.grad(m(x), x, g)
                if device != "cpu":
                    torch.cuda.synchronize()
                if i >= 3:  # warm-up
                    times[k].append(time.perf_counter() - t)
        med = [sorted(t)[len(t) // 2] for t in times]
        out.append((name, med[0], med[1]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    p.add_argument("--bench", action="store_true",
                   help="only print each op's achieved memory bandwidth beside torch.nn's "
                        "(GB/s and %% of the device's peak; fusednorm/bandwidth.py)")
    p.add_argument("--no-interpreter", action="store_true",
                   help="skip the Triton kernels in the interpreter on the CPU (TRITON_INTERPRET=1): "
                        "seconds a case there")
    args = p.parse_args(argv)
    if args.bench:
        from fusednorm import bandwidth
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"fusednorm {fusednorm.__version__}, torch {torch.__version__}, device "
              f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (bench/bench.py measures the CPU)'}")
        bandwidth.report(device)
        return 0
    runs = targets(interpreter=not args.no_interpreter)
    print(f"fusednorm {fusednorm.__version__}, torch {torch.__version__}, CPU kernels: {fusednorm.cpu_isa()}, "
          f"CUDA kernels built: {fusednorm._C.with_cuda}, GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    print(f"{'device':6} {'backend':7} {'case':22} {'dtype':9} {'activation':11} {'mode':5} result")
    failures = 0
    for device, backend in runs:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        for name, make, make_ref, shape, cl in cases(device):
            for dtype in dtypes:
                for act in EDGE_ACTS if "edge" in name else ACTS if dtype == torch.float32 else COMMON_ACTS:
                    for train in (True, False):
                        try:
                            with fusednorm.use_backend(backend):
                                ok, worst = check(name, make, make_ref, shape, cl, device, dtype, act, train)
                            result = "pass" if ok else f"FAIL (error {worst:.1f}x the tolerance)"
                        except Exception as e:  # noqa: BLE001 - reported, counted as a failure
                            ok, result = False, f"FAIL ({type(e).__name__}: {e})"
                        failures += not ok
                        print(f"{device:6} {backend:7} {name:22} {str(dtype)[6:]:9} {str(act):11} "
                              f"{'train' if train else 'eval':5} {result}")
    if not args.no_speed:
        print("\nspeed (fwd+bwd, medians of a short interleaved run; indicative, see bench/bench.py):")
        for device, backend in runs:
            if device == "cpu" and backend == "triton":
                continue  # the interpreter's speed means nothing
            with fusednorm.use_backend(backend):
                results = speed(device)
            for name, t_ours, t_ref in results:
                print(f"  {device:5} {backend:7} {name:30} fusednorm {t_ours * 1e3:7.2f} ms  torch.nn {t_ref * 1e3:7.2f} ms  "
                      f"{t_ref / t_ours:5.2f}x")
    print(f"\n{failures} mismatches" if failures else "\nall cases match torch.nn")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
