"""Group norm kernels on the CPU (Numba), with the reference's signatures.

Sample n's group g is the channels [g*Cg, (g+1)*Cg) (Cg = C/G) at every
spatial position; with m = Cg*HW elements, in float64:

    mean = sum(x) / m,  var = sum((x - mean)**2) / m    (float64, shifted sums)
    y    = x * scale[c] + shift[c],  scale = rstd * w[c], shift = b[c] - mean * scale

Channels first (axis=1, NCHW): a group is one contiguous run of m elements,
processed like a layer-norm row by one ``prange`` iteration over (n, g):
one pass for sums shifted by the group's first element (which bounds the
cancellation, see cpu/norm.py), one for y, the run staying in cache.

Channels last (axis=-1, NHWC, and NCHW shapes stored channels last): one
``prange`` iteration per sample streams its HW rows of C channels, summing
per channel (vectorized along the row) with each channel shifted by its
first element; channel means and M2 are merged per group with Chan's
formula, and a second pass writes y (a 128x56x56 float32 sample, 1.6 MB,
is still in L2/L3).

Backward, with g = dy * w[c] and xhat = (x - mean) * rstd, means over a group:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight[c] = sum_n sum_s dy * xhat,  dbias[c] = sum_n sum_s dy

Each (n, c) partial of dweight/dbias is written by the iteration that owns
sample n; the partials are summed over n in order. Every sum runs in an
order fixed by the shape, so results are bitwise identical at any thread
count.

Bytes (minimal): fwd read x, write y; bwd read dy, x, write dx (+ params
and statistics).
"""

import numba
import numpy as np
from numba import prange

from ._common import PARALLEL_JIT, ChannelLayout, finish, param, reduce_blocks, target


# --------------------------------------------------------------------------- channels first

@numba.njit(**PARALLEL_JIT)
def _group_norm_fwd_groups(x, w, b, eps, y, mean, rstd, var):
    """x, y: (N*G, Cg, HW); mean, rstd, var: (N*G,)."""
    R, Cg, HW = x.shape
    G = max(w.shape[0] // max(Cg, 1), 1)
    inv_m = 1.0 / max(Cg * HW, 1)
    for i in prange(R):
        k = np.float64(x[i, 0, 0]) if Cg * HW else 0.0  # shift: the group's first element
        s1 = 0.0
        s2 = 0.0
        for ci in range(Cg):
            for j in range(HW):
                d = x[i, ci, j] - k
                s1 += d
                s2 += d * d
        m1 = s1 * inv_m
        v = s2 * inv_m - m1 * m1
        if v < 0.0:  # rounding; NaN passes through
            v = 0.0
        mu = k + m1
        r = 1.0 / np.sqrt(v + eps)
        g = i % G
        for ci in range(Cg):
            c = g * Cg + ci
            scale = r * w[c]
            shift = b[c] - mu * scale
            for j in range(HW):
                y[i, ci, j] = x[i, ci, j] * scale + shift
        mean[i] = mu
        rstd[i] = r
        var[i] = v


@numba.njit(**PARALLEL_JIT)
def _group_norm_bwd_groups(dy, x, mean, rstd, w, dx, dw_part, db_part):
    """dy, x, dx: (N*G, Cg, HW); dw_part, db_part: (N*G, Cg) per (n, c) partials."""
    R, Cg, HW = x.shape
    G = max(w.shape[0] // max(Cg, 1), 1)
    inv_m = 1.0 / max(Cg * HW, 1)
    for i in prange(R):
        mu = np.float64(mean[i])
        r = np.float64(rstd[i])
        g = i % G
        sg = 0.0
        sgx = 0.0
        for ci in range(Cg):
            s_dy = 0.0
            s_dyx = 0.0
            for j in range(HW):
                s_dy += dy[i, ci, j]
                s_dyx += dy[i, ci, j] * (x[i, ci, j] - mu)
            wc = w[g * Cg + ci]
            db_part[i, ci] = s_dy
            dw_part[i, ci] = s_dyx * r
            sg += wc * s_dy
            sgx += wc * s_dyx * r
        a = sg * inv_m
        k = sgx * inv_m
        for ci in range(Cg):
            wc = w[g * Cg + ci]
            for j in range(HW):
                xh = (x[i, ci, j] - mu) * r
                dx[i, ci, j] = r * (dy[i, ci, j] * wc - a - xh * k)


# --------------------------------------------------------------------------- channels last

@numba.njit(**PARALLEL_JIT)
def _group_norm_fwd_rows(x, G, w, b, eps, y, mean, rstd, var):
    """x, y: (N, HW, C); mean, rstd, var: (N, G)."""
    N, HW, C = x.shape
    Cg = C // G
    inv_m = 1.0 / max(Cg * HW, 1)
    inv_hw = 1.0 / max(HW, 1)
    for n in prange(N):
        # per channel: sums shifted by the channel's first element, in one pass
        k = np.empty(C)
        for c in range(C):
            k[c] = x[n, 0, c] if HW else 0.0
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for s in range(HW):
            for c in range(C):
                d = x[n, s, c] - k[c]
                s1[c] += d
                s2[c] += d * d
        # channel means and M2, merged per group (Chan et al.; equal counts)
        mu_c = np.empty(C)
        acc = np.empty(C)  # the group's M2 contributions, per channel
        for g in range(G):
            t = 0.0
            for ci in range(Cg):
                c = g * Cg + ci
                mc = s1[c] * inv_hw
                mu_c[c] = k[c] + mc
                t += mu_c[c]
            mg = t / max(Cg, 1)
            mean[n, g] = mg
            for ci in range(Cg):
                c = g * Cg + ci
                mc = s1[c] * inv_hw
                dm = mu_c[c] - mg
                acc[c] = max(s2[c] - s1[c] * mc, 0.0) + HW * dm * dm
            for ci in range(Cg):
                mu_c[g * Cg + ci] = mg
        scale = np.empty(C)
        shift = np.empty(C)
        for g in range(G):
            t = 0.0
            for ci in range(Cg):
                t += acc[g * Cg + ci]
            v = t * inv_m
            r = 1.0 / np.sqrt(v + eps)
            var[n, g] = v
            rstd[n, g] = r
            for ci in range(Cg):
                c = g * Cg + ci
                scale[c] = r * w[c]
                shift[c] = b[c] - mu_c[c] * scale[c]
        for s in range(HW):
            for c in range(C):
                y[n, s, c] = x[n, s, c] * scale[c] + shift[c]


@numba.njit(**PARALLEL_JIT)
def _group_norm_bwd_rows(dy, x, mean, rstd, w, dx, dw_part, db_part):
    """dy, x, dx: (N, HW, C); mean, rstd: (N, G); dw_part, db_part: (N, C)."""
    N, HW, C = x.shape
    G = mean.shape[1]
    Cg = C // G
    inv_m = 1.0 / max(Cg * HW, 1)
    for n in prange(N):
        mu_c = np.empty(C)
        r_c = np.empty(C)
        for c in range(C):
            mu_c[c] = mean[n, c // Cg]
            r_c[c] = rstd[n, c // Cg]
        s_dy = np.zeros(C)
        s_dyx = np.zeros(C)
        for s in range(HW):
            for c in range(C):
                s_dy[c] += dy[n, s, c]
                s_dyx[c] += dy[n, s, c] * (x[n, s, c] - mu_c[c])
        # per channel: dx = alpha*dy - beta*(x - mean) - gamma
        alpha = np.empty(C)
        beta = np.empty(C)
        gamma = np.empty(C)
        for g in range(G):
            sg = 0.0
            sgx = 0.0
            for ci in range(Cg):
                c = g * Cg + ci
                db_part[n, c] = s_dy[c]
                dw_part[n, c] = s_dyx[c] * r_c[c]
                sg += w[c] * s_dy[c]
                sgx += w[c] * s_dyx[c] * r_c[c]
            for ci in range(Cg):
                c = g * Cg + ci
                r = r_c[c]
                alpha[c] = r * w[c]
                beta[c] = r * r * sgx * inv_m
                gamma[c] = r * sg * inv_m
        for s in range(HW):
            for c in range(C):
                dx[n, s, c] = alpha[c] * dy[n, s, c] - beta[c] * (x[n, s, c] - mu_c[c]) - gamma[c]


# --------------------------------------------------------------------------- launchers

def _views(x, axis, G):
    """Layout of x and how to view same-laid arrays: (N*G, Cg, HW) or (N, HW, C)."""
    N, C = x.shape[0], x.shape[axis]
    layout = ChannelLayout(x, axis, keep_first=True)
    A, _, B = layout.shape3
    if B > 1 or x.ndim == 2:
        shape = (N * G, C // G, B * (A // max(N, 1)))
        channels_last = False
    else:
        shape = (N, A // max(N, 1), C)
        channels_last = True
    return layout, shape, channels_last


def group_norm(x, G, weight, bias, eps, axis, out):
    y, mean, rstd = out
    N, C = x.shape[0], x.shape[axis]
    var = np.zeros((N, G))
    if x.size == 0:
        mean[...] = 0.0
        rstd[...] = 1.0 / np.sqrt(eps)
        return var
    layout, shape, channels_last = _views(x, axis, G)
    w, b = param(weight, C, x.dtype, 1.0), param(bias, C, x.dtype, 0.0)
    xv, yv = layout.input(x).reshape(shape), layout.output(y)
    mt, rt = target(mean), target(rstd)
    if channels_last:
        _group_norm_fwd_rows(xv, G, w, b, eps, yv.reshape(shape), mt, rt, var)
    else:
        _group_norm_fwd_groups(xv, w, b, eps, yv.reshape(shape), mt.reshape(N * G),
                               rt.reshape(N * G), var.reshape(N * G))
    layout.finish(y, yv)
    finish(mean, mt), finish(rstd, rt)
    return var


def group_norm_backward(dy, x, mean, rstd, G, weight, axis, out):
    dx, dweight, dbias = out
    N, C = x.shape[0], x.shape[axis]
    dw_part = np.zeros((N, C))
    db_part = np.zeros((N, C))
    if x.size:
        layout, shape, channels_last = _views(x, axis, G)
        w = param(weight, C, x.dtype, 1.0)
        dyv, xv = layout.input(dy).reshape(shape), layout.input(x).reshape(shape)
        dxv = layout.output(dx)
        m, r = np.ascontiguousarray(mean), np.ascontiguousarray(rstd)
        if channels_last:
            _group_norm_bwd_rows(dyv, xv, m, r, w, dxv.reshape(shape), dw_part, db_part)
        else:
            _group_norm_bwd_groups(dyv, xv, m.reshape(N * G), r.reshape(N * G), w,
                                   dxv.reshape(shape), dw_part.reshape(N * G, C // G),
                                   db_part.reshape(N * G, C // G))
        layout.finish(dx, dxv)
    reduce_blocks(dw_part, dweight)
    reduce_blocks(db_part, dbias)
