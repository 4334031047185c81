"""Runs fuzz cases (cases.py) sent one JSON line at a time on stdin, answering one JSON line
each on stdout, so that a case that kills the interpreter (a crash in a kernel) is reported
by the parent as that case's failure instead of taking the test run down.

    python worker.py BACKEND      BACKEND: cpu, triton (the interpreter) or emulation

emulation: the CUDA backend's ops compiled for the CPU (tests/emulation), run through the
modules in place of the CPU kernels. Its build directory is the first line read."""
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def setup(backend):
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    import fusednorm
    if backend == "triton":
        fusednorm.set_backend("triton")
    elif backend == "emulation":
        build = sys.stdin.readline().strip()
        sys.path.insert(0, os.path.dirname(HERE))
        from emulation import load_emulation
        load_emulation(build)
        import fusednorm.autograd
        emu = torch.ops.fusednorm_emu
        fusednorm.autograd.ops_for = lambda x: emu  # the modules' one way to their ops
    torch.set_num_threads(1)
    return fusednorm


def main():
    backend = sys.argv[1]
    sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the cases, and tests/reference.py
    fusednorm = setup(backend)
    from cases import Mismatch, run_case
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        try:
            run_case(case, fusednorm)
            reply = {"ok": True}
        except Mismatch as e:
            reply = {"ok": False, "error": str(e)}
        except Exception:  # noqa: BLE001 - a harness error is the case's failure too
            reply = {"ok": False, "error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
