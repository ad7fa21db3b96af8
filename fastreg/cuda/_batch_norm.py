"""Batch norm on a CUDA device (CuPy arrays) or the host emulation (NumPy arrays).

Same function names and signatures as ``fastreg/reference/norm.py`` and
``fastreg/cpu/_batch_norm.py``; the kernels are ``kernels/batch_norm.cu``
(formulas, strategy, bytes and expected bandwidth in its header), the
geometry is in ``_channels.py``.

x is viewed as (A, C, B) around the channel axis (``_layout.ChannelLayout``:
NCHW (N, C, H*W); NHWC, channels_last storage and (N, C) as (rows, C, 1);
other strides are copied first). Chunks of at least 32 bytes (B * itemsize)
take the chunk kernels, one block per (channel, split); shorter ones the
row kernels over (A, C*B), B columns per channel.

- training forward: statistics partials -> per-channel merge in float64 ->
  coefficients (mean, rstd, the biased variance for the running statistics,
  which ``fastreg.norm`` updates by its host-side rule) -> apply;
- inference forward: coefficients from the given statistics -> apply;
- backward: sums partials (when training, or when dweight/dbias are wanted)
  -> merge -> coefficients and dweight/dbias -> dx.

The split steps (``batch_norm_stats`` ...) run the same kernels with float64
partials (``batch_norm_stats_<dtype>``, ``batch_norm_backward_reduce_<dtype>``
instances) and return float64 statistics, as the CPU ones do.
"""

from __future__ import annotations

import numpy as np

from . import TAGS, _device
from ._channels import (CHUNK_MIN_BYTES, COEF_THREADS, MERGE_THREADS, Chunks, Rows, acc_dtype,
                        cdiv, f64, fwd_coef, merge_stats, param)
from ._layout import ChannelLayout

MODULE = "batch_norm"
F64 = np.dtype(np.float64)


def kernel_names():
    """Every kernel the launchers may launch (the compile checks cover each)."""
    names = []
    for tag in TAGS.values():
        split = tag != "f64"  # float64 input: the split steps use the kernels below
        for prefix in [f"batch_norm_fwd_{tag}_stats"] + ([f"batch_norm_stats_{tag}"] if split
                                                         else []):
            names += [f"{prefix}_chunks", f"{prefix}_rows", f"{prefix}_merge"]
        for prefix in [f"batch_norm_bwd_{tag}_reduce"] + (
                [f"batch_norm_backward_reduce_{tag}"] if split else []):
            names += [f"{prefix}_chunks", f"{prefix}_rows"]
        for direction in ("fwd", "bwd"):
            names += [f"batch_norm_{direction}_{tag}_coef",
                      f"batch_norm_{direction}_{tag}_apply_chunks",
                      f"batch_norm_{direction}_{tag}_apply_rows"]
    return names + ["batch_norm_bwd_merge_p32", "batch_norm_bwd_merge_p64",
                    "batch_norm_combine_f64"]


def hot_kernel_names():
    """The kernels that stream x (the chunk and row kernels)."""
    return [n for n in kernel_names() if n.endswith(("_chunks", "_rows"))]


def _view(dev, tag, A, C, B, itemsize, arrays):
    """The chunk or the row kernels for an (A, C, B) view."""
    if B * itemsize >= CHUNK_MIN_BYTES:
        return Chunks(dev, MODULE, tag, A, C, B, arrays)
    return Rows(dev, MODULE, tag, 1, A, C * B, B, arrays)


def _stats_name(tag, split):
    """Instances of the statistics kernels: float64 partials for the split steps."""
    return f"batch_norm_stats_{tag}" if split and tag != "f64" else f"batch_norm_fwd_{tag}_stats"


def _reduce_name(tag, split):
    if split and tag != "f64":
        return f"batch_norm_backward_reduce_{tag}"
    return f"batch_norm_bwd_{tag}_reduce"


def _statistics(dev, view, x3, tag, split, count, mean, m2):
    P = F64 if split else acc_dtype(x3.dtype)
    part = view.stats(_stats_name(tag, split), x3, P)
    merge_stats(view, _stats_name(tag, split), x3, part, count, mean, m2)


def _sums(dev, view, dy3, x3, y3, center, scale, tag, split, sum_dy, sum_dy_xhat):
    """sum(dz) and rstd * sum(dz * (x - center)) per channel, float64."""
    P = F64 if split else acc_dtype(x3.dtype)
    part = view.reduce(_reduce_name(tag, split), dy3, x3, y3, center, P)
    C = view.K // view.W
    dev.launch(MODULE, f"batch_norm_bwd_merge_p{P.itemsize * 8}", cdiv(C, MERGE_THREADS // 32),
               MERGE_THREADS, (part, np.int32(1), np.int32(view.S), np.int32(view.K),
                               np.int32(view.W), scale, sum_dy, sum_dy_xhat))


def _zero(*arrays):
    for a in arrays:
        if a is not None:
            a[...] = 0


# --------------------------------------------------------------------------- forward

def batch_norm(x, weight, bias, eps, axis, activation, training, out):
    y, mean, rstd = out
    dev = _device.of(x)
    layout = ChannelLayout(dev, x, axis)
    A, C, B = layout.shape3
    if A * B == 0 or C == 0:
        if not training:
            return None
        mean[...] = 0.0  # the statistics of an empty set (as the reference)
        rstd[...] = 1.0 / np.sqrt(eps)
        return dev.xp.zeros(C, F64)
    tag, acc = TAGS[x.dtype], acc_dtype(x.dtype)
    x3, y3 = layout.input(x), layout.output(y)
    view = _view(dev, tag, A, C, B, x.itemsize, (x3, y3))
    w, b = param(dev, weight, C), param(dev, bias, C)
    coef = dev.empty((3, view.K), acc)
    name = f"batch_norm_fwd_{tag}"
    var = None
    if training:
        count, mean64, m2 = (dev.empty(C, F64) for _ in range(3))
        _statistics(dev, view, x3, tag, False, count, mean64, m2)
        var = dev.empty(C, F64)
        mt, rt = dev.target(mean), dev.target(rstd)
        fwd_coef(view, name, count, mean64, m2, True, w, b, eps, False, mt, rt, var, coef)
        dev.finish(mean, mt)
        dev.finish(rstd, rt)
    else:  # mean and rstd hold the statistics to use (fastreg.norm filled them)
        fwd_coef(view, name, None, f64(dev, mean), f64(dev, rstd), False, w, b, eps, False,
                 None, None, None, coef)
    view.apply(f"{name}_apply", x3, coef, y3, activation == "relu")
    layout.finish(y, y3)
    return var


# --------------------------------------------------------------------------- backward

def _bwd_coef(dev, view, tag, sum_dy, sum_dy_xhat, mean64, rstd64, w, n, training, dweight,
              dbias, coef):
    C = view.K // view.W
    dev.launch(MODULE, f"batch_norm_bwd_{tag}_coef", cdiv(view.K, COEF_THREADS), COEF_THREADS,
               (sum_dy, sum_dy_xhat, mean64, rstd64, w, np.float64(1.0 / max(n, 1)),
                np.int32(training), np.int32(C), np.int32(view.W), dweight, dbias, coef))


def batch_norm_backward(dy, x, mean, rstd, weight, training, axis, y, out):
    dx, dweight, dbias = out
    dev = _device.of(x)
    layout = ChannelLayout(dev, x, axis)
    A, C, B = layout.shape3
    if A * B == 0 or C == 0:
        _zero(dweight, dbias)  # sums over no values
        return
    tag, acc = TAGS[x.dtype], acc_dtype(x.dtype)
    dy3, x3, dx3 = layout.input(dy), layout.input(x), layout.output(dx)
    y3 = None if y is None else layout.input(y)
    view = _view(dev, tag, A, C, B, x.itemsize, (dy3, x3, dx3, y3))
    mean64, rstd64 = f64(dev, mean), f64(dev, rstd)
    sum_dy = sum_dy_xhat = None
    if training or dweight is not None or dbias is not None:
        sum_dy, sum_dy_xhat = dev.empty(C, F64), dev.empty(C, F64)
        _sums(dev, view, dy3, x3, y3, dev.contiguous(mean).reshape(C), rstd64, tag, False,
              sum_dy, sum_dy_xhat)
    dwt = None if dweight is None else dev.target(dweight)
    dbt = None if dbias is None else dev.target(dbias)
    coef = dev.empty((4, view.K), acc)
    _bwd_coef(dev, view, tag, sum_dy, sum_dy_xhat, mean64, rstd64, param(dev, weight, C), A * B,
              training, dwt, dbt, coef)
    view.bwd_apply(f"batch_norm_bwd_{tag}_apply", dy3, x3, y3, coef, dx3)
    layout.finish(dx, dx3)
    for g, t in ((dweight, dwt), (dbias, dbt)):
        if g is not None:
            dev.finish(g, t)


# --------------------------------------------------------------------------- split steps

def batch_norm_stats(x, axis, out):
    count, mean, m2 = out
    dev = _device.of(x)
    layout = ChannelLayout(dev, x, axis)
    A, C, B = layout.shape3
    if A * B == 0 or C == 0:
        _zero(count, mean, m2)
        return
    tag = TAGS[x.dtype]
    x3 = layout.input(x)
    view = _view(dev, tag, A, C, B, x.itemsize, (x3,))
    targets = [dev.target(a) for a in (count, mean, m2)]
    _statistics(dev, view, x3, tag, True, *targets)
    for a, t in zip((count, mean, m2), targets):
        dev.finish(a, t)


def batch_norm_combine(counts, means, m2s, out):
    dev = _device.of(counts)
    R, C = counts.shape
    if C == 0:
        return
    targets = [dev.target(a) for a in out]
    dev.launch(MODULE, "batch_norm_combine_f64", cdiv(C, COEF_THREADS), COEF_THREADS,
               (*(dev.contiguous(a.astype(np.float64, copy=False)) for a in (counts, means, m2s)),
                np.int32(R), np.int32(C), *targets))
    for a, t in zip(out, targets):
        dev.finish(a, t)


def batch_norm_backward_reduce(dy, x, mean, rstd, axis, y, out):
    sum_dy, sum_dy_xhat = out
    dev = _device.of(x)
    layout = ChannelLayout(dev, x, axis)
    A, C, B = layout.shape3
    if A * B == 0 or C == 0:
        _zero(sum_dy, sum_dy_xhat)
        return
    tag = TAGS[x.dtype]
    dy3, x3 = layout.input(dy), layout.input(x)
    y3 = None if y is None else layout.input(y)
    view = _view(dev, tag, A, C, B, x.itemsize, (dy3, x3, y3))
    targets = [dev.target(a) for a in out]
    _sums(dev, view, dy3, x3, y3, f64(dev, mean), f64(dev, rstd), tag, True, *targets)
    for a, t in zip(out, targets):
        dev.finish(a, t)


def batch_norm_backward_apply(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training,
                              axis, y, out):
    (dx,) = out
    dev = _device.of(x)
    layout = ChannelLayout(dev, x, axis)
    A, C, B = layout.shape3
    if A * B == 0 or C == 0:
        return
    tag, acc = TAGS[x.dtype], acc_dtype(x.dtype)
    dy3, x3, dx3 = layout.input(dy), layout.input(x), layout.output(dx)
    y3 = None if y is None else layout.input(y)
    view = _view(dev, tag, A, C, B, x.itemsize, (dy3, x3, dx3, y3))
    coef = dev.empty((4, view.K), acc)
    sums = (f64(dev, sum_dy), f64(dev, sum_dy_xhat)) if training else (None, None)
    _bwd_coef(dev, view, tag, *sums, f64(dev, mean), f64(dev, rstd), param(dev, weight, C),
              count if training else 1, training, None, None, coef)
    view.bwd_apply(f"batch_norm_bwd_{tag}_apply", dy3, x3, y3, coef, dx3)
    layout.finish(dx, dx3)
