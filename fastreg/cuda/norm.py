"""Layer and RMS norm on a CUDA device (CuPy arrays) or the host emulation (NumPy arrays).

Same function names and signatures as ``fastreg/reference/norm.py`` and
``fastreg/cpu/norm.py``; the kernels are ``kernels/norm.cu`` (strategy,
reduction order and byte counts in its header). This module holds the launch
geometry, the one place to tune it:

Forward. x is viewed as (M, D) rows. ``row_plan`` picks the smallest row
group R (threads per row, a power of two from 32) and then the smallest K
(16-byte slots per thread) from the instances in ``ROW_KERNELS`` that hold
the row in registers: R * K * N >= D, N = 16 bytes / itemsize. A warp per
row up to D = 32 * K * N with the dtype's largest K (fp32 and fp64: K = 4,
D <= 512 and 256; 16-bit: K = 2, D <= 512), then R doubles up to 1024
threads (fp32: D <= 16384; fp64 8192; 16-bit 8192, as K = 1 at 1024 threads
or K = 2 at 512). Blocks of max(R, 128) threads, max(R, 128) / R rows each,
one row per group, ceil(M / rows per block) blocks. Beyond the registers,
the loop kernel: one row per 512-thread block.

Backward. The same search over the backward instances (at most 512 threads:
fp32 D <= 8192, bf16 8192, fp64 4096), blocks of max(R, 256) threads, and a
grid of G = min(row groups, 132 * max(1, 512 // threads)) blocks: one
resident wave on a 132-SM H100 given the kernels' register use (<= 128 per
thread). G depends on the shapes only, so the partial rows, and the order in
which ``norm_sum_partials`` adds them, are the same run to run and on every
device. Partial rows cost 2 * G * D * 4 bytes (written, then read) per
parameter gradient: at the benchmark shapes 1-4 % of the bytes for float32
and 2-9 % for 16-bit types (layer norm, D >= 4096), mostly L2 traffic (17 MB
< 50 MB L2). Fewer blocks would idle SMs; reducing the partials across a
thread-block cluster in distributed shared memory would remove most of it.
Beyond the registers: a dx kernel (one row per block) and a column-parallel
partial-row kernel over fixed ranges of rows.

Rows take 16-byte loads when D is a multiple of N and every row array and
parameter is 16-byte aligned (``vec``); else the scalar body runs (same
register layout, columns strided by R so warps stay coalesced). Inputs that
are not C-contiguous are copied first; outputs that are not are written
through a temporary.
"""

from __future__ import annotations

import numpy as np

from . import TAGS, VEC, _device  # noqa: F401 - TAGS and VEC are part of this module's interface

MODULE = "norm"

# (K, largest block) of the register-path instances, as instantiated at the end of
# kernels/norm.cu: the block bound sets the register budget.
ROW_KERNELS = {
    "fwd": {"f16": ((1, 1024), (2, 512)), "bf16": ((1, 1024), (2, 512)),
            "f32": ((1, 1024), (2, 1024), (4, 1024)), "f64": ((1, 1024), (2, 1024), (4, 1024))},
    "bwd": {"f16": ((1, 512), (2, 512)), "bf16": ((1, 512), (2, 512)),
            "f32": ((1, 512), (2, 512), (4, 512)), "f64": ((1, 512), (2, 512), (4, 512))},
}
MIN_THREADS = {"fwd": 128, "bwd": 256}
LOOP_THREADS = 512
PARAMS_THREADS = 256          # the loop path's partial-row kernel, one column per thread
SUM_THREADS = 256             # norm_sum_partials, one column per thread
H100_SMS = 132                # backward grid: one resident wave on an H100 (see above)
LOOP_PARTIAL_ROWS = 256       # loop path: at most this many partial rows

# Ops of this family without CUDA kernels: the dispatcher refuses them by name
# (fastreg._backend.select) instead of falling back to another backend. None left.
UNSUPPORTED = frozenset()


def kernel_names():
    """Every kernel the launchers may launch (the compile checks cover each)."""
    names = []
    for tag in VEC:
        for op in ("layer_norm", "rms_norm"):
            for direction in ("fwd", "bwd"):
                names += [f"{op}_{direction}_{tag}_k{k}" for k, _ in ROW_KERNELS[direction][tag]]
                names.append(f"{op}_{direction}_{tag}_loop")
            names.append(f"{op}_bwd_params_{tag}")
        names.append(f"norm_sum_partials_{tag}")
    return names


def hot_kernel_names():
    """The kernels that carry the rows (the register and loop paths)."""
    return [n for n in kernel_names() if "_params_" not in n and "sum_partials" not in n]


def row_plan(direction, tag, D, kernels=None):
    """(R, K, max_threads) of the register path for rows of D elements, or None (loop path).

    ``kernels``: the (K, largest block) table of the module's instances (default
    this module's ``ROW_KERNELS``; the fused dropout + add + LayerNorm passes its own).
    """
    kernels = ROW_KERNELS if kernels is None else kernels
    N = VEC[tag]
    R = 32
    while R <= 1024:
        for K, max_threads in kernels[direction][tag]:
            if R <= max_threads and R * K * N >= D:
                return R, K, max_threads
        R *= 2
    return None


def backward_blocks(row_groups, threads, sms=None):
    """Grid of the register-path backward: fixed by the shapes (see the module doc)."""
    sms = H100_SMS if sms is None else sms
    return max(1, min(row_groups, sms * max(1, 512 // threads)))


def _rows(a, k):
    D = int(np.prod(a.shape[a.ndim - k:]))
    M = int(np.prod(a.shape[:a.ndim - k]))
    if M >= 2**31 or D >= 2**31:
        raise ValueError(f"rows of {D} elements x {M} rows exceed the kernels' 2**31 limits")
    return M, D


def _acc(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _vec_ok(dev, D, N, arrays):
    return D % N == 0 and all(a is None or dev.address(a) % 16 == 0 for a in arrays)


def _param(dev, a, D):
    return None if a is None else dev.contiguous(a).reshape(D)


# --------------------------------------------------------------------------- forward

def _row_forward(op, x, weight, bias, eps, k, y, mean, rstd):
    dev = _device.of(x)
    M, D = _rows(x, k)
    if M == 0:
        return
    tag, acc = TAGS[x.dtype], _acc(x.dtype)
    xc = dev.contiguous(x).reshape(M, D)
    w, b = _param(dev, weight, D), _param(dev, bias, D)
    yt, rt = dev.target(y), dev.target(rstd)
    mt = None if mean is None else dev.target(mean)
    vec = _vec_ok(dev, D, VEC[tag], (xc, yt, w, b))
    plan = row_plan("fwd", tag, D)
    if plan is not None:
        R, K, _ = plan
        threads = max(R, MIN_THREADS["fwd"])
        name, grid = f"{op}_fwd_{tag}_k{K}", -(-M // (threads // R))
    else:
        R, threads, name, grid = 0, LOOP_THREADS, f"{op}_fwd_{tag}_loop", M
    dev.launch(MODULE, name, grid, threads,
               (xc, w, b, yt, mt, rt, np.int32(M), np.int32(D), acc(eps), np.int32(R),
                np.int32(vec)))
    dev.finish(y, yt)
    dev.finish(rstd, rt)
    if mean is not None:
        dev.finish(mean, mt)


def layer_norm(x, weight, bias, eps, normalized_ndim, out):
    y, mean, rstd = out
    _row_forward("layer_norm", x, weight, bias, eps, normalized_ndim, y, mean, rstd)


def rms_norm(x, weight, eps, normalized_ndim, out):
    y, rstd = out
    _row_forward("rms_norm", x, weight, None, eps, normalized_ndim, y, None, rstd)


# --------------------------------------------------------------------------- backward

def _row_backward(op, dy, x, mean, rstd, weight, k, dx, dweight, dbias):
    dev = _device.of(x)
    M, D = _rows(x, k)
    if M == 0 or D == 0:
        for g in (dweight, dbias):  # sums over no rows are 0; with D = 0 they are empty
            if g is not None:
                g[...] = 0
        return
    tag, acc = TAGS[x.dtype], _acc(x.dtype)
    xc, dyc = dev.contiguous(x).reshape(M, D), dev.contiguous(dy).reshape(M, D)
    mc = None if mean is None else dev.contiguous(mean).reshape(M)
    rc = dev.contiguous(rstd).reshape(M)
    w = _param(dev, weight, D)
    dxt = dev.target(dx)
    vec = _vec_ok(dev, D, VEC[tag], (xc, dyc, dxt, w))
    wanted = [g for g in (dweight, dbias) if g is not None]
    plan = row_plan("bwd", tag, D)
    if plan is not None:
        R, K, _ = plan
        threads = max(R, MIN_THREADS["bwd"])
        groups = threads // R
        G = backward_blocks(-(-M // groups), threads)
        parts = [dev.empty((G, D), acc) if g is not None else None for g in (dweight, dbias)]
        shared = groups * D * np.dtype(acc).itemsize if groups > 1 and wanted else 0
        dev.launch(MODULE, f"{op}_bwd_{tag}_k{K}", G, threads,
                   (dyc, xc, mc, rc, w, dxt, parts[0], parts[1], np.int32(M), np.int32(D),
                    np.int32(R), np.int32(vec)), shared_mem=shared)
    else:
        dev.launch(MODULE, f"{op}_bwd_{tag}_loop", M, LOOP_THREADS,
                   (dyc, xc, mc, rc, w, dxt, None, None, np.int32(M), np.int32(D), np.int32(0),
                    np.int32(vec)))
        rows_per_part = -(-M // LOOP_PARTIAL_ROWS)
        G = -(-M // rows_per_part)
        parts = [dev.empty((G, D), acc) if g is not None else None for g in (dweight, dbias)]
        if wanted:
            dev.launch(MODULE, f"{op}_bwd_params_{tag}", (-(-D // PARAMS_THREADS), G),
                       PARAMS_THREADS,
                       (dyc, xc, mc, rc, None, None, parts[0], parts[1], np.int32(M),
                        np.int32(D), np.int32(rows_per_part), np.int32(0)))
    dev.finish(dx, dxt)
    for g, part in zip((dweight, dbias), parts):
        if g is None:
            continue
        gt = dev.target(g)
        dev.launch(MODULE, f"norm_sum_partials_{tag}", -(-D // SUM_THREADS), SUM_THREADS,
                   (part, np.int32(G), np.int32(D), gt.reshape(D)))
        dev.finish(g, gt)


def layer_norm_backward(dy, x, mean, rstd, weight, normalized_ndim, out):
    dx, dweight, dbias = out
    _row_backward("layer_norm", dy, x, mean, rstd, weight, normalized_ndim, dx, dweight, dbias)


def rms_norm_backward(dy, x, rstd, weight, normalized_ndim, out):
    dx, dweight = out
    _row_backward("rms_norm", dy, x, None, rstd, weight, normalized_ndim, dx, dweight, None)


# Batch and group norm live in their own modules (kernels/batch_norm.cu and
# kernels/group_norm.cu); this module is the family's single entry point, as
# fastreg/cpu/norm.py is. Instance norm is group norm with G = C (fastreg.norm).
from ._batch_norm import (  # noqa: E402,F401
    batch_norm, batch_norm_backward, batch_norm_backward_apply, batch_norm_backward_reduce,
    batch_norm_combine, batch_norm_stats)
from ._group_norm import group_norm, group_norm_backward  # noqa: E402,F401
