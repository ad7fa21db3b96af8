"""Tensors to arrays without copies, the CUDA stream, and when PyTorch's own op runs instead.

Zero copy:

- CPU tensors become NumPy views (``tensor.detach().numpy()``): same memory,
  no copy, writes through.
- CUDA tensors become CuPy views through DLPack (``cupy.from_dlpack``), inside
  a CuPy scope on the tensor's device and on torch's current stream
  (``cupy.cuda.ExternalStream``), so fastreg's kernels are ordered with the
  surrounding PyTorch work and need no synchronization. Outputs are allocated
  by PyTorch (its caching allocator, on its stream) and handed to fastreg as
  ``out=`` views, so nothing travels back through DLPack.

Channel layouts: a tensor stored channels-last (PyTorch's ``channels_last``
and ``channels_last_3d``, and the same storage order for 3-D ``(N, C, L)``)
is handed over as its contiguous ``(N, *spatial, C)`` view with ``axis=-1``,
so it keeps its layout and outputs come back in the same memory format.

Fallback: :func:`why_not` says why fastreg cannot run a call (a dtype the
backend lacks, a device without fastreg support, autocast, torch.compile,
tensor subclasses); the caller then runs PyTorch's op and :func:`fallback`
warns once per (layer type, reason). Invalid or empty inputs go to PyTorch
silently: it raises its own errors, or returns its own (trivial) result.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import warnings

import torch

__all__ = ["FallbackWarning"]


class FallbackWarning(UserWarning):
    """A fastreg layer ran PyTorch's own op for a case fastreg does not run."""


# Reasons that need no warning: PyTorch raises its own error (INVALID) or the
# result is trivial (EMPTY).
INVALID = "invalid input (PyTorch raises its error)"
EMPTY = "empty input"
_SILENT = (INVALID, EMPTY)

CPU_DTYPES = (torch.float32, torch.float64)
# What fastreg's CUDA backend is designed to run (DESIGN.md); its own DTYPES win.
_CUDA_DTYPES_DEFAULT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_warned: set = set()

# Tensors under a torch.func transform (vmap, grad, jacrev, ...) are wrappers
# without storage of their own; PyTorch's ops know how to run on them.
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None),
                             "is_functorch_wrapped_tensor", lambda t: False)


def fallback(layer, reason):
    """Warn once per (layer, reason) that PyTorch's op runs instead of fastreg's."""
    if reason in _SILENT or (layer, reason) in _warned:
        return
    _warned.add((layer, reason))
    warnings.warn(f"fastreg.torch: {layer} runs PyTorch's own op: {reason}. "
                  "(Shown once per layer type and reason.)", FallbackWarning, stacklevel=4)


# --------------------------------------------------------------------------- CUDA availability

@functools.lru_cache(maxsize=None)
def _cuda_support():
    """(cupy module, torch dtypes fastreg runs on the GPU) or (None, reason)."""
    if importlib.util.find_spec("cupy") is None:
        return None, "CuPy is not installed (pip install fastreg[gpu])"
    if importlib.util.find_spec("fastreg.cuda") is None:
        return None, "this fastreg has no CUDA backend"
    try:
        import cupy
        backend = importlib.import_module("fastreg.cuda")
    except Exception as error:  # a broken CUDA install must not break CPU users
        return None, f"CuPy or fastreg.cuda failed to import ({type(error).__name__}: {error})"
    names = getattr(backend, "DTYPES", None)
    if names is None:
        dtypes = _CUDA_DTYPES_DEFAULT
    else:
        dtypes = tuple(getattr(torch, str(d)) for d in names if hasattr(torch, str(d)))
    if torch.bfloat16 in dtypes and _cupy_bfloat16(cupy) is None:
        dtypes = tuple(d for d in dtypes if d != torch.bfloat16)
    return cupy, dtypes


@functools.lru_cache(maxsize=None)
def _cupy_bfloat16(cupy):
    """The bfloat16 dtype CuPy arrays can hold (ml_dtypes'), or None."""
    try:
        import ml_dtypes
        cupy.empty(0, dtype=ml_dtypes.bfloat16)
        return ml_dtypes.bfloat16
    except Exception:
        return None


# --------------------------------------------------------------------------- routing

def why_not(x, *tensors, autocast=True):
    """Why fastreg cannot run on ``x`` (with ``tensors``, None entries ignored): a
    reason string, or None when it can. Only conditions of the tensors are
    checked here; each op adds its own (shapes, eps, momentum). Runs on every
    call, so it is written for speed (plain loops, cheap attributes).

    ``autocast=False`` for ops that autocast leaves alone (dropout runs in its
    input's dtype under autocast, so fastreg may run it there too)."""
    others = [t for t in tensors if t is not None]
    if not isinstance(x, torch.Tensor):
        return INVALID
    for t in others:
        if not isinstance(t, torch.Tensor):
            return INVALID
    if torch.overrides.has_torch_function((x, *others)):
        return "a tensor subclass with __torch_function__"
    if torch.compiler.is_compiling():
        return "inside torch.compile, where PyTorch's op compiles with the graph"
    if _functorch_wrapped(x) or any(_functorch_wrapped(t) for t in others):
        return "inside a torch.func transform (vmap, grad, ...)"
    if x.layout != torch.strided:
        return f"layout {x.layout} (fastreg runs dense tensors)"
    device, dtype = x.device, x.dtype
    mixed = False
    for t in others:
        if t.device != device:
            return INVALID
        if t.layout != torch.strided:
            return f"layout {t.layout} (fastreg runs dense tensors)"
        mixed = mixed or t.dtype != dtype
    if x.is_cpu:
        dtypes = CPU_DTYPES
        if autocast and torch.is_autocast_enabled("cpu"):
            return "autocast is enabled"
    elif x.is_cuda:
        cupy, dtypes = _cuda_support()
        if cupy is None:
            return dtypes
        if autocast and torch.is_autocast_enabled("cuda"):
            return "autocast is enabled"
    else:
        return f"device type {device.type!r} (fastreg runs CPU and CUDA tensors)"
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {str(dtype).replace('torch.', '')} on {device.type.upper()} " \
               f"(fastreg runs {names} there)"
    if mixed:
        return "parameters or statistics of another dtype than the input"
    if x.numel() == 0:
        return EMPTY
    return None


@functools.lru_cache(maxsize=None)
def _cuda_lacks(family, name):
    try:
        module = importlib.import_module(f"fastreg.cuda.{family}")
    except Exception as error:
        return f"fastreg.cuda.{family} failed to import ({type(error).__name__}: {error})"
    if name in getattr(module, "UNSUPPORTED", ()):
        return f"fastreg's CUDA backend has no {name} kernel in this version"
    return None


def backend_lacks(x, family, name):
    """Why fastreg's backend for ``x``'s device does not run ``fastreg.<name>`` (a
    reason, or None): a backend lists what it does not run yet in its family
    module's ``UNSUPPORTED``. Call after :func:`why_not` passed."""
    return _cuda_lacks(family, name) if x.is_cuda else None


def needs_grad(*tensors):
    """Whether autograd must record this call."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- views

def array(t):
    """A NumPy (CPU) or CuPy (CUDA) view of tensor ``t`` sharing its memory; None stays None."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if t.is_cuda:
        return _cupy_view(t)
    return t.numpy()


def _cupy_view(t):
    cupy, _ = _cuda_support()
    if t.dtype == torch.bfloat16:
        # CuPy has no native bfloat16: share the bits as int16, then view as ml_dtypes'.
        return cupy.from_dlpack(t.view(torch.int16)).view(_cupy_bfloat16(cupy))
    return cupy.from_dlpack(t)


_NO_SCOPE = contextlib.nullcontext()


def on_stream(x):
    """Run the enclosed fastreg calls where PyTorch would run an op on ``x``: for a
    CUDA tensor, CuPy's current device and stream become x's device and torch's
    current stream there. Entered before the DLPack views are made, so DLPack
    sees one stream on both sides and adds no synchronization. Nothing for CPU
    tensors."""
    return _cuda_scope(x) if x.is_cuda else _NO_SCOPE


@contextlib.contextmanager
def _cuda_scope(x):
    cupy, _ = _cuda_support()
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream):
        yield


def channels_last(x):
    """Whether x (N, C, *spatial) is stored as (N, *spatial, C) and not also contiguous."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def channel_layout(x):
    """(x_dense, axis): x itself with axis=1 when contiguous, or with axis=-1 when
    stored channels-last (no copy either way); else a contiguous copy, axis=1.
    Outputs made by ``torch.empty_like(x_dense)`` get the same layout."""
    if x.is_contiguous():
        return x, 1
    if channels_last(x):
        return x, -1
    return x.contiguous(), 1


def kernel_view(t, axis):
    """What the kernels see of a tensor laid out like ``x_dense``: itself for axis=1,
    its (N, *spatial, C) view for axis=-1 (a view, so outputs are written in place)."""
    return t if axis == 1 else t.permute(0, *range(2, t.dim()), 1)


def like_layout(t, axis):
    """``t`` (an incoming gradient, any layout) as a dense tensor in the layout of
    :func:`channel_layout` for ``axis``: no copy when it already is."""
    if axis == 1:
        return t.contiguous()
    v = t.permute(0, *range(2, t.dim()), 1).contiguous()
    return v.permute(0, v.dim() - 1, *range(1, v.dim() - 1))


# --------------------------------------------------------------------------- memory order

def dense(t):
    """(t_dense, perm): ``t`` itself with the permutation ``perm`` of its axes that
    lists them in memory order (``t.permute(perm)`` is contiguous; None when t is
    contiguous already), or, for a tensor with gaps or overlaps, a contiguous
    copy with perm None. For elementwise kernels: they run on the contiguous
    view, and outputs made by ``torch.empty_like(t_dense)`` share its strides."""
    if t.is_contiguous():
        return t, None
    perm = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    if t.permute(perm).is_contiguous():
        return t, perm
    return t.contiguous(), None


def permuted(t, perm):
    """``t`` viewed in the axis order ``perm`` (None: t itself)."""
    return t if perm is None else t.permute(perm)


def unpermuted(t, perm):
    """The inverse of :func:`permuted`: ``t`` (in the order ``perm``) back in the
    original axis order, a view."""
    if perm is None:
        return t
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return t.permute(inverse)
