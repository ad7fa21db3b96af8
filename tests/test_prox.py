"""The prox family's CPU kernels against the NumPy reference.

Fresh random data each run, float32 and float64, odd sizes, size 1, empty,
non-contiguous layouts, sizes that span several kernel chunks; outputs
poisoned with NaN before the call, fresh outputs too, in-place updates on
arrays placed inside guarded buffers (so an update that strays outside what it
owns shows up), and inputs checked unchanged afterwards.
"""

import numpy as np
import pytest

import fastreg
from _assert import assert_bitwise, assert_close, tol
from conftest import poisoned
from fastreg.cpu.prox import CHUNK
from prox_cases import LAYOUTS, place

DTYPES = [np.float32, np.float64]
dtype_ids = lambda t: np.dtype(t).name


def _layouts(shape):
    return ("contig",) if len(shape) == 0 or 0 in shape else LAYOUTS


def _cases(shapes):
    return [(s, lay) for s in shapes for lay in _layouts(s)]


def _with_layouts(cases):
    """(shape, axis, layout): every layout for small 2-D+ shapes, C order for the rest."""
    return [(s, a, lay) for s, a in cases
            for lay in (LAYOUTS if len(s) >= 2 and 0 not in s and max(s) <= 1000 else ("contig",))]


def _ids(cases):
    return [f"{s}-axis{a}-{lay}" for s, a, lay in cases]


# --------------------------------------------------------------------------- elementwise prox

EW_SHAPES = [(), (1,), (7,), (0,), (3, 0), (5, 37), (2, 3, 5, 7), (2 * CHUNK + 3,)]
THRESHOLDS = ["scalar", "zero", "full", "row", "zero-d"]


def _threshold(rng, kind, shape, dtype, scale=1.0):
    if kind == "scalar":
        return 0.7 * scale
    if kind == "zero":
        return 0.0
    if kind == "zero-d":
        return np.array(0.5 * scale, dtype)
    tshape = shape if kind == "full" else (*shape[:-1], 1) if shape else ()
    return (rng.uniform(0, 1.2, tshape) * scale).astype(dtype)


def _prox_call(op, w, t, **kw):
    if op == "prox_l1":
        return fastreg.prox_l1(w, t, **kw)
    return fastreg.prox_elastic_net(w, t, 0.3 if np.ndim(t) == 0 else t / 2, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("tkind", THRESHOLDS)
@pytest.mark.parametrize("shape,layout", _cases(EW_SHAPES))
@pytest.mark.parametrize("op", ["prox_l1", "prox_elastic_net"])
def test_elementwise_prox_matches_reference(op, shape, layout, tkind, dtype, rng):
    p = place(rng, shape, dtype, layout)
    w, w0 = p.a, p.a.copy()
    t = _threshold(rng, tkind, shape, dtype)
    case = f"{op} {np.dtype(dtype).name} {shape} {layout} threshold={tkind}"
    ref = _prox_call(op, w, t, backend="reference")
    rtol, atol = tol(dtype)
    out = poisoned(ref)
    got = _prox_call(op, w, t, out=out)
    assert got is out, case
    assert_close(got, ref, rtol=rtol, atol=atol, case=f"{case} (out=)")
    fresh = _prox_call(op, w, t)
    assert_close(fresh, ref, rtol=rtol, atol=atol, case=f"{case} (fresh)")
    assert fresh.dtype == w.dtype and fresh.shape == w.shape, case
    assert np.array_equal(w, w0), f"{case}: w was modified"
    # in place (out=w): the same values, nothing outside w touched
    got = _prox_call(op, w, t, out=w)
    assert got is w, case
    assert_close(w, ref, rtol=rtol, atol=atol, case=f"{case} (in place)")
    assert p.untouched(), f"{case}: in-place update wrote outside w"
    if op == "prox_l1":
        assert_bitwise(w, fresh, case=f"{case} in place vs fresh")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_prox_l1_zeros_are_exact_and_others_shift_by_the_threshold(dtype, rng):
    w = rng.standard_normal(10_001).astype(dtype)
    t = dtype(0.5)
    y = fastreg.prox_l1(w, float(t))
    inside = np.abs(w) <= t
    assert inside.any() and (~inside).any()
    assert np.all(y[inside] == 0)
    assert np.array_equal(y[~inside], w[~inside] - np.sign(w[~inside]) * t)


# --------------------------------------------------------------------------- group prox

GROUP_CASES = [
    ((7, 13), 0), ((7, 13), 1), ((7, 13), None), ((7, 13), (0, 1)), ((7, 13), ()),
    ((4, 5, 3, 3), (1, 2, 3)), ((3, 3, 4, 5), (0, 1, 2)), ((4, 5, 3, 3), (0, 2, 3)),
    ((4, 5, 3, 3), 1), ((4, 5, 3, 3), (1, 2)), ((1, 1), 1), ((5,), 0), ((0, 4), 1),
    ((4, 0), 1), ((3, 2 * CHUNK + 1), 1), ((70_000, 3), 0), ((2, 50_000, 3), 1),
]


def _group_threshold(rng, kind, shape, axis, dtype, scale):
    if kind == "scalar":
        return scale
    ax = tuple(range(len(shape))) if axis is None else \
        (axis,) if isinstance(axis, int) else axis
    gshape = tuple(1 if k in ax else n for k, n in enumerate(shape))
    return (rng.uniform(0.3, 1.2, gshape) * scale).astype(dtype)


def _group_call(op, w, t, axis, **kw):
    if op == "prox_group_l1":
        return fastreg.prox_group_l1(w, t, axis=axis, **kw)
    return fastreg.max_norm(w, t if np.ndim(t) == 0 else float(np.max(t, initial=1.0)), axis=axis,
                            eps=0.0 if np.ndim(t) else 1e-7, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("tkind", ["scalar", "per-group"])
@pytest.mark.parametrize("shape,axis,layout", _with_layouts(GROUP_CASES),
                         ids=_ids(_with_layouts(GROUP_CASES)))
@pytest.mark.parametrize("op", ["prox_group_l1", "max_norm"])
def test_group_ops_match_reference(op, shape, axis, layout, tkind, dtype, rng):
    p = place(rng, shape, dtype, layout)
    w, w0 = p.a, p.a.copy()
    # thresholds around the typical group norm, so some groups vanish or get clipped
    ax = tuple(range(len(shape))) if axis is None else (axis,) if isinstance(axis, int) else axis
    size = int(np.prod([shape[k] for k in ax])) if shape else 1
    t = _group_threshold(rng, tkind, shape, axis, dtype, float(np.sqrt(max(size, 1))))
    case = f"{op} {np.dtype(dtype).name} {shape} axis={axis} {layout} {tkind}"
    ref = _group_call(op, w, t, axis, backend="reference")
    rtol, atol = tol(dtype)
    out = poisoned(ref)
    assert _group_call(op, w, t, axis, out=out) is out
    assert_close(out, ref, rtol=rtol, atol=atol, case=f"{case} (out=)")
    fresh = _group_call(op, w, t, axis)
    assert_close(fresh, ref, rtol=rtol, atol=atol, case=f"{case} (fresh)")
    assert np.array_equal(w, w0), f"{case}: w was modified"
    assert _group_call(op, w, t, axis, out=w) is w
    assert_bitwise(w, fresh, case=f"{case} in place vs fresh")
    assert p.untouched(), f"{case}: in-place update wrote outside w"
    if op == "prox_group_l1" and ref.size:
        ax_ = tuple(range(len(shape))) if axis is None else ax
        zero_groups = np.all(ref == 0, axis=ax_)
        assert np.array_equal(np.all(fresh == 0, axis=ax_), zero_groups), \
            f"{case}: exact-zero groups differ from the reference"


# --------------------------------------------------------------------------- optimizer steps

STEP_SHAPES = [(1,), (7,), (0,), (5, 37), (2 * CHUNK + 5,)]

SGD_VARIANTS = [
    {},
    {"momentum": 0.9, "first_step": True},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
    {"momentum": 0.8, "nesterov": True, "l1": 0.5},
    {"momentum": 0.9, "decoupled_weight_decay": 0.3, "l1": 0.4, "weight_decay": 0.1},
    {"maximize": True, "weight_decay": 0.2, "l1": 1.0},
    {"momentum": 0.9, "nesterov": True, "maximize": True, "first_step": True,
     "decoupled_weight_decay": 0.1},
]

ADAM_VARIANTS = [
    ("adamw_step", {}),
    ("adamw_step", {"l1": 0.5, "weight_decay": 0.1}),
    ("adamw_step", {"amsgrad": True, "l1": 0.2}),
    ("adamw_step", {"maximize": True, "betas": (0.3, 0.8), "eps": 1e-3}),
    ("adam_step", {}),
    ("adam_step", {"weight_decay": 0.1, "amsgrad": True}),
    ("adam_step", {"weight_decay": 0.1, "decoupled_weight_decay": True, "l1": 0.3}),
    ("adam_step", {"weight_decay": 0.05, "maximize": True, "l1": 0.1, "betas": (0.0, 0.0)}),
]


def _state(rng, shape, dtype, layout, kind):
    """Placed optimizer state: momentum buffers and first moments of either sign,
    second moments >= 0."""
    values = rng.standard_normal(shape) * 0.1
    if kind == "second":
        values = values ** 2
    return place(rng, shape, dtype, layout, values=values)


def _run_sgd(backend, ws, gs, bufs, kw):
    kw = dict(kw)
    if kw.get("momentum"):
        kw["momentum_buffer"] = bufs
    return fastreg.sgd_step(ws, gs, lr=0.1, backend=backend, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=lambda v: ",".join(map(str, v)) or "plain")
@pytest.mark.parametrize("shape,layout", _cases(STEP_SHAPES))
def test_sgd_step_matches_reference(shape, layout, variant, dtype, rng):
    w = place(rng, shape, dtype, layout)
    g = place(rng, shape, dtype, layout)
    b = _state(rng, shape, dtype, layout, "first")
    g0, ref = g.buf.copy(), [w.a.copy(), b.a.copy()]
    _run_sgd("reference", ref[0], g.a, ref[1], variant)
    assert _run_sgd(None, w.a, g.a, b.a, variant) is w.a
    case = f"sgd {np.dtype(dtype).name} {shape} {layout} {variant}"
    rtol, atol = tol(dtype)
    assert_close(w.a, ref[0], rtol=rtol, atol=atol, case=f"{case} w")
    assert_close(b.a, ref[1], rtol=rtol, atol=atol, case=f"{case} momentum_buffer")
    assert w.untouched() and b.untouched(), f"{case}: wrote outside w or the buffer"
    assert np.array_equal(g.buf, g0), f"{case}: g was modified"


def _run_adam(op, backend, ws, gs, ms, vs, vmaxs, kw):
    return getattr(fastreg, op)(ws, gs, ms, vs, step=3, lr=0.01, max_exp_avg_sq=vmaxs,
                                backend=backend, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("op,variant", ADAM_VARIANTS,
                         ids=[f"{o}-{','.join(map(str, v)) or 'plain'}" for o, v in ADAM_VARIANTS])
@pytest.mark.parametrize("shape,layout", _cases(STEP_SHAPES))
def test_adam_steps_match_reference(op, variant, shape, layout, dtype, rng):
    w = place(rng, shape, dtype, layout)
    g = place(rng, shape, dtype, layout)
    m = _state(rng, shape, dtype, layout, "first")
    v = _state(rng, shape, dtype, layout, "second")
    vm = _state(rng, shape, dtype, layout, "second")
    g0 = g.buf.copy()
    ref = [a.a.copy() for a in (w, m, v, vm)]
    _run_adam(op, "reference", *ref[:1], g.a, *ref[1:], variant)
    assert _run_adam(op, None, w.a, g.a, m.a, v.a, vm.a, variant) is w.a
    case = f"{op} {np.dtype(dtype).name} {shape} {layout} {variant}"
    rtol, atol = tol(dtype)
    for name, got, r in zip(("w", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                            (w.a, m.a, v.a, vm.a), ref):
        assert_close(got, r, rtol=rtol, atol=atol, case=f"{case} {name}")
    for name, p in (("w", w), ("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vm)):
        assert p.untouched(), f"{case}: wrote outside {name}"
    assert np.array_equal(g.buf, g0), f"{case}: g was modified"
    if not variant.get("amsgrad"):
        assert np.array_equal(vm.a, ref[3]), f"{case}: max_exp_avg_sq touched without amsgrad"


def _tensor_list(rng, dtypes_and_shapes):
    """Parameters of mixed dtypes, sizes (empty, several chunks) and layouts."""
    out = []
    for i, (dtype, shape) in enumerate(dtypes_and_shapes):
        layout = "strided" if i == 2 else "contig"
        out.append(place(rng, shape, dtype, layout).a)
    return out


LIST_SPEC = [(np.float32, (3, 5)), (np.float64, (17,)), (np.float32, (4, 9)), (np.float32, (0,)),
             (np.float64, (2 * CHUNK + 1,)), (np.float32, (CHUNK + 7,)), (np.float32, (1,))]


@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=lambda v: ",".join(map(str, v)) or "plain")
def test_sgd_list_equals_per_tensor_calls_bitwise(variant, rng):
    ws = _tensor_list(rng, LIST_SPEC)
    gs = [rng.standard_normal(w.shape).astype(w.dtype) for w in ws]
    bs = [rng.standard_normal(w.shape).astype(w.dtype) for w in ws]
    ws1, bs1 = [w.copy() for w in ws], [b.copy() for b in bs]
    assert _run_sgd(None, ws, gs, bs, variant) is ws
    for w, g, b in zip(ws1, gs, bs1):
        _run_sgd(None, w, g, b, variant)
    for i, (a, b) in enumerate(zip(ws + bs, ws1 + bs1)):
        assert_bitwise(a, b, case=f"sgd {variant} list vs per tensor, array {i}")


@pytest.mark.parametrize("op,variant", ADAM_VARIANTS,
                         ids=[f"{o}-{','.join(map(str, v)) or 'plain'}" for o, v in ADAM_VARIANTS])
def test_adam_list_equals_per_tensor_calls_bitwise(op, variant, rng):
    ws = _tensor_list(rng, LIST_SPEC)
    gs = [rng.standard_normal(w.shape).astype(w.dtype) for w in ws]
    ms = [(rng.standard_normal(w.shape) * 0.1).astype(w.dtype) for w in ws]
    vs = [(rng.standard_normal(w.shape) * 0.1).astype(w.dtype) ** 2 for w in ws]
    vms = [v * 1.5 for v in vs]
    copies = [[a.copy() for a in arrs] for arrs in (ws, ms, vs, vms)]
    _run_adam(op, None, ws, gs, ms, vs, vms, variant)
    for i in range(len(ws)):
        _run_adam(op, None, copies[0][i], gs[i], copies[1][i], copies[2][i], copies[3][i],
                  variant)
    for name, lst, single in zip(("w", "m", "v", "vmax"), (ws, ms, vs, vms), copies):
        for i, (a, b) in enumerate(zip(lst, single)):
            assert_bitwise(a, b, case=f"{op} {variant} list vs per tensor, {name}[{i}]")


def test_empty_list_is_a_no_op():
    assert fastreg.sgd_step([], [], lr=0.1) == []
    assert fastreg.adamw_step([], [], [], [], step=1, lr=0.1) == []


# --------------------------------------------------------------------------- cross-entropy

CE_CASES = [((1, 1), {}), ((13, 17), {}), ((6, 2), {}), ((0, 5), {}),
            ((4, 3001), {}), ((64, 100), {"ignore": True}), ((9, 33), {"layout": "strided"}),
            ((9, 33), {"layout": "transposed", "ignore": True}), ((5, 7), {"all_ignored": True})]
# style "others" needs K >= 2 (K = 1 is a validation test)
CE_PARAMS = [(s, o, st) for s, o in CE_CASES for st in ("uniform", "others")
             if st == "uniform" or s[1] >= 2]


def _ce_inputs(rng, shape, dtype, opts):
    N, K = shape
    p = place(rng, shape, dtype, opts.get("layout", "contig"), rng.standard_normal(shape) * 3)
    target = rng.integers(0, K, N)
    ignore = None
    if opts.get("ignore") or opts.get("all_ignored"):
        ignore = -100
        target[rng.random(N) < (1.0 if opts.get("all_ignored") else 0.3)] = ignore
    return p, target, ignore


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("shape,opts,style", CE_PARAMS,
                         ids=[f"{s}-{o}-{st}" for s, o, st in CE_PARAMS])
def test_cross_entropy_matches_reference(shape, opts, style, smoothing, reduction, dtype, rng):
    p, target, ignore = _ce_inputs(rng, shape, dtype, opts)
    z, z0, t0 = p.a, p.a.copy(), target.copy()
    kw = dict(smoothing=smoothing, reduction=reduction, ignore_index=ignore, style=style)
    case = f"ce {np.dtype(dtype).name} {shape} {opts} {kw}"
    ref = fastreg.cross_entropy_label_smoothing(z, target, backend="reference", **kw)
    rtol, atol = tol(dtype, "grad")
    out = tuple(poisoned(r) for r in ref)
    got = fastreg.cross_entropy_label_smoothing(z, target, out=out, **kw)
    assert got[0] is out[0] and got[1] is out[1], case
    fresh = fastreg.cross_entropy_label_smoothing(z, target, **kw)
    for variant, res in (("out=", got), ("fresh", fresh)):
        assert_close(res[0], ref[0], rtol=rtol, atol=atol, case=f"{case} loss ({variant})")
        assert_close(res[1], ref[1], rtol=rtol, atol=atol, case=f"{case} dlogits ({variant})")
        assert res[0].dtype == res[1].dtype == z.dtype, case
    assert np.array_equal(z, z0) and np.array_equal(target, t0), f"{case}: inputs modified"
    # the gradient written over the logits (out[1] = logits)
    loss, dl = fastreg.cross_entropy_label_smoothing(z, target, out=(None, z), **kw)
    assert dl is z, case
    assert_bitwise(z, fresh[1], case=f"{case} in-place dlogits vs fresh")
    assert_bitwise(loss, fresh[0], case=f"{case} loss with in-place dlogits")
    assert p.untouched(), f"{case}: in-place dlogits wrote outside the logits"


# --------------------------------------------------------------------------- data scaling

SCALE_CASES = [((20, 7), 0), ((20, 7), 1), ((5, 6, 7, 8), (0, 2, 3)), ((5, 6, 7, 8), 0),
               ((5, 6, 7, 8), (1, 2)), ((5, 6, 7, 8), 3), ((1, 3), 0), ((0, 3), 1), ((9,), None),
               ((40_000, 3), 0), ((3, 70_001), 1)]


def _scale_call(op, x, axis, stats=None, **kw):
    if op == "standardize":
        extra = {} if stats is None else {"mean": stats[0], "std": stats[1]}
        return fastreg.standardize(x, axis=axis, eps=kw.pop("eps", 0.0), **extra, **kw)
    extra = {} if stats is None else {"data_min": stats[0], "data_max": stats[1]}
    return fastreg.min_max_scale(x, axis=axis, feature_range=(-1.0, 2.0), **extra, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape,axis,layout", _with_layouts(SCALE_CASES),
                         ids=_ids(_with_layouts(SCALE_CASES)))
@pytest.mark.parametrize("op", ["standardize", "min_max_scale"])
def test_scaling_fit_and_apply_match_reference(op, shape, axis, layout, dtype, rng):
    offset = rng.uniform(-50, 50, shape[-1:]) if shape else 0.0
    p = place(rng, shape, dtype, layout, values=rng.standard_normal(shape) * 3 + offset)
    x, x0 = p.a, p.a.copy()
    if x.ndim == 2 and x.shape[1] > 2 and x.shape[0] > 1:
        x[:, 1] = 4.2          # a constant feature (axis 0) / a constant entry
        x0 = x.copy()
    case = f"{op} {np.dtype(dtype).name} {shape} axis={axis} {layout}"
    ref = _scale_call(op, x, axis, backend="reference")
    rtol, atol = tol(dtype)
    out = tuple(poisoned(r) for r in ref)
    got = _scale_call(op, x, axis, out=out)
    fresh = _scale_call(op, x, axis)
    for variant, res in (("out=", got), ("fresh", fresh)):
        for name, a, r in zip(("y", "stat0", "stat1"), res, ref):
            assert_close(a, r, rtol=rtol, atol=atol, case=f"{case} {name} ({variant})")
            assert a.dtype == x.dtype, case
    assert all(a is o for a, o in zip(got, out)), case
    # apply the fitted statistics to new data
    x_new = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
    ref_new = _scale_call(op, x_new, axis, stats=ref[1:], backend="reference")
    y_out = poisoned(x_new)
    got_new = _scale_call(op, x_new, axis, stats=fresh[1:], out=(y_out, None, None))
    assert got_new[0] is y_out and got_new[1] is fresh[1] and got_new[2] is fresh[2]
    assert_close(got_new[0], ref_new[0], rtol=rtol, atol=atol, case=f"{case} apply")
    # applying the fitted statistics to the training data gives the fit's y
    again = _scale_call(op, x, axis, stats=fresh[1:])
    assert_bitwise(again[0], fresh[0], case=f"{case} apply vs fit")
    assert np.array_equal(x, x0), f"{case}: x was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_scaling_constant_features(dtype, rng):
    x = rng.standard_normal((50, 4)).astype(dtype)
    x[:, 0] = 0.1          # not exactly representable: the variance is rounding noise
    x[:, 2] = -3.0
    y, mean, std = fastreg.standardize(x, axis=0)
    assert np.all(y[:, [0, 2]] == 0) and std[0] == 1 and std[2] == 1
    assert np.allclose(y[:, [1, 3]].std(axis=0), 1, rtol=1e-5)
    y, lo, hi = fastreg.min_max_scale(x, axis=0, feature_range=(-2.0, 5.0))
    assert np.all(y[:, [0, 2]] == -2.0)
    assert np.allclose(y[:, [1, 3]].min(axis=0), -2) and np.allclose(y[:, [1, 3]].max(axis=0), 5)


def test_float32_exp_of_the_cross_entropy_kernel_is_accurate():
    """The vectorizable exp used for float32 rows: within 2 ulp of the exact value down
    to exp(-87), and below 2e-38 beyond (a negligible softmax term next to exp(0) = 1)."""
    from fastreg.cpu.prox import _E_BLOCK, _exp_row_f32
    x = np.concatenate([np.linspace(-87, 0, 1_000_001), np.linspace(-200, -87, 1001),
                        [0.0, -1e-30, -0.5, -np.log(2)]]).astype(np.float32)
    e = np.empty_like(x)
    _exp_row_f32(x, np.float32(0), e, np.empty(_E_BLOCK, np.int32))
    exact = np.exp(x.astype(np.float64))
    inside = x >= -87
    ulp = np.spacing(exact[inside].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(e[inside] - exact[inside]) / ulp) <= 2.0
    assert np.all((e[~inside] >= 0) & (e[~inside] < 2e-38))
    assert e[-4] == 1.0
