"""fusednorm benchmark: fusednorm vs eager torch.nn (norm + separate activation module) vs
torch.compile of the torch.nn version, timed in the same process.

    python bench/bench.py                    # default preset (under 3 minutes on 2 CPU cores)
    python bench/bench.py --full             # size sweep: where per-call overhead starts to matter
    python bench/bench.py --json r.json --csv r.csv --plot r.png
    python bench/bench.py --filter BatchNorm2d --no-compile

Per case: median time of each implementation (torch.utils.benchmark, with warm-up), the
speed-up ratio eager/fusednorm and compile/fusednorm, the effective bandwidth (the bytes
the operation must move, divided by fusednorm's time) and fusednorm's time over the memory
floor: preallocated torch ops that move the same bytes (a copy per read-write pair of
tensors, an add for an odd one), timed in the same rounds. No kernel gets below 1.

Same allocator on both sides by default: glibc keeps freed memory (as CUDA's caching
allocator does) and fusednorm's CPU output cache is off unless FUSEDNORM_CPU_CACHE_MB or
fusednorm.set_cpu_cache() turned it on (the header says which). --system-malloc keeps
glibc's dynamic thresholds instead (what a default process gets: page faults included).
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings

# torch.compile's background compile workers would compete with the timed code for the
# two cores: compile in-process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

import fusednorm

ROUNDS = 3
ACT_MODULES = {None: None, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "silu": nn.SiLU,
               "gelu": nn.GELU, "hardswish": nn.Hardswish}


class AddNorm(nn.Module):
    """A pre-norm block's residual add: (norm(x + r), x + r), r a parameter so that its
    gradient is computed too. fused: fusednorm's norm(x, residual=r); else torch.nn's norm
    (and activation) after a separate add."""

    def __init__(self, norm, residual, fused):
        super().__init__()
        self.norm, self.fused = norm, fused
        self.residual = nn.Parameter(residual)

    def forward(self, x):
        if self.fused:
            return self.norm(x, residual=self.residual)
        s = x + self.residual
        return self.norm(s), s


class BatchNormAdd(nn.Module):
    """A ResNet block's tail, act(bn(x) + r), r a parameter so that its gradient is
    computed too: fusednorm's bn(x, residual=r), or torch.nn's norm, add and activation."""

    def __init__(self, norm, residual, fused, act=None):
        super().__init__()
        self.norm, self.fused, self.act = norm, fused, act
        self.residual = nn.Parameter(residual)

    def forward(self, x):
        if self.fused:
            return self.norm(x, residual=self.residual)
        y = self.norm(x) + self.residual
        return self.act(y) if self.act is not None else y


@dataclasses.dataclass
class Case:
    norm: str            # BatchNorm2d, InstanceNorm2d, GroupNorm, LayerNorm, RMSNorm, Add+LayerNorm, Add+RMSNorm
    shape: tuple
    activation: object = None
    train: bool = True
    backward: bool = False
    dtype: str = "float32"
    layout: str = "nchw"  # nchw | channels_last
    device: str = "cpu"
    groups: int = 32
    backend: str = "auto"  # fusednorm's kernels: "auto" (C++/CUDA) or "triton" (GPU)

    @property
    def name(self):
        act = f"+{self.activation}" if self.activation else ""
        mode = "train" if self.train else "eval"
        step = "fwd+bwd" if self.backward else "fwd"
        shape = "x".join(map(str, self.shape))
        norm = f"GroupNorm({self.groups})" if self.norm == "GroupNorm" else self.norm
        where = self.device if self.backend == "auto" else f"{self.device}, {self.backend}"
        return f"{norm}{act} {shape} {self.layout} {self.dtype} {mode} {step} [{where}]"


def build(case):
    """(fusednorm module, torch.nn module (+ activation), input, grad) for a case."""
    dtype = getattr(torch, case.dtype)
    c = case.shape[-1] if "LayerNorm" in case.norm or "RMSNorm" in case.norm else case.shape[1]
    if case.norm in ("BatchNorm2d", "BatchNorm2d+add"):
        ours, ref = fusednorm.BatchNorm2d(c, activation=case.activation), nn.BatchNorm2d(c)
    elif case.norm == "InstanceNorm2d":
        ours = fusednorm.InstanceNorm2d(c, affine=True, activation=case.activation)
        ref = nn.InstanceNorm2d(c, affine=True)
    elif case.norm == "GroupNorm":
        ours = fusednorm.GroupNorm(case.groups, c, activation=case.activation)
        ref = nn.GroupNorm(case.groups, c)
    elif case.norm in ("LayerNorm", "Add+LayerNorm"):
        ours, ref = fusednorm.LayerNorm(c, activation=case.activation), nn.LayerNorm(c)
    elif case.norm in ("RMSNorm", "Add+RMSNorm"):
        ours, ref = fusednorm.RMSNorm(c, activation=case.activation), nn.RMSNorm(c)
    else:
        raise ValueError(case.norm)
    if case.norm == "BatchNorm2d+add":
        r = torch.randn(case.shape).to(dtype)
        act = ACT_MODULES[case.activation]() if case.activation else None
        ours, ref = BatchNormAdd(ours, r.clone(), True), BatchNormAdd(ref, r.clone(), False, act)
    elif case.activation:
        ref = nn.Sequential(ref, ACT_MODULES[case.activation]())
    if case.norm.startswith("Add+"):
        r = torch.randn(case.shape).to(dtype)
        ours, ref = AddNorm(ours, r.clone(), True), AddNorm(ref, r.clone(), False)
    ours, ref = ours.to(case.device), ref.to(case.device)
    ours.train(case.train)
    ref.train(case.train)
    x = torch.randn(case.shape, device=case.device).to(dtype)
    if case.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return ours, ref, x, torch.randn_like(x)


def step_fn(module, x, g, backward, backend="auto"):
    # The default backend needs no context manager (its cost would show in the per-call figures).
    selected = contextlib.nullcontext if backend == "auto" else (lambda: fusednorm.use_backend(backend))
    if not backward:
        def fwd():
            with torch.no_grad(), selected():
                return module(x)
        return fwd
    xg = x.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd_bwd():
        with selected():
            y = module(xg)
            if isinstance(y, tuple):  # (output, sum) of a residual add: both receive gradients
                return torch.autograd.grad(y, [xg] + params, (g, g))
            return torch.autograd.grad(y, [xg] + params, g)
    return fwd_bwd


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steady_malloc():
    """Make glibc keep freed memory (as CUDA's caching allocator does) instead of its
    dynamic mmap/trim thresholds, which flip between reusing memory and page-faulting every
    new 25 MB tensor depending on the allocation history (the same eager call measured 4 ms
    and 15 ms in one process): kernel-against-kernel numbers, the default. --system-malloc
    keeps glibc's behaviour."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # Tensors up to 1 GiB from the heap, and the heap never trimmed (both are C ints).
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def median_time(fn, device, min_run_time):
    fn()  # warm-up (and compilation for torch.compile)
    fn()
    sync(device)
    t = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def floor_fn(tensors, x, g):
    """Preallocated torch ops that move `tensors` tensor-sized passes over memory (the
    fewest any implementation of the case must move), each writing a tensor of its own as
    the implementations do (forward+backward of a norm: `y.copy_(x)` then
    `torch.add(g, x, out=dx)`, the step's four tensors): copies (read one, write one) and,
    for an odd count, an add (read two, write one) last. One output buffer for every op
    would keep a smaller set of tensors in cache than any implementation can (LayerNorm
    8192x1024: 3.1 ms against 3.9 ms for the four tensors)."""
    a, b = x.detach(), g.detach()
    n, ops = tensors, []
    while n > 3 or n == 2:
        ops.append(lambda out=torch.empty_like(a): out.copy_(a))
        n -= 2
    if n == 3:
        ops.append(lambda out=torch.empty_like(a): torch.add(b, a, out=out))

    def floor():
        for op in ops:
            op()
    return floor


def peak_memory(fn, device):
    """Peak bytes allocated during one call of fn beyond what was allocated before it (its
    inputs and the parameters are not counted): the allocator's statistics on a GPU; on the
    CPU, which keeps none, the allocations and frees torch's profiler records, in order."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation:  # size < 0: a free
            sizes.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def run_case(case, compile_ref, min_run_time):
    ours, ref, x, g = build(case)
    # Bytes the operation must move: forward reads x and writes y; backward reads x and dy
    # and writes dx. A residual add: forward also reads r and writes the sum; backward also
    # reads the sum's gradient (x + r's gradient is one tensor for both).
    tensors = 5 if case.backward else 2
    if case.norm.startswith("Add+"):
        tensors = 8 if case.backward else 4
    elif case.norm == "BatchNorm2d+add":  # r read forward, its gradient written backward
        tensors = 7 if case.backward else 3
    nbytes = tensors * x.numel() * x.element_size()
    row = {"case": case.name, **dataclasses.asdict(case)}
    row["shape"] = list(case.shape)
    impls = {"fusednorm": ours, "eager": ref}
    if compile_ref:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(ref)
    fns = {k: step_fn(m, x, g, case.backward, case.backend if k == "fusednorm" else "auto")
           for k, m in impls.items()}
    fns["floor"] = floor_fn(tensors, x, g)
    # Interleaved rounds, median of the rounds' medians: slow drifts hit every column alike.
    times = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            times[k].append(median_time(fn, case.device, min_run_time / ROUNDS))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    row["fusednorm_s"], row["eager_s"] = med["fusednorm"], med["eager"]
    row["compile_s"] = med.get("compile")
    row["speedup_vs_eager"] = row["eager_s"] / row["fusednorm_s"]
    row["speedup_vs_compile"] = row["compile_s"] / row["fusednorm_s"] if row["compile_s"] else None
    row["bandwidth_GBps"] = nbytes / row["fusednorm_s"] / 1e9
    row["floor_s"] = med["floor"]
    row["floor_ratio"] = row["fusednorm_s"] / row["floor_s"]
    row["eager_floor_ratio"] = row["eager_s"] / row["floor_s"]
    row["peak_mem_MiB_fusednorm"] = row["peak_mem_MiB_eager"] = None
    if case.backward:
        for impl, m in (("fusednorm", ours), ("eager", ref)):
            pm = peak_memory(step_fn(m, x, g, True, case.backend if impl == "fusednorm" else "auto"), case.device)
            row[f"peak_mem_MiB_{impl}"] = pm / 2**20 if pm is not None else None
    return row


def devices():
    """(device, fusednorm backend) pairs: the C++ kernels on the CPU; on a GPU the CUDA
    kernels and the Triton ones."""
    out = [("cpu", "auto")]
    if torch.cuda.is_available():
        out += [("cuda", "auto"), ("cuda", "triton")]
    return out


def default_cases():
    cases = []
    for dev, backend in devices():
        big = (32, 64, 56, 56)
        for dtype in ("float32", "bfloat16"):
            cases += [
                Case("BatchNorm2d", big, "relu", True, True, dtype, device=dev, backend=backend),
                Case("BatchNorm2d", big, None, True, False, dtype, device=dev, backend=backend),
                Case("BatchNorm2d", big, "relu", False, False, dtype, device=dev, backend=backend),
                Case("BatchNorm2d", big, "relu", True, True, dtype, "channels_last", device=dev, backend=backend),
                Case("InstanceNorm2d", big, None, True, True, dtype, device=dev, backend=backend),
                Case("GroupNorm", big, "relu", True, True, dtype, device=dev, backend=backend),
                Case("LayerNorm", (8192, 1024), None, True, True, dtype, device=dev, backend=backend),
            ]
        cases += [
            # Activations that save their input in eager (fusing them saves that tensor):
            # YOLO / EfficientNet (BatchNorm -> SiLU), diffusion UNets (GroupNorm(32) -> SiLU),
            # ViT-B/16 at batch 32 (LayerNorm(768) -> GELU over 32 x 197 tokens).
            Case("BatchNorm2d", big, "silu", True, True, "float32", device=dev, backend=backend),
            Case("GroupNorm", big, "silu", True, True, "float32", device=dev, backend=backend),
            Case("LayerNorm", (6304, 768), "gelu", True, True, "float32", device=dev, backend=backend),
            Case("BatchNorm2d", big, "leaky_relu", True, False, "float32", "channels_last", device=dev,
                 backend=backend),
            Case("GroupNorm", big, "relu", True, False, "float32", "channels_last", device=dev, backend=backend),
            Case("LayerNorm", (8192, 1024), "relu", True, False, "float32", device=dev, backend=backend),
            # Pre-norm transformer blocks (Llama: RMSNorm, ViT/GPT: LayerNorm) at hidden size
            # 4096, the residual add fused.
            Case("Add+RMSNorm", (8192, 4096), None, True, True, "float32", device=dev, backend=backend),
            Case("Add+RMSNorm", (8192, 4096), None, True, True, "bfloat16", device=dev, backend=backend),
            Case("Add+LayerNorm", (8192, 4096), None, True, True, "float32", device=dev, backend=backend),
            Case("RMSNorm", (8192, 4096), None, True, True, "float32", device=dev, backend=backend),
            # ResNet tails: relu(bn(conv(x)) + identity), ResNet-18 stage 1 at batch 32.
            Case("BatchNorm2d+add", big, "relu", True, True, "float32", device=dev, backend=backend),
        ]
    return cases


def full_cases():
    """Size sweeps, small to large, so cost growth and the overhead floor show."""
    cases = []
    for dev, backend in devices():
        for n, c, hw in [(1, 8, 4), (2, 16, 8), (4, 32, 14), (8, 64, 28), (16, 64, 56), (32, 64, 56), (64, 128, 56)]:
            for backward in (False, True):
                cases.append(Case("BatchNorm2d", (n, c, hw, hw), "relu", True, backward, device=dev, backend=backend))
                cases.append(Case("GroupNorm", (n, c, hw, hw), "relu", True, backward, device=dev, backend=backend,
                                  groups=min(8, c)))
                cases.append(Case("InstanceNorm2d", (n, c, hw, hw), None, True, backward, device=dev, backend=backend))
        for rows, cols in [(4, 64), (64, 256), (512, 512), (2048, 1024), (8192, 1024), (8192, 4096)]:
            for backward in (False, True):
                cases.append(Case("LayerNorm", (rows, cols), None, True, backward, device=dev, backend=backend))
    return cases


def per_call_overhead(min_run_time):
    """Time of one call on a tiny tensor: Python, autograd.Function and dispatch overhead."""
    x = torch.randn(2, 4, 2, 2)
    out = {}
    for name, m in (("fusednorm", fusednorm.BatchNorm2d(4)), ("eager", nn.BatchNorm2d(4))):
        out[name + "_fwd_us"] = median_time(step_fn(m, x, None, False), "cpu", min_run_time) * 1e6
        out[name + "_fwd_bwd_us"] = median_time(step_fn(m, x, torch.randn_like(x), True), "cpu", min_run_time) * 1e6
    return out


def _sync_rank(rank, world, port, shape, rounds, queue):
    """One rank of the distributed case: fwd+bwd step time of SyncBatchNorm (statistics
    synchronised over gloo) and of local BatchNorm on the same local batch."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    mods = {"fusednorm.SyncBatchNorm+relu": fusednorm.SyncBatchNorm(shape[1], activation="relu"),
            "fusednorm.BatchNorm2d+relu (local)": fusednorm.BatchNorm2d(shape[1], activation="relu"),
            "torch.nn.BatchNorm2d+ReLU (local)": nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU())}
    times = {k: [] for k in mods}
    for i in range(rounds + 3):
        for k, m in mods.items():
            dist.barrier()
            t = time.perf_counter()
            torch.autograd.grad(m(x), [x] + list(m.parameters()), g)
            if i >= 3:
                times[k].append(time.perf_counter() - t)
    if rank == 0:
        queue.put({k: sorted(v)[len(v) // 2] for k, v in times.items()})
    dist.destroy_process_group()


def sync_case(shape=(16, 64, 28, 28), world=2, rounds=20):
    """Median step times on rank 0 of `world` gloo processes (one thread each)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_rank, args=(r, world, port, shape, rounds, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def fmt_ratio(v):
    return "—" if v is None else f"{v:.2f}×"


def markdown(rows):
    lines = [
        "| case | fusednorm | eager | compile | vs eager | vs compile | GB/s | floor | × floor "
        "(fusednorm / eager) | peak MiB fwd+bwd (fusednorm / eager) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        comp = "—" if r["compile_s"] is None else f"{r['compile_s'] * 1e3:.2f} ms"
        mem = "—"
        if r["peak_mem_MiB_fusednorm"] is not None:
            mem = f"{r['peak_mem_MiB_fusednorm']:.0f} / {r['peak_mem_MiB_eager']:.0f}"
        lines.append(
            f"| {r['case']} | {r['fusednorm_s'] * 1e3:.2f} ms | {r['eager_s'] * 1e3:.2f} ms | {comp} | "
            f"{fmt_ratio(r['speedup_vs_eager'])} | {fmt_ratio(r['speedup_vs_compile'])} | "
            f"{r['bandwidth_GBps']:.1f} | {r['floor_s'] * 1e3:.2f} ms | "
            f"{r['floor_ratio']:.2f} / {r['eager_floor_ratio']:.2f} | {mem} |"
        )
    return "\n".join(lines)


def progress(i, n, label, start):
    width = 30
    done = int(width * i / n)
    eta = (time.time() - start) / i * (n - i) if i else 0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} eta {eta:4.0f}s {label[:60]:60s}")
    sys.stderr.flush()


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")
    names = [r["case"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["speedup_vs_eager"] for r in rows], height=0.4, label="vs eager torch.nn")
    ax.barh([i - 0.2 for i in y], [r["speedup_vs_compile"] or 0 for r in rows], height=0.4, label="vs torch.compile")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of fusednorm (×)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="sweep sizes instead of the default preset")
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--no-sync", action="store_true", help="skip the distributed (2 gloo ranks) case")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's dynamic thresholds (page faults on new tensors, as a default process "
                        "gets) instead of keeping freed memory on both sides")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--csv", help="write the results as CSV")
    p.add_argument("--plot", help="write a PNG of the speed-ups (needs matplotlib)")
    args = p.parse_args(argv)

    cases = full_cases() if args.full else default_cases()
    cases = [c for c in cases if args.filter in c.name]
    if not cases:
        p.error(f"no case of the {'--full' if args.full else 'default'} preset matches --filter {args.filter!r}")
    min_run_time = args.min_run_time or (0.1 if args.full else 0.2)
    compile_ref = not args.no_compile and not args.full
    warnings.filterwarnings("ignore")
    steady = not args.system_malloc and steady_malloc()
    cache = fusednorm.cpu_cache_info()
    cache_state = f"on (up to {cache['limit_bytes'] >> 20} MiB)" if cache["limit_bytes"] else "off"
    cpu = platform.processor() or platform.machine()
    header = (f"fusednorm {fusednorm.__version__}, torch {torch.__version__}, {cpu}, "
              f"{torch.get_num_threads()} threads, CPU kernels: {fusednorm.cpu_isa()}, "
              f"{datetime.date.today().isoformat()}, "
              f"{'steady malloc (freed memory kept)' if steady else 'system malloc'}, fusednorm CPU output cache "
              f"{cache_state}")
    rows = []
    start = time.time()
    for i, case in enumerate(cases):
        progress(i, len(cases), case.name, start)
        rows.append(run_case(case, compile_ref, min_run_time))
    progress(len(cases), len(cases), "done", start)
    sys.stderr.write("\n")
    print(header)
    print()
    print(markdown(rows))
    overhead = per_call_overhead(min_run_time)
    print()
    print("Per-call overhead on a (2, 4, 2, 2) BatchNorm2d: "
          f"fusednorm {overhead['fusednorm_fwd_us']:.1f} µs fwd / {overhead['fusednorm_fwd_bwd_us']:.1f} µs fwd+bwd, "
          f"eager {overhead['eager_fwd_us']:.1f} µs / {overhead['eager_fwd_bwd_us']:.1f} µs")
    if args.full:
        print()
        print(crossover_report(rows))
    sync = None
    if not args.no_sync and not args.filter:
        sync = sync_case()
        base = sync["torch.nn.BatchNorm2d+ReLU (local)"]
        print("\nDistributed: 2 gloo processes on this CPU (1 thread each), local batch 16x64x28x28, "
              "fwd+bwd step (median on rank 0):")
        print("| implementation | step | vs torch.nn local |\n|---|---:|---:|")
        for k, v in sync.items():
            print(f"| {k} | {v * 1e3:.2f} ms | {base / v:.2f}× |")
    slower = [r["case"] for r in rows if r["speedup_vs_eager"] < 1 or (r["speedup_vs_compile"] or 2) < 1]
    if cache["limit_bytes"]:
        print(f"\nfusednorm's CPU output cache holds {fusednorm.cpu_cache_info()['cached_bytes'] / 2**20:.0f} MiB")
    print(f"\n{len(rows)} cases in {time.time() - start:.0f} s; slower than eager or compile: "
          f"{', '.join(slower) if slower else 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "overhead": overhead, "rows": rows, "sync": sync}, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    return rows


def crossover_report(rows):
    """For each norm and pass: the largest size at which fusednorm is still slower than eager."""
    lines = ["Crossover (largest swept size still slower than eager; per-call overhead dominates below it):"]
    groups = {}
    for r in rows:
        key = (r["norm"], r["backward"], r["device"])
        groups.setdefault(key, []).append(r)
    for (norm, backward, dev), rs in groups.items():
        rs.sort(key=lambda r: math.prod(r["shape"]))
        slow = [r for r in rs if r["speedup_vs_eager"] < 1]
        which = "fwd+bwd" if backward else "fwd"
        if slow:
            worst = slow[-1]
            lines.append(f"- {norm} {which} [{dev}]: slower up to {math.prod(worst['shape'])} elements "
                         f"({'x'.join(map(str, worst['shape']))}, {worst['speedup_vs_eager']:.2f}×)")
        else:
            lines.append(f"- {norm} {which} [{dev}]: faster than eager at every swept size "
                         f"(smallest {math.prod(rs[0]['shape'])} elements: {rs[0]['speedup_vs_eager']:.2f}×)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
