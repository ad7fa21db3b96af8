"""Numerics: large offsets, constant rows, and NaN confined to what it touches."""

import numpy as np
import pytest

import fastreg
from cases import BATCH_NORM, GROUP_NORM, INSTANCE_NORM, LAYER_NORM, make_array

CENTERED = [
    (LAYER_NORM, (64, 1024), {}),
    (BATCH_NORM, (32, 16, 12, 12), {}),
    (BATCH_NORM, (32, 12, 12, 16), {"axis": -1}),
    (BATCH_NORM, (4096, 64), {}),
    (GROUP_NORM, (8, 16, 12, 12), {"G": 4}),
    (GROUP_NORM, (8, 12, 12, 16), {"G": 4, "axis": -1}),
    (INSTANCE_NORM, (8, 16, 12, 12), {}),
]


@pytest.mark.parametrize("op,shape,variant", CENTERED,
                         ids=[f"{o.name}-{v}" for o, _, v in CENTERED])
def test_float32_with_mean_1e4_normalizes_like_float64(op, shape, variant, rng):
    """Naive E[x^2] - E[x]^2 in float32 loses every digit here; the kernels must not."""
    d = op.make(rng, shape, np.float32, variant, scale=1.0, offset=1e4)
    y = op.forward(d, "cpu")[0]
    d64 = dict(d, x=d["x"].astype(np.float64))
    for k in ("weight", "bias"):
        if d64.get(k) is not None:
            d64[k] = d64[k].astype(np.float64)
    y64 = op.forward(d64, "reference")[0]
    err = np.max(np.abs(y - y64))
    assert err < 1e-3, f"{op.name} {variant}: max |y - y_float64| = {err}"


def test_rms_norm_with_large_offset_matches_float64(rng):
    """RMS norm does not center: with an offset its output is ~1 everywhere, and the
    float64 accumulation of x**2 keeps it to float32 rounding."""
    x = make_array(rng, (64, 1024), np.float32, offset=1e4)
    y, _ = fastreg.rms_norm(x)
    y64, _ = fastreg.rms_norm(x.astype(np.float64), backend="reference")
    assert np.max(np.abs(y - y64)) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_rows_give_rstd_one_over_sqrt_eps(dtype):
    x = np.full((3, 4, 5, 5), 2.5, dtype)
    eps = 1e-5
    for y, mean, rstd in [fastreg.layer_norm(x, eps=eps), fastreg.batch_norm(x, eps=eps),
                          fastreg.group_norm(x, 2, eps=eps), fastreg.instance_norm(x, eps=eps)]:
        assert np.all(np.isfinite(y)) and np.all(y == 0)
        np.testing.assert_allclose(rstd, 1 / np.sqrt(eps), rtol=1e-6)
        np.testing.assert_allclose(mean, 2.5, rtol=1e-7)


def test_nan_propagates_only_to_its_row_group_and_channel(rng):
    x = rng.standard_normal((4, 6, 5, 5)).astype(np.float32)
    x[1, 2, 3, 4] = np.nan
    y, _, _ = fastreg.layer_norm(x, normalized_ndim=3)          # rows = samples
    assert np.isnan(y[1]).all() and not np.isnan(np.delete(y, 1, 0)).any()
    y, _, _ = fastreg.group_norm(x, 3)                           # group 1 of sample 1
    bad = np.zeros(x.shape, bool)
    bad[1, 2:4] = True
    assert np.isnan(y[bad]).all() and not np.isnan(y[~bad]).any()
    y, _, _ = fastreg.batch_norm(x)                              # channel 2
    assert np.isnan(y[:, 2]).all() and not np.isnan(np.delete(y, 2, 1)).any()
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))           # NHWC, channel 2
    y, _, _ = fastreg.batch_norm(xl, axis=-1)
    assert np.isnan(y[..., 2]).all() and not np.isnan(np.delete(y, 2, 3)).any()
    y, _, _ = fastreg.instance_norm(xl, axis=-1)                 # (sample 1, channel 2)
    assert np.isnan(y[1, ..., 2]).all() and np.isnan(y).sum() == 25
