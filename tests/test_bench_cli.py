"""The bench command end to end (quick mode), and its verdict on a broken kernel."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

BROKEN = """
import sys
import fastreg.cpu.norm as cpu
original = cpu.layer_norm
def broken(x, weight, bias, eps, normalized_ndim, out):
    original(x, weight, bias, eps, normalized_ndim, out)
    out[0][...] += 1e-2          # a wrong answer the bench must notice
cpu.layer_norm = broken
from fastreg._bench import bench
sys.exit(bench(sys.argv[1:]))
"""


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args, "--quick", "--repeat", "1", "--ops",
                           "layer_norm", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_bench_quick_runs_and_writes_results(tmp_path):
    proc = _run(["-m", "fastreg", "bench"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "copy", "first_call_s", "rows"} <= result.keys()
    assert result["copy"]["ceiling_gbs"] > 0
    rows = result["rows"]
    assert {r["direction"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    verified = [r for r in rows if "ok" in r]
    assert verified and all(r["ok"] for r in verified)
    for r in rows:
        assert r["fastreg ms"] > 0 and r["GB/s"] > 0 and r["bytes"] > 0
    assert "layer_norm_fwd" in (tmp_path / "cpu-norm.md").read_text()


@pytest.mark.slow
def test_bench_reports_a_broken_kernel_and_fails(tmp_path):
    proc = _run(["-c", BROKEN], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VERIFICATION FAILED: layer_norm_fwd" in proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert any(r.get("ok") is False for r in rows)
