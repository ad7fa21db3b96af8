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
import os

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
    kinds = {array_kind(a) for a in arrays} - {None}  # non-arrays are the checks' business
    if len(kinds) > 1:
        raise TypeError(f"{caller}: all arrays must come from one library, got {sorted(kinds)}.")
    kind = kinds.pop() if kinds else "numpy"
    name = backend or _forced.get() or os.environ.get("FASTREG_BACKEND") or _DEFAULT_FOR_KIND[kind]
    _check_name(name, caller)
    if _KIND_OF_BACKEND[name] != kind:
        raise TypeError(f"{caller}: 'backend' {name!r} runs {_KIND_OF_BACKEND[name]} arrays, "
                        f"got {kind} arrays.")
    module = importlib.import_module(f"{_REGISTRY[name]}.{family}")
    if caller in getattr(module, "UNSUPPORTED", ()):
        raise RuntimeError(f"{caller}: the {name!r} backend does not implement {caller} in this "
                           "version of fastreg; use NumPy arrays with backend 'cpu' or "
                           "'reference'.")
    return module


def dtypes(family, *arrays, backend=None, caller="fastreg"):
    """The module for ``family`` and the dtypes its backend supports."""
    module = select(family, *arrays, backend=backend, caller=caller)
    package = importlib.import_module(module.__name__.rpartition(".")[0])
    return module, package.DTYPES


def _xp(kind):
    if kind == "cupy":
        import cupy
        return cupy
    return np


def empty(shape, dtype, *, like=None, inputs=None):
    """A fresh output in the library of the inputs; copies ``like``'s layout."""
    kinds = {array_kind(a) for a in (inputs or {}).values() if a is not None} - {None}
    xp = _xp("cupy" if "cupy" in kinds else "numpy")
    if like is not None:
        return xp.empty_like(like, dtype=dtype, order="K")
    return xp.empty(shape, dtype=dtype)


def may_share_memory(a, b):
    ka, kb = array_kind(a), array_kind(b)
    if ka != kb or ka is None:
        return False  # different libraries: different memory
    return bool(_xp(ka).may_share_memory(a, b))
