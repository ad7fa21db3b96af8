"""Numerics of the norm family on every backend, against float64 evaluations of the
definitions on the stored inputs.

- Large offsets (mean 1e4..1e6, std 1) in float32: the outputs keep float32
  accuracy (no E[x^2] - E[x]^2 cancellation, no mean rounded before x - mean).
- float16/bfloat16 (CUDA kernels, emulated; on a GPU where present): large
  offsets relative to the spread, and values near the float16 maximum, give
  finite results within the low-precision bound of tests/_cuda_targets.py.
- Constant rows/groups/channels: variance 0, rstd = 1/sqrt(eps), no NaN,
  forward and backward.
- NaN/Inf in one element reach only what shares its statistics (row, group,
  channel, instance), forward and backward: everything else is bitwise the
  result without it.

Known limit (README, Known limits): the saved mean is stored in float32 for float32
inputs, so a backward at |mean|/std ~ 1e6 carries its rounding; the forward
does not.
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

import fastreg
from _cuda_targets import ATOL_LOW, BF16, GPU, needs_emulator

F16 = np.dtype(np.float16)
EMU = pytest.param("cuda_emulator", marks=[needs_emulator, pytest.mark.gpu])
BACKENDS = ["cpu", EMU]


# --------------------------------------------------------------------------- ops

@dataclass
class Norm:
    name: str
    channel: bool          # statistics per channel/group/instance (x is (N, C, L) or (N, L, C))
    centred: bool = True

    def fwd(self, x, w, b, eps, backend, axis=1):
        if self.name == "layer_norm":
            return fastreg.layer_norm(x, w, b, eps, backend=backend)
        if self.name == "rms_norm":
            return fastreg.rms_norm(x, w, eps, backend=backend)
        if self.name == "batch_norm":
            return fastreg.batch_norm(x, w, b, eps=eps, axis=axis, backend=backend)
        if self.name == "group_norm":
            return fastreg.group_norm(x, GROUPS, w, b, eps, axis=axis, backend=backend)
        return fastreg.instance_norm(x, w, b, eps=eps, axis=axis, backend=backend)

    def bwd(self, dy, x, stats, w, b, backend, axis=1):
        if self.name == "layer_norm":
            return fastreg.layer_norm_backward(dy, x, *stats, w, b, backend=backend)
        if self.name == "rms_norm":
            return fastreg.rms_norm_backward(dy, x, *stats, w, backend=backend)
        if self.name == "batch_norm":
            return fastreg.batch_norm_backward(dy, x, *stats, w, b, axis=axis, backend=backend)
        if self.name == "group_norm":
            return fastreg.group_norm_backward(dy, x, *stats, GROUPS, w, b, axis=axis,
                                               backend=backend)
        return fastreg.instance_norm_backward(dy, x, *stats, w, b, axis=axis, backend=backend)

    def shape(self, axis=1, big=False):
        if not self.channel:
            return (3, 20000) if big else (6, 37)   # 20000: the CUDA loop path
        return ((4, 8, 300) if big else (4, 8, 9)) if axis == 1 else (4, 9, 8)

    def stat_mask(self, shape, axis, idx):
        """Elements of x sharing their statistics with element idx."""
        mask = np.zeros(shape, bool)
        if not self.channel:
            mask[idx[0]] = True
            return mask
        c_ax = axis % len(shape)
        n, c = idx[0], idx[c_ax]
        sel = [slice(None)] * len(shape)
        if self.name == "batch_norm":
            sel[c_ax] = c
        elif self.name == "instance_norm":
            sel[0], sel[c_ax] = n, c
        else:
            per = shape[c_ax] // GROUPS
            sel[0], sel[c_ax] = n, slice(c // per * per, c // per * per + per)
        mask[tuple(sel)] = True
        return mask

    def param_mask(self, shape, axis, idx):
        """Channels whose weight/bias gradients sum over the touched elements (None: all)."""
        if not self.channel:
            return None
        c_ax = axis % len(shape)
        return self.stat_mask(shape, axis, idx).any(axis=tuple(
            a for a in range(len(shape)) if a != c_ax))


GROUPS = 4
EPS32 = float(np.finfo(np.float32).eps)
OPS = [Norm("layer_norm", False), Norm("rms_norm", False, centred=False),
       Norm("batch_norm", True), Norm("group_norm", True), Norm("instance_norm", True)]
OP_IDS = [op.name for op in OPS]


def define(op, x, w, b, eps, axis=1):
    """y, and the statistics (mean, rstd), by the definition in float64 on the stored x."""
    x = x.astype(np.float64)
    w = None if w is None else w.astype(np.float64)
    b = None if b is None else b.astype(np.float64)
    if op.channel:
        x = np.moveaxis(x, axis, 1)
    N, C = x.shape[0], x.shape[1]
    if op.name in ("layer_norm", "rms_norm"):
        v = x.reshape(N, 1, -1)
    elif op.name == "batch_norm":
        v = np.moveaxis(x, 1, 0).reshape(1, C, -1)
    elif op.name == "instance_norm":
        v = x.reshape(N, C, -1)
    else:
        v = x.reshape(N, GROUPS, -1)
    if op.centred:
        mean = v.mean(-1, keepdims=True)
        rstd = 1 / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + eps)
        xh = (v - mean) * rstd
    else:
        mean = None
        rstd = 1 / np.sqrt((v * v).mean(-1, keepdims=True) + eps)
        xh = v * rstd
    if op.name == "batch_norm":
        xh = np.moveaxis(xh.reshape(np.moveaxis(x, 1, 0).shape), 0, 1)
    else:
        xh = xh.reshape(x.shape)
    pshape = (1, C) + (1,) * (x.ndim - 2) if op.channel else (1, -1)
    y = xh * (1 if w is None else w.reshape(pshape)) + (0 if b is None else b.reshape(pshape))
    if op.channel:
        y = np.moveaxis(y, 1, axis)
    stats = (mean, rstd) if op.centred else (rstd,)
    return y, [None if s is None else s.reshape(-1) for s in stats]


def _data(rng, op, dtype, offset, std, axis=1, big=False):
    shape = op.shape(axis, big)
    C = shape[axis % len(shape)] if op.channel else shape[-1]
    x = (rng.standard_normal(shape) * std + offset).astype(dtype)
    w = (1 + 0.25 * rng.standard_normal(C)).astype(dtype)
    b = None if not op.centred else (0.5 * rng.standard_normal(C)).astype(dtype)
    return x, w, b


def _stats(op, res):
    return tuple(res[1:])


# --------------------------------------------------------------------------- large offsets

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_float32_with_large_offset_matches_float64_definition(op, offset, backend, rng):
    for big in (False, True):   # True: the CUDA loop path of layer/RMS norm; several blocks
        x, w, b = _data(rng, op, np.float32, offset, 1.0, big=big)
        res = op.fwd(x, w, b, 1e-5, backend)
        y64, stats64 = define(op, x, w, b, 1e-5)
        err = np.max(np.abs(res[0].astype(np.float64) - y64))
        assert err < 4e-6, f"{op.name} on {backend}, mean {offset:g}, shape {x.shape}: " \
                           f"max |y - y_float64| = {err:.3g}"
        got = _stats(op, res)
        for name, g, e in zip(("mean", "rstd") if op.centred else ("rstd",), got, stats64):
            g = g.reshape(-1).astype(np.float64)
            if name == "mean":  # the float32 rounding of the exact mean, within one ulp
                bound = np.spacing(np.abs(e).astype(np.float32)).astype(np.float64)
                assert (np.abs(g - e) <= bound).all(), f"{op.name} {backend}: mean"
            else:
                np.testing.assert_allclose(g, e, rtol=2e-6, err_msg=f"{op.name} {backend} rstd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_fused_dropout_add_layer_norm_with_large_offset_matches_float64(offset, backend, rng):
    """The LayerNorm of the stored residual sum s keeps float32 accuracy at any offset
    (the CUDA register and loop paths were 0.06 off at a mean of 1e6)."""
    for D in (37, 20000):       # the CUDA register and loop paths
        x = (rng.standard_normal((3, D)) + offset).astype(np.float32)
        res = rng.standard_normal((3, D)).astype(np.float32)
        w = (1 + 0.25 * rng.standard_normal(D)).astype(np.float32)
        for p in (0.0, 0.3):
            y, s, mean, rstd, _ = fastreg.dropout_add_layer_norm(x, res, w, None, p, rng=7,
                                                                 backend=backend)
            y64, (m64, r64) = define(OPS[0], s, w, None, 1e-5)
            err = np.max(np.abs(y - y64))
            assert err < 4e-6, f"{backend} D={D} p={p} mean {offset:g}: max |y - y64| = {err:.3g}"
            np.testing.assert_allclose(rstd, r64, rtol=2e-6)


def _low_bound(y64, dtype):
    """Twice the error of the exact result stored in dtype, plus the dtype's atol."""
    stored = y64.astype(dtype).astype(np.float64)
    return 2 * np.abs(stored - y64) + ATOL_LOW[np.dtype(dtype)] * max(1.0, np.abs(y64).max())


# (dtype, offset, std): offset/std ~ 1e3 (float16) and 1e2 (bfloat16) where the
# stored inputs still resolve the spread; near the float16 maximum (65504)
LOW_CASES = [(F16, 1e4, 8.0), (F16, 6.2e4, 64.0), (BF16, 1e4, 100.0), (BF16, 1e6, 1e4)]


@needs_emulator
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,offset,std", LOW_CASES,
                         ids=[f"{np.dtype(d).name}-{o:g}" for d, o, _ in LOW_CASES])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_16_bit_large_values_forward_and_backward_are_finite_and_accurate(op, dtype, offset,
                                                                         std, rng):
    x, w, b = _data(rng, op, dtype, offset, std)
    finite_max = float(ml_dtypes.finfo(dtype).max)
    assert np.isfinite(x.astype(np.float64)).all() and np.abs(x.astype(np.float64)).max() <= \
        finite_max
    res = op.fwd(x, w, b, 1e-5, "cuda_emulator")
    y64, _ = define(op, x, w, b, 1e-5)
    y = res[0].astype(np.float64)
    case = f"{op.name} {np.dtype(dtype).name} mean {offset:g} std {std:g}"
    assert np.isfinite(y).all(), f"{case}: non-finite y"
    err, bound = np.abs(y - y64), _low_bound(y64, dtype)
    assert (err <= bound).all(), f"{case}: max |y - y64| = {err.max():.3g}"
    for s in _stats(op, res):
        assert np.isfinite(s).all(), f"{case}: non-finite statistics"
    dy = rng.standard_normal(x.shape).astype(dtype)
    grads = op.bwd(dy, x, _stats(op, res), w, b, "cuda_emulator")
    # the float64 reference on the float64 statistics of the stored inputs
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    ref = op.fwd(x64, w64, b64, 1e-5, "reference")
    ref_grads = op.bwd(dy.astype(np.float64), x64, _stats(op, ref), w64, b64, "reference")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        if r is None:
            continue
        g = g.astype(np.float64)
        assert np.isfinite(g).all(), f"{case}: non-finite {name}"
        # the saved float32 mean is off by up to half an ulp of itself: offset/std times
        # float32's eps in xhat (README, Known limits)
        bound = _low_bound(r, dtype) + 4 * EPS32 * offset / std * np.abs(r).max()
        assert (np.abs(g - r) <= bound).all(), \
            f"{case}: {name} max err {np.abs(g - r).max():.3g}"


# --------------------------------------------------------------------------- constant rows

CONST_DTYPES = {"cpu": [np.float32, np.float64],
                "cuda_emulator": [F16, BF16, np.float32, np.float64]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_constant_rows_give_rstd_one_over_sqrt_eps_and_finite_gradients(op, backend, rng):
    eps = 1e-5
    for dtype in CONST_DTYPES[backend]:
        for axis in ((1, -1) if op.channel else (1,)):
            shape = op.shape(axis)
            # one random constant per statistic: every row/group/channel/instance all-equal
            x64 = np.full(shape, np.nan)
            for flat in range(x64.size):
                idx = np.unravel_index(flat, shape)
                if np.isnan(x64[idx]):
                    x64[op.stat_mask(shape, axis, idx)] = rng.uniform(-3, 3)
            if op.name == "rms_norm":
                x64[:] = 0.0          # RMS norm's "variance" is mean(x^2): zero rows
            x = x64.astype(dtype)
            _, w, b = _data(rng, op, dtype, 0.0, 1.0, axis)
            case = f"{op.name} {backend} {np.dtype(dtype).name} axis {axis}"
            res = op.fwd(x, w, b, eps, backend, axis)
            y64, _ = define(op, x, w, b, eps, axis)
            y = res[0].astype(np.float64)
            assert np.isfinite(y).all(), f"{case}: non-finite y"
            # a constant row normalizes to the bias (0 without one)
            np.testing.assert_allclose(y, y64, atol=1e-3 if np.dtype(dtype) in (F16, BF16)
                                       else 1e-4, err_msg=case)
            rstd = res[-1].astype(np.float64)
            np.testing.assert_allclose(rstd, 1 / np.sqrt(eps), rtol=1e-5, err_msg=case)
            dy = rng.standard_normal(x.shape).astype(dtype)
            grads = op.bwd(dy, x, _stats(op, res), w, b, backend, axis)
            for name, g in zip(("dx", "dweight", "dbias"), grads):
                assert g is None or np.isfinite(g.astype(np.float64)).all(), \
                    f"{case}: non-finite {name}"


# --------------------------------------------------------------------------- NaN / Inf

def _where_bad(op, axis, rng):
    shape = op.shape(axis)
    return shape, tuple(int(rng.integers(0, n)) for n in shape)


PROP_DTYPES = {"cpu": [np.float32, np.float64], "cuda_emulator": [F16, np.float32]}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_nan_and_inf_reach_only_what_shares_their_statistics(op, backend, bad, rng):
    for dtype in PROP_DTYPES[backend]:
        for axis in ((1, -1) if op.channel else (1,)):
            shape, idx = _where_bad(op, axis, rng)
            x, w, b = _data(rng, op, dtype, 0.0, 1.0, axis)
            dirty = x.copy()
            dirty[idx] = bad
            dy = rng.standard_normal(shape).astype(dtype)
            case = f"{op.name} {backend} {np.dtype(dtype).name} axis {axis}, {bad} at {idx}"
            clean_res = op.fwd(x, w, b, 1e-5, backend, axis)
            dirty_res = op.fwd(dirty, w, b, 1e-5, backend, axis)
            region = op.stat_mask(shape, axis, idx)
            for name, c, d in (("y", clean_res[0], dirty_res[0]),):
                assert not np.isfinite(d[idx].astype(np.float64)), f"{case}: {name} at {idx}"
                assert d[~region].tobytes() == c[~region].tobytes(), \
                    f"{case}: {name} changed outside the touched statistics"
            if op.centred:   # the whole row/group is NaN (its mean and variance are)
                assert np.isnan(d[region].astype(np.float64)).all(), f"{case}: y in the region"
            # the statistics: non-finite for the touched one, bitwise the others
            stat_region = op.stat_mask(shape, axis, idx)
            if op.channel:
                c_ax = axis % len(shape)
                if op.name == "batch_norm":
                    srows = stat_region.any(axis=tuple(a for a in range(len(shape)) if a != c_ax))
                elif op.name == "instance_norm":
                    srows = stat_region.any(axis=tuple(a for a in range(1, len(shape))
                                                       if a != c_ax))
                else:
                    per = shape[c_ax] // GROUPS
                    srows = np.zeros((shape[0], GROUPS), bool)
                    srows[idx[0], idx[c_ax] // per] = True
            else:
                srows = np.zeros(shape[0], bool)
                srows[idx[0]] = True
            for k, (cs, ds) in enumerate(zip(clean_res[1:], dirty_res[1:])):
                sr = srows.reshape(ds.shape)
                if not op.centred and np.isinf(bad):   # mean(x^2) = inf: rstd = 0
                    assert (ds[sr] == 0).all(), f"{case}: rstd of an infinite row"
                else:
                    assert not np.isfinite(ds[sr]).any(), f"{case}: statistic {k} stayed finite"
                assert ds[~sr].tobytes() == cs[~sr].tobytes(), f"{case}: statistic {k} moved"
            clean_g = op.bwd(dy, x, _stats(op, clean_res), w, b, backend, axis)
            dirty_g = op.bwd(dy, dirty, _stats(op, dirty_res), w, b, backend, axis)
            dx_c, dx_d = clean_g[0], dirty_g[0]
            assert not np.isfinite(dx_d[idx].astype(np.float64)), f"{case}: dx at {idx}"
            assert dx_d[~region].tobytes() == dx_c[~region].tobytes(), \
                f"{case}: dx changed outside the touched statistics"
            if op.centred:   # dbias = sum dy does not see x
                assert dirty_g[2].tobytes() == clean_g[2].tobytes(), f"{case}: dbias changed"
            pm = op.param_mask(shape, axis, idx)
            if pm is not None:
                dw_c, dw_d = clean_g[1], dirty_g[1]
                assert not np.isfinite(dw_d[pm].astype(np.float64)).all(), f"{case}: dweight"
                assert dw_d[~pm].tobytes() == dw_c[~pm].tobytes(), \
                    f"{case}: dweight changed outside the touched channels"


@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_float32_large_offset_on_the_gpu(op, rng):
    import cupy
    x, w, b = _data(rng, op, np.float32, 1e6, 1.0, big=True)
    res = op.fwd(cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b),
                 1e-5, "cuda")
    y64, _ = define(op, x, w, b, 1e-5)
    err = np.max(np.abs(cupy.asnumpy(res[0]).astype(np.float64) - y64))
    assert err < 4e-6, f"{op.name} on the GPU, mean 1e6: max |y - y_float64| = {err:.3g}"


# --------------------------------------------------------------------------- prox near float16 max

def _near_max_calls(rng):
    """Calls whose inputs sit near the float16 maximum (65504) and whose exact results
    are finite in float16: reductions (squares, ranges, log-sum-exp) that would overflow
    if formed in float16."""
    from strategies import Call

    def big(shape, lo=5.0e4, hi=6.5e4):
        return rng.uniform(lo, hi, shape).astype(F16) * np.where(rng.random(shape) < 0.5, -1, 1
                                                                  ).astype(F16)
    w = big((4, 64))
    logits = rng.uniform(5.5e4, 6.5e4, (6, 40)).astype(F16)
    return [
        Call("max_norm", fastreg.max_norm, dict(w=w, max_value=1.0, axis=1), dtype=F16),
        Call("prox_group_l1", fastreg.prox_group_l1, dict(w=w, threshold=1e5, axis=1),
             dtype=F16),
        Call("prox_l1", fastreg.prox_l1, dict(w=w, threshold=1e4), dtype=F16),
        Call("standardize", fastreg.standardize, dict(x=w, axis=0), dtype=F16),
        Call("min_max_scale", fastreg.min_max_scale, dict(x=w, axis=0, feature_range=(0.0, 1.0)),
             dtype=F16),
        Call("cross_entropy_label_smoothing", fastreg.cross_entropy_label_smoothing,
             dict(logits=logits, target=rng.integers(0, 40, 6), smoothing=0.1), kind="grad",
             dtype=F16),
        Call("sgd_step", fastreg.sgd_step,
             # gradients along w: the step moves w towards 0 and stays finite
             dict(w=w.copy(), g=(np.abs(big((4, 64), 1e4, 2e4)) * np.sign(w)).astype(F16),
                  lr=0.5, momentum=0.9,
                  momentum_buffer=(np.abs(big((4, 64), 1e4, 2e4)) * np.sign(w)).astype(F16)),
             inplace=("w", "momentum_buffer"),
             kind="grad", dtype=F16),
    ]


@needs_emulator
@pytest.mark.gpu
def test_float16_near_its_maximum_through_the_prox_kernels(rng):
    from strategies import check_low_precision
    for call in _near_max_calls(rng):
        res = call.run("cuda_emulator")
        outs = (list(res[0]) if isinstance(res[0], tuple) else [res[0]]) + res[1]
        for i, a in enumerate(outs):
            assert np.isfinite(np.asarray(a, np.float64)).all(), \
                f"{call.name}: result {i} not finite"
        check_low_precision(call, "cuda_emulator")


# --------------------------------------------------------------------------- NaN / Inf, other families

def _confined_cases():
    """(name, fn(x, backend) -> arrays shaped like x (or per row / per column), the
    region of x's (6, 10) shape a bad element at (2, 3) may reach: "row", "col", "elem",
    the results that must carry it)."""
    def dal(x, b):
        res = np.ones_like(x)
        y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(x, res, None, None, 0.3, rng=4,
                                                                mask="bits", backend=b)
        dx, dres, _, _ = fastreg.dropout_add_layer_norm_backward(
            np.ones_like(x), s, mean, rstd, None, None, mask, backend=b)
        return [y, s, dx, dres, mean[:, None], rstd[:, None]]

    def ce(x, b):
        t = np.arange(6) % 10
        loss, grad = fastreg.cross_entropy_label_smoothing(x, t, smoothing=0.1,
                                                           reduction="none", backend=b)
        return [loss[:, None], grad]

    def sgd(x, b):
        w, buf = np.ones_like(x), np.ones_like(x)
        fastreg.sgd_step(w, x, lr=0.1, momentum=0.9, momentum_buffer=buf, l1=0.01, backend=b)
        return [w, buf]

    def adam(x, b):
        w, m, v = np.ones_like(x), np.zeros_like(x), np.zeros_like(x)
        fastreg.adamw_step(w, x, m, v, step=1, lr=0.1, l1=0.01, backend=b)
        return [w, m, v]

    return [
        ("dropout_add_layer_norm", dal, "row", (0, 1, 2, 3, 4, 5)),
        ("cross_entropy_label_smoothing", ce, "row", (0, 1)),
        ("prox_group_l1", lambda x, b: [fastreg.prox_group_l1(x, 0.5, axis=1, backend=b)],
         "row", (0,)),
        ("max_norm", lambda x, b: [fastreg.max_norm(x, 1.0, axis=0, backend=b)], "col", (0,)),
        ("standardize", lambda x, b: [a.reshape(-1, 10) for a in
                                      fastreg.standardize(x, axis=0, backend=b)], "col",
         (0, 1, 2)),
        ("min_max_scale", lambda x, b: [a.reshape(-1, 10) for a in
                                        fastreg.min_max_scale(x, axis=0, backend=b)], "col",
         (0,)),   # min of a column with +inf is finite
        ("dropout", lambda x, b: [fastreg.dropout(x, 0.3, rng=5, backend=b)[0]], "elem", (0,)),
        ("gaussian_dropout", lambda x, b: [fastreg.gaussian_dropout(x, 0.3, rng=5,
                                                                    backend=b)[0]], "elem",
         (0,)),
        ("sgd_step", sgd, "elem", (0, 1)),
        ("adamw_step", adam, "elem", (0, 1, 2)),
    ]


CONFINED = _confined_cases()


def _reach(shape, reach, at=(2, 3)):
    """The elements of a result of this shape that a bad x[2, 3] may reach."""
    mask = np.zeros(shape, bool)
    rows = shape[0] == 6
    cols = shape[-1] == 10
    if reach == "row" and rows:
        mask[at[0]] = True
    elif reach == "col" and cols:
        mask[..., at[1]] = True
    elif reach == "elem":
        mask[at[0] if rows else slice(None), at[1] if cols else slice(None)] = True
    return mask


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,reach,must", CONFINED, ids=[c[0] for c in CONFINED])
def test_nan_and_inf_stay_in_their_row_column_or_element(name, fn, reach, must, backend, bad,
                                                         rng):
    x = rng.standard_normal((6, 10)).astype(np.float32)
    dirty = x.copy()
    dirty[2, 3] = bad
    with np.errstate(invalid="ignore"):     # inf - inf inside NumPy code is the point
        clean, bad_res = fn(x, backend), fn(dirty, backend)
    for i, (c, d) in enumerate(zip(clean, bad_res)):
        region = _reach(d.shape, reach)
        assert d[~region].tobytes() == c[~region].tobytes(), \
            f"{name} on {backend}: result {i} changed outside the touched {reach}"
        if i in must:
            assert not np.isfinite(d[region]).all(), \
                f"{name} on {backend}: result {i} does not carry the {bad}"
