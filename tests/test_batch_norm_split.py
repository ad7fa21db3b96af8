"""Split batch norm (stats / combine / apply, backward reduce / apply).

- The CPU kernels against the NumPy reference, step by step, on the batch
  norm shapes and layouts of tests/cases.py, float32 and float64, outputs
  poisoned with NaN and fresh, inputs unchanged.
- The split pipeline on uneven slices of a batch (one empty) against
  single-process batch_norm on the whole batch, on both backends.
- Chan's merge against the two-pass variance of the concatenated data
  (zero-count ranks, per-channel counts, offsets up to 1e8).
"""

import copy

import numpy as np
import pytest

import fastreg
from _assert import assert_close, tol
from cases import BATCH_NORM, make_array
from conftest import poisoned

DTYPES = [np.float32, np.float64]
BACKENDS = ["cpu", "reference"]
CASES = BATCH_NORM.cases
IDS = ["x".join(map(str, s)) + "-" + ",".join(f"{k}={v}" for k, v in v_.items())
       for s, v_ in CASES]
# Inference normalizes with running statistics: nothing to split (batch_norm_apply is its path).
TRAINING = [c for c in CASES if c[1].get("training", True)]
TRAINING_IDS = [i for c, i in zip(CASES, IDS) if c[1].get("training", True)]


def _snapshot(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _assert_unchanged(before, after, case, skip=()):
    for k, v in before.items():
        if isinstance(v, np.ndarray) and k not in skip:
            assert np.array_equal(v, after[k], equal_nan=True), f"{case}: '{k}' was modified"


def _both(fn, n_out):
    """fn(backend, out) on the reference, then on the CPU into poisoned outputs and fresh."""
    ref = fn("reference", None)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = tuple(poisoned(r) for r in ref)
    got = fn("cpu", out if n_out > 1 else out[0])
    got = got if isinstance(got, tuple) else (got,)
    for g, o in zip(got, out):
        assert g is o, "the kernel must return the out= arrays it was given"
    fresh = fn("cpu", None)
    fresh = fresh if isinstance(fresh, tuple) else (fresh,)
    return got, fresh, ref


def _check(names, got, fresh, ref, rtol, atol, case, scaled=True):
    for name, g, f, r in zip(names, got, fresh, ref):
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0))) if scaled else 1.0
        assert_close(g, r, rtol=rtol, atol=atol * scale, case=f"{case} {name} (out=)")
        assert_close(f, r, rtol=rtol, atol=atol * scale, case=f"{case} {name} (fresh)")
        assert f.dtype == r.dtype, f"{case} {name}: dtype {f.dtype} != {r.dtype}"


def _stats64(d):
    """The batch's float64 statistics (reference), as the apply steps take them."""
    n, mean, m2 = fastreg.batch_norm_stats(d["x"], axis=d.get("axis", 1), backend="reference")
    count, mean, var = fastreg.batch_norm_combine(n[None], mean[None], m2[None],
                                                  backend="reference")
    return int(count[0]) if count.size else 0, mean, var, 1.0 / np.sqrt(var + 1e-5)


# --------------------------------------------------------------------------- step by step

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", CASES, ids=IDS)
def test_batch_norm_stats_matches_reference(shape, variant, dtype, rng):
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    before = _snapshot(d)
    got, fresh, ref = _both(lambda be, out: fastreg.batch_norm_stats(
        d["x"], axis=d.get("axis", 1), backend=be, out=out), 3)
    case = f"stats {np.dtype(dtype).name} {shape} {variant}"
    # float64 sums of exactly representable values: only float64 rounding differs
    _check(("count", "mean", "m2"), got, fresh, ref, 1e-11, 1e-11, case)
    assert np.array_equal(got[0], ref[0]), case
    _assert_unchanged(before, d, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", CASES, ids=IDS)
def test_batch_norm_apply_matches_reference(shape, variant, dtype, rng):
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    count, mean, var, _ = _stats64(d)
    if count == 1:
        count = 0  # the unbiased variance needs 2 values; 0 means "no update"
    states = {}

    def call(be, out):
        dd = copy.deepcopy(d)
        res = fastreg.batch_norm_apply(dd["x"], mean, var, dd["weight"], dd["bias"],
                                       dd["running_mean"], dd["running_var"], count=count,
                                       momentum=0.3, axis=dd.get("axis", 1),
                                       activation=dd.get("activation"), backend=be, out=out)
        states[be] = dd
        return res

    before = _snapshot(d)
    got, fresh, ref = _both(call, 2)
    case = f"apply {np.dtype(dtype).name} {shape} {variant}"
    rtol, atol = tol(dtype)
    _check(("y", "rstd"), got, fresh, ref, rtol, atol, case, scaled=False)
    for k in ("running_mean", "running_var"):
        assert_close(states["cpu"][k], states["reference"][k], rtol=1e-6, atol=1e-6,
                     case=f"{case} {k}")
    _assert_unchanged(before, d, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", CASES, ids=IDS)
def test_batch_norm_backward_split_matches_reference(shape, variant, dtype, rng):
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    count, mean, var, rstd = _stats64(d)
    ax, act = d.get("axis", 1), d.get("activation")
    y = fastreg.batch_norm_apply(d["x"], mean, var, d["weight"], d["bias"],
                                 axis=ax, activation=act)[0] if act else None
    dy = np.empty_like(d["x"])
    dy[...] = rng.standard_normal(d["x"].shape)
    before = _snapshot(d)
    case = f"backward {np.dtype(dtype).name} {shape} {variant}"
    got, fresh, ref = _both(lambda be, out: fastreg.batch_norm_backward_reduce(
        dy, d["x"], mean, rstd, axis=ax, y=y, activation=act, backend=be, out=out), 2)
    _check(("sum_dy", "sum_dy_xhat"), got, fresh, ref, *tol(np.float64, "grad"), case)
    sdy, sdx = ref
    for training in (True, False):
        got, fresh, ref = _both(lambda be, out: fastreg.batch_norm_backward_apply(
            dy, d["x"], mean, rstd, d["weight"], sdy, sdx, count=count, training=training,
            axis=ax, y=y, activation=act, backend=be, out=out), 1)
        _check(("dx",), got, fresh, ref, *tol(dtype, "grad"), f"{case} training={training}")
        if d["x"].size:  # a fresh dx keeps x's memory layout
            order = np.argsort([-s for s in d["x"].strides], kind="stable").tolist()
            assert np.argsort([-s for s in fresh[0].strides], kind="stable").tolist() == order
    _assert_unchanged(before, d, case)


def test_batch_norm_combine_matches_reference(rng):
    R, C = 5, 9
    counts = rng.integers(0, 50, (R, C)).astype(np.float64)
    counts[1] = 0
    means = rng.standard_normal((R, C)) * 10 + 100
    m2s = rng.uniform(0, 50, (R, C)) * counts
    got, fresh, ref = _both(lambda be, out: fastreg.batch_norm_combine(
        counts, means, m2s, backend=be, out=out), 3)
    _check(("count", "mean", "var"), got, fresh, ref, 1e-13, 1e-13, "combine")


# --------------------------------------------------------------------------- the pipeline

def _slices(N, rng):
    """Uneven slices of N samples along axis 0, the first one empty."""
    cuts = np.sort(rng.integers(0, N + 1, 2)) if N else np.zeros(2, int)
    return [(0, 0), (0, int(cuts[0])), (int(cuts[0]), int(cuts[1])), (int(cuts[1]), N)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape,variant", TRAINING, ids=TRAINING_IDS)
def test_split_pipeline_equals_batch_norm_on_the_whole_batch(shape, variant, dtype, backend, rng):
    """Slices through stats -> combine -> apply and reduce -> sum -> apply give
    batch_norm's y, statistics, running statistics and gradients."""
    d = BATCH_NORM.make(rng, shape, dtype, variant)
    x, ax, act = d["x"], d.get("axis", 1), d.get("activation")
    whole = copy.deepcopy(d)
    y1, m1, r1 = fastreg.batch_norm(x, whole["weight"], whole["bias"], whole["running_mean"],
                                    whole["running_var"], momentum=0.3, axis=ax, activation=act,
                                    backend=backend)
    dy = np.empty_like(x)
    dy[...] = rng.standard_normal(x.shape)
    dx1, dw1, db1 = fastreg.batch_norm_backward(dy, x, m1, r1, d["weight"], d["bias"], axis=ax,
                                                y=y1, activation=act, backend=backend)

    parts = _slices(x.shape[0], rng)
    stats = [fastreg.batch_norm_stats(x[lo:hi], axis=ax, backend=backend) for lo, hi in parts]
    count, mean, var = fastreg.batch_norm_combine(
        *(np.stack([s[i] for s in stats]) for i in range(3)), backend=backend)
    n = int(count[0]) if count.size else 0
    rm, rv = d["running_mean"].copy(), d["running_var"].copy()
    ys, rstds = [], []
    for k, (lo, hi) in enumerate(parts):
        # every slice updates its own copy of the running statistics, as every process does
        rmk, rvk = (rm, rv) if k == 0 else (d["running_mean"].copy(), d["running_var"].copy())
        yk, rk = fastreg.batch_norm_apply(x[lo:hi], mean, var, d["weight"], d["bias"], rmk, rvk,
                                          count=n, momentum=0.3, axis=ax, activation=act,
                                          backend=backend)
        ys.append(yk)
        rstds.append(rk)
        assert np.array_equal(rmk, rm) and np.array_equal(rvk, rv), "running stats differ"
    y = np.concatenate(ys, axis=0)
    red = [fastreg.batch_norm_backward_reduce(dy[lo:hi], x[lo:hi], mean, rstds[0], axis=ax,
                                              y=ys[k], activation=act, backend=backend)
           for k, (lo, hi) in enumerate(parts)]
    sdy, sdx = (sum(r[i] for r in red) for i in range(2))
    dx = np.concatenate([fastreg.batch_norm_backward_apply(
        dy[lo:hi], x[lo:hi], mean, rstds[0], d["weight"], sdy, sdx, count=n, axis=ax,
        y=ys[k], activation=act, backend=backend) for k, (lo, hi) in enumerate(parts)], axis=0)

    case = f"pipeline {backend} {np.dtype(dtype).name} {shape} {variant} slices {parts}"
    t = 1e-12 if dtype == np.float64 else tol(dtype)[0]
    tg = 1e-12 if dtype == np.float64 else tol(dtype, "grad")[0]
    assert_close(y, y1, rtol=t, atol=t, case=f"{case} y")
    assert_close(mean, m1, rtol=t, atol=t, case=f"{case} mean")
    assert_close(rstds[0], r1, rtol=t, atol=t, case=f"{case} rstd")
    assert_close(rm, whole["running_mean"], rtol=1e-6, atol=1e-6, case=f"{case} running_mean")
    assert_close(rv, whole["running_var"], rtol=1e-6, atol=1e-6, case=f"{case} running_var")
    scale = max(1.0, float(np.max(np.abs(dx1), initial=0)))
    assert_close(dx, dx1, rtol=tg, atol=tg * scale, case=f"{case} dx")
    if dw1 is not None:
        for name, g, r in (("dweight", sdx, dw1), ("dbias", sdy, db1)):
            scale = max(1.0, float(np.max(np.abs(r), initial=0)))
            assert_close(g, r, rtol=tg, atol=tg * scale, case=f"{case} {name}")


# --------------------------------------------------------------------------- Chan's merge

@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8])
def test_combine_matches_two_pass_variance_of_the_concatenation(offset, rng):
    """Ranks with different counts per channel, zero-count ranks whose mean and M2
    are garbage (ignored), and data far from 0."""
    R, C = 6, 5
    counts = rng.integers(0, 40, (R, C))
    counts[0] = 0          # an empty first rank
    counts[3, 2] = 0       # and an empty rank in one channel
    counts[:, 4] = 0       # a channel with no data at all
    data = [[rng.standard_normal(counts[r, c]) * 3 + offset for c in range(C)]
            for r in range(R)]
    means = np.full((R, C), np.nan)
    m2s = np.full((R, C), np.nan)
    for r in range(R):
        for c in range(C):
            if counts[r, c]:
                means[r, c] = data[r][c].mean()
                m2s[r, c] = ((data[r][c] - means[r, c]) ** 2).sum()
    for backend in BACKENDS:
        n, mean, var = fastreg.batch_norm_combine(counts.astype(np.float64), means, m2s,
                                                  backend=backend)
        for c in range(C):
            allc = np.concatenate([data[r][c] for r in range(R)])
            assert n[c] == allc.size
            if not allc.size:
                assert mean[c] == 0 and var[c] == 0, (backend, c)
                continue
            m, v = allc.mean(), allc.var()
            # The merge carries each rank mean's rounding (|mean| * 2**-52) into delta:
            # an inherent limit of exchanging means, far below float32 resolution.
            slack = 8 * np.finfo(np.float64).eps * abs(m) * np.sqrt(v)
            assert abs(mean[c] - m) <= 1e-14 * abs(m) + 1e-14, (backend, c, mean[c], m)
            assert abs(var[c] - v) <= 1e-12 * v + slack, (backend, c, var[c], v)


def test_stats_of_float32_with_mean_1e4_match_float64(rng):
    for variant in ({}, {"axis": -1}):
        shape = (16, 6, 9, 9) if not variant else (16, 9, 9, 6)
        x = make_array(rng, shape, np.float32, offset=1e4)
        got = fastreg.batch_norm_stats(x, **variant)
        ref = fastreg.batch_norm_stats(x.astype(np.float64), backend="reference", **variant)
        for name, g, r in zip(("count", "mean", "m2"), got, ref):
            assert_close(g, r, rtol=1e-10, atol=0, case=f"{variant} {name}")


def test_combine_of_one_rank_is_the_rank_itself(rng):
    x = rng.standard_normal((12, 4, 5))
    n, mean, m2 = fastreg.batch_norm_stats(x)
    count, mean2, var = fastreg.batch_norm_combine(n[None], mean[None], m2[None])
    assert np.array_equal(count, n) and np.array_equal(mean2, mean)
    assert_close(var, m2 / n, rtol=1e-15, atol=0, case="var")


def test_running_stats_use_the_global_count(rng):
    x = rng.standard_normal((4, 3))
    mean, var = x.mean(0), x.var(0)
    rm, rv = np.zeros(3), np.ones(3)
    fastreg.batch_norm_apply(x, mean, var, None, None, rm, rv, count=40, momentum=1.0)
    assert_close(rv, var * 40 / 39, rtol=1e-15, atol=0, case="running_var")
    assert_close(rm, mean, rtol=0, atol=0, case="running_mean")
    before = rm.copy(), rv.copy()
    fastreg.batch_norm_apply(x, mean + 1, var + 1, None, None, rm, rv, count=0, momentum=1.0)
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1]), \
        "count 0 must leave the running statistics unchanged"


# --------------------------------------------------------------------------- bad input

f32 = np.float32


def _x():
    return np.random.default_rng(0).standard_normal((4, 3, 5)).astype(f32)


def _c(*s):
    return np.zeros(s)


BAD = [
    ("stats-int", lambda: fastreg.batch_norm_stats(np.ones((3, 2), int)), TypeError, "'x'"),
    ("stats-1d", lambda: fastreg.batch_norm_stats(np.ones(3, f32)), ValueError, "at least 2"),
    ("stats-axis", lambda: fastreg.batch_norm_stats(_x(), axis=3), ValueError, "'axis'"),
    ("stats-out-dtype", lambda: fastreg.batch_norm_stats(_x(), out=(np.zeros(3, f32), None, None)),
     TypeError, "float64"),
    ("combine-1d", lambda: fastreg.batch_norm_combine(_c(3), _c(3), _c(3)), ValueError,
     "'counts' must be a 2-D"),
    ("combine-shape", lambda: fastreg.batch_norm_combine(_c(2, 3), _c(2, 4), _c(2, 3)),
     ValueError, r"'means' must be an array of shape \(2, 3\)"),
    ("combine-negative", lambda: fastreg.batch_norm_combine(-np.ones((2, 3)), _c(2, 3), _c(2, 3)),
     ValueError, "'counts' must be >= 0, got -1.0"),
    ("combine-nan", lambda: fastreg.batch_norm_combine(np.full((2, 3), np.nan), _c(2, 3), _c(2, 3)),
     ValueError, "'counts' must be >= 0, got nan"),
    ("combine-int-means", lambda: fastreg.batch_norm_combine(_c(2, 3), np.zeros((2, 3), int),
                                                             _c(2, 3)), TypeError, "'means'"),
    ("apply-no-count", lambda: fastreg.batch_norm_apply(_x(), _c(3), _c(3), None, None, _c(3),
                                                        np.ones(3)), ValueError,
     "'count' must be the batch's count"),
    ("apply-count-1", lambda: fastreg.batch_norm_apply(_x(), _c(3), _c(3), None, None, _c(3),
                                                       np.ones(3), count=1), ValueError,
     "'count' must not be 1"),
    ("apply-count-neg", lambda: fastreg.batch_norm_apply(_x(), _c(3), _c(3), None, None, _c(3),
                                                         np.ones(3), count=-2), ValueError,
     "'count'"),
    ("apply-mean-shape", lambda: fastreg.batch_norm_apply(_x(), _c(4), _c(3)), ValueError,
     "'mean'"),
    ("apply-var-none", lambda: fastreg.batch_norm_apply(_x(), _c(3), None), ValueError, "'var'"),
    ("bwd-apply-no-sums", lambda: fastreg.batch_norm_backward_apply(_x(), _x(), _c(3), _c(3), None,
                                                                    None, None, count=20),
     ValueError, "'sum_dy'"),
    ("bwd-apply-no-count", lambda: fastreg.batch_norm_backward_apply(_x(), _x(), _c(3), _c(3), None,
                                                                     _c(3), _c(3), count=None),
     ValueError, "'count'"),
    ("bwd-reduce-relu-no-y", lambda: fastreg.batch_norm_backward_reduce(_x(), _x(), _c(3), _c(3),
                                                                        activation="relu"),
     ValueError, "'y'"),
    ("bwd-reduce-dy-shape", lambda: fastreg.batch_norm_backward_reduce(_x()[:2], _x(), _c(3),
                                                                       _c(3)), ValueError, "'dy'"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_split_steps_reject_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_apply_with_bad_count_leaves_outputs_and_running_stats_untouched():
    x = _x()
    y = np.full_like(x, np.nan)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError):
        fastreg.batch_norm_apply(x, _c(3), np.ones(3), None, None, rm, rv, count=1, out=(y, None))
    assert np.isnan(y).all() and not rm.any() and (rv == 1).all()
