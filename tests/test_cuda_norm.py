"""Layer and RMS norm on the CUDA kernels, against the NumPy reference.

The kernels run on a GPU (backend "cuda", CuPy arrays) when CuPy and a
device are present, and always under the host emulation (backend
"cuda_emulator", NumPy arrays), so CI runs every kernel path: the warp- and
block-per-row register paths, the loop paths for long rows, 16-byte and
scalar loads, the multi-block dweight/dbias partials and their second pass.

Tolerances: per dtype, flash-attention's rule for float16/bfloat16
(tests/_cuda_targets.py).
"""

import ml_dtypes
import numpy as np
import pytest

from _assert import assert_bitwise, assert_close
from _cuda_targets import (BF16, DTYPES, GPU, TARGETS, _check, _host, _references, _run,
                           _snapshot, _to, _xp, needs_emulator)
from cases import LAYER_NORM, RMS_NORM, ROW_CASES

pytestmark = pytest.mark.gpu

CASES = ROW_CASES + [
    ((5, 1), {}),                          # D = 1
    ((9, 7), {}),                          # odd D: scalar loads
    ((4, 2050), {}),                       # even D, not a multiple of 4 or 8
    ((33, 1000), {}),                      # warp rows (16-bit) and block rows (fp32)
    ((3, 12288), {}),                      # fp32 forward at R = 1024; backward loop path
    ((2, 65536), {}),                      # loop paths, every dtype
    ((2600, 8), {}),                       # backward: blocks walk several row groups
    ((2, 3, 40), {"normalized_ndim": 2}),
    ((6, 1024), {"layout": "strided"}),    # non-contiguous input, 16-byte path after the copy
    ((4, 40), {"affine": False}),
]
OPS = [LAYER_NORM, RMS_NORM]
IDS = [f"{op.name}-{'x'.join(map(str, s))}-{','.join(f'{k}={v}' for k, v in v_.items())}"
       for op in OPS for s, v_ in CASES]
PARAMS = [(op, s, v) for op in OPS for s, v in CASES]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", PARAMS, ids=IDS)
def test_forward_matches_reference(op, shape, variant, dtype, target, rng):
    d = op.make(rng, shape, dtype, variant)
    before = _snapshot(d)
    got, fresh = _run(target, lambda dd, t, out=None: op.forward(dd, t, out), d)
    ref64, low = _references(op, d, dtype, "fwd")
    case = f"{op.name} fwd {np.dtype(dtype).name} {shape} {variant} on {target}"
    names = ("y", "mean", "rstd") if op is LAYER_NORM else ("y", "rstd")
    for name, g, f, r, lo in zip(names, got, fresh, ref64, low):
        if name != "y":  # statistics: float32 (float64 for float64 x), float32 tolerances
            sd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
            assert g.dtype == f.dtype == sd, f"{case}: {name} dtype {g.dtype}"
            lo = None
        _check(f"{name} (out=)", g, r, lo, dtype, "out", case)
        _check(f"{name} (fresh)", f, r, lo, dtype, "out", case)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input {k} modified"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", PARAMS, ids=IDS)
def test_backward_matches_reference(op, shape, variant, dtype, target, rng):
    d = op.make(rng, shape, dtype, variant)
    saved = [_host(a) for a in op.forward({k: _to(target, v) for k, v in d.items()}, target)]
    dy = np.empty_like(d["x"])
    dy[...] = rng.standard_normal(d["x"].shape)
    before = _snapshot(d)
    saved_before = [s.copy() for s in saved]
    got, fresh = _run(target, lambda dd, s, g, t, out=None: op.backward(dd, s, g, t, out), d,
                      tuple(saved), dy)
    ref64, low = _references(op, d, dtype, "bwd", saved, dy)
    case = f"{op.name} bwd {np.dtype(dtype).name} {shape} {variant} on {target}"
    for name, g, f, r, lo in zip(("dx", "dweight", "dbias"), got, fresh, ref64, low):
        _check(f"{name} (out=)", g, r, lo, dtype, "grad", case)
        _check(f"{name} (fresh)", f, r, lo, dtype, "grad", case)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input {k} modified"
    for s0, s1 in zip(saved_before, saved):
        assert np.array_equal(s0, s1, equal_nan=True), f"{case}: saved statistics modified"


# --------------------------------------------------------------------------- properties

def _all_outputs(target, x, w, b, dy):
    import fastreg
    xs, ws, bs, dys = (_to(target, a) for a in (x, w, b, dy))
    y, m, r = fastreg.layer_norm(xs, ws, bs, backend=target)
    g = fastreg.layer_norm_backward(dys, xs, m, r, ws, bs, backend=target)
    y2, r2 = fastreg.rms_norm(xs, ws, backend=target)
    g2 = fastreg.rms_norm_backward(dys, xs, r2, ws, backend=target)
    return [_host(a) for a in (y, m, r, *g, y2, r2, *g2)]


# register path with several row groups per block and many blocks, register path with
# one row per block, and the loop paths
DETERMINISM_SHAPES = [(2600, 24), (40, 1000), (3, 20000)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", DETERMINISM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_results_are_bitwise_identical_run_to_run(shape, target, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    w, b = (rng.standard_normal(shape[1:]).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(shape).astype(np.float32)
    first = _all_outputs(target, x, w, b, dy)
    for _ in range(2):
        for i, (a, c) in enumerate(zip(first, _all_outputs(target, x, w, b, dy))):
            assert_bitwise(c, a, case=f"{shape} output {i} on {target}")


@needs_emulator
def test_emulated_results_do_not_depend_on_the_scheduler(rng):
    """Real threads and fibers interleave the block's threads differently; the
    reductions' order is fixed by the code, so the bits must agree."""
    from fastreg.cuda import _emulator
    shape = (300, 72)
    x = rng.standard_normal(shape).astype(np.float32)
    w, b = rng.standard_normal(72).astype(np.float32), rng.standard_normal(72).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    fibers = _all_outputs("cuda_emulator", x, w, b, dy)
    _emulator.set_mode("threads")
    try:
        threads = _all_outputs("cuda_emulator", x, w, b, dy)
    finally:
        _emulator.set_mode("fibers")
    for i, (a, c) in enumerate(zip(fibers, threads)):
        assert_bitwise(c, a, case=f"output {i}: threads vs fibers")


@pytest.mark.parametrize("target", TARGETS)
def test_misaligned_buffers_take_the_scalar_path(target, rng):
    """An out= view starting 4 bytes into its buffer cannot take 16-byte stores;
    the scalar body must give the same answer within tolerance."""
    import fastreg
    xp = _xp(target)
    M, D = 10, 256
    x = rng.standard_normal((M, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    y_ref, m_ref, r_ref = fastreg.layer_norm(x, w, None, backend="reference")
    buf = xp.full(M * D + 1, np.nan, np.float32)
    y = buf[1:].reshape(M, D)
    assert y.flags.c_contiguous
    fastreg.layer_norm(_to(target, x), _to(target, w), None, backend=target, out=(y, None, None))
    assert_close(_host(y), y_ref, rtol=2e-5, atol=2e-5, case="misaligned y")
    dy = rng.standard_normal((M, D)).astype(np.float32)
    dx = xp.full(M * D + 1, np.nan, np.float32)[1:].reshape(M, D)
    ref = fastreg.layer_norm_backward(dy, x, m_ref, r_ref, w, backend="reference")
    fastreg.layer_norm_backward(_to(target, dy), _to(target, x), _to(target, m_ref),
                                _to(target, r_ref), _to(target, w), backend=target,
                                out=(dx, None, None))
    assert_close(_host(dx), ref[0], rtol=1e-4, atol=1e-4, case="misaligned dx")


def test_an_op_listed_unsupported_is_refused_by_name(monkeypatch):
    """A family module may list ops it does not run (UNSUPPORTED): the dispatcher
    then raises naming the op rather than falling back to another backend."""
    import fastreg
    from fastreg.cuda import norm as cuda_norm
    assert not cuda_norm.UNSUPPORTED, "every norm op has CUDA kernels"
    monkeypatch.setattr(cuda_norm, "UNSUPPORTED", frozenset({"group_norm"}))
    x = np.ones((2, 4, 3, 3), np.float32)
    msg = "group_norm: the 'cuda_emulator' backend does not implement group_norm"
    with pytest.raises(RuntimeError, match=msg):
        fastreg.group_norm(x, 2, backend="cuda_emulator")


@needs_emulator
def test_low_precision_is_for_the_cuda_backends_only():
    import fastreg
    x = np.ones((2, 8), ml_dtypes.bfloat16)
    msg = r"layer_norm: 'x' must be a floating array \(float32, float64\)"
    with pytest.raises(TypeError, match=msg):
        fastreg.layer_norm(x)
    y, mean, rstd = fastreg.layer_norm(x, backend="cuda_emulator")
    assert y.dtype == BF16 and mean.dtype == rstd.dtype == np.float32


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op_name", ["layer_norm", "rms_norm"])
def test_float32_rows_with_large_offsets_and_denormals(op_name, target, rng):
    """Mean 1e4 and std 1 (the centred two-pass keeps every digit), and rows of
    float32 denormals (the GPU flushes them under CuPy's -ftz=true; the results
    differ from the reference by far less than the tolerance either way)."""
    import fastreg
    fn = getattr(fastreg, op_name)
    x = (rng.standard_normal((64, 1024)) + 1e4).astype(np.float32)
    tiny = (rng.standard_normal((8, 1000)) * 1e-39).astype(np.float32)
    assert (np.abs(tiny) < np.finfo(np.float32).tiny).mean() > 0.9
    for data, atol in ((x, 1e-3), (tiny, 2e-5)):
        got = fn(_to(target, data), backend=target)
        ref = fn(data.astype(np.float64), backend="reference")
        for g, r in zip(got, ref):
            err = np.max(np.abs(_host(g).astype(np.float64) - r))
            assert err < atol * max(1.0, np.max(np.abs(r))), f"{op_name} on {target}: {err}"


# --------------------------------------------------------------------------- real hardware

needs_gpu = pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_matches_torch_on_the_same_device(dtype, rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupy
    import fastreg
    tdt = getattr(torch, dtype)
    xt = torch.randn(257, 1000, device="cuda", dtype=tdt)
    wt, bt = (torch.randn(1000, device="cuda", dtype=tdt) for _ in range(2))
    x, w, b = (cupy.from_dlpack(t) for t in (xt, wt, bt))
    y, _, _ = fastreg.layer_norm(x, w, b)
    yt = torch.nn.functional.layer_norm(xt, (1000,), wt, bt, eps=1e-5)
    atol = {"float32": 1e-5, "bfloat16": 6e-2, "float16": 8e-3}[dtype]
    assert (torch.from_dlpack(y).float() - yt.float()).abs().max().item() <= atol
    y, _ = fastreg.rms_norm(x, w, eps=1e-6)
    yt = torch.nn.functional.rms_norm(xt, (1000,), wt, eps=1e-6)
    assert (torch.from_dlpack(y).float() - yt.float()).abs().max().item() <= atol


@needs_gpu
def test_kernels_run_on_the_current_stream(rng):
    import cupy
    import fastreg
    x = cupy.asarray(rng.standard_normal((512, 768)).astype(np.float32))
    ref = fastreg.layer_norm(x.get(), backend="reference")[0]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = fastreg.layer_norm(x)[0]
    stream.synchronize()
    assert_close(y.get(), ref, rtol=2e-5, atol=2e-5, case="layer_norm on a side stream")


@needs_gpu
@pytest.mark.slow
def test_a_second_process_compiles_nothing(tmp_path):
    """CuPy's disk cache serves the second process: no new cubin appears."""
    import os
    import subprocess
    import sys
    code = ("import cupy, numpy as np, fastreg\n"
            "x = cupy.ones((64, 1000), np.float32)\n"
            "y, m, r = fastreg.layer_norm(x, x[0], x[0])\n"
            "fastreg.layer_norm_backward(x, x, m, r, x[0], x[0])\n"
            "cupy.cuda.runtime.deviceSynchronize()\n")
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cupy"))
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    files = sorted(p.name for p in (tmp_path / "cupy").rglob("*") if p.is_file())
    assert files, "the first process cached nothing"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    assert sorted(p.name for p in (tmp_path / "cupy").rglob("*") if p.is_file()) == files
