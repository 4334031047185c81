"""The benchmark script runs and writes its outputs (structure only: speed is the
benchmark's business, not a unit test's)."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_writes_table_json_and_csv(tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--filter", "LayerNorm+relu",
           "--no-compile", "--min-run-time", "0.02", "--json", str(out_json), "--csv", str(out_csv)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "| LayerNorm+relu 8192x1024" in res.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert rows and all(r["fusednorm_s"] > 0 and r["eager_s"] > 0 for r in rows)
    assert all(abs(r["speedup_vs_eager"] - r["eager_s"] / r["fusednorm_s"]) < 1e-9 for r in rows)
    # the memory floor is timed beside them; same allocator on both sides by default
    assert all(r["floor_s"] > 0 and abs(r["floor_ratio"] - r["fusednorm_s"] / r["floor_s"]) < 1e-9 for r in rows)
    assert "steady malloc" in res.stdout and "output cache off" in res.stdout
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
