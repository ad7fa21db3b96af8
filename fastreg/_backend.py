"""The one dispatch point: which implementation runs a call.

NumPy arrays go to the Numba kernels (``"cpu"``); ``"reference"`` forces the
NumPy reference. CuPy arrays go to the CUDA kernels (``"cuda"``);
``"cuda_emulator"`` runs those same kernels on NumPy arrays under the host
emulation (for tests and for reading the kernels without a GPU). A backend is
chosen, in order, by the ``backend=`` argument of a call, the innermost
:func:`use_backend` context, the ``FASTREG_BACKEND`` environment variable,
and the arrays' library.

Adding a backend means one package (``fastreg/<name>/`` with the family
modules and a ``DTYPES`` tuple) plus one line in ``_REGISTRY``. A family
module may list in ``UNSUPPORTED`` the public functions it does not run yet:
they raise a RuntimeError naming the function rather than fall back.

CuPy is imported only when a CuPy array is met.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import os
import re
import threading

import numpy as np

# backend name -> package holding one module per op family
_REGISTRY = {
    "cpu": "fastreg.cpu",
    "reference": "fastreg.reference",
    "cuda": "fastreg.cuda",
    "cuda_emulator": "fastreg.cuda",
}
# array library -> backend that runs it by default
_DEFAULT_FOR_KIND = {"numpy": "cpu", "cupy": "cuda"}
# backend -> array library it accepts
_KIND_OF_BACKEND = {"cpu": "numpy", "reference": "numpy", "cuda": "cupy",
                    "cuda_emulator": "numpy"}

_forced = contextvars.ContextVar("fastreg_backend", default=None)


def array_kind(a):
    """'numpy', 'cupy' or None, decided without importing CuPy."""
    if isinstance(a, np.ndarray):
        return "numpy"
    module = type(a).__module__ or ""
    if module.split(".")[0] == "cupy" and type(a).__name__ == "ndarray":
        return "cupy"
    return None


def names():
    """Backends that can be requested."""
    return tuple(sorted(_REGISTRY))


@contextlib.contextmanager
def use_backend(name):
    """Run the calls inside the ``with`` block on backend ``name``.

    >>> with fastreg.use_backend("reference"):
    ...     y, mean, rstd = fastreg.layer_norm(x)
    """
    _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _check_name(name, caller):
    if name not in names():
        allowed = ", ".join(repr(n) for n in names())
        raise ValueError(f"{caller}: 'backend' must be one of {allowed}, got {name!r}.")


def select(family, *arrays, backend=None, caller="fastreg"):
    """Return the module implementing ``family`` for these arrays.

    Raises TypeError when the arrays mix libraries or do not suit the
    requested backend, and RuntimeError when a backend is not available.
    """
    return _select(family, arrays, backend, caller)[0]


def _select(family, arrays, backend, caller):
    """(the guarded family module, the backend's package) for a call."""
    kinds = {array_kind(a) for a in arrays} - {None}  # non-arrays are the checks' business
    if len(kinds) > 1:
        raise TypeError(f"{caller}: all arrays must come from one library, got {sorted(kinds)}.")
    kind = kinds.pop() if kinds else "numpy"
    name = backend or _forced.get() or os.environ.get("FASTREG_BACKEND") or _DEFAULT_FOR_KIND[kind]
    hit = _selected.get((family, name, caller))
    if hit is None or _KIND_OF_BACKEND[name] != kind:
        _check_name(name, caller)
        if _KIND_OF_BACKEND[name] != kind:
            raise TypeError(f"{caller}: 'backend' {name!r} runs {_KIND_OF_BACKEND[name]} arrays, "
                            f"got {kind} arrays.")
        module = importlib.import_module(f"{_REGISTRY[name]}.{family}")
        hit = _selected[(family, name, caller)] = (
            _Guarded(module, name, caller), importlib.import_module(_REGISTRY[name]))
    if caller in getattr(hit[0]._module, "UNSUPPORTED", ()):
        raise RuntimeError(f"{caller}: the {name!r} backend does not implement {caller} in this "
                           "version of fastreg; use NumPy arrays with backend 'cpu' or "
                           "'reference'.")
    return hit


# (family, backend, caller) -> (its _Guarded module, the backend's package): the
# name and kind checks pass once per key, then a dispatch is a look-up (a call's
# Python layers run with cold caches after a big kernel, ~1 us per function)
_selected = {}


# --------------------------------------------------------------------------- guarded calls

class CompileError(RuntimeError):
    """A kernel failed to compile on its first call (the cause is chained)."""


# Exceptions raised by a failed first-call compilation: Numba's (TypingError,
# LoweringError, ... all derive from NumbaError), the host emulation's build, and
# CuPy's NVRTC (cupy.cuda.compiler.CompileException). Matched by class name along
# the MRO, so that neither Numba nor CuPy is imported here.
_COMPILE_ERRORS = {"NumbaError", "EmulatorBuildError", "CompileException"}


def _is_compile_error(exc):
    return any(c.__name__ in _COMPILE_ERRORS for c in type(exc).__mro__)


def _dtype_of(args):
    """The dtype of the first array among a kernel call's arguments (lists searched)."""
    for a in args:
        if isinstance(a, (list, tuple)):
            found = _dtype_of(a)
            if found is not None:
                return found
        elif array_kind(a) is not None:
            return np.dtype(a.dtype).name
    return None


def _summary(exc, limit=300):
    """The compiler's first error line (else its first two lines), without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), "; ".join(lines[:2]))
    return first[:limit]


_cpu_lock = None  # None: not decided yet; False: no lock needed; else the lock


def _cpu_serializer():
    """A lock around the CPU kernels when Numba's threading layer is 'workqueue'.

    That layer is not thread-safe: parallel kernels launched from two Python
    threads at once make Numba terminate the process. OpenMP and TBB are
    thread-safe, and then no lock is taken. The layer is fixed at the first
    parallel launch; deciding it here launches Numba's threads early (the first
    kernel would do it anyway).
    """
    global _cpu_lock
    if _cpu_lock is None:
        import numba
        try:
            from numba.np.ufunc import parallel
            parallel._launch_threads()
            layer = numba.threading_layer()
        except Exception:  # noqa: BLE001 - private API moved: go by the configuration
            layer = numba.config.THREADING_LAYER
        _cpu_lock = threading.RLock() if layer == "workqueue" else False
    return _cpu_lock or None


# (module, function, backend, caller) -> (function, its guarded wrapper): built once,
# so that a dispatch costs a dictionary look-up rather than a closure per call
_wrapped = {}


def _guard(value, module_name, attr, backend, caller):
    lock = _cpu_serializer() if backend == "cpu" else None

    def call(*args, **kwargs):
        try:
            if lock is None:
                return value(*args, **kwargs)
            with lock:
                return value(*args, **kwargs)
        except Exception as exc:
            if not _is_compile_error(exc):
                raise
            dtype = _dtype_of(args) or "its"
            raise CompileError(
                f"{caller}: compiling the {backend!r} kernels of {module_name}.{attr} "
                f"for {dtype} input failed ({type(exc).__name__}: {_summary(exc)})") from exc
    call.__name__ = attr
    return call


class _Guarded:
    """A backend module whose functions report compile failures as :class:`CompileError`
    naming the public function, the backend and the dtype, and whose CPU kernels are
    serialized where Numba's threading layer requires it."""

    __slots__ = ("_module", "_backend", "_caller")

    def __init__(self, module, backend, caller):
        self._module, self._backend, self._caller = module, backend, caller

    @property
    def __name__(self):
        return self._module.__name__

    def __getattr__(self, attr):
        value = getattr(self._module, attr)
        if not callable(value) or isinstance(value, type):
            return value
        key = (self._module.__name__, attr, self._backend, self._caller)
        hit = _wrapped.get(key)
        if hit is not None and hit[0] is value:  # a replaced function is wrapped anew
            return hit[1]
        call = _guard(value, self._module.__name__, attr, self._backend, self._caller)
        _wrapped[key] = (value, call)
        return call

    def __repr__(self):
        return f"<{self._module.__name__} as run by {self._caller} on {self._backend!r}>"


def dtypes(family, *arrays, backend=None, caller="fastreg"):
    """The module for ``family`` and the dtypes its backend supports."""
    module, package = _select(family, arrays, backend, caller)
    return module, package.DTYPES


def _xp(kind):
    if kind == "cupy":
        import cupy
        return cupy
    return np


# Fresh NumPy outputs of at least ALIGN_FROM bytes start on a HUGE_PAGE boundary.
HUGE_PAGE = 2 << 20
ALIGN_FROM = 32 << 20


def empty(shape, dtype, *, like=None, inputs=None):
    """A fresh output in the library of the inputs; copies ``like``'s layout.

    A NumPy output of ``ALIGN_FROM`` (32 MiB) or more starts on a 2 MiB
    boundary. glibc maps an allocation that large afresh on every call (its
    mmap threshold stops growing at 32 MiB), and NumPy advises the mapping for
    transparent huge pages; but a 2 MiB stretch of it is faulted in as one
    huge page only if the stretch lies wholly inside it, so an unaligned
    array pays up to 512 4 KiB faults per end (a 32 MiB layer norm output
    here: 528 faults and 1.8 ms to fill, against 16 and 1.4 ms aligned).
    Smaller outputs come from the heap, whose memory glibc reuses, already
    faulted in, call after call.
    """
    kinds = {array_kind(a) for a in (inputs or {}).values() if a is not None} - {None}
    xp = _xp("cupy" if "cupy" in kinds else "numpy")
    dtype = np.dtype(dtype)
    if like is not None:
        shape = like.shape
    elif isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    if xp is not np or nbytes < ALIGN_FROM:
        if like is not None:
            return xp.empty_like(like, dtype=dtype, order="K")
        return xp.empty(shape, dtype=dtype)
    if like is None:
        return _aligned_empty(nbytes, dtype).reshape(shape)
    # like's axes from the largest stride to the smallest (NumPy's order="K")
    order = sorted(range(like.ndim), key=lambda k: -abs(like.strides[k]))
    stored = _aligned_empty(nbytes, dtype).reshape([shape[k] for k in order])
    return stored.transpose(np.argsort(order))


def _aligned_empty(nbytes, dtype):
    """``nbytes`` of ``dtype`` (1-D) starting on a HUGE_PAGE boundary, cut from a
    NumPy allocation 2 huge pages longer (the spare one past the end keeps the
    last 2 MiB stretch inside the mapping). Untouched, the spare bytes cost no
    memory; the array's ``base`` holds the allocation."""
    raw = np.empty(nbytes + 2 * HUGE_PAGE, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype)


def may_share_memory(a, b):
    ka, kb = array_kind(a), array_kind(b)
    if ka != kb or ka is None:
        return False  # different libraries: different memory
    return bool(_xp(ka).may_share_memory(a, b))
