"""The split batch-norm steps on the CUDA kernels, so that sync_batch_norm runs on CuPy arrays.

- Each step (stats, combine, apply, backward reduce, backward apply) against
  the reference on every dtype: float64 partials and sums for every input
  dtype (float16/bfloat16 inputs are compared with the reference of their
  exact values in float64), outputs poisoned with NaN and fresh, inputs
  unchanged.
- The steps on uneven slices of a batch (one empty) give the CUDA
  batch_norm of the whole batch.
- sync_batch_norm with ranks as threads, every rank on the CUDA backend
  (under the emulation here), equals batch_norm on the whole batch
  (tests/_sync_bn_cases.py's checks: outputs, statistics, running
  statistics, gradients, bitwise-equal statistics on every rank, 5 float64
  per channel on the wire).
"""

import sys

import numpy as np
import pytest

import fastreg
from _assert import assert_close, tol
from _cuda_targets import (DTYPES, GPU, TARGETS, _check, _host, _poisoned, _snapshot, _to,
                           needs_emulator)
from cases import BATCH_NORM

pytestmark = pytest.mark.gpu

CASES = [
    ((16, 7), {}),
    ((4, 5, 6, 7), {}),                              # chunks, scalar units
    ((4, 6, 7, 8), {"axis": -1}),                    # rows, 16-byte columns
    ((37, 3), {"axis": -1, "activation": "relu"}),
    ((4, 5, 6, 7), {"layout": "channels_last"}),
    ((8, 3, 9), {"layout": "strided"}),
    ((5, 4, 3, 3), {"activation": "relu", "affine": False}),
    ((3, 4, 2, 2), {}),                              # rows, 4 columns a channel
    ((0, 5), {}),
    ((16, 3, 32, 32), {}),                           # several blocks per channel
    ((2048, 8), {"activation": "relu"}),             # several row splits
]
IDS = ["x".join(map(str, s)) + "-" + ",".join(f"{k}={v}" for k, v in v_.items())
       for s, v_ in CASES]


def _exact(d):
    """The case's x, weight and bias in float64: the reference of the exact input values."""
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and k not in
                ("running_mean", "running_var") else v) for k, v in d.items()}


def _both_ways(target, fn, n_out):
    """fn(backend, out) on the target: fresh, then into poisoned outputs."""
    fresh = fn(target, None)
    fresh = fresh if isinstance(fresh, tuple) else (fresh,)
    out = tuple(_poisoned(target, f) for f in fresh)
    got = fn(target, out if n_out > 1 else out[0])
    got = got if isinstance(got, tuple) else (got,)
    for g, o in zip(got, out):
        assert g is o, "the kernel must return the out= arrays it was given"
    return [_host(g) for g in got], [_host(f) for f in fresh]


def _stats64(d):
    x = d["x"].astype(np.float64)
    n, mean, m2 = fastreg.batch_norm_stats(x, axis=d.get("axis", 1), backend="reference")
    count, mean, var = fastreg.batch_norm_combine(n[None], mean[None], m2[None],
                                                  backend="reference")
    return int(count[0]) if count.size else 0, mean, var, 1.0 / np.sqrt(var + 1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", CASES, ids=IDS)
def test_split_steps_match_reference(shape, variant, dtype, target, rng):
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    ex = _exact(d)
    ax, act = d.get("axis", 1), d.get("activation")
    before = _snapshot(d)
    case = f"{np.dtype(dtype).name} {shape} {variant} on {target}"
    x = _to(target, d["x"])

    # statistics: float64 partials of the exact values
    got, fresh = _both_ways(target, lambda be, out: fastreg.batch_norm_stats(
        x, axis=ax, backend=be, out=out), 3)
    ref = fastreg.batch_norm_stats(ex["x"], axis=ax, backend="reference")
    for name, g, f, r in zip(("count", "mean", "m2"), got, fresh, ref):
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        for label, a in (("out=", g), ("fresh", f)):
            assert a.dtype == np.float64, f"{case} {name} dtype {a.dtype}"
            assert_close(a, r, rtol=1e-11, atol=1e-11 * scale, case=f"{case} stats {name} ({label})")

    # apply with the batch's statistics, running statistics updated
    count, mean, var, rstd = _stats64(d)
    if count == 1:
        count = 0  # no unbiased variance: 0 means "leave the running statistics"
    states = {}

    def apply(be, out, dd, xx):
        rm, rv = (_to(target, dd[k].copy()) if be == target else dd[k].copy()
                  for k in ("running_mean", "running_var"))
        res = fastreg.batch_norm_apply(xx, *(_to(target, a) if be == target else a
                                             for a in (mean, var, dd["weight"], dd["bias"])),
                                       rm, rv, count=count, momentum=0.3, axis=ax,
                                       activation=act, backend=be, out=out)
        states[be] = (_host(rm), _host(rv))
        return res

    got, fresh = _both_ways(target, lambda be, out: apply(be, out, d, x), 2)
    ref64 = apply("reference", None, ex, ex["x"])
    low = None
    if np.dtype(dtype).itemsize == 2:
        d32 = {k: (v.astype(np.float32) if k in ("x", "weight", "bias") and v is not None else v)
               for k, v in d.items()}
        low = apply("reference", None, d32, d32["x"])[0].astype(dtype)
    for label, res in (("out=", got), ("fresh", fresh)):
        _check(f"apply y ({label})", res[0], ref64[0], low, dtype, "out", case)
        assert_close(res[1], ref64[1], rtol=1e-12, atol=0, case=f"{case} apply rstd ({label})")
    for k, g, r in zip(("running_mean", "running_var"), states[target], states["reference"]):
        assert_close(g, r, rtol=1e-6, atol=1e-6, case=f"{case} {k}")

    # backward: float64 sums, then dx from the batch's sums
    y = None
    if act:
        y = fastreg.batch_norm_apply(d["x"].astype(np.float64), mean, var, ex["weight"],
                                     ex["bias"], axis=ax, activation=act,
                                     backend="reference")[0].astype(dtype)
    dy = np.empty_like(d["x"])
    dy[...] = rng.standard_normal(d["x"].shape)
    yt, dyt = _to(target, y), _to(target, dy)
    mt, rt = _to(target, mean), _to(target, rstd)
    got, fresh = _both_ways(target, lambda be, out: fastreg.batch_norm_backward_reduce(
        dyt, x, mt, rt, axis=ax, y=yt, activation=act, backend=be, out=out), 2)
    y64 = None if y is None else y.astype(np.float64)
    ref = fastreg.batch_norm_backward_reduce(dy.astype(np.float64), ex["x"], mean, rstd, axis=ax,
                                             y=y64, activation=act, backend="reference")
    for name, g, f, r in zip(("sum_dy", "sum_dy_xhat"), got, fresh, ref):
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        for label, a in (("out=", g), ("fresh", f)):
            assert a.dtype == np.float64, f"{case} {name} dtype {a.dtype}"
            assert_close(a, r, rtol=1e-10, atol=1e-10 * scale, case=f"{case} {name} ({label})")
    sdy, sdx = ref
    for training in (True, False):
        got, fresh = _both_ways(target, lambda be, out: fastreg.batch_norm_backward_apply(
            dyt, x, mt, rt, _to(target, d["weight"]), _to(target, sdy), _to(target, sdx),
            count=count, training=training, axis=ax, y=yt, activation=act, backend=be,
            out=out), 1)
        refs = []
        for rd in (np.float64, np.float32):
            w = None if d["weight"] is None else d["weight"].astype(rd)
            refs.append(fastreg.batch_norm_backward_apply(
                dy.astype(rd), d["x"].astype(rd), mean, rstd, w, sdy, sdx, count=count,
                training=training, axis=ax, y=None if y is None else y.astype(rd),
                activation=act, backend="reference"))
        low = refs[1].astype(dtype) if np.dtype(dtype).itemsize == 2 else None
        for label, res in (("out=", got), ("fresh", fresh)):
            _check(f"dx training={training} ({label})", res[0], refs[0], low, dtype, "grad", case)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input {k} modified"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
def test_combine_matches_reference(dtype, target, rng):
    R, C = 5, 9
    counts = rng.integers(0, 50, (R, C)).astype(dtype)
    counts[1] = 0
    means = (rng.standard_normal((R, C)) * 10 + 100).astype(dtype)
    m2s = (rng.uniform(0, 50, (R, C)) * counts).astype(dtype)
    gathered = np.stack([counts, means, m2s], axis=1)  # rows of one buffer: strided views
    args = [_to(target, gathered)[:, i] for i in range(3)]
    got, fresh = _both_ways(target, lambda be, out: fastreg.batch_norm_combine(
        *args, backend=be, out=out), 3)
    ref = fastreg.batch_norm_combine(counts, means, m2s, backend="reference")
    for name, g, f, r in zip(("count", "mean", "var"), got, fresh, ref):
        assert_close(g, r, rtol=1e-13, atol=1e-13, case=f"combine {name} (out=)")
        assert_close(f, r, rtol=1e-13, atol=1e-13, case=f"combine {name} (fresh)")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", [c for c in CASES if c[0][0] > 2],
                         ids=[i for c, i in zip(CASES, IDS) if c[0][0] > 2])
def test_split_pipeline_equals_batch_norm_on_the_whole_batch(shape, variant, dtype, target, rng):
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    ax, act = d.get("axis", 1), d.get("activation")
    x, w, b = (_to(target, d[k]) for k in ("x", "weight", "bias"))
    rm1, rv1 = _to(target, d["running_mean"].copy()), _to(target, d["running_var"].copy())
    y1, m1, r1 = fastreg.batch_norm(x, w, b, rm1, rv1, momentum=0.3, axis=ax, activation=act,
                                    backend=target)
    dy = _to(target, rng.standard_normal(shape).astype(dtype))
    dx1, dw1, db1 = fastreg.batch_norm_backward(dy, x, m1, r1, w, b, axis=ax, y=y1,
                                                activation=act, backend=target)
    N = shape[0]
    parts = [(0, 0), (0, N // 3), (N // 3, N)]
    stats = [fastreg.batch_norm_stats(x[lo:hi], axis=ax, backend=target) for lo, hi in parts]
    xp = np if target != "cuda" else __import__("cupy")
    count, mean, var = fastreg.batch_norm_combine(
        *(xp.stack([s[i] for s in stats]) for i in range(3)), backend=target)
    n = int(count[0])
    rm, rv = _to(target, d["running_mean"].copy()), _to(target, d["running_var"].copy())
    applied = [fastreg.batch_norm_apply(x[lo:hi], mean, var, w, b, rm if k == 0 else None,
                                        rv if k == 0 else None, count=n, momentum=0.3,
                                        axis=ax, activation=act, backend=target)
               for k, (lo, hi) in enumerate(parts)]
    ys = [a[0] for a in applied]
    rstd = applied[0][1]
    red = [fastreg.batch_norm_backward_reduce(dy[lo:hi], x[lo:hi], mean, rstd, axis=ax,
                                              y=ys[k], activation=act, backend=target)
           for k, (lo, hi) in enumerate(parts)]
    sdy, sdx = (sum(r[i] for r in red) for i in range(2))
    dx = [fastreg.batch_norm_backward_apply(dy[lo:hi], x[lo:hi], mean, rstd, w, sdy, sdx,
                                            count=n, axis=ax, y=ys[k], activation=act,
                                            backend=target) for k, (lo, hi) in enumerate(parts)]
    case = f"pipeline {np.dtype(dtype).name} {shape} {variant} on {target}"
    t, tg = (1e-12, 1e-12) if dtype == np.float64 else (tol(dtype)[0], tol(dtype, "grad")[0])
    host = lambda arrays: np.concatenate([_host(a) for a in arrays], axis=0)  # noqa: E731
    assert_close(host(ys), _host(y1), rtol=t, atol=t, case=f"{case} y")
    assert_close(_host(mean), _host(m1), rtol=t, atol=t, case=f"{case} mean")
    assert_close(_host(rstd), _host(r1), rtol=t, atol=t, case=f"{case} rstd")
    assert_close(_host(rm), _host(rm1), rtol=1e-6, atol=1e-6, case=f"{case} running_mean")
    assert_close(_host(rv), _host(rv1), rtol=1e-6, atol=1e-6, case=f"{case} running_var")
    scale = max(1.0, float(np.max(np.abs(_host(dx1)))))
    assert_close(host(dx), _host(dx1), rtol=tg, atol=tg * scale, case=f"{case} dx")
    if dw1 is not None:
        for name, g, r in (("dweight", sdx, dw1), ("dbias", sdy, db1)):
            scale = max(1.0, float(np.max(np.abs(_host(r)))))
            assert_close(_host(g), _host(r), rtol=tg, atol=tg * scale, case=f"{case} {name}")


# --------------------------------------------------------------------------- sync batch norm

@needs_emulator
@pytest.mark.parametrize("ranks", [1, 2])
def test_sync_batch_norm_on_the_cuda_backend_equals_batch_norm(ranks):
    """Every rank (a thread) runs on the emulated CUDA backend: forward, backward,
    statistics, running statistics and the bytes on the wire, as the CPU ranks."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import _sync_bn_cases as cases
    from conftest import SEED

    def rank(comm):
        with fastreg.use_backend("cuda_emulator"):
            cases.run_all(comm, SEED + ranks)

    cases.ThreadGroup(ranks).run(rank)


class _OneRank:
    """The collectives of a single process, for any array library."""
    rank, size = 0, 1

    def allgather(self, send, recv):
        recv[0] = send

    def allreduce_sum(self, buf):
        pass


@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sync_batch_norm_runs_on_cupy_arrays(dtype, rng):
    import cupy
    from fastreg.distributed import sync_batch_norm, sync_batch_norm_backward
    dt = np.dtype(np.float32) if dtype == "float32" else np.dtype(DTYPES[1])
    x = cupy.asarray(rng.standard_normal((8, 6, 9, 9)).astype(dt))
    dy = cupy.asarray(rng.standard_normal((8, 6, 9, 9)).astype(dt))
    w = cupy.asarray(rng.standard_normal(6).astype(dt))
    y, mean, rstd, n = sync_batch_norm(x, w, w, comm=_OneRank())
    y1, m1, r1 = fastreg.batch_norm(x, w, w)
    bound = 1e-5 if dtype == "float32" else 2e-2
    assert float(cupy.abs(y.astype(cupy.float32) - y1.astype(cupy.float32)).max()) <= bound
    assert float(cupy.abs(mean - m1).max()) <= 1e-5
    dx = sync_batch_norm_backward(dy, x, mean, rstd, n, w, w, comm=_OneRank())[0]
    dx1 = fastreg.batch_norm_backward(dy, x, m1, r1, w, w)[0]
    assert float(cupy.abs(dx.astype(cupy.float32) - dx1.astype(cupy.float32)).max()) <= 10 * bound
