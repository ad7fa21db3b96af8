"""The prox family on the CUDA kernels, against the CPU kernels and the NumPy reference.

The kernels run on a GPU (backend "cuda", CuPy arrays) when CuPy and a
device are present, and always under the host emulation (backend
"cuda_emulator", NumPy arrays), so CI runs every path: 16-byte and scalar
loads, multi-chunk tensor tables, the cross-entropy's warp rows, block rows,
the 1024-thread float32 row of 32000 classes and the loop path, the group
statistics split over several blocks.

float32/float64: the elementwise prox, the optimizer steps and the group ops'
apply mode follow the rounding contract and must equal the CPU bit for bit;
the cross-entropy and the fitted group statistics (exp, other summation
trees) match the reference within the CPU tests' tolerances.
float16/bfloat16 follow flash-attention's rule: the error against the float64
reference may be at most twice that of the low-precision reference (the
reference on float32 copies of the inputs, stored in the dtype) plus a small
atol.
"""

import ml_dtypes
import numpy as np
import pytest

import fastreg
from _assert import assert_bitwise, assert_close, tol
from prox_cases import place

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
LOW = (np.dtype(np.float16), BF16)
EXACT = (np.dtype(np.float32), np.dtype(np.float64))
FLOATS = LOW + EXACT
ATOL_LOW = {np.dtype(np.float16): 1e-3, BF16: 1e-2}
dtype_ids = lambda t: np.dtype(t).name  # noqa: E731


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
needs_gpu = pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
TARGETS = [pytest.param("cuda_emulator", marks=needs_emulator)] + (["cuda"] if GPU else [])


def _xp(target):
    if target == "cuda":
        import cupy
        return cupy
    return np


def _to(target, a):
    """A NumPy array on the target (CuPy keeps the strides of a view's layout only
    through a copy: non-contiguous inputs are sent as views of a device buffer)."""
    if not isinstance(a, np.ndarray) or target != "cuda":
        return a
    import cupy
    if a.flags.c_contiguous or a.size == 0:
        return cupy.asarray(a)
    return cupy.asarray(a.T.copy()).T if a.T.flags.c_contiguous else cupy.asarray(a)


def _host(a):
    if a is None or isinstance(a, (np.ndarray, float, int)):
        return a
    return a.get()


def _poisoned(target, like):
    out = _xp(target).empty(like.shape, dtype=like.dtype)
    out[...] = np.nan
    return out


def _f(a, dtype):
    """Floating arrays (bfloat16 included, whose dtype kind is 'V') cast to dtype."""
    return a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype in FLOATS else a


def _check(name, got, ref64, ref_low, case, kind="out", scale=1.0):
    """got against the float64 reference: the CPU tests' tolerances for float32/float64,
    flash-attention's rule (2 x the low-precision reference's error + atol) for 16-bit."""
    got = np.asarray(got)
    ref64 = np.asarray(ref64, np.float64)
    assert got.shape == ref64.shape, f"{case}: {name} shape {got.shape} != {ref64.shape}"
    if np.dtype(got.dtype) in LOW:
        g, lo = got.astype(np.float64), np.asarray(ref_low).astype(np.float64)
        both_nan = lambda a: np.isnan(a) & np.isnan(ref64)  # noqa: E731
        low_err = np.where(both_nan(lo), 0.0, np.abs(lo - ref64))
        bound = 2 * np.max(low_err, initial=0.0) + ATOL_LOW[np.dtype(got.dtype)] * scale
        err = np.where(both_nan(g), 0.0, np.abs(g - ref64))
        if not (err <= bound).all():
            i = np.unravel_index(np.argmax(np.where(np.isnan(err), np.inf, err)), err.shape)
            raise AssertionError(f"{case}: {name} max |kernel - ref64| = {err[i]:.3g} at {i} "
                                 f"(got {g[i]!r}, expected {ref64[i]!r}) exceeds 2 * "
                                 f"low-precision error + atol = {bound:.3g}")
        return
    rtol, atol = tol(got.dtype, kind)
    assert_close(got, ref64.astype(got.dtype), rtol=rtol, atol=atol * scale, case=f"{case} {name}")


def _low_reference(fn, dtype, *arrays):
    """(ref64, ref_low): fn on float64 copies, and on float32 copies with the results
    stored in ``dtype`` (fn returns a tuple of arrays)."""
    r64 = fn(*(_f(a, np.float64) for a in arrays))
    r32 = fn(*(_f(a, np.float32) for a in arrays))
    return r64, tuple(np.asarray(r).astype(dtype) for r in r32)


# --------------------------------------------------------------------------- elementwise prox

EW_SHAPES = [(), (1,), (7,), (0,), (5, 37), (2, 3, 5, 7), (4099,)]
EW_CASES = [(s, lay) for s in EW_SHAPES
            for lay in (("contig",) if len(s) == 0 or 0 in s else ("contig", "strided"))]
THRESHOLDS = ["scalar", "full", "row", "zero-d"]


def _threshold(rng, kind, shape, dtype):
    if kind == "scalar":
        return 0.7
    if kind == "zero-d":
        return np.array(0.5, dtype)
    tshape = shape if kind == "full" else (*shape[:-1], 1) if shape else ()
    return rng.uniform(0, 1.2, tshape).astype(dtype)


def _prox_call(op, w, t, **kw):
    if op == "prox_l1":
        return fastreg.prox_l1(w, t, **kw)
    return fastreg.prox_elastic_net(w, t, 0.3 if np.ndim(t) == 0 else t / 2, **kw)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape,layout", EW_CASES, ids=[f"{s}-{lay}" for s, lay in EW_CASES])
def test_elementwise_prox_matches_cpu_and_reference(shape, layout, dtype, target, rng):
    for op in ("prox_l1", "prox_elastic_net"):
        for tkind in THRESHOLDS:
            p = place(rng, shape, dtype, layout)
            w, w0 = p.a, p.a.copy()
            t = _threshold(rng, tkind, shape, dtype)
            case = f"{op} {np.dtype(dtype).name} {shape} {layout} threshold={tkind} on {target}"
            wd, td = _to(target, w), _to(target, t)
            out = _poisoned(target, wd)
            got = _prox_call(op, wd, td, out=out, backend=target)
            assert got is out, case
            fresh = _prox_call(op, wd, td, backend=target)
            assert fresh.dtype == w.dtype and fresh.shape == w.shape, case
            if np.dtype(dtype) in EXACT:
                cpu = _prox_call(op, w, t)
                assert_bitwise(_host(got), cpu, case=f"{case} (out=) vs cpu")
                assert_bitwise(_host(fresh), cpu, case=f"{case} (fresh) vs cpu")
            r64, low = _low_reference(lambda ww, tt: (_prox_call(op, ww, tt, backend="reference"),),
                                      dtype, w, t)
            _check("y", _host(got), r64[0], low[0], case)
            assert np.array_equal(_host(wd), w0), f"{case}: w was modified"
            # in place (out=w): the same bits as a fresh output, nothing outside w touched
            if target == "cuda_emulator":
                assert _prox_call(op, w, t, out=w, backend=target) is w, case
                assert_bitwise(w, _host(fresh), case=f"{case} in place vs fresh")
                assert p.untouched(), f"{case}: the in-place update wrote outside w"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_prox_l1_zeros_are_exact(dtype, target, rng):
    w = rng.standard_normal(10_001).astype(dtype)
    y = _host(fastreg.prox_l1(_to(target, w), 0.5, backend=target))
    inside = np.abs(w.astype(np.float64)) <= 0.5
    assert inside.any() and (~inside).any()
    assert np.all(y[inside] == 0) and np.all(y[~inside] != 0)


# --------------------------------------------------------------------------- optimizer steps

CHUNK = __import__("fastreg.cuda.prox").cuda.prox.CHUNK
# one list per call: odd sizes, several chunks, an empty and a strided tensor
LIST_SHAPES = [(3, 5), (17,), (4, 9), (0,), (2 * CHUNK + 5,), (CHUNK + 7,), (1,)]

SGD_VARIANTS = [
    {},
    {"momentum": 0.9, "first_step": True},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
    {"momentum": 0.8, "nesterov": True, "l1": 0.5},
    {"momentum": 0.9, "decoupled_weight_decay": 0.3, "l1": 0.4, "weight_decay": 0.1},
    {"maximize": True, "weight_decay": 0.2, "l1": 1.0},
]
ADAM_VARIANTS = [
    ("adamw_step", {}),
    ("adamw_step", {"l1": 0.5, "weight_decay": 0.1}),
    ("adamw_step", {"amsgrad": True, "l1": 0.2}),
    ("adamw_step", {"maximize": True, "betas": (0.3, 0.8), "eps": 1e-3}),
    ("adam_step", {"weight_decay": 0.1, "amsgrad": True}),
    ("adam_step", {"weight_decay": 0.05, "maximize": True, "l1": 0.1, "betas": (0.0, 0.0)}),
]
STEP_VARIANTS = [("sgd_step", v) for v in SGD_VARIANTS] + ADAM_VARIANTS
STEP_IDS = [f"{op}-{','.join(map(str, v)) or 'plain'}" for op, v in STEP_VARIANTS]
STATE = {"sgd_step": ("momentum_buffer",),
         "adam_step": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         "adamw_step": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _step_inputs(rng, op, dtype, shapes=LIST_SHAPES):
    """Placed parameters, gradients and state (second moments >= 0)."""
    placed = {"w": [], "g": []}
    for name in STATE[op]:
        placed[name] = []
    for i, shape in enumerate(shapes):
        layout = "strided" if i == 2 else "contig"
        placed["w"].append(place(rng, shape, dtype, layout))
        placed["g"].append(place(rng, shape, dtype, layout))
        for name in STATE[op]:
            v = rng.standard_normal(shape) * 0.1
            placed[name].append(place(rng, shape, dtype, layout,
                                      values=v * v if name != "exp_avg" and op != "sgd_step"
                                      else v))
    return placed


def _step(op, variant, arrays, backend):
    """Run one step on ``arrays`` (name -> list), in place."""
    kw = dict(variant)
    if op == "sgd_step":
        if kw.get("momentum"):
            kw["momentum_buffer"] = arrays["momentum_buffer"]
        return fastreg.sgd_step(arrays["w"], arrays["g"], lr=0.1, backend=backend, **kw)
    return getattr(fastreg, op)(arrays["w"], arrays["g"], arrays["exp_avg"], arrays["exp_avg_sq"],
                                step=3, lr=0.01, max_exp_avg_sq=arrays["max_exp_avg_sq"],
                                backend=backend, **kw)


def _copies(placed, dtype=None):
    return {k: [p.a.astype(dtype or p.a.dtype) for p in v] for k, v in placed.items()}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("op,variant", STEP_VARIANTS, ids=STEP_IDS)
def test_optimizer_steps_match_cpu_and_reference(op, variant, dtype, target, rng):
    placed = _step_inputs(rng, op, dtype)
    before = _copies(placed)
    case = f"{op} {variant} {np.dtype(dtype).name} on {target}"
    if target == "cuda":
        arrays = {k: [_to(target, a) for a in v] for k, v in before.items()}
    else:
        arrays = {k: [p.a for p in v] for k, v in placed.items()}
    assert _step(op, variant, arrays, target) is arrays["w"], case
    got = {k: [_host(a) for a in v] for k, v in arrays.items()}
    if np.dtype(dtype) in EXACT:
        cpu = {k: [a.copy() for a in v] for k, v in before.items()}
        _step(op, variant, cpu, None)
        for k in got:
            for i, (a, c) in enumerate(zip(got[k], cpu[k])):
                assert_bitwise(a, c, case=f"{case} {k}[{i}] vs cpu")
    r64 = _copies(placed, np.float64)
    for k in r64:                          # the reference starts from the same values
        r64[k] = [b.astype(np.float64) for b in before[k]]
    r32 = {k: [b.astype(np.float32) for b in v] for k, v in before.items()}
    _step(op, variant, r64, "reference")
    _step(op, variant, r32, "reference")
    for k in got:
        for i, (a, r, lo) in enumerate(zip(got[k], r64[k], r32[k])):
            _check(f"{k}[{i}]", a, r, lo.astype(dtype), case)
    assert all(np.array_equal(_host(a), b) for a, b in zip(arrays["g"], before["g"])), \
        f"{case}: g was modified"
    if target == "cuda_emulator":
        for k, v in placed.items():
            assert all(p.untouched() for p in v), f"{case}: wrote outside {k}"
    unused = [k for k in STATE[op] if k == "max_exp_avg_sq" and not variant.get("amsgrad")
              or k == "momentum_buffer" and not variant.get("momentum")]
    for k in unused:
        for a, b in zip(got[k], before[k]):
            assert np.array_equal(a, b), f"{case}: {k} touched although unused"


@needs_emulator
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("op,variant", [STEP_VARIANTS[4], ADAM_VARIANTS[2]],
                         ids=[STEP_IDS[4], STEP_IDS[len(SGD_VARIANTS) + 2]])
def test_optimizer_list_equals_per_tensor_calls_bitwise(op, variant, dtype, rng):
    """16-bit lists (float32/float64 lists equal the CPU's, which equal its per-tensor calls)."""
    placed = _step_inputs(rng, op, dtype)
    arrays = {k: [p.a for p in v] for k, v in placed.items()}
    single = _copies(placed)
    _step(op, variant, arrays, "cuda_emulator")
    for i in range(len(LIST_SHAPES)):
        _step(op, variant, {k: [v[i]] for k, v in single.items()}, "cuda_emulator")
    for k in arrays:
        for i, (a, b) in enumerate(zip(arrays[k], single[k])):
            assert_bitwise(a, b, case=f"{op} {variant} list vs per tensor, {k}[{i}]")


@needs_emulator
def test_mixed_dtype_list_runs_one_launch_per_dtype(rng):
    ws = [rng.standard_normal(s).astype(dt) for s, dt in
          (((5,), np.float32), ((7,), np.float16), ((3, 3), np.float32), ((9,), BF16))]
    gs = [rng.standard_normal(w.shape).astype(w.dtype) for w in ws]
    single = [w.copy() for w in ws]
    fastreg.sgd_step(ws, gs, lr=0.1, l1=0.2, backend="cuda_emulator")
    for w, g in zip(single, gs):
        fastreg.sgd_step(w, g, lr=0.1, l1=0.2, backend="cuda_emulator")
    for i, (a, b) in enumerate(zip(ws, single)):
        assert_bitwise(a, b, case=f"mixed list [{i}]")


# --------------------------------------------------------------------------- cross-entropy

COMBOS = [("mean", 0.25, "uniform"), ("sum", 0.0, "others"), ("none", 0.1, "others"),
          ("mean", 0.0, "uniform")]
# (shape, options, combos). Scalar loads (contig: 3 elements into a guarded
# buffer) and 16-byte vectors (aligned, K % 8 == 0) at every register-path
# instance: K = 48, 96, 200, 400, 1000, 2000 and 32000 take KS = 1, 2, 4, 8 slots
# at R = 32..1024 threads per row depending on the dtype (32000: float32 at
# R = 1024, KS = 8, the benchmark's case; float64 the loop path); 40000 and
# 9001 take the loop path.
CE_CASES = [
    ((1, 1), {}, (0, 1)), ((13, 17), {}, (0, 1, 2, 3)), ((6, 2), {}, (1, 2)), ((0, 5), {}, (0, 1)),
    ((64, 100), {"ignore": True}, (0, 2)), ((9, 33), {"layout": "strided"}, (0, 2)),
    ((9, 33), {"layout": "transposed", "ignore": True}, (3,)),
    ((5, 7), {"all_ignored": True}, (0, 1)),
    ((6, 48), {"layout": "aligned"}, (0,)), ((4, 96), {"layout": "aligned"}, (1,)),
    ((5, 200), {"layout": "aligned"}, (2,)),
    ((4, 400), {"layout": "aligned", "ignore": True}, (3,)),
    ((3, 1000), {"layout": "aligned"}, (1,)),
    ((3, 2000), {"layout": "aligned"}, (0,)), ((2, 32000), {"layout": "aligned"}, (0,)),
    ((5, 199), {}, (0,)), ((4, 399), {}, (1,)), ((3, 999), {}, (2,)), ((3, 1999), {}, (3,)),
    ((3, 3001), {}, (0,)), ((2, 40000), {"layout": "aligned", "ignore": True}, (3,)),
    ((2, 9001), {}, (2,)),
]
CE_PARAMS = [(s, o, COMBOS[c]) for s, o, cs in CE_CASES for c in cs
             if COMBOS[c][2] == "uniform" or s[1] >= 2]


def _ce_inputs(rng, shape, dtype, opts):
    N, K = shape
    p = place(rng, shape, dtype, opts.get("layout", "contig"), rng.standard_normal(shape) * 3)
    target = rng.integers(0, K, N)
    ignore = None
    if opts.get("ignore") or opts.get("all_ignored"):
        ignore = -100
        target[rng.random(N) < (1.0 if opts.get("all_ignored") else 0.3)] = ignore
    return p, target, ignore


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape,opts,combo", CE_PARAMS,
                         ids=[f"{s}-{o}-{c}" for s, o, c in CE_PARAMS])
def test_cross_entropy_matches_reference(shape, opts, combo, dtype, target, rng):
    reduction, smoothing, style = combo
    p, tgt, ignore = _ce_inputs(rng, shape, dtype, opts)
    z, z0, t0 = p.a, p.a.copy(), tgt.copy()
    if opts.get("layout") == "aligned":
        assert z.ctypes.data % 16 == 0, "an aligned case whose logits are not 16-byte aligned"
    kw = dict(smoothing=smoothing, reduction=reduction, ignore_index=ignore, style=style)
    case = f"ce {np.dtype(dtype).name} {shape} {opts} {kw} on {target}"
    zd, td = _to(target, z), _to(target, tgt)
    fresh = fastreg.cross_entropy_label_smoothing(zd, td, backend=target, **kw)
    out = tuple(_poisoned(target, f) for f in fresh)
    got = fastreg.cross_entropy_label_smoothing(zd, td, out=out, backend=target, **kw)
    assert got[0] is out[0] and got[1] is out[1], case
    r64, low = _low_reference(
        lambda zz: fastreg.cross_entropy_label_smoothing(zz, tgt, backend="reference", **kw),
        dtype, z)
    scale = max(1.0, float(np.max(np.abs(r64[0]), initial=0.0)))
    for variant, res in (("out=", got), ("fresh", fresh)):
        loss, dl = _host(res[0]), _host(res[1])
        assert loss.dtype == dl.dtype == np.dtype(dtype), case
        _check(f"loss ({variant})", loss, r64[0], low[0], case, "grad", scale)
        _check(f"dlogits ({variant})", dl, r64[1], low[1], case, "grad")
    assert np.array_equal(_host(zd), z0) and np.array_equal(_host(td), t0), \
        f"{case}: inputs modified"
    if target == "cuda_emulator":   # the gradient written over the logits
        loss, dl = fastreg.cross_entropy_label_smoothing(z, tgt, out=(None, z), backend=target,
                                                         **kw)
        assert dl is z, case
        assert_bitwise(z, fresh[1], case=f"{case} in-place dlogits vs fresh")
        assert_bitwise(loss, fresh[0], case=f"{case} loss with in-place dlogits")
        assert p.untouched(), f"{case}: in-place dlogits wrote outside the logits"


@pytest.mark.parametrize("target", TARGETS)
def test_cross_entropy_masked_vocabulary_and_extreme_logits(target, rng):
    """-inf logits (a masked vocabulary) give probability 0 and, without smoothing,
    a finite loss (as PyTorch), on the register and the loop paths; logits of
    +-1e4 keep a finite loss."""
    for K in (1000, 40000):
        z = (rng.standard_normal((4, K)) * 3).astype(np.float32)
        z[:, K // 2:] = -np.inf
        z[1, 0] = 1e4
        z[2, 1] = -1e4
        t = np.array([0, 1, 2, 3])
        loss, dl = fastreg.cross_entropy_label_smoothing(_to(target, z), _to(target, t),
                                                         smoothing=0.0, reduction="none",
                                                         backend=target)
        ref = fastreg.cross_entropy_label_smoothing(z.astype(np.float64), t, smoothing=0.0,
                                                    reduction="none", backend="reference")
        assert_close(_host(loss), ref[0], rtol=1e-4, atol=1e-4, case=f"loss K={K}")
        assert_close(_host(dl), ref[1], rtol=1e-4, atol=1e-5, case=f"dlogits K={K}")
        assert np.all(_host(dl)[:, K // 2:] == 0), K
        assert np.all(np.isfinite(_host(loss))), K


# --------------------------------------------------------------------------- group ops

GROUP_CASES = [
    ((7, 13), 0), ((7, 13), 1), ((7, 13), None), ((7, 13), ()), ((4, 5, 3, 3), (1, 2, 3)),
    ((3, 3, 4, 5), (0, 1, 2)), ((4, 5, 3, 3), (0, 2, 3)), ((4, 5, 3, 3), (1, 2)), ((1, 1), 1),
    ((5,), 0), ((0, 4), 1), ((4, 0), 1), ((3, 20001), 1), ((20001, 3), 0), ((2, 9000, 40), 1),
]
GROUP_PARAMS = [(s, a, lay) for s, a in GROUP_CASES
                for lay in (("contig", "transposed") if len(s) >= 2 and 0 not in s and max(s) < 100
                            else ("contig",))]


def _axes(shape, axis):
    return tuple(range(len(shape))) if axis is None else (axis,) if isinstance(axis, int) else axis


def _run_group(op, x, axis, backend, t=None, stats=None, out=None):
    """(y, stat0, stat1) of one group op (stats None for the prox ops)."""
    kw = {} if out is None else {"out": out}
    if op == "prox_group_l1":
        return (fastreg.prox_group_l1(x, t, axis=axis, backend=backend, **kw),)
    if op == "max_norm":
        return (fastreg.max_norm(x, t, axis=axis, backend=backend, **kw),)
    if op == "standardize":
        extra = {} if stats is None else {"mean": stats[0], "std": stats[1]}
        return fastreg.standardize(x, axis=axis, eps=1e-6, backend=backend, **extra, **kw)
    extra = {} if stats is None else {"data_min": stats[0], "data_max": stats[1]}
    return fastreg.min_max_scale(x, axis=axis, feature_range=(-1.0, 2.0), backend=backend,
                                 **extra, **kw)


def x_groups(shape, ax):
    return int(np.prod([n for k, n in enumerate(shape) if k not in ax]))


def _scaling_references(op, x, axis, dtype):
    """(ref64, ref_low) of a fit: the low-precision y comes from the statistics
    stored in the dtype (y is computed from the returned statistics, on every
    backend, so that applying them to the same data gives the fit's y)."""
    x64 = x.astype(np.float64)
    r64 = _run_group(op, x64, axis, "reference")
    stats = tuple(s.astype(dtype) for s in r64[1:])
    y = _run_group(op, x64, axis, "reference", stats=tuple(s.astype(np.float64) for s in stats))
    return r64, (y[0].astype(dtype),) + stats


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape,axis,layout", GROUP_PARAMS,
                         ids=[f"{s}-axis{a}-{lay}" for s, a, lay in GROUP_PARAMS])
def test_group_ops_match_reference(shape, axis, layout, dtype, target, rng):
    ax = _axes(shape, axis)
    size = int(np.prod([shape[k] for k in ax])) if shape else 1
    gshape = tuple(1 if k in ax else n for k, n in enumerate(shape))
    offset = rng.uniform(-20, 20, shape[-1:]) if shape else 0.0
    fits = size > 0 or x_groups(shape, ax) == 0   # a fit needs elements in every group
    for op in ("prox_group_l1", "max_norm") + (("standardize", "min_max_scale") if fits else ()):
        scaled = op in ("standardize", "min_max_scale")
        p = place(rng, shape, dtype, layout,
                  values=rng.standard_normal(shape) * 3 + (offset if scaled else 0.0))
        x, x0 = p.a, p.a.copy()
        if scaled and x.ndim == 2 and x.shape[0] > 1 and x.shape[1] > 2:
            x[:, 1] = 4.25                 # a constant feature (axis 0) / entry
            x0 = x.copy()
        t = None
        if op == "prox_group_l1":          # per-group thresholds around the group norms
            t = (rng.uniform(0.3, 1.2, gshape) * np.sqrt(max(size, 1)) * 3).astype(dtype)
        elif op == "max_norm":
            t = float(np.sqrt(max(size, 1)) * 3)
        case = f"{op} {np.dtype(dtype).name} {shape} axis={axis} {layout} on {target}"
        xd, tdev = _to(target, x), _to(target, t)
        fresh = _run_group(op, xd, axis, target, tdev)
        out = tuple(_poisoned(target, f) for f in fresh)
        got = _run_group(op, xd, axis, target, tdev, out=out if scaled else out[0])
        got = got if scaled else (got[0],)
        assert all(g is o for g, o in zip(got, out)), case
        if scaled:
            r64, low = _scaling_references(op, x, axis, dtype)
        else:
            r64, low = _low_reference(lambda xx, tt: _run_group(op, xx, axis, "reference", tt),
                                      dtype, x, t)
        for variant, res in (("out=", got), ("fresh", fresh)):
            for name, a, r, lo in zip(("y", "stat0", "stat1"), res, r64, low):
                _check(f"{name} ({variant})", _host(a), r, lo, case)
                assert a.dtype == x.dtype, case
        assert np.array_equal(_host(xd), x0), f"{case}: x was modified"
        if op == "prox_group_l1" and x.size:   # whole groups vanish exactly
            zero = np.all(_host(fresh[0]) == 0, axis=ax)
            assert zero.any() or not np.any(np.all(r64[0] == 0, axis=ax)), case
        if scaled:
            # apply mode: the fitted statistics on new data; float32/float64 equal the CPU's
            x_new = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
            stats = tuple(_host(a) for a in fresh[1:])
            y = _host(_run_group(op, _to(target, x_new), axis, target,
                                 stats=tuple(_to(target, s) for s in stats))[0])
            r64, low = _low_reference(
                lambda xx, s0, s1: _run_group(op, xx, axis, "reference", stats=(s0, s1)),
                dtype, x_new, *stats)
            _check("y (apply)", y, r64[0], low[0], case)
            if np.dtype(dtype) in EXACT:
                assert_bitwise(y, _run_group(op, x_new, axis, None, stats=stats)[0],
                               case=f"{case} apply vs cpu")
        elif target == "cuda_emulator":
            assert _run_group(op, x, axis, target, t, out=x)[0] is x, case
            assert_bitwise(x, _host(fresh[0]), case=f"{case} in place vs fresh")
            assert p.untouched(), f"{case}: the in-place update wrote outside x"


# --------------------------------------------------------------------------- properties

def _all_outputs(target):
    """The ops whose results combine values across threads and blocks, once each on
    fixed data: cross-entropy block rows (R = 128) and the loop path (float64,
    K = 9001), group statistics over several Q-blocks and over row tiles."""
    rng = np.random.default_rng(7)
    res = []
    for shape, dt in (((3, 3001), np.float32), ((2, 9001), np.float64)):
        z = (rng.standard_normal(shape) * 3).astype(dt)
        t = rng.integers(0, shape[1], shape[0])
        res += fastreg.cross_entropy_label_smoothing(_to(target, z), _to(target, t),
                                                     smoothing=0.1, backend=target)
    for shape, axis in (((9000, 3), 0), ((40, 30), 1)):
        x = _to(target, (rng.standard_normal(shape) * 2 + 5).astype(np.float32))
        res += fastreg.standardize(x, axis=axis, backend=target)
        res += fastreg.min_max_scale(x, axis=axis, backend=target)
        res.append(fastreg.prox_group_l1(x, 10.0, axis=axis, backend=target))
        res.append(fastreg.max_norm(x, 10.0, axis=axis, backend=target))
    return [_host(a) for a in res]


@pytest.mark.parametrize("target", TARGETS)
def test_results_are_bitwise_identical_run_to_run(target):
    first = _all_outputs(target)
    for i, (a, b) in enumerate(zip(first, _all_outputs(target))):
        assert_bitwise(b, a, case=f"output {i} on {target}")


@needs_emulator
def test_emulated_results_do_not_depend_on_the_scheduler():
    """Real threads interleave a block's threads differently from fibers; the
    reductions' order is fixed by the code, so the bits must agree."""
    from fastreg.cuda import _emulator
    fibers = _all_outputs("cuda_emulator")
    _emulator.set_mode("threads")
    try:
        threads = _all_outputs("cuda_emulator")
    finally:
        _emulator.set_mode("fibers")
    for i, (a, b) in enumerate(zip(fibers, threads)):
        assert_bitwise(b, a, case=f"output {i}: threads vs fibers")


@needs_emulator
def test_half_precision_is_for_the_cuda_backends_only():
    w = np.ones(8, ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"prox_l1: 'w' must be a floating array \(float32, "
                                        r"float64\)"):
        fastreg.prox_l1(w, 0.5)
    y = fastreg.prox_l1(w, 0.25, backend="cuda_emulator")
    assert y.dtype == BF16 and np.all(y.astype(np.float32) == 0.75)


# --------------------------------------------------------------------------- real hardware

@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_matches_torch_on_the_same_device(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupy
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    zt = (torch.randn(257, 32000, device="cuda", generator=g) * 3).to(tdt).requires_grad_()
    tt = torch.randint(0, 32000, (257,), device="cuda", generator=g)
    loss_t = torch.nn.functional.cross_entropy(zt.float(), tt, label_smoothing=0.1)
    (grad_t,) = torch.autograd.grad(loss_t, zt)
    loss, dl = fastreg.cross_entropy_label_smoothing(cupy.from_dlpack(zt.detach()),
                                                     cupy.from_dlpack(tt), smoothing=0.1)
    atol = {"float32": 1e-6, "bfloat16": 1e-4}[dtype]
    assert abs(float(loss) - loss_t.item()) <= 1e-4 * max(1.0, abs(loss_t.item()))
    assert (torch.from_dlpack(dl).float() - grad_t.float()).abs().max().item() <= atol


@needs_gpu
def test_adamw_matches_torch_fused_on_the_same_device():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupy
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda", generator=g))
    w = cupy.from_dlpack(p.detach().clone())
    m, v = cupy.zeros_like(w), cupy.zeros_like(w)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, fused=True)
    for step in range(1, 11):
        grad = torch.randn(1 << 20, device="cuda", generator=g)
        p.grad = grad
        opt.step()
        fastreg.adamw_step(w, cupy.from_dlpack(grad), m, v, step=step, lr=1e-3,
                           weight_decay=1e-2)
    assert (torch.from_dlpack(w) - p.detach()).abs().max().item() <= 1e-6
