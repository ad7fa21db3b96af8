"""Layer and RMS norm on the CUDA kernels, against the NumPy reference.

The kernels run on a GPU (backend "cuda", CuPy arrays) when CuPy and a
device are present, and always under the host emulation (backend
"cuda_emulator", NumPy arrays), so CI runs every kernel path: the warp- and
block-per-row register paths, the loop paths for long rows, 16-byte and
scalar loads, the multi-block dweight/dbias partials and their second pass.

Tolerances: float32 and float64 as the CPU tests (tests/_assert.py).
float16/bfloat16 follow flash-attention's rule: the error of the kernel
against the float64 reference may be at most twice that of a low-precision
reference (the exact result stored in the dtype: what a float32 computation
rounded to float16/bfloat16, as PyTorch's, achieves) plus a small atol. The
float32 statistics of low-precision inputs are held to float32 tolerances.
"""

import ml_dtypes
import numpy as np
import pytest

from _assert import assert_bitwise, assert_close, tol
from cases import LAYER_NORM, RMS_NORM, ROW_CASES

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
LOW = (np.dtype(np.float16), BF16)
ATOL_LOW = {np.dtype(np.float16): 1e-3, BF16: 1e-2}


def _gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device
        return False


GPU = _gpu()
EMULATOR = __import__("fastreg.cuda._emulator").cuda._emulator.compiler() is not None
needs_emulator = pytest.mark.skipif(not EMULATOR, reason="no C++ compiler (g++ or $CXX) for "
                                                         "the CUDA host emulation")
TARGETS = [pytest.param("cuda_emulator", marks=needs_emulator)] + (["cuda"] if GPU else [])

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


def _xp(target):
    if target == "cuda":
        import cupy
        return cupy
    return np


def _to(target, a):
    if a is None or not isinstance(a, np.ndarray):
        return a
    return _xp(target).asarray(a) if target == "cuda" else a


def _host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.get()


def _cast(d, dtype):
    """The inputs of case d with the floating arrays of x's dtype cast to ``dtype``."""
    xdt = d["x"].dtype
    return {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype == xdt else v)
            for k, v in d.items()}


def _poisoned(target, like):
    out = _xp(target).empty(like.shape, dtype=like.dtype)
    out[...] = np.nan
    return out


def _run(target, fn, d, *extra):
    """fn on the target, with fresh outputs and with poisoned out= buffers."""
    dd = {k: _to(target, v) for k, v in d.items()}
    ex = [tuple(_to(target, e) for e in x) if isinstance(x, tuple) else _to(target, x)
          for x in extra]
    fresh = fn(dd, *ex, target)
    out = tuple(None if f is None else _poisoned(target, f) for f in fresh)
    got = fn(dd, *ex, target, out)
    for g, o in zip(got, out):
        assert g is o, "the kernel must return the out= arrays it was given"
    return [_host(g) for g in got], [_host(f) for f in fresh]


def _check(name, got, ref64, ref_low, dtype, kind, case):
    if got is None or ref64 is None:
        assert got is None and ref64 is None, f"{case}: {name} presence"
        return
    scale = max(1.0, float(np.max(np.abs(ref64), initial=0.0))) if kind == "grad" else 1.0
    if ref_low is not None and np.dtype(got.dtype) in LOW:
        assert got.dtype == dtype, f"{case}: {name} dtype {got.dtype}"
        g, r = got.astype(np.float64), ref64.astype(np.float64)
        bound = 2 * np.max(np.abs(ref_low.astype(np.float64) - r), initial=0.0) + \
            ATOL_LOW[np.dtype(dtype)] * scale
        err = np.abs(g - r)
        if not (err <= bound).all():
            i = np.unravel_index(np.argmax(err), err.shape)
            raise AssertionError(f"{case}: {name} max |kernel - ref64| = {err[i]:.3g} at {i} "
                                 f"(got {g[i]!r}, expected {r[i]!r}) exceeds 2 * low-precision "
                                 f"error + atol = {bound:.3g}")
        return
    rtol, atol = tol(np.float64 if got.dtype == np.float64 else np.float32, kind)
    assert_close(got, ref64.astype(got.dtype), rtol=rtol, atol=atol * scale, case=f"{case} {name}")


def _references(op, d, dtype, direction, saved=None, dy=None):
    """The float64 reference, and the low-precision one: the reference on float32
    copies of the inputs with its outputs stored in ``dtype``."""
    outs = []
    for rd in (np.float64, np.float32):
        dd = _cast(d, rd)
        if direction == "fwd":
            outs.append(op.forward(dd, "reference"))
        else:
            outs.append(op.backward(dd, tuple(a.astype(rd) for a in saved), dy.astype(rd),
                                    "reference"))
    ref64, ref32 = outs
    return ref64, tuple(None if a is None else a.astype(dtype) for a in ref32)


def _snapshot(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


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


@pytest.mark.parametrize("fn,args", [
    ("batch_norm", lambda x: (x,)),
    ("batch_norm_backward", lambda x: (x, x, x[0, :, 0, 0], x[0, :, 0, 0])),
    ("group_norm", lambda x: (x, 2)),
    ("group_norm_backward", lambda x: (x, x, x[:, :2, 0, 0], x[:, :2, 0, 0], 2)),
    ("instance_norm", lambda x: (x,)),
    ("instance_norm_backward", lambda x: (x, x, x[:, :, 0, 0], x[:, :, 0, 0])),
])
def test_ops_without_kernels_refuse_the_cuda_backends_by_name(fn, args):
    import fastreg
    x = np.ones((2, 4, 3, 3), np.float32)
    msg = f"{fn}: the 'cuda_emulator' backend does not implement {fn}"
    with pytest.raises(RuntimeError, match=msg):
        getattr(fastreg, fn)(*args(x), backend="cuda_emulator")


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
