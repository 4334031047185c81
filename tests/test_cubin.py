"""The CUDA build's machine code (sm_90 SASS, read with cuobjdump; no GPU needed): every
kernel that streams a tensor in packs issues 16-byte global loads and stores, and no kernel
touches local memory. Runs where fusednorm was built with its CUDA kernels (CI's install)
or on the build FUSEDNORM_CUBIN names; skips, visibly, on a CPU-only build."""
import re

import cubin
import pytest

ITEMSIZE = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
# kernel template and which template argument is the elements per access (launch.h)
PACKED = re.compile(
    r"fusednorm::cuda::(?P<kernel>row_(?:fwd|bwd)_(?:warp|block)|channel_reduce_(?:nchw|nhwc)"
    r"|elementwise_(?:nchw|nhwc))<(?P<args>[^()]*)>\(")


@pytest.fixture(scope="module")
def kernels():
    so = cubin.extension_or_skip()
    k = cubin.sass(so)
    assert k, f"no kernels in {so}"
    return k


def access_bytes(name):
    """(kernel, bytes per streamed access) of one of our kernels, or None."""
    m = PACKED.search(name)
    if not m:
        return None
    args = [a.strip() for a in m.group("args").split(",")]
    size = ITEMSIZE[args[0]]
    return m.group("kernel"), size * int(args[-1])


def test_packed_kernels_issue_16_byte_global_accesses(kernels):
    """Every row kernel, channel reduction and elementwise kernel instantiated for
    16-byte packs loads its streams with LDG.E.128 (and the kernels that write a tensor
    store with STG.E.128). The scalar fallbacks (misaligned views) are not required to."""
    checked, missing = 0, []
    for name, ins in kernels.items():
        info = access_bytes(name)
        if info is None or info[1] == ITEMSIZE.get(name.split("<")[1].split(",")[0].strip()):
            continue  # not ours, or a single-element fallback
        kernel, nbytes = info
        if nbytes != 16:
            missing.append((name.split("(")[0], f"packs of {nbytes} bytes"))
            continue
        bits = 128
        loads = any(re.match(rf"LDG\.E\.{bits}\b", i) for i in ins)
        stores = kernel.startswith("channel_reduce") or any(re.match(rf"STG\.E\.{bits}\b", i) for i in ins)
        if not (loads and stores):
            missing.append((name.split("(")[0], bits, sorted({i for i in ins if i.startswith(("LDG", "STG"))})))
        checked += 1
    # 4 dtypes x (row: 2 directions x 4 tiers; reductions and elementwise: 2 layouts x 2 ops)
    assert checked >= 4 * (8 + 4 + 4), f"only {checked} packed kernels found"
    assert not missing, "\n".join(map(str, missing))


def test_no_kernel_uses_local_memory(kernels):
    """No kernel of ours spills or keeps an array in local memory (LDL/STL): the CUDA
    build's ptxas -warn-lmem-usage turns that into an error too, this reads the result."""
    ours = {n: i for n, i in kernels.items() if "fusednorm::cuda::" in n}
    assert len(ours) >= 100, len(ours)
    local = {n.split("(")[0]: sorted({i for i in ins if i.startswith(("LDL", "STL"))})
             for n, ins in ours.items() if any(i.startswith(("LDL", "STL")) for i in ins)}
    assert not local, local
