"""What the GPU tests share: where they run, and how they compare with the reference.

Targets: the host emulation (backend "cuda_emulator", NumPy arrays) wherever
a C++ compiler exists, and the GPU (backend "cuda", CuPy arrays) where CuPy
and a device are present.

Tolerances: float32 and float64 as the CPU tests (tests/_assert.py).
float16/bfloat16 follow flash-attention's rule: the error of the kernel
against the float64 reference may be at most twice that of a low-precision
reference (the exact result stored in the dtype: what a float32 computation
rounded to float16/bfloat16, as PyTorch's, achieves) plus a small atol.
Statistics of low-precision inputs (float32) are held to float32 tolerances.
"""

import ml_dtypes
import numpy as np
import pytest

from _assert import assert_close, tol

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
