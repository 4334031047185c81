"""Reading the CUDA build's machine code without a GPU: cuobjdump (it ships in the triton
wheel) on the built extension. FUSEDNORM_CUBIN names another built _C*.so to read (a
developer's CUDA build beside a CPU-only install)."""
import os
import re
import shutil
import subprocess


def built_extension():
    """Path of a fusednorm extension with CUDA kernels, or None."""
    path = os.environ.get("FUSEDNORM_CUBIN")
    if path:
        return path
    import fusednorm
    return fusednorm._C.__file__ if fusednorm._C.with_cuda else None


def extension_or_skip():
    """built_extension(), or a pytest skip saying why there is no machine code to read."""
    import pytest
    so = built_extension()
    if so is None:
        pytest.skip("this fusednorm was built without its CUDA kernels: no machine code to read")
    if cuobjdump() is None:
        pytest.skip("cuobjdump not found (it ships in the triton wheel)")
    return so


def cuobjdump():
    try:
        import triton
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        tool = shutil.which("cuobjdump")
    return tool if tool and os.path.exists(tool) else None


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return out.split("\n")[: len(names)]


def shared_memory(so_path):
    """{demangled kernel name: SHARED bytes} from `cuobjdump -res-usage`."""
    out = subprocess.run([cuobjdump(), "-res-usage", so_path], capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    mangled = {}
    for line, nxt in zip(lines, lines[1:]):
        m, sh = re.match(r"\s*Function (\S+):", line), re.search(r"SHARED:(\d+)", nxt)
        if m and sh:
            mangled[m.group(1)] = int(sh.group(1))
    return dict(zip(demangle(list(mangled)), mangled.values()))


def sass(so_path):
    """{demangled kernel name: [SASS instruction mnemonics with modifiers]} for sm_90."""
    out = subprocess.run([cuobjdump(), "-sass", so_path], capture_output=True, text=True, timeout=600)
    kernels, current = {}, None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if ins and current is not None:
            current.append(ins.group(1))
    return dict(zip(demangle(list(kernels)), kernels.values()))
