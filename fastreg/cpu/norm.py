"""Normalization kernels on the CPU (Numba), with the reference's signatures.

Layer and RMS norm (rows): x is viewed as (M, D). One row per ``prange``
iteration; the row (D*itemsize bytes) stays in L1/L2 while it is read up to
three times, so memory sees x read once and y written once:

    pass 1  s1 = sum(x - k), s2 = sum((x - k)**2)   (float64, k = the row's first element)
            mean = k + s1 / D, var = s2 / D - (s1 / D)**2
    pass 2  y = (x - mean) * rstd * w + b

The shift k bounds the cancellation by (mean - k)**2 / var instead of
mean**2 / var, so float32 rows with mean 1e4 and std 1 match the float64
reference (tests/test_stability.py). One shifted pass ran 1.3-1.45x faster
than a mean pass plus a squared-deviation pass over the cached row; a
one-pass Welford loop does not vectorize and ran 7x slower.

Backward (rows): per row, sum(g) and sum(g*xhat) then dx; dweight/dbias are
accumulated into per-block partials (blocks of rows fixed by M, see
``_common.block_rows``) and summed in block order, so they are bitwise
identical at any thread count. Rows go in groups of 4: the sums of the 4 rows
(x and dy read from memory), then one loop over the 4 cached rows writes dx
and adds the 4 rows' dweight/dbias terms to the partials, whose loads and
stores (float64, 2*8*D bytes per row) otherwise dominated the backward.
Where the rest of the time goes (4096x4096 float32, 2 threads, same process):
a two-pass kernel with one float64 dot per row and dx = x*s + dy ran at the
speed of a copy of the same bytes (5.1-5.2 ms); the layer norm arithmetic
without dweight/dbias took 5.6-5.7 ms and this kernel 6.5-6.6. Keeping tiles
of the partials in L1 (groups of 8-16 rows, 256-1024 columns) did not
help, in cache or from memory: the cost is the float64 arithmetic (0.14,
0.22 and 0.27 ns per element on one core, in cache), which adds to the memory
time instead of hiding under it.

Bytes (minimal): fwd read x, write y (+ params and stats); bwd read dy, x,
write dx (+ params and stats).
"""

import math
import numba
import numpy as np
from numba import prange

from ._common import PARALLEL_JIT, block_rows, contiguous, finish, param, reduce_blocks, target


def _rows(a, k):
    D = int(math.prod(a.shape[a.ndim - k:]))
    M = int(math.prod(a.shape[:a.ndim - k]))
    return M, D


# --------------------------------------------------------------------------- layer norm

@numba.njit(**PARALLEL_JIT)
def _layer_norm_fwd_rows(x, w, b, eps, y, mean, rstd):
    M, D = x.shape
    inv_d = 1.0 / max(D, 1)
    for i in prange(M):
        k = np.float64(x[i, 0]) if D else 0.0  # shift: the row's first element
        s1 = 0.0
        s2 = 0.0
        for j in range(D):
            d = x[i, j] - k
            s1 += d
            s2 += d * d
        m1 = s1 * inv_d
        var = s2 * inv_d - m1 * m1
        if var < 0.0:  # rounding; NaN passes through
            var = 0.0
        mu = k + m1
        r = 1.0 / np.sqrt(var + eps)
        for j in range(D):
            y[i, j] = (x[i, j] - mu) * r * w[j] + b[j]
        mean[i] = mu
        rstd[i] = r


@numba.njit(**PARALLEL_JIT)
def _layer_norm_bwd_rows(dy, x, mean, rstd, w, rows_per_block, dx, dw_part, db_part):
    """Rows in groups of 4: the sums of each row first (x and dy read from memory),
    then dx of the 4 rows and their dweight/dbias terms in one loop over the
    cached rows, so each partial is loaded and stored once per 4 rows
    (1.3-1.4x faster than a row at a time, whose partial updates dominated)."""
    M, D = x.shape
    inv_d = 1.0 / max(D, 1)
    for blk in prange(dw_part.shape[0]):
        pw = dw_part[blk]
        pb = db_part[blk]
        pw[:] = 0.0
        pb[:] = 0.0
        i0 = blk * rows_per_block
        i1 = min(M, i0 + rows_per_block)
        mu = np.empty(4)
        r = np.empty(4)
        a = np.empty(4)   # mean(g), g = dy * w
        c = np.empty(4)   # mean(g * (x - mean)) * rstd**2
        for g0 in range(i0, i1, 4):
            n = min(4, i1 - g0)
            for t in range(n):
                i = g0 + t
                mu[t] = mean[i]
                r[t] = rstd[i]
                sg = 0.0
                sgx = 0.0
                for j in range(D):
                    g = np.float64(dy[i, j]) * w[j]
                    sg += g
                    sgx += g * (x[i, j] - mu[t])
                a[t] = sg * inv_d
                c[t] = sgx * inv_d * r[t] * r[t]
            if n == 4:
                m0, m1, m2, m3 = mu[0], mu[1], mu[2], mu[3]
                r0, r1, r2, r3 = r[0], r[1], r[2], r[3]
                a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
                c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
                for j in range(D):
                    wj = w[j]
                    x0 = x[g0, j] - m0
                    x1 = x[g0 + 1, j] - m1
                    x2 = x[g0 + 2, j] - m2
                    x3 = x[g0 + 3, j] - m3
                    d0 = np.float64(dy[g0, j])
                    d1 = np.float64(dy[g0 + 1, j])
                    d2 = np.float64(dy[g0 + 2, j])
                    d3 = np.float64(dy[g0 + 3, j])
                    dx[g0, j] = r0 * (d0 * wj - a0 - x0 * c0)
                    dx[g0 + 1, j] = r1 * (d1 * wj - a1 - x1 * c1)
                    dx[g0 + 2, j] = r2 * (d2 * wj - a2 - x2 * c2)
                    dx[g0 + 3, j] = r3 * (d3 * wj - a3 - x3 * c3)
                    pw[j] += (d0 * x0 * r0 + d1 * x1 * r1) + (d2 * x2 * r2 + d3 * x3 * r3)
                    pb[j] += (d0 + d1) + (d2 + d3)
            else:  # the block's last rows
                for t in range(n):
                    i = g0 + t
                    for j in range(D):
                        xc = x[i, j] - mu[t]
                        d = np.float64(dy[i, j])
                        dx[i, j] = r[t] * (d * w[j] - a[t] - xc * c[t])
                        pw[j] += d * xc * r[t]
                        pb[j] += d


def layer_norm(x, weight, bias, eps, normalized_ndim, out):
    y, mean, rstd = out
    M, D = _rows(x, normalized_ndim)
    yt, mt, rt = target(y), target(mean), target(rstd)
    _layer_norm_fwd_rows(contiguous(x).reshape(M, D), param(weight, D, x.dtype, 1.0),
                         param(bias, D, x.dtype, 0.0), eps, yt.reshape(M, D),
                         mt.reshape(M), rt.reshape(M))
    finish(y, yt), finish(mean, mt), finish(rstd, rt)


def layer_norm_backward(dy, x, mean, rstd, weight, normalized_ndim, out):
    dx, dweight, dbias = out
    M, D = _rows(x, normalized_ndim)
    rows, nb = block_rows(M)
    dw_part = np.empty((nb, D), np.float64)
    db_part = np.empty((nb, D), np.float64)
    dxt = target(dx)
    _layer_norm_bwd_rows(contiguous(dy).reshape(M, D), contiguous(x).reshape(M, D),
                         contiguous(mean).reshape(M), contiguous(rstd).reshape(M),
                         param(weight, D, x.dtype, 1.0), rows, dxt.reshape(M, D),
                         dw_part, db_part)
    finish(dx, dxt)
    reduce_blocks(dw_part, dweight)
    reduce_blocks(db_part, dbias)


# --------------------------------------------------------------------------- RMS norm

@numba.njit(**PARALLEL_JIT)
def _rms_norm_fwd_rows(x, w, eps, y, rstd):
    M, D = x.shape
    inv_d = 1.0 / max(D, 1)
    for i in prange(M):
        ss = 0.0
        for j in range(D):
            v = np.float64(x[i, j])
            ss += v * v
        r = 1.0 / np.sqrt(ss * inv_d + eps)
        for j in range(D):
            y[i, j] = x[i, j] * r * w[j]
        rstd[i] = r


@numba.njit(**PARALLEL_JIT)
def _rms_norm_bwd_rows(dy, x, rstd, w, rows_per_block, dx, dw_part):
    """Rows in groups of 4, as ``_layer_norm_bwd_rows``."""
    M, D = x.shape
    inv_d = 1.0 / max(D, 1)
    for blk in prange(dw_part.shape[0]):
        pw = dw_part[blk]
        pw[:] = 0.0
        i0 = blk * rows_per_block
        i1 = min(M, i0 + rows_per_block)
        r = np.empty(4)
        c = np.empty(4)   # mean(g * x) * rstd**3, g = dy * w
        for g0 in range(i0, i1, 4):
            n = min(4, i1 - g0)
            for t in range(n):
                i = g0 + t
                r[t] = rstd[i]
                sgx = 0.0
                for j in range(D):
                    sgx += np.float64(dy[i, j]) * w[j] * x[i, j]
                c[t] = sgx * inv_d * r[t] * r[t] * r[t]
            if n == 4:
                r0, r1, r2, r3 = r[0], r[1], r[2], r[3]
                c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
                for j in range(D):
                    wj = w[j]
                    x0 = np.float64(x[g0, j])
                    x1 = np.float64(x[g0 + 1, j])
                    x2 = np.float64(x[g0 + 2, j])
                    x3 = np.float64(x[g0 + 3, j])
                    d0 = np.float64(dy[g0, j])
                    d1 = np.float64(dy[g0 + 1, j])
                    d2 = np.float64(dy[g0 + 2, j])
                    d3 = np.float64(dy[g0 + 3, j])
                    dx[g0, j] = r0 * d0 * wj - x0 * c0
                    dx[g0 + 1, j] = r1 * d1 * wj - x1 * c1
                    dx[g0 + 2, j] = r2 * d2 * wj - x2 * c2
                    dx[g0 + 3, j] = r3 * d3 * wj - x3 * c3
                    pw[j] += (d0 * x0 * r0 + d1 * x1 * r1) + (d2 * x2 * r2 + d3 * x3 * r3)
            else:
                for t in range(n):
                    i = g0 + t
                    for j in range(D):
                        xv = np.float64(x[i, j])
                        d = np.float64(dy[i, j])
                        dx[i, j] = r[t] * d * w[j] - xv * c[t]
                        pw[j] += d * xv * r[t]


def rms_norm(x, weight, eps, normalized_ndim, out):
    y, rstd = out
    M, D = _rows(x, normalized_ndim)
    yt, rt = target(y), target(rstd)
    _rms_norm_fwd_rows(contiguous(x).reshape(M, D), param(weight, D, x.dtype, 1.0), eps,
                       yt.reshape(M, D), rt.reshape(M))
    finish(y, yt), finish(rstd, rt)


def rms_norm_backward(dy, x, rstd, weight, normalized_ndim, out):
    dx, dweight = out
    M, D = _rows(x, normalized_ndim)
    rows, nb = block_rows(M)
    dw_part = np.empty((nb, D), np.float64)
    dxt = target(dx)
    _rms_norm_bwd_rows(contiguous(dy).reshape(M, D), contiguous(x).reshape(M, D),
                       contiguous(rstd).reshape(M), param(weight, D, x.dtype, 1.0), rows,
                       dxt.reshape(M, D), dw_part)
    finish(dx, dxt)
    reduce_blocks(dw_part, dweight)


# Batch and group norm live in their own files (channel layouts, more kernels);
# this module is the family's single entry point, as reference/norm.py is.
from ._batch_norm import (  # noqa: E402,F401
    batch_norm, batch_norm_backward, batch_norm_backward_apply, batch_norm_backward_reduce,
    batch_norm_combine, batch_norm_stats)
from ._group_norm import group_norm, group_norm_backward  # noqa: E402,F401
