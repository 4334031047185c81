"""Property-based comparison of every fusednorm module with torch.nn (tests/fuzz/cases.py
says what a case draws and how it compares), on the CPU kernels, the Triton kernels in
Triton's interpreter and the CUDA kernels under the CPU emulation.

Each case runs in a worker process (tests/fuzz/worker.py): a case that crashes the
interpreter fails as that case, with hypothesis's shrunk example, and a fresh worker takes
the next. Seeded and reproducible: FUSEDNORM_FUZZ_SEED picks the seed (default below),
--fuzz-examples N the number of CPU examples (the interpreted and emulated backends run a
tenth of that, at least 10)."""
import json
import os
import subprocess
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz.cases import strategy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = int(os.environ.get("FUSEDNORM_FUZZ_SEED", "20261130"))
CASE_TIMEOUT_S = 300


class Worker:
    """One worker process for a backend, restarted after a crash or a timeout."""

    def __init__(self, backend, first_line=None):
        self.backend, self.first_line, self.proc = backend, first_line, None

    def _start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz", "worker.py"), self.backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        if self.first_line is not None:
            self.proc.stdin.write(self.first_line + "\n")
            self.proc.stdin.flush()
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"fuzz worker ({self.backend}) did not start: {self.proc.stderr.read()}")

    def run(self, case):
        """None if the case passed, else what went wrong."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # the worker answers every case it survives
        if not line:
            self.proc.wait(timeout=CASE_TIMEOUT_S)
            rc, err = self.proc.returncode, self.proc.stderr.read()
            self.proc = None
            return f"the worker process died (exit status {rc}) running this case: {err[-2000:]}"
        reply = json.loads(line)
        return None if reply["ok"] else reply["error"]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def make_worker(backend):
    """A Worker for `backend` ("cpu", "triton" or "emulation"): skips without triton; builds
    the emulation here (once, cached), so that a worker start only loads it."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    if backend == "emulation":
        from emulation import build_dir, load_emulation
        load_emulation()
        return Worker(backend, build_dir())
    return Worker(backend)


def examples(config, backend):
    n = config.getoption("--fuzz-examples")
    return n if backend == "cpu" else max(10, n // 10)


@pytest.fixture(scope="module")
def workers():
    pool = {}
    yield pool
    for w in pool.values():
        w.close()


def fuzz(backend, workers, request):
    if backend not in workers:
        workers[backend] = make_worker(backend)
    worker = workers[backend]

    @settings(max_examples=examples(request.config, backend), deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @hypothesis.seed(SEED)
    @given(case=strategy())
    def check(case):
        error = worker.run(case)
        assert error is None, f"{backend}: {json.dumps(case)}\n{error}"

    check()


def test_fuzz_cpu(workers, request):
    fuzz("cpu", workers, request)


@pytest.mark.slow
def test_fuzz_triton_interpreter(workers, request):
    fuzz("triton", workers, request)


@pytest.mark.slow
def test_fuzz_cuda_emulation(workers, request):
    fuzz("emulation", workers, request)
