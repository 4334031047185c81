"""The Triton backend beyond the shared parity/gradcheck/opcheck suites (which run every
case on it too): proof that its kernels ran with no fall-back to the C++ ops, the row
loops and split reductions forced on small inputs, torch.compile, backend selection and
its errors, and an ahead-of-time compile of every kernel variant for sm_90."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed: the Triton backend's tests need it")

import fusednorm  # noqa: E402
from helpers import KINDS, TRITON_CPU, activate, assert_close, make_input, make_pair  # noqa: E402

HERE = os.path.dirname(__file__)

EXPECTED_KERNELS = {
    "BatchNorm2d": {"channel_moments_kernel", "channel_finish_kernel", "channel_apply_kernel",
                    "channel_grad_sums_kernel", "channel_input_grad_kernel"},
    "InstanceNorm2d": {"row_fwd_kernel", "instance_running_kernel", "row_bwd_kernel",
                       "channel_grad_sums_kernel"},
    "LayerNorm": {"row_fwd_kernel", "row_bwd_kernel", "channel_grad_sums_kernel"},
    "GroupNorm": {"row_fwd_kernel", "row_bwd_kernel", "channel_grad_sums_kernel"},
}


class _NoCompiledOps:
    def __getattr__(self, name):
        raise AssertionError(f"the compiled op {name} was called under the Triton backend")


@TRITON_CPU
@pytest.mark.parametrize("kind", list(EXPECTED_KERNELS))
def test_triton_kernels_ran_without_fallback(kind, monkeypatch):
    """Every kernel the op needs was launched, and the C++ ops were never reached."""
    from fusednorm.triton import launches
    monkeypatch.setattr(fusednorm.backend, "compiled_ops", _NoCompiledOps())
    ours, ref = make_pair(kind, "relu")
    x = make_input(KINDS[kind][3], torch.float32, "contiguous").requires_grad_()
    launches.clear()
    with fusednorm.use_backend("triton"):
        y = ours(x)
        y.backward(torch.ones_like(y))
    assert set(launches) == EXPECTED_KERNELS[kind]
    xr = x.detach().requires_grad_()
    yr = activate(ref(xr), "relu")
    yr.backward(torch.ones_like(yr))
    assert_close(y, yr, torch.float32, "output")
    assert_close(x.grad, xr.grad, torch.float32, "input grad")


# Limits that make small inputs take the long paths: rows longer than one block (loops in
# the row kernels), more rows than row programs (the grid-stride row loop) and reductions
# split over several programs (merged partials).
SMALL = dict(max_block=8, block_j=4, max_programs=64, max_row_programs=3)


@TRITON_CPU
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d", "LayerNorm", "GroupNorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [None, "leaky_relu"], ids=str)
def test_multi_block_rows_and_split_reductions(kind, layout, dtype, activation):
    from fusednorm.triton import limits
    from fusednorm.triton.ops import _reduce_tiles
    with limits(**SMALL):  # the reductions of this input really are split
        assert _reduce_tiles(3 * 5 * 6, 4, (120, 30, 1))[3] > 1
        assert _reduce_tiles(3 * 5 * 6, 4, (120, 1, 4))[3] > 1
    ours, ref = make_pair(kind, activation, torch.float64 if dtype == torch.float64 else torch.float32)
    x = make_input(KINDS[kind][3], dtype, layout).requires_grad_()
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xr = x.detach().to(ref_dtype).requires_grad_()
    with fusednorm.use_backend("triton"), limits(**SMALL):
        y = ours(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        y.backward(g)
    yr = activate(ref(xr), activation)
    yr.backward(g.to(ref_dtype))
    assert_close(y, yr, dtype, "output")
    assert_close(x.grad, xr.grad, dtype, "input grad")
    for (name, p), pr in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, pr.grad, p.dtype, f"{name} grad")
    for (name, b), br in zip(ours.named_buffers(), ref.buffers()):
        if b.dtype.is_floating_point:
            assert_close(b, br, b.dtype, name)


@TRITON_CPU
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_residual_add_rows_walked_grid_stride(rms):
    """The pre-norm residual add with more rows than row programs (and rows longer than a
    block): each program walks several rows, forward and backward, against the composition
    of torch ops in float64."""
    import torch.nn.functional as F

    from fusednorm.functional import add_layer_norm, add_rms_norm
    from fusednorm.triton import limits
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(7, 20, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    w = (torch.rand(20, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    dy, ds = torch.randn(7, 20, generator=g, dtype=torch.float64), torch.randn(7, 20, generator=g, dtype=torch.float64)
    with fusednorm.use_backend("triton"), limits(**SMALL):
        y, total = add_rms_norm(x, r, (20,), w, 1e-5) if rms else add_layer_norm(x, r, (20,), w, None, 1e-5)
        grads = torch.autograd.grad((y * dy).sum() + (total * ds).sum(), [x, r, w])
    t = x + r
    yr = F.rms_norm(t, (20,), w, 1e-5) if rms else F.layer_norm(t, (20,), w, None, 1e-5)
    grads_ref = torch.autograd.grad((yr * dy).sum() + (t * ds).sum(), [x, r, w])
    assert_close(y, yr, torch.float64, "output")
    assert_close(total, t, torch.float64, "sum")
    for a, e, what in zip(grads, grads_ref, ("dx", "dresidual", "dweight")):
        assert_close(a, e, torch.float64, what)


@pytest.mark.slow
@TRITON_CPU
@pytest.mark.parametrize("kind", ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d"])
def test_torch_compile_with_triton_backend(kind):
    torch._dynamo.reset()
    ours, _ = make_pair(kind, "relu")
    twin, _ = make_pair(kind, "relu")
    x = make_input(KINDS[kind][3], torch.float32, "contiguous")
    compiled = torch.compile(ours, fullgraph=True)
    with fusednorm.use_backend("triton"):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc), twin(xe)
        yc.sum().backward()
        ye.sum().backward()
    assert_close(yc, ye, torch.float32, "output")
    assert_close(xc.grad, xe.grad, torch.float32, "input grad")
    for b, be in zip(ours.buffers(), twin.buffers()):
        if b.dtype.is_floating_point:
            assert_close(b, be, torch.float32, "buffer")


def test_backend_selection_and_errors():
    x = torch.randn(4, 3)
    assert fusednorm.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown fusednorm backend"):
        fusednorm.set_backend("tpu")
    with pytest.raises(RuntimeError, match="input is on cpu"):
        with fusednorm.use_backend("cuda"):
            fusednorm.BatchNorm1d(3)(x)
    with pytest.raises(ZeroDivisionError):  # the previous backend comes back on errors
        with fusednorm.use_backend("cpu"):
            assert fusednorm.get_backend() == "cpu"
            1 / 0
    assert fusednorm.get_backend() == "auto"
    with fusednorm.use_backend("cpu"):  # "cpu" is the C++ kernels: same numbers as auto
        assert torch.equal(fusednorm.LayerNorm(3)(x), fusednorm.LayerNorm(3)(x))


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, fusednorm\n"
            "fusednorm.set_backend('triton')\n"
            "try:\n"
            "    fusednorm.LayerNorm(3)(torch.randn(2, 3))\n"
            "except RuntimeError as e:\n"
            "    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR: fusednorm's Triton backend got a CPU tensor" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    """Triton's compiler, not the interpreter: the kernels as a GPU's runtime would build
    them (Triton's own argument specialisation, edge sizes, sm_90 and sm_80). Caught before
    this check existed: `.to()` on an int argument equal to 1, which the runtime makes a
    constant (InstanceNorm running statistics over a batch of one, LayerNorm over 1-element
    rows, BatchNorm over one element per channel)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "kernel variants for sm_90 and sm_80" in out.stdout


@TRITON_CPU
@pytest.mark.parametrize("kind,shape", [("BatchNorm2d", (0, 4, 3, 3)), ("GroupNorm", (0, 4, 3, 3)),
                                        ("LayerNorm", (0, 4, 5, 6)), ("InstanceNorm2d", (2, 4, 0, 3))])
def test_empty_inputs_match_compiled_backend(kind, shape):
    """Empty batches (or spatial sizes): the same outputs and zero parameter gradients as
    the C++ kernels, and no aliasing between returned tensors (custom ops forbid it)."""
    results = []
    for backend in ("auto", "triton"):
        ours, _ = make_pair(kind, "relu")
        x = torch.zeros(shape, requires_grad=True)
        with fusednorm.use_backend(backend):
            y = ours(x)
            grads = torch.autograd.grad(y, [x] + list(ours.parameters()), torch.ones_like(y))
        results.append((y, grads, [b.clone() for b in ours.buffers()]))
    (y0, g0, b0), (y1, g1, b1) = results
    assert y0.shape == y1.shape
    for a, b in zip(g0 + tuple(b0), g1 + tuple(b1)):
        torch.testing.assert_close(a, b)


def test_kernel_scalars_made_once_and_exact():
    """eps, the activation's parameters and momentum reach the kernels as a tensor in the statistics' dtype (exact in
    float64), made once per value set and device, not per launch (a host-to-device copy on
    a GPU, and not capturable in a CUDA graph)."""
    from fusednorm.triton import ops as triton_ops
    x = torch.zeros(1)
    a = triton_ops._scalars(x, torch.float64, eps=1e-5, act=(0.2, 0.5), momentum=0.1)
    assert triton_ops._scalars(x, torch.float64, eps=1e-5, act=(0.2, 0.5), momentum=0.1) is a
    assert a.dtype == torch.float64 and a.tolist() == [1e-5, 0.2, 0.5, 0.1]
    b = triton_ops._scalars(x, torch.float32, eps=1e-5, act=(0.2, 0.5), momentum=0.1)
    assert b is not a and b.dtype == torch.float32
    assert triton_ops._scalars(x, torch.float64, eps=1e-3, act=(0.2, 0.5), momentum=0.1).tolist()[0] == 1e-3


def test_row_kernels_launch_table():
    """Rows up to 4096 elements are one block of their next power of two, read once (kept
    in registers); longer rows loop over 4096-element blocks; warps from ops.ROW_WARPS."""
    from fusednorm.triton import ops as tops
    lengths = (1, 200, 256, 257, 1024, 1025, 4096, 4097, 100000)
    assert [tops._row_config(n) for n in lengths] == [
        (1, 1, True), (256, 1, True), (256, 1, True), (512, 4, True), (1024, 4, True), (2048, 8, True),
        (4096, 8, True), (4096, 8, False), (4096, 8, False)]
