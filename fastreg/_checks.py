"""Argument validation shared by every public function.

Every check runs before any kernel and raises ``TypeError`` (wrong type or
dtype) or ``ValueError`` (wrong value or shape) with one message style::

    layer_norm: 'eps' must be a finite number > 0, got -1.0.

The message names the function, the argument, what was expected and what was
received, so a failure deep in a training loop points at its cause.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend


def _fail(exc, caller, name, expected, got):
    raise exc(f"{caller}: '{name}' must be {expected}, got {got}.")


def _dtype_names(dtypes):
    return ", ".join(np.dtype(d).name for d in dtypes)


def array(name, x, *, caller, dtypes, ndim=None, min_ndim=None):
    """Check that ``x`` is a NumPy/CuPy array of one of ``dtypes``."""
    if _backend.array_kind(x) is None:
        _fail(TypeError, caller, name, "a NumPy or CuPy array", f"{type(x).__name__}")
    if x.dtype not in dtypes:
        _fail(TypeError, caller, name, f"a floating array ({_dtype_names(dtypes)})",
              f"dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        _fail(ValueError, caller, name, f"a {ndim}-D array", f"shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        _fail(ValueError, caller, name, f"an array with at least {min_ndim} dimensions",
              f"shape {x.shape}")
    return x


def same_kind(caller, **arrays):
    """All non-None arrays must come from one library (NumPy or CuPy)."""
    kinds = {name: _backend.array_kind(a) for name, a in arrays.items()
             if _backend.array_kind(a) is not None}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"'{n}' is {k}" for n, k in kinds.items())
        raise TypeError(f"{caller}: all arrays must come from one library, but {listing}.")


def like(name, a, *, caller, shape, dtype, writeable=False, none_ok=True):
    """Check an auxiliary array (weight, bias, statistics) for shape and dtype."""
    if a is None:
        if none_ok:
            return None
        _fail(ValueError, caller, name, f"an array of shape {tuple(shape)}", "None")
    if _backend.array_kind(a) is None:
        _fail(TypeError, caller, name, "a NumPy or CuPy array or None", type(a).__name__)
    if tuple(a.shape) != tuple(shape):
        _fail(ValueError, caller, name, f"an array of shape {tuple(shape)}", f"shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        _fail(TypeError, caller, name, f"of dtype {np.dtype(dtype).name}", f"dtype {a.dtype}")
    if writeable and not _writeable(a):
        _fail(ValueError, caller, name, "writeable (it is updated in place)", "a read-only array")
    return a


def floating_like(name, a, *, caller, shape, dtypes, writeable=False):
    """Like :func:`like` but accepting any of ``dtypes`` (running statistics)."""
    if a is None:
        return None
    like(name, a, caller=caller, shape=shape, dtype=None, writeable=writeable)
    if a.dtype not in dtypes:
        _fail(TypeError, caller, name, f"a floating array ({_dtype_names(dtypes)})",
              f"dtype {a.dtype}")
    return a


def _same_library(caller, label, o, kinds):
    """An output must live where the inputs do: a NumPy buffer cannot receive a GPU
    kernel's result, nor a CuPy buffer a CPU kernel's."""
    kind = _backend.array_kind(o)
    if kinds and kind not in kinds:
        _fail(TypeError, caller, label, f"a {' or '.join(sorted(kinds))} array like the inputs",
              f"a {kind} array")


def _writeable(a):
    flags = getattr(a, "flags", None)
    return True if flags is None else bool(getattr(flags, "writeable", True))


def scalar(name, value, *, caller, gt=None, ge=None, le=None, lt=None):
    """A finite real number within the given bounds; returns it as float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(TypeError, caller, name, "a real number", f"{type(value).__name__} {value!r}")
    v = float(value)
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt}")
    if ge is not None:
        bounds.append(f">= {ge}")
    if lt is not None:
        bounds.append(f"< {lt}")
    if le is not None:
        bounds.append(f"<= {le}")
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    ok = math.isfinite(v)
    ok = ok and (gt is None or v > gt) and (ge is None or v >= ge)
    ok = ok and (lt is None or v < lt) and (le is None or v <= le)
    if not ok:
        _fail(ValueError, caller, name, expected, repr(value))
    return v


def integer(name, value, *, caller, ge=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(TypeError, caller, name, "an integer", f"{type(value).__name__} {value!r}")
    v = int(value)
    if ge is not None and v < ge:
        _fail(ValueError, caller, name, f"an integer >= {ge}", repr(value))
    return v


def flag(name, value, *, caller):
    if not isinstance(value, (bool, np.bool_)):
        _fail(TypeError, caller, name, "True or False", repr(value))
    return bool(value)


def choice(name, value, *, caller, choices):
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        _fail(ValueError, caller, name, f"one of {allowed}", repr(value))
    return value


def axis(name, value, *, caller, ndim):
    """A valid axis of an ``ndim``-D array; returns it normalized to [0, ndim)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(TypeError, caller, name, "an integer axis", f"{type(value).__name__} {value!r}")
    v = int(value)
    if not -ndim <= v < ndim:
        _fail(ValueError, caller, name, f"an axis in [-{ndim}, {ndim}) for a {ndim}-D input",
              repr(value))
    return v % ndim


def out(caller, out_arg, specs, inputs):
    """Validate ``out=`` and allocate what it leaves as None.

    ``specs`` is a list of ``(name, shape, dtype, like)`` for each output, where
    ``like`` is None (allocate C-contiguous) or an array whose memory layout a
    fresh output should copy (``empty_like(..., order="K")``), and ``dtype``
    None marks an output that is not produced (it must be None in ``out``).
    ``inputs`` maps argument names to arrays no output may overlap.
    Returns the list of output arrays.
    """
    n = len(specs)
    if out_arg is None:
        out_arg = (None,) * n
    kinds = {_backend.array_kind(a) for a in inputs.values()} - {None}
    if not isinstance(out_arg, (tuple, list)) or len(out_arg) != n:
        _fail(TypeError, caller, "out", f"a tuple of {n} arrays or None",
              type(out_arg).__name__ if not isinstance(out_arg, (tuple, list))
              else f"a sequence of length {len(out_arg)}")
    result = []
    for i, ((name, shape, dtype, like_arr), o) in enumerate(zip(specs, out_arg)):
        label = f"out[{i}] ({name})"
        if dtype is None:
            if o is not None:
                _fail(ValueError, caller, label, "None because this output is not computed",
                      "an array")
            result.append(None)
            continue
        if o is None:
            result.append(_backend.empty(shape, dtype, like=like_arr, inputs=inputs))
            continue
        if _backend.array_kind(o) is None:
            _fail(TypeError, caller, label, "an array or None", type(o).__name__)
        _same_library(caller, label, o, kinds)
        if tuple(o.shape) != tuple(shape):
            _fail(ValueError, caller, label, f"an array of shape {tuple(shape)}", f"shape {o.shape}")
        if o.dtype != dtype:
            _fail(TypeError, caller, label, f"of dtype {np.dtype(dtype).name}", f"dtype {o.dtype}")
        if not _writeable(o):
            _fail(ValueError, caller, label, "writeable", "a read-only array")
        for in_name, a in inputs.items():
            if a is not None and _backend.may_share_memory(o, a):
                _fail(ValueError, caller, label, f"memory separate from '{in_name}'",
                      "an overlapping array")
        for j, prev in enumerate(result):
            if prev is not None and _backend.may_share_memory(o, prev):
                _fail(ValueError, caller, label, f"memory separate from out[{j}]",
                      "an overlapping array")
        result.append(o)
    return result


# --------------------------------------------------------------------------- prox family

def axes(name, value, *, caller, ndim):
    """None (every axis), an int or a tuple of ints: the sorted tuple of distinct
    axes in [0, ndim)."""
    if value is None:
        return tuple(range(ndim))
    items = value if isinstance(value, (tuple, list)) else (value,)
    out_axes = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            _fail(TypeError, caller, name, "None, an integer axis or a tuple of them",
                  f"{type(value).__name__} {value!r}")
        if not -ndim <= int(v) < ndim:
            _fail(ValueError, caller, name, f"axes in [-{ndim}, {ndim}) for a {ndim}-D input",
                  repr(value))
        out_axes.append(int(v) % ndim)
    if len(set(out_axes)) != len(out_axes):
        _fail(ValueError, caller, name, "distinct axes", repr(value))
    return tuple(sorted(out_axes))


def scalar_or_array(name, value, *, caller, dtype, shape, ge=None, gt=None):
    """A finite real number, or an array of ``dtype`` that broadcasts to ``shape``
    (without enlarging it) holding finite values within the bounds.

    Returns a float or the array. Checking an array's values reads it once;
    a threshold that is negative or NaN would turn a shrinkage into garbage
    silently, so the read is worth it.
    """
    bounds = ("" if ge is None else f" >= {ge}") + ("" if gt is None else f" > {gt}")
    if _backend.array_kind(value) is None:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            _fail(TypeError, caller, name, "a real number or an array",
                  f"{type(value).__name__} {value!r}")
        return scalar(name, value, caller=caller, ge=ge, gt=gt)
    if value.dtype != dtype:
        _fail(TypeError, caller, name, f"a number or an array of dtype {np.dtype(dtype).name}",
              f"dtype {value.dtype}")
    try:
        target_shape = np.broadcast_shapes(tuple(value.shape), tuple(shape))
    except ValueError:
        target_shape = None
    if target_shape != tuple(shape):
        _fail(ValueError, caller, name, f"an array that broadcasts to shape {tuple(shape)}",
              f"shape {value.shape}")
    ok = value < math.inf
    if ge is not None:
        ok &= value >= ge
    if gt is not None:
        ok &= value > gt
    if not bool(ok.all()):
        _fail(ValueError, caller, name, f"an array of finite values{bounds}",
              "an array with other values")
    return value


def _address(a):
    if _backend.array_kind(a) == "cupy":
        return a.data.ptr
    return a.__array_interface__["data"][0]


def same_view(a, b):
    """True when ``a`` and ``b`` are the same elements in the same order (``out=x``)."""
    if a is b:
        return True
    kind = _backend.array_kind(a)
    if kind is None or kind != _backend.array_kind(b):
        return False
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and _address(a) == _address(b))


def inplace_out(caller, out_arg, x, *, name, inputs):
    """Validate a single ``out=`` that may be ``x`` itself (in place) or separate
    memory; allocate one like ``x`` (same memory layout) when None.

    ``inputs`` maps the names of other arrays read by the op to the arrays; the
    output must not overlap them (nor overlap ``x`` partially: an update read
    and written through two different views of one buffer is ill-defined).
    """
    if out_arg is None:
        return _backend.empty(x.shape, x.dtype, like=x, inputs={name: x})
    if _backend.array_kind(out_arg) is None:
        _fail(TypeError, caller, "out", "an array or None", type(out_arg).__name__)
    _same_library(caller, "out", out_arg, {_backend.array_kind(x)})
    if tuple(out_arg.shape) != tuple(x.shape):
        _fail(ValueError, caller, "out", f"an array of shape {tuple(x.shape)}",
              f"shape {out_arg.shape}")
    if out_arg.dtype != x.dtype:
        _fail(TypeError, caller, "out", f"of dtype {np.dtype(x.dtype).name}",
              f"dtype {out_arg.dtype}")
    if not _writeable(out_arg):
        _fail(ValueError, caller, "out", "writeable", "a read-only array")
    if not same_view(out_arg, x) and _backend.may_share_memory(out_arg, x) \
            and shares_memory(out_arg, x):
        _fail(ValueError, caller, "out", f"'{name}' itself (in place) or memory separate from it",
              "an overlapping view")
    for in_name, a in inputs.items():
        if _backend.array_kind(a) is not None and _backend.may_share_memory(out_arg, a):
            _fail(ValueError, caller, "out", f"memory separate from '{in_name}'",
                  "an overlapping array")
    return out_arg


def _byte_bounds(a):
    lo = hi = _address(a)
    if a.flags.c_contiguous:
        return lo, lo + a.nbytes
    for n, s in zip(a.shape, a.strides):
        if n == 0:
            return lo, lo
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + a.itemsize


def disjoint(caller, named):
    """No two arrays of ``named`` (a sequence of ``(label, array)``) share an element.

    Sorts the arrays' byte ranges and confirms each range overlap with
    ``np.shares_memory`` (interleaved strided views may overlap in range
    without sharing elements); O(n log n) for the usual disjoint tensors.
    """
    spans = sorted((*_byte_bounds(a), i) for i, (_, a) in enumerate(named) if a.size)
    active = []  # (hi, index) of ranges that may still overlap the next one
    for lo, hi, i in spans:
        active = [(h, j) for h, j in active if h > lo]
        for _, j in active:
            if shares_memory(named[i][1], named[j][1]):
                first, second = sorted((i, j))
                _fail(ValueError, caller, named[second][0],
                      f"memory separate from '{named[first][0]}'", "an overlapping array")
        active.append((hi, i))


def shares_memory(a, b):
    """Whether arrays of one library share an element (exact; NumPy's or CuPy's
    ``shares_memory``, which for CuPy runs on the device)."""
    if _backend.array_kind(a) == "cupy":
        import cupy
        return bool(cupy.shares_memory(a, b))
    return bool(np.shares_memory(a, b))
