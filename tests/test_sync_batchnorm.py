"""fusednorm.SyncBatchNorm over torch.distributed with gloo on CPU: spawned processes on
127.0.0.1, bounded by timeouts. Outputs, input gradients, running statistics and
(all-reduced) parameter gradients equal BatchNorm(+activation) on the concatenated batch;
uneven batches, an empty rank; DistributedDataParallel training of a small conv net matches
single-process training; exactly one collective per forward and one per backward."""
import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fusednorm
from helpers import TRITON_CPU, activate

TIMEOUT = datetime.timedelta(seconds=60)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, *args):
    """Run fn(rank, world, result_dir, *args) in `world` processes; re-raise any failure."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                pytest.fail(f"rank {r} did not finish in time")
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
        assert not errors, "\n".join(errors)
        return [torch.load(os.path.join(out, f"{r}.pt")) for r in range(world)]


def _entry(fn, rank, world, port, out, args):
    import traceback
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=TIMEOUT)
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:  # reported to the parent
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}")


def count_collectives(monkey_target=dist):
    counts = {"all_gather": 0, "all_reduce": 0}
    originals = {k: getattr(monkey_target, k) for k in counts}

    def wrap(name):
        def f(*a, **k):
            counts[name] += 1
            return originals[name](*a, **k)
        return f
    for k in counts:
        setattr(monkey_target, k, wrap(k))
    return counts, lambda: [setattr(monkey_target, k, v) for k, v in originals.items()]


def data(sizes, C=3, spatial=(4, 5), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn((sum(sizes), C) + spatial, generator=g) * 2 + 0.5
    grad = torch.randn(full.shape, generator=g)
    return full, grad


def seeded_affine(m):
    """The same weight and bias in every process and in the single-process reference."""
    torch.manual_seed(0)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def reference(full, grad, act, steps=2):
    """BatchNorm2d(+act) on the full batch for `steps` steps: y, dx, dweight, dbias, module."""
    ref = seeded_affine(nn.BatchNorm2d(3))
    xr = full.clone().requires_grad_()
    for _ in range(steps):
        yr = act(ref(xr))
        gxr, gwr, gbr = torch.autograd.grad(yr, [xr, ref.weight, ref.bias], grad)
    return yr.detach(), gxr, gwr, gbr, ref


def _sync_step(rank, world, sizes, activation, channels_last, dtype=torch.float32, backend="auto"):
    full, grad = data(sizes)
    lo = sum(sizes[:rank])
    x = full[lo:lo + sizes[rank]].clone().to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    m = seeded_affine(fusednorm.SyncBatchNorm(3, activation=activation, negative_slope=0.2))
    counts, restore = count_collectives()
    ys = []
    with fusednorm.use_backend(backend):
        for _ in range(2):
            y = m(x)
            (gx, gw, gb) = torch.autograd.grad(y, [x, m.weight, m.bias], grad[lo:lo + sizes[rank]].to(dtype))
            ys.append(y.detach())
    restore()
    gw_sum, gb_sum = gw.clone(), gb.clone()
    dist.all_reduce(gw_sum)
    dist.all_reduce(gb_sum)
    return {"y": ys[-1], "gx": gx, "gw": gw_sum, "gb": gb_sum, "rm": m.running_mean, "rv": m.running_var,
            "nbt": m.num_batches_tracked, "counts": counts, "cl": y.is_contiguous(memory_format=torch.channels_last)}


WORLDS = [(2, [3, 5]), (3, [4, 1, 2]), (3, [3, 0, 4])]
WORLD_IDS = ["2-ranks-uneven", "3-ranks-uneven", "3-ranks-one-empty"]


@pytest.mark.slow
@pytest.mark.parametrize("world,sizes", WORLDS, ids=WORLD_IDS)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "silu"])
def test_sync_matches_full_batch(world, sizes, activation, backend="auto"):
    results = run_ranks(_sync_step, world, sizes, activation, False, torch.float32, backend)
    full, grad = data(sizes)
    act = lambda t: activate(t, activation, 0.2)  # noqa: E731
    yr, gxr, gwr, gbr, ref = reference(full, grad, act)
    lo = 0
    for rank, r in enumerate(results):
        hi = lo + sizes[rank]
        torch.testing.assert_close(r["y"], yr[lo:hi], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["gx"], gxr[lo:hi], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["gw"], gwr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["gb"], gbr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["rm"], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["rv"], ref.running_var, rtol=1e-5, atol=1e-6)
        assert r["nbt"].item() == 2
        # 2 steps: one all_gather per forward, one all_reduce per backward.
        assert r["counts"] == {"all_gather": 2, "all_reduce": 2}
        lo = hi


@pytest.mark.slow
@TRITON_CPU
@pytest.mark.parametrize("world,sizes", [WORLDS[0], WORLDS[2]], ids=[WORLD_IDS[0], WORLD_IDS[2]])
def test_sync_on_triton_backend(world, sizes):
    """The same checks with the Triton kernels (statistics, normalise, backward sums) under
    the interpreter; the spawned ranks inherit TRITON_INTERPRET=1 from conftest."""
    test_sync_matches_full_batch(world, sizes, "relu", backend="triton")


@pytest.mark.slow
def test_bfloat16_input_float32_statistics():
    """bfloat16 activations, float32 parameters and statistics: against float32 BatchNorm on
    the same (rounded) values, to bfloat16's precision."""
    sizes = [3, 4]
    results = run_ranks(_sync_step, 2, sizes, "relu", False, torch.bfloat16)
    full, grad = data(sizes)
    full, grad = full.bfloat16().float(), grad.bfloat16().float()
    yr, gxr, _, _, ref = reference(full, grad, F.relu)
    eps = torch.finfo(torch.bfloat16).eps
    lo = 0
    for rank, r in enumerate(results):
        hi = lo + sizes[rank]
        assert r["y"].dtype == torch.bfloat16 and r["rm"].dtype == torch.float32
        torch.testing.assert_close(r["y"].float(), yr[lo:hi], rtol=eps, atol=eps)
        torch.testing.assert_close(r["gx"].float(), gxr[lo:hi], rtol=eps, atol=eps * gxr.abs().max().item())
        torch.testing.assert_close(r["rm"], ref.running_mean, rtol=1e-5, atol=1e-6)
        lo = hi


@pytest.mark.slow
def test_channels_last_kept():
    results = run_ranks(_sync_step, 2, [2, 3], "relu", True)
    assert all(r["cl"] for r in results)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _ddp_train(rank, world, sizes, steps):
    torch.manual_seed(0)
    model = fusednorm.SyncBatchNorm.convert_sync_batchnorm(fusednorm.convert(ConvNet()))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    N = sum(sizes)
    lo = sum(sizes[:rank])
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(N, 3, 6, 6, generator=g)
        target = torch.randn(N, 4, generator=g)
        out = ddp(x[lo:lo + sizes[rank]])
        # DDP averages gradients over ranks: scale each rank's share of the full-batch mean loss.
        loss = F.mse_loss(out, target[lo:lo + sizes[rank]], reduction="sum") * world / (N * 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_training_matches_single_process():
    sizes, steps = [3, 5], 3
    results = run_ranks(_ddp_train, 2, sizes, steps)
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    N = sum(sizes)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(N, 3, 6, 6, generator=g)
        target = torch.randn(N, 4, generator=g)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in results:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r[k], v, rtol=1e-4, atol=1e-5, msg=k)


def _double_backward(rank, world):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    m = fusednorm.SyncBatchNorm(3, activation="relu")
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    try:
        gx.pow(2).sum().backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_double_backward_is_refused():
    """Differentiating SyncBatchNorm's gradient must raise (its backward op has no
    derivative), not give zeros."""
    for message in run_ranks(_double_backward, 2):
        assert "differentiate twice" in message


def test_without_process_group():
    m = fusednorm.SyncBatchNorm(3, activation="relu")
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="process group"):
        m(x)
    m.eval()
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), F.relu(ref(x)))


def test_signature_and_state_dict_match_torch():
    import inspect
    ours = inspect.signature(fusednorm.SyncBatchNorm.__init__).parameters
    for name, p in inspect.signature(nn.SyncBatchNorm.__init__).parameters.items():
        assert name in ours and ours[name].default == p.default, name
    assert list(fusednorm.SyncBatchNorm(4).state_dict()) == list(nn.SyncBatchNorm(4).state_dict())


def test_convert_sync_batchnorm_keeps_activation_and_convert_sync_flag():
    model = nn.Sequential(fusednorm.BatchNorm2d(4, activation="relu"), nn.BatchNorm1d(4))
    converted = fusednorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], fusednorm.SyncBatchNorm) and converted[0].activation == "relu"
    assert isinstance(converted[1], fusednorm.SyncBatchNorm) and converted[1].activation is None
    torch_sync = nn.Sequential(nn.SyncBatchNorm(4))
    assert type(fusednorm.convert(torch_sync)[0]) is nn.SyncBatchNorm  # left alone by default
    assert isinstance(fusednorm.convert(torch_sync, sync=True)[0], fusednorm.SyncBatchNorm)


def test_torch_convert_sync_batchnorm_keeps_fused_activations():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm (the usual DDP recipe) on a model with
    fusednorm BatchNorms: one with an activation becomes fusednorm.SyncBatchNorm (torch's
    SyncBatchNorm has no activation and dropped it, silently changing the model), one
    without becomes torch.nn.SyncBatchNorm as before; same outputs (eval: plain BatchNorm,
    no process group needed) and state_dict keys as the model before conversion."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fusednorm.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2),
                          nn.Sequential(fusednorm.BatchNorm2d(4), fusednorm.BatchNorm2d(4, activation="relu")),
                          nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.normal_(), m.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    keys = list(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kept = [converted[1], converted[2][1]]
    assert all(isinstance(m, fusednorm.SyncBatchNorm) for m in kept)
    assert [m.activation for m in kept] == ["leaky_relu", "relu"] and kept[0].negative_slope == 0.2
    assert type(converted[2][0]) is nn.SyncBatchNorm and type(converted[3]) is nn.SyncBatchNorm
    assert list(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), want)
