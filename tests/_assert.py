"""assert_close with failure messages that locate the bug, and per-dtype tolerances."""

import numpy as np

# (rtol, atol) by dtype, for outputs and for gradients (which sum more terms).
TOL = {
    np.dtype(np.float32): {"out": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    np.dtype(np.float64): {"out": (1e-12, 1e-12), "grad": (1e-10, 1e-10)},
}


def tol(dtype, kind="out"):
    return TOL[np.dtype(dtype)][kind]


def assert_close(actual, expected, *, rtol, atol, case):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{case}: shape {actual.shape} != {expected.shape}"
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    bad = ~np.isclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = "\n".join(f"  at {tuple(int(v) for v in i)}: got {a64[tuple(i)]!r}, "
                         f"expected {e64[tuple(i)]!r}" for i in idx)
        raise AssertionError(f"{case}: {int(bad.sum())} of {bad.size} elements differ "
                             f"(rtol={rtol}, atol={atol}); first:\n{rows}")


def assert_bitwise(actual, expected, *, case):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, case
    if actual.tobytes() != expected.tobytes():
        diff = np.argwhere(actual.view(np.uint8).reshape(-1) !=
                           expected.view(np.uint8).reshape(-1))
        raise AssertionError(f"{case}: not bitwise identical ({len(diff)} bytes differ)")
