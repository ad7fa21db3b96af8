"""``python -m fastreg bench`` end to end (quick mode), and its verdict on broken kernels."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fastreg import _bench, _bench_norm

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A runner that breaks the CPU layer norm forward, then runs the bench's main.
BROKEN = """
import sys
import numpy as np
import fastreg.cpu.norm as cpu
original = cpu.layer_norm
def offset(x, weight, bias, eps, normalized_ndim, out):
    original(x, weight, bias, eps, normalized_ndim, out)
    out[0][...] += 1e-2                      # wrong values
def ignores_out(x, weight, bias, eps, normalized_ndim, out):
    original(x, weight, bias, eps, normalized_ndim, [np.empty_like(o) for o in out])
cpu.layer_norm = {"offset": offset, "ignores_out": ignores_out}[sys.argv[1]]
from fastreg._bench import bench
sys.exit(bench(sys.argv[2:]))
"""


def _run(args, out_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, *args, "--quick", "--repeat", "1", "--ops",
                           "layer_norm", "--out", str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_bench_quick_runs_and_writes_results(tmp_path):
    proc = _run(["-m", "fastreg", "bench"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "copy", "first_call_s", "repeat", "quick", "rows"} <= result.keys()
    assert result["quick"] is True and result["repeat"] == 1
    assert result["copy"]["ceiling_gbs"] > 0 and result["copy"]["bytes_moved"] >= 64 << 20
    assert result["machine"]["numba_threads"] >= 1
    assert set(result["first_call_s"]) == {"layer_norm"}
    rows = result["rows"]
    assert [r["direction"] for r in rows] == ["fwd", "bwd", "fwd+bwd"] * 2
    assert {r["op"] for r in rows} == {"layer_norm"}
    for r in rows:
        assert r["bytes"] > 0
        assert {"fastreg", "fastreg fresh", "numpy"} <= r["ms"].keys()
        for variant in ("fastreg", "fastreg fresh"):
            v = r[variant]
            assert v["ms"] > 0 and v["GB/s"] > 0 and v["% copy"] > 0 and v["x numpy"] > 0
            # the copy timed in the same rounds moves the case's bytes
            beside = r["bytes"] / r["ms"]["copy (same bytes)"] / 1e6
            assert v["% copy beside"] == pytest.approx(100 * v["GB/s"] / beside)
        assert r["copy beside"]["GB/s"] == pytest.approx(beside)
        assert r["floor bytes"] == r["bytes"]          # layer norm: each row read once
        if "torch" in r["ms"]:
            assert r["x torch at floor"] == pytest.approx(r["ms"]["torch"]
                                                          / r["ms"]["copy (same bytes)"])
        else:
            assert r["x torch at floor"] is None
    verified = [r for r in rows if "verify" in r]
    assert len(verified) == 4                 # fwd and bwd of both shapes
    assert all(r["ok"] and r["verify"]["err/tol"] <= 1 for r in verified)
    assert "layer_norm_fwd|512x1024|float32" in proc.stdout       # the printed table
    assert "copy ceiling" in proc.stdout
    # the torch line says how torch's allocator ran, or that torch is missing
    torch_line = next(line for line in proc.stdout.splitlines() if line.startswith("torch "))
    assert "THP_MEM_ALLOC_ENABLE=" in torch_line or torch_line == "torch not installed"
    md = (tmp_path / "cpu-norm.md").read_text()
    assert "| case |" in md and "layer_norm_bwd 256x4096 float32" in md
    png = (tmp_path / "bandwidth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("args,message", [
    (["--backend", "cuda"], "'cuda' backend is not available"),
    (["--dtype", "float16"], "--dtype must list some of float32, float64"),
    (["--ops", "no_such_op"], "no op matches"),
])
def test_bench_rejects_what_it_cannot_run(args, message, capsys):
    assert _bench.bench(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_float64_and_labels_rows_by_dtype(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "fastreg", "bench", "--quick", "--repeat", "1",
                           "--ops", "rms_norm", "--dtype", "float64", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and {r["dtype"] for r in rows} == {"float64"}
    assert {r["backend"] for r in rows} == {"cpu"}
    assert all(r["ok"] for r in rows if "verify" in r)


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["offset", "ignores_out"])
def test_bench_reports_a_broken_kernel_and_fails(tmp_path, breakage):
    proc = _run(["-c", BROKEN, breakage], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VERIFICATION FAILED: layer_norm_fwd|" in proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    failed = {r["case"] for r in rows if r.get("ok") is False}
    forward = {"layer_norm_fwd|512x1024|float32", "layer_norm_fwd|256x4096|float32"}
    if breakage == "offset":
        # only the forward is wrong: the backward (its own kernel, correct statistics) passes
        assert failed == forward
    else:
        # the statistics the backward is timed with are garbage too: it may fail as well
        assert forward <= failed
    assert "FAIL" in proc.stdout


def test_compare_scales_by_tolerance_and_flags_nan_and_shape():
    ref = (np.array([1.0, -2.0, 100.0]),)
    ok = _bench.compare({"out=": (ref[0] + 1e-6,)}, ref, ("y",), 1e-5, 1e-5)
    assert ok["ok"] and 0 < ok["err/tol"] < 1 and ok["max_abs_err"] == pytest.approx(1e-6)
    bad = _bench.compare({"out=": (ref[0] + [0, 0, 1e-2],)}, ref, ("y",), 1e-5, 1e-5)
    assert not bad["ok"] and bad["worst"] == "y (out=)"
    nan = _bench.compare({"fresh": (np.array([1.0, np.nan, 100.0]),)}, ref, ("y",), 1, 1)
    assert not nan["ok"] and nan["err/tol"] == np.inf
    shape = _bench.compare({"fresh": (ref[0][:2],)}, ref, ("y",), 1, 1)
    assert not shape["ok"]


def test_case_table_counts_minimal_bytes():
    spec = _bench_norm.Spec("batch_norm", (4, 5, 6, 3), "NHWC")
    assert spec.axis == -1 and spec.params == 3
    cases = _bench.build(spec)
    x = 4 * 5 * 6 * 3 * 4
    # fwd: read x, w, b, running mean/var; write y, mean, rstd, running mean/var
    assert cases["fwd"].nbytes == 2 * x + 2 * 3 * 4 + 4 * 3 * 4 + 2 * 3 * 4
    # bwd: read dy, x, mean, rstd, w; write dx, dw, db
    assert cases["bwd"].nbytes == 3 * x + 3 * 3 * 4 + 2 * 3 * 4
    assert cases["fwd+bwd"].nbytes == cases["fwd"].nbytes + cases["bwd"].nbytes
    # statistics over rows: x read twice forward, dy and x twice backward
    assert cases["fwd"].floor_bytes == cases["fwd"].nbytes + x
    assert cases["bwd"].floor_bytes == cases["bwd"].nbytes + 2 * x
    assert cases["fwd+bwd"].floor_bytes == cases["fwd"].floor_bytes + cases["bwd"].floor_bytes
    nchw = _bench.build(_bench_norm.Spec("batch_norm", (4, 3, 6, 5), "NCHW"))
    assert nchw["fwd"].floor_bytes == nchw["fwd"].nbytes       # a channel at a time, cached
    assert nchw["bwd"].floor_bytes == nchw["bwd"].nbytes
    assert cases["fwd"].verify()["ok"] and cases["bwd"].verify()["ok"]
    assert [s.op for s in _bench.select_specs("layer_norm,rms_*")] == ["layer_norm"] * 2 + \
        ["rms_norm"] * 2
    quick = [s for s in _bench.select_specs(quick=True) if _bench.family_of(s) is _bench_norm]
    assert len(quick) == len(_bench_norm.SPECS)
    assert all(q.shape[1:] == s.shape[1:] and q.shape[0] < s.shape[0]
               for q, s in zip(quick, _bench_norm.SPECS))
    assert _bench.family_of(spec) is _bench_norm and cases["fwd"].spec is spec


def test_time_peers_warms_fast_peers_before_each_sample():
    """A peer faster than warm_s runs untimed for warm_s before each timed sample;
    a slower one does not (its own call is long enough to wake the cores)."""
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        end = _bench.time.perf_counter() + 0.012
        while _bench.time.perf_counter() < end:
            pass

    t = _bench.time_peers({"fast": fast, "slow": slow}, 3, warm_s=0.01)
    assert t["fast"]["samples"] == t["slow"]["samples"] == 3
    assert calls["slow"] == 1 + 3                      # the warm-up call, then one per sample
    # each warm spell of the fast peer spans 10 ms of calls
    assert calls["fast"] > 3 * t["fast"]["number"] + 100
    calls["fast"] = 0
    t = _bench.time_peers({"fast": fast}, 3, warm_s=0.0)
    n = t["fast"]["number"]
    assert n > 1 and calls["fast"] == 2 + 3 * (1 + n)   # no spells without warm_s


def test_norm_summary_lists_cases_below_the_torch_target_with_their_floor():
    def row(direction, x_torch, floor, nbytes=300):
        return {"op": "batch_norm", "shape": [64, 56, 56, 64], "layout": "NHWC",
                "direction": direction, "ms": {}, "bytes": nbytes, "floor bytes": floor,
                "x torch at floor": 1.18, "fastreg": {"x torch": x_torch, "x numpy": 40.0}}
    lines = _bench_norm.summary([row("fwd", 1.6, 450), row("bwd", 1.17, 500),
                                 row("fwd+bwd", 1.3, 950)])
    assert lines[0].startswith("fwd+bwd, fastreg out= vs NumPy reference") and "40.0x" in lines[0]
    below = lines[1]
    assert "batch_norm 64x56x56x64 NHWC bwd 1.17x (at most 1.18x, floor 1.67x the minimal" in below
    assert " fwd 1.6" not in below and "fwd+bwd 1.30x" not in below    # met, or not a target


def test_spread_table_gives_each_run_and_the_range(tmp_path):
    """bench/spread.py: one column per run, the lowest and highest ratio over the runs."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("spread", ROOT / "bench" / "spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)

    def run(out, fresh, at_most):
        row = {"family": "norm", "op": "layer_norm", "shape": [8, 4], "layout": "rows",
               "direction": "fwd", "dtype": "float32", "backend": "cpu",
               "ms": {"torch": 1.0}, "fastreg": {"x torch": out},
               "fastreg fresh": {"x torch": fresh}, "x torch at floor": at_most}
        other = dict(row, backend="reference")             # not a CPU row: left out
        return {"rows": [row, other]}

    paths = []
    for i, r in enumerate([run(1.6, 0.9, 2.0), run(1.4, 1.1, 1.8)]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        paths.append(str(d))
    out = tmp_path / "spread.md"
    assert spread.main(paths + ["--out", str(out)]) == 0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("| layer_norm")]
    assert lines == ["| layer_norm 8x4 rows | fwd | 1.60 / 0.90 (at most 2.00) | "
                     "1.40 / 1.10 (at most 1.80) | 1.40-1.60 | 0.90-1.10 |"]
