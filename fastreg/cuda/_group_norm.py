"""Group norm (and instance norm, G = C) on a CUDA device or the host emulation.

Same function names and signatures as ``fastreg/reference/norm.py`` and
``fastreg/cpu/_group_norm.py``; the kernels are ``kernels/group_norm.cu``
(formulas, strategy, bytes and expected bandwidth in its header).

Layouts (``_layout.ChannelLayout`` with the sample axis kept outermost):

- channels first with H*W > 1 (NCHW): one block per (n, g) over its
  contiguous run, ``group_threads`` picks R threads per channel (a power of
  two, 32..512, at most the channel's 16-byte units rounded up) and
  blockDim / R channels at a time, so that the threads cover the group's
  channels without idling: 32x256x56x56 float32 with G = 32 gives 64
  threads per channel, 8 channels at a time, 512 threads.
- channels last (NHWC, channels_last storage, (N, C)): x as (N, HW, C), the
  row kernels of ``_channels.Rows`` with N outer slices and C / G columns per
  group: statistics partials -> per-group merge in float64 -> per-(n, column)
  coefficients -> apply.

The backward writes per-(n, c) partials of dweight/dbias (groups) or per
(n, split, c) (rows), which ``group_norm_bwd_<dtype>_params`` adds over n in
order. ``group_norm`` returns the biased variance (N, G) in float64 for the
running statistics of instance norm (updated by ``fastreg.norm``).
"""

from __future__ import annotations

import numpy as np

from . import TAGS, VEC, _device
from ._channels import (COEF_THREADS, MERGE_THREADS, Rows, acc_dtype, cdiv, fwd_coef,
                        merge_stats, next_pow2, param, vec_ok)
from ._layout import ChannelLayout

MODULE = "group_norm"
F64 = np.dtype(np.float64)
GROUP_THREADS = 512  # the groups kernels' largest block


def kernel_names():
    """Every kernel the launchers may launch (the compile checks cover each)."""
    names = []
    for tag in TAGS.values():
        names += [f"group_norm_fwd_{tag}_{k}" for k in ("groups", "stats_rows", "stats_merge",
                                                      "coef", "apply_rows")]
        names += [f"group_norm_bwd_{tag}_{k}" for k in ("groups", "reduce_rows", "coef",
                                                      "apply_rows", "params")]
    return names


def hot_kernel_names():
    """The kernels that stream x (the groups and row kernels)."""
    return [n for n in kernel_names() if n.endswith(("_groups", "_rows"))]


def group_threads(U, Cg):
    """(R, blockDim) of the groups kernels for channels of U units and Cg channels a group."""
    r_max = min(GROUP_THREADS, max(32, next_pow2(U)))
    cpb = max(1, min(next_pow2(Cg), GROUP_THREADS // 32))
    R = max(32, min(r_max, GROUP_THREADS // cpb))
    return R, R * min(cpb, GROUP_THREADS // R)


def _plan(dev, x, axis):
    """(layout, HW, channels_last) as the CPU's group norm views x."""
    layout = ChannelLayout(dev, x, axis, keep_first=True)
    A, C, B = layout.shape3
    N = x.shape[0]
    return layout, A // N * B, B == 1


def _limits(N, G, Cg, HW):
    if N * G >= 2**31 or Cg * HW >= 2**31:
        raise ValueError(f"group_norm: {N} x {G} groups of {Cg * HW} elements exceed the "
                         "kernels' 2**31 limits")


def group_norm(x, G, weight, bias, eps, axis, out):
    y, mean, rstd = out
    dev = _device.of(x)
    N, C = x.shape[0], x.shape[axis]
    if x.size == 0:
        mean[...] = 0.0  # the statistics of an empty set (as the reference)
        rstd[...] = 1.0 / np.sqrt(eps)
        return dev.xp.zeros((N, G), F64)
    tag, acc = TAGS[x.dtype], acc_dtype(x.dtype)
    Cg = C // G
    layout, HW, channels_last = _plan(dev, x, axis)
    _limits(N, G, Cg, HW)
    x3, y3 = layout.input(x), layout.output(y)
    w, b = param(dev, weight, C), param(dev, bias, C)
    mt, rt = dev.target(mean), dev.target(rstd)
    if not channels_last:
        vec = vec_ok(dev, HW, VEC[tag], (x3, y3))
        R, threads = group_threads(HW // (VEC[tag] if vec else 1), Cg)
        var = dev.empty((N, G), acc)
        dev.launch(MODULE, f"group_norm_fwd_{tag}_groups", N * G, threads,
                   (x3, w, b, y3, mt, rt, var, np.int32(G), np.int32(Cg), np.int32(HW),
                    acc.type(eps), np.int32(R), np.int32(vec)))
        var = var.astype(F64)
    else:
        view = Rows(dev, MODULE, tag, N, HW, C, Cg, (x3, y3))
        part = view.stats(f"group_norm_fwd_{tag}_stats", x3, acc)
        count, mean64, m2 = (dev.empty(N * G, F64) for _ in range(3))
        merge_stats(view, f"group_norm_fwd_{tag}_stats", x3, part, count, mean64, m2)
        var = dev.empty((N, G), F64)
        coef = dev.empty((3, N * C), acc)
        fwd_coef(view, f"group_norm_fwd_{tag}", count, mean64, m2, True, w, b, eps, True,
                 mt, rt, var, coef)
        view.apply(f"group_norm_fwd_{tag}_apply", x3, coef, y3, False)
    layout.finish(y, y3)
    dev.finish(mean, mt)
    dev.finish(rstd, rt)
    return var


def group_norm_backward(dy, x, mean, rstd, G, weight, axis, out):
    dx, dweight, dbias = out
    dev = _device.of(x)
    N, C = x.shape[0], x.shape[axis]
    if x.size == 0:
        for g in (dweight, dbias):  # sums over no values
            if g is not None:
                g[...] = 0
        return
    tag, acc = TAGS[x.dtype], acc_dtype(x.dtype)
    Cg = C // G
    layout, HW, channels_last = _plan(dev, x, axis)
    _limits(N, G, Cg, HW)
    dy3, x3, dx3 = layout.input(dy), layout.input(x), layout.output(dx)
    w = param(dev, weight, C)
    m, r = dev.contiguous(mean).reshape(N * G), dev.contiguous(rstd).reshape(N * G)
    if not channels_last:
        S = 1
        vec = vec_ok(dev, HW, VEC[tag], (dy3, x3, dx3))
        R, threads = group_threads(HW // (VEC[tag] if vec else 1), Cg)
        part = dev.empty((2, N, 1, C), acc)
        dev.launch(MODULE, f"group_norm_bwd_{tag}_groups", N * G, threads,
                   (dy3, x3, m, r, w, dx3, part, np.int32(G), np.int32(Cg), np.int32(HW),
                    np.int32(R), np.int32(vec)))
    else:
        view = Rows(dev, MODULE, tag, N, HW, C, Cg, (dy3, x3, dx3))
        S = view.S
        part = view.reduce(f"group_norm_bwd_{tag}_reduce", dy3, x3, None, m, acc)
        coef = dev.empty((4, N * C), acc)
        dev.launch(MODULE, f"group_norm_bwd_{tag}_coef", cdiv(N * G, MERGE_THREADS // 32),
                   MERGE_THREADS, (part, m, r, w, np.int32(N), np.int32(S), np.int32(G),
                                   np.int32(Cg), np.int32(HW), coef))
        view.bwd_apply(f"group_norm_bwd_{tag}_apply", dy3, x3, None, coef, dx3)
    layout.finish(dx, dx3)
    if dweight is None and dbias is None:
        return
    dwt = None if dweight is None else dev.target(dweight)
    dbt = None if dbias is None else dev.target(dbias)
    dev.launch(MODULE, f"group_norm_bwd_{tag}_params", cdiv(C, COEF_THREADS), COEF_THREADS,
               (part, r, np.int32(N), np.int32(S), np.int32(C), np.int32(Cg), dwt, dbt))
    for g, t in ((dweight, dwt), (dbias, dbt)):
        if g is not None:
            dev.finish(g, t)
