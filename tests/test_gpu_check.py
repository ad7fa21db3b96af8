"""The plain-Python parts of bench/gpu_check.py: cases, byte counts, the report.

The timing itself needs CuPy and a GPU (it runs on the GPU machine); the byte
counts here are checked against the arrays each op actually reads and writes.
"""

import importlib.util
import pathlib
import sys

import ml_dtypes
import numpy as np
import pytest

import fastreg
from fastreg.cuda import _emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)

NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
             "float64": np.float64}


@pytest.mark.skipif(_emulator.compiler() is None, reason="no C++ compiler (g++ or $CXX) for "
                                                        "the CUDA host emulation")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_byte_counts_are_the_arrays_read_and_written(op, dtype):
    M, D = 6, 10
    dt = NP_DTYPES[dtype]
    x, dy = np.ones((M, D), dt), np.ones((M, D), dt)
    w, b = np.ones(D, dt), np.ones(D, dt)
    if op == "layer_norm":
        fwd = fastreg.layer_norm(x, w, b, backend="cuda_emulator")
        bwd = fastreg.layer_norm_backward(dy, x, fwd[1], fwd[2], w, b, backend="cuda_emulator")
        fwd_in, bwd_in = (x, w, b), (dy, x, fwd[1], fwd[2], w)
    else:
        fwd = fastreg.rms_norm(x, w, backend="cuda_emulator")
        bwd = fastreg.rms_norm_backward(dy, x, fwd[1], w, backend="cuda_emulator")
        fwd_in, bwd_in = (x, w), (dy, x, fwd[1], w)
    total = lambda arrays: sum(a.nbytes for a in arrays if a is not None)  # noqa: E731
    assert gpu_check.row_norm_bytes(op, "fwd", M, D, dtype) == total(fwd_in) + total(fwd)
    assert gpu_check.row_norm_bytes(op, "bwd", M, D, dtype) == total(bwd_in) + total(bwd)


@pytest.mark.skipif(_emulator.compiler() is None, reason="no C++ compiler (g++ or $CXX) for "
                                                        "the CUDA host emulation")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "instance_norm"])
def test_channel_norm_byte_counts_are_the_arrays_read_and_written(op, dtype):
    shape = (3, 8, 5, 4)
    dt, C = NP_DTYPES[dtype], shape[1]
    x, dy, w, b = np.ones(shape, dt), np.ones(shape, dt), np.ones(C, dt), np.ones(C, dt)
    total = lambda arrays: sum(a.nbytes for a in arrays if a is not None)  # noqa: E731
    be, written = "cuda_emulator", 0
    if op == "batch_norm":
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        fwd = fastreg.batch_norm(x, w, b, rm, rv, backend=be)
        fwd_in, written = (x, w, b, rm, rv), rm.nbytes + rv.nbytes  # updated in place
        bwd = fastreg.batch_norm_backward(dy, x, fwd[1], fwd[2], w, b, backend=be)
    elif op == "group_norm":
        fwd = fastreg.group_norm(x, 4, w, b, backend=be)
        fwd_in = (x, w, b)
        bwd = fastreg.group_norm_backward(dy, x, fwd[1], fwd[2], 4, w, b, backend=be)
    else:
        fwd = fastreg.instance_norm(x, w, b, backend=be)
        fwd_in = (x, w, b)
        bwd = fastreg.instance_norm_backward(dy, x, fwd[1], fwd[2], w, b, backend=be)
    bwd_in = (dy, x, fwd[1], fwd[2], w)
    groups = {"batch_norm": None, "group_norm": 4, "instance_norm": C}[op]
    assert gpu_check.channel_norm_bytes(op, "fwd", shape, dtype, groups=groups) == \
        total(fwd_in) + total(fwd) + written
    assert gpu_check.channel_norm_bytes(op, "bwd", shape, dtype, groups=groups) == \
        total(bwd_in) + total(bwd)


def test_cases_cover_every_op_direction_and_the_target_shapes():
    cases = gpu_check.select_cases()
    assert {c.op for c in cases} == set(gpu_check.OPS) >= {
        "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm", "sgd_step",
        "adamw_step"}
    assert {(4096, 8192), (8192, 4096), (32768, 1024), (256, 64, 56, 56),
            (32, 256, 56, 56)} <= {c.shape for c in cases}
    assert {c.layout for c in cases if c.op == "batch_norm"} == {"nchw", "nhwc"}
    targets = {c.name: gpu_check.target_of(c) for c in cases}
    assert targets["batch_norm_fwd nchw 256x64x56x56 float32"] == (None, 2.0)
    assert targets["group_norm_fwd nhwc 32x256x56x56 bfloat16"] == (2400, None)
    assert {c.direction for c in cases if c.op.endswith("_norm")} == {"fwd", "bwd"}
    for c in cases:  # well past the 50 MB L2 of an H100
        assert gpu_check.OPS[c.op].nbytes(c) > 100e6, c
    quick = gpu_check.select_cases("rms*", quick=True)
    assert quick and all(c.op == "rms_norm" for c in quick)


@pytest.mark.skipif(_emulator.compiler() is None, reason="no C++ compiler (g++ or $CXX) for "
                                                        "the CUDA host emulation")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_prox_byte_counts_are_the_arrays_read_and_written(dtype):
    T, n, dt = 3, 10, NP_DTYPES[dtype]
    ws, gs, bufs, ms, vs = ([np.ones(n, dt) for _ in range(T)] for _ in range(5))
    total = lambda *lists: sum(a.nbytes for lst in lists for a in lst)  # noqa: E731
    fastreg.sgd_step(ws, gs, lr=0.1, momentum=0.9, l1=0.1, momentum_buffer=bufs,
                     backend="cuda_emulator")
    assert gpu_check.prox_step_bytes("sgd_step", T, n, dtype) == \
        total(ws, gs, bufs) + total(ws, bufs)
    fastreg.adamw_step(ws, gs, ms, vs, step=1, lr=0.1, l1=0.1, backend="cuda_emulator")
    assert gpu_check.prox_step_bytes("adamw_step", T, n, dtype) == \
        total(ws, gs, ms, vs) + total(ws, ms, vs)
    z, t = np.ones((6, 10), dt), np.zeros(6, np.int64)
    loss, dz = fastreg.cross_entropy_label_smoothing(z, t, smoothing=0.1, backend="cuda_emulator")
    assert gpu_check.cross_entropy_bytes(6, 10, dtype) == z.nbytes + dz.nbytes


def test_prox_cases_are_the_issue_targets():
    cases = {(c.op, c.direction, c.shape, c.dtype) for c in gpu_check.select_cases()}
    assert {("sgd_step", "step", (1, 1 << 26), "float32"),
            ("adamw_step", "step", (1, 1 << 26), "float32"),
            ("cross_entropy", "fwd_bwd", (8192, 32000), "float32"),
            ("cross_entropy", "fwd_bwd", (8192, 32000), "bfloat16")} <= cases
    for op, direction, shape, dtype in cases:
        if op in ("sgd_step", "adamw_step", "cross_entropy"):
            assert gpu_check.TARGETS[(op, direction, dtype)] > 0
            case = gpu_check.Case(op, direction, shape, dtype)
            assert gpu_check.OPS[op].nbytes(case) > 100e6, case  # well past the 50 MB L2


@pytest.mark.skipif(_emulator.compiler() is None, reason="no C++ compiler (g++ or $CXX) for "
                                                        "the CUDA host emulation")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dropout_byte_counts_are_the_arrays_read_and_written(dtype):
    dt, be = NP_DTYPES[dtype], "cuda_emulator"
    x = np.ones(100, dt)
    y, m = fastreg.dropout(x, 0.1, rng=1, backend=be)
    assert gpu_check.dropout_bytes("dropout", (100,), dtype) == x.nbytes + y.nbytes + m.nbytes
    M, D = 6, 10
    x, r, w, b = np.ones((M, D), dt), np.ones((M, D), dt), np.ones(D, dt), np.ones(D, dt)
    outs = fastreg.dropout_add_layer_norm(x, r, w, b, 0.1, rng=1, backend=be)
    assert outs[4].nbytes == 0
    assert gpu_check.dropout_bytes("dropout_add_layer_norm", (M, D), dtype) == \
        sum(a.nbytes for a in (x, r, w, b, *outs[:4]))


def test_dropout_cases_are_the_issue_targets():
    cases = [c for c in gpu_check.select_cases("dropout*")]
    assert {(c.op, c.dtype) for c in cases} == {
        (op, dt) for op in ("dropout", "dropout_add_layer_norm") for dt in ("float32", "bfloat16")}
    by_name = {c.name: gpu_check.target_of(c) for c in cases}
    assert by_name["dropout_fwd 67108864 float32"] == (2700, None)
    assert by_name["dropout_add_layer_norm_fwd 32768x1024 bfloat16"] == (None, 2.5)
    for c in cases:
        assert gpu_check.OPS[c.op].nbytes(c) > 100e6, c   # well past the 50 MB L2
    md = gpu_check.format_markdown({"info": _result()["info"], "rows": [
        {"case": "dropout_fwd 67108864 float32", "op": "dropout", "bytes": 545e6,
         "target_gbs": 2700, "peers": {"fastreg": {"ms": 0.2, "gbs": 2725.0, "pct_copy": 90.0},
                                       "torch": {"ms": 0.3, "gbs": 1816.0, "pct_copy": 60.0}}}]})
    assert "fastreg 0.125 B, fastreg_seed 0 B, torch 1 B" in md


def test_device_slug():
    assert gpu_check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.device_slug("  ") == "unknown"


def _result():
    row = {"case": "layer_norm_fwd 32768x1024 float32", "bytes": 268_500_000,
           "target_gbs": 2850, "peers": {
               "fastreg": {"ms": 0.1, "gbs": 2685.0, "pct_copy": 89.5},
               "torch": {"ms": 0.12, "gbs": 2237.5, "pct_copy": 74.6},
               "liger": {"error": "RuntimeError: boom"}}}
    failed = {"case": "rms_norm_bwd 4096x8192 bfloat16", "bytes": 201_000_000,
              "target_gbs": 2200, "error": "ValueError: no", "peers": {}}
    info = {"device": "NVIDIA H100", "fastreg": "0.1.0", "cupy": "14.2.0", "cuda": 13000,
            "torch": "2.11", "copy": {"ceiling_gbs": 3000.0, "memcpy_gbs": 2900.0,
                                      "copy_kernel_gbs": 3000.0},
            "tests": {"summary": "300 passed"}}
    ratio = {"case": "batch_norm_fwd nchw 256x64x56x56 float32", "bytes": 411_000_000,
             "target_gbs": None, "target_vs_torch": 2.0, "peers": {
                 "fastreg": {"ms": 0.2, "gbs": 2055.0, "pct_copy": 68.5},
                 "torch": {"ms": 0.48, "gbs": 856.0, "pct_copy": 28.5}}}
    return {"info": info, "rows": [row, failed, ratio]}


def test_report_lists_speedups_and_errors():
    result = _result()
    assert gpu_check.speedups(result["rows"][0]) == pytest.approx({"torch": 1.2})
    md = gpu_check.format_markdown(result)
    assert "copy ceiling 3000 GB/s" in md and "300 passed" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| layer_norm_fwd"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[6].strip("|").split("|")]
    assert dict(zip(header, cells))["x torch"] == "1.20"
    assert dict(zip(header, cells))["liger ms"] == "-"
    assert dict(zip(header, cells))["GB/s"] == "2685"
    assert "ValueError: no" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| batch_norm_fwd"))
    cells = dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))
    assert cells["target"] == "x2 torch" and cells["x torch"] == "2.40"


def test_report_shows_the_torch_adapter_run():
    result = _result()
    result["info"]["torch_adapter"] = {
        "exit_code": 0, "summary": "250 passed in 60.0s", "example_exit_code": 0,
        "example": ["torch    test accuracy 0.99", "fastreg  test accuracy 0.99",
                    "step time torch / fastreg: 1.30"]}
    md = gpu_check.format_markdown(result)
    assert "PyTorch adapter tests: 250 passed" in md
    assert "fastreg.torch.convert on CUDA: torch    test accuracy 0.99 / " in md
    assert "step time torch / fastreg: 1.30" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| case |"))
    assert "fastreg ms" in header  # the table follows unchanged


def test_report_shows_the_syncbn_smoke_run():
    result = _result()
    result["info"]["syncbn_smoke"] = {"exit_code": 0, "lines": ["ok CupyNcclComm allgather",
                                                                "ok TorchComm allreduce"]}
    md = gpu_check.format_markdown(result)
    assert ("1-rank NCCL smoke run (exit 0): ok CupyNcclComm allgather / ok TorchComm "
            "allreduce") in md


def test_command_line_help_needs_no_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
