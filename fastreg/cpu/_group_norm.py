"""Group norm kernels on the CPU (Numba), with the reference's signatures.

Sample n's group g is the channels [g*Cg, (g+1)*Cg) (Cg = C/G) at all HW
spatial positions. With m = Cg*HW and k = the group's first element
(channel g*Cg at spatial position 0), in float64:

    mean = k + sum(x - k) / m,  var = sum((x - k)**2) / m - (mean - k)**2   (biased)
    y    = x * scale[c] + shift[c],  scale = rstd * w[c],  shift = b[c] - mean * scale

The shift k bounds the cancellation by (mean - k)**2 / var instead of
mean**2 / var (see cpu/norm.py): float32 data with mean 1e4 and std 1
matches the float64 reference.

Channels first (NCHW, spatial size > 1): x is viewed as (N*G, Cg, HW), each
group one contiguous run of m elements, summed in one pass like a layer-norm
row and written from cache in a second. ``prange`` runs over fixed blocks of
runs (``_common.block_rows``); inside a block, run i+1 is summed in the loop
that writes run i, so memory sees reads and writes together instead of in
turns (7-10% faster). Backward per run: per-channel sums of dy and
dy * (x - mean), then dx from cache.

Channels last (NHWC, NCHW shapes stored channels last, and (N, C) input):
x is viewed as (N, HW, C) and summed per column, vectorized along the rows;
the columns of a group are merged afterwards. Column sums are updated four
(backward: two) rows at a time, taken from evenly spaced parts of the rows:
separate sequential streams, where interleaving adjacent rows ran up to 2x
slower from memory. With at least ``_MIN_SAMPLES`` samples, ``prange`` runs
over fixed blocks of whole samples: a sample is summed, then written while
it is still in L2/L3 (128x56x56 float32: 1.6 MB), so x is read once from
memory. Fewer samples are split into fixed row blocks so that every thread
has work: per-block partial sums, merged in block order, then a second
``prange`` writes y (x is read twice).

Backward, with g = dy * w[c] and xhat = (x - mean) * rstd, means over a group:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
       = alpha[c] * dy - beta * (x - mean) - gamma     (alpha, beta, gamma per (n, g))
    dweight[c] = sum over n and s of dy * xhat,  dbias[c] = sum of dy

dweight/dbias partials (per (n, c), or per block of samples) are each written
by one iteration and summed in order by ``_common.reduce_blocks``. Every sum
runs in an order fixed by the shape alone, so results are bitwise identical
run to run and at any thread count.

Bytes (minimal): fwd read x, write y; bwd read dy, x, write dx (+ params and
statistics). The row-block split (fewer than ``_MIN_SAMPLES`` channels-last
samples) reads x (and dy) twice.
"""

import numba
import numpy as np
from numba import prange

from ._common import (JIT, PARALLEL_JIT, REDUCE_BLOCKS, ChannelLayout, block_rows, finish,
                      param, reduce_blocks, target)

# Channels last: from this many samples on, whole samples per iteration (x read
# once); below, samples are split into row blocks of at least _MIN_BLOCK_ROWS rows.
_MIN_SAMPLES = 8
_MIN_BLOCK_ROWS = 64


# --------------------------------------------------------------------------- channels first

@numba.njit(**PARALLEL_JIT)
def _group_norm_fwd_groups(x, w, b, eps, rows_per_block, y, mean, rstd, var):
    """x, y: (N*G, Cg, HW), one run per (n, g); mean, rstd, var: (N*G,)."""
    R, Cg, HW = x.shape
    G = w.shape[0] // Cg
    inv_m = 1.0 / (Cg * HW)
    for blk in prange(-(-R // rows_per_block)):
        i0 = blk * rows_per_block
        i1 = min(R, i0 + rows_per_block)
        xr = x[i0].reshape(Cg * HW)
        k = np.float64(xr[0])  # shift: the group's first element
        s1 = 0.0
        s2 = 0.0
        for j in range(Cg * HW):
            d = xr[j] - k
            s1 += d
            s2 += d * d
        for i in range(i0, i1):
            m1 = s1 * inv_m
            v = s2 * inv_m - m1 * m1
            if v < 0.0:  # rounding; NaN passes through
                v = 0.0
            mu = k + m1
            r = 1.0 / np.sqrt(v + eps)
            mean[i] = mu
            rstd[i] = r
            var[i] = v
            c0 = (i % G) * Cg
            if i + 1 < i1:  # write run i while summing run i + 1
                k = np.float64(x[i + 1, 0, 0])
                s1 = 0.0
                s2 = 0.0
                for ci in range(Cg):
                    scale = r * w[c0 + ci]
                    shift = b[c0 + ci] - mu * scale
                    for j in range(HW):
                        y[i, ci, j] = x[i, ci, j] * scale + shift
                        d = x[i + 1, ci, j] - k
                        s1 += d
                        s2 += d * d
            else:
                for ci in range(Cg):
                    scale = r * w[c0 + ci]
                    shift = b[c0 + ci] - mu * scale
                    for j in range(HW):
                        y[i, ci, j] = x[i, ci, j] * scale + shift


@numba.njit(**PARALLEL_JIT)
def _group_norm_bwd_groups(dy, x, mean, rstd, w, dx, dw_part, db_part):
    """dy, x, dx: (N*G, Cg, HW); mean, rstd: (N*G,); dw_part, db_part: (N*G, Cg)."""
    R, Cg, HW = x.shape
    G = w.shape[0] // Cg
    inv_m = 1.0 / (Cg * HW)
    for i in prange(R):
        mu = np.float64(mean[i])
        r = np.float64(rstd[i])
        c0 = (i % G) * Cg
        sg = 0.0  # sum(g)
        sgx = 0.0  # sum(g * (x - mean))
        for ci in range(Cg):
            s_dy = 0.0
            s_dyx = 0.0
            for j in range(HW):
                s_dy += dy[i, ci, j]
                s_dyx += dy[i, ci, j] * (x[i, ci, j] - mu)
            db_part[i, ci] = s_dy
            dw_part[i, ci] = s_dyx * r
            sg += w[c0 + ci] * s_dy
            sgx += w[c0 + ci] * s_dyx
        beta = r * r * r * sgx * inv_m
        gamma = r * sg * inv_m
        for ci in range(Cg):
            alpha = r * w[c0 + ci]
            for j in range(HW):
                dx[i, ci, j] = alpha * dy[i, ci, j] - beta * (x[i, ci, j] - mu) - gamma


# --------------------------------------------------------------------------- channels last

# The per-column helpers view (C,) arrays as (G, Cg): loops over range(Cg) index
# from 0, so Numba's negative-index wraparound does not block vectorization.

@numba.njit(**JIT)
def _per_column(v, out):
    """out[c] = v[g] for the columns c of each group g."""
    G = v.shape[0]
    o = out.reshape(G, out.shape[0] // G)
    for g in range(G):
        for ci in range(o.shape[1]):
            o[g, ci] = v[g]


@numba.njit(**JIT)
def _column_sums(x, r0, r1, k, s1, s2):
    """s1[c] += sum(x[s, c] - k[c]), s2[c] += sum((x[s, c] - k[c])**2) over rows [r0, r1).

    Four rows per update (the sums are loaded and stored a quarter as often),
    one from each quarter of the range: four sequential streams."""
    C = x.shape[1]
    q = (r1 - r0) // 4
    for s in range(r0, r0 + q):
        for c in range(C):
            d0 = x[s, c] - k[c]
            d1 = x[s + q, c] - k[c]
            d2 = x[s + 2 * q, c] - k[c]
            d3 = x[s + 3 * q, c] - k[c]
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for s in range(r0 + 4 * q, r1):
        for c in range(C):
            d = x[s, c] - k[c]
            s1[c] += d
            s2[c] += d * d


@numba.njit(**JIT)
def _fwd_coefficients(s1, s2, k, w, b, eps, m, mean, rstd, var, scale, shift):
    """Merge one sample's column sums per group into its statistics (mean, rstd,
    var: (G,)) and per-column scale and shift."""
    G = mean.shape[0]
    Cg = s1.shape[0] // G
    s1, s2, w, b = s1.reshape(G, Cg), s2.reshape(G, Cg), w.reshape(G, Cg), b.reshape(G, Cg)
    scale, shift = scale.reshape(G, Cg), shift.reshape(G, Cg)
    for g in range(G):
        t1 = 0.0
        t2 = 0.0
        for ci in range(Cg):
            t1 += s1[g, ci]
            t2 += s2[g, ci]
        m1 = t1 / m
        v = t2 / m - m1 * m1
        if v < 0.0:  # rounding; NaN passes through
            v = 0.0
        mu = k[g * Cg] + m1
        r = 1.0 / np.sqrt(v + eps)
        mean[g] = mu
        rstd[g] = r
        var[g] = v
        for ci in range(Cg):
            scale[g, ci] = r * w[g, ci]
            shift[g, ci] = b[g, ci] - mu * scale[g, ci]


@numba.njit(**JIT)
def _fwd_apply(x, r0, r1, scale, shift, y):
    for s in range(r0, r1):
        for c in range(x.shape[1]):
            y[s, c] = x[s, c] * scale[c] + shift[c]


@numba.njit(**PARALLEL_JIT)
def _group_norm_fwd_rows(x, w, b, eps, samples_per_block, rows_per_block, y, mean, rstd, var):
    """x, y: (N, HW, C); mean, rstd, var: (N, G). With rows_per_block >= HW, one
    iteration per block of whole samples, each sample read once from memory; else one
    per (sample, row block), in two passes."""
    N, HW, C = x.shape
    G = mean.shape[1]
    Cg = C // G
    m = Cg * HW
    if rows_per_block >= HW:
        for blk in prange(-(-N // samples_per_block)):
            k = np.empty(C)
            s1 = np.empty(C)
            s2 = np.empty(C)
            scale = np.empty(C)
            shift = np.empty(C)
            for n in range(blk * samples_per_block, min(N, (blk + 1) * samples_per_block)):
                _per_column(x[n, 0, ::Cg], k)  # each group's shift: its first element
                s1[:] = 0.0
                s2[:] = 0.0
                _column_sums(x[n], 0, HW, k, s1, s2)
                _fwd_coefficients(s1, s2, k, w, b, eps, m, mean[n], rstd[n], var[n], scale,
                                  shift)
                _fwd_apply(x[n], 0, HW, scale, shift, y[n])
        return
    nb = -(-HW // rows_per_block)
    k = np.empty((N, C))
    for n in prange(N):
        _per_column(x[n, 0, ::Cg], k[n])
    part1 = np.zeros((N, nb, C))
    part2 = np.zeros((N, nb, C))
    for u in prange(N * nb):
        n = u // nb
        blk = u % nb
        r0 = blk * rows_per_block
        _column_sums(x[n], r0, min(HW, r0 + rows_per_block), k[n], part1[n, blk],
                     part2[n, blk])
    s1 = np.zeros((N, C))
    s2 = np.zeros((N, C))
    scale = np.empty((N, C))
    shift = np.empty((N, C))
    for n in prange(N):
        for blk in range(nb):  # in block order: the sums are fixed by the shape
            for c in range(C):
                s1[n, c] += part1[n, blk, c]
                s2[n, c] += part2[n, blk, c]
        _fwd_coefficients(s1[n], s2[n], k[n], w, b, eps, m, mean[n], rstd[n], var[n], scale[n],
                          shift[n])
    for u in prange(N * nb):
        n = u // nb
        blk = u % nb
        r0 = blk * rows_per_block
        _fwd_apply(x[n], r0, min(HW, r0 + rows_per_block), scale[n], shift[n], y[n])


@numba.njit(**JIT)
def _grad_column_sums(dy, x, r0, r1, mu, s_dy, s_dyx):
    """s_dy[c] += sum(dy[s, c]), s_dyx[c] += sum(dy[s, c] * (x[s, c] - mu[c])) over
    rows [r0, r1); two rows per update, one from each half of the range."""
    C = x.shape[1]
    h = (r1 - r0) // 2
    for s in range(r0, r0 + h):
        for c in range(C):
            g0 = np.float64(dy[s, c])
            g1 = np.float64(dy[s + h, c])
            s_dy[c] += g0 + g1
            s_dyx[c] += g0 * (x[s, c] - mu[c]) + g1 * (x[s + h, c] - mu[c])
    for s in range(r0 + 2 * h, r1):
        for c in range(C):
            s_dy[c] += dy[s, c]
            s_dyx[c] += dy[s, c] * (x[s, c] - mu[c])


@numba.njit(**JIT)
def _bwd_coefficients(s_dy, s_dyx, rstd, w, m, dw, alpha, beta, gamma):
    """From one sample's column sums: dx = alpha*dy - beta*(x - mean) - gamma per
    column; dw[c] = s_dyx[c] * rstd (dweight's partial)."""
    G = rstd.shape[0]
    Cg = s_dy.shape[0] // G
    w = w.reshape(G, Cg)
    s_dy, s_dyx, dw = s_dy.reshape(G, Cg), s_dyx.reshape(G, Cg), dw.reshape(G, Cg)
    alpha, beta, gamma = alpha.reshape(G, Cg), beta.reshape(G, Cg), gamma.reshape(G, Cg)
    for g in range(G):
        r = np.float64(rstd[g])
        sg = 0.0
        sgx = 0.0
        for ci in range(Cg):
            sg += w[g, ci] * s_dy[g, ci]
            sgx += w[g, ci] * s_dyx[g, ci]
        for ci in range(Cg):
            dw[g, ci] = s_dyx[g, ci] * r
            alpha[g, ci] = r * w[g, ci]
            beta[g, ci] = r * r * r * sgx / m
            gamma[g, ci] = r * sg / m


@numba.njit(**JIT)
def _bwd_apply(dy, x, r0, r1, mu, alpha, beta, gamma, dx):
    for s in range(r0, r1):
        for c in range(x.shape[1]):
            dx[s, c] = alpha[c] * dy[s, c] - beta[c] * (x[s, c] - mu[c]) - gamma[c]


@numba.njit(**PARALLEL_JIT)
def _group_norm_bwd_rows(dy, x, mean, rstd, w, samples_per_block, rows_per_block, dx, dw_part,
                         db_part):
    """dy, x, dx: (N, HW, C); mean, rstd: (N, G); dw_part, db_part: (blocks of samples, C),
    zeroed. Iterations as in ``_group_norm_fwd_rows`` (row blocks: one sample per block)."""
    N, HW, C = x.shape
    G = mean.shape[1]
    m = C // G * HW
    if rows_per_block >= HW:
        for blk in prange(dw_part.shape[0]):
            mu = np.empty(C)
            s_dy = np.empty(C)
            s_dyx = np.empty(C)
            dw = np.empty(C)
            alpha = np.empty(C)
            beta = np.empty(C)
            gamma = np.empty(C)
            for n in range(blk * samples_per_block, min(N, (blk + 1) * samples_per_block)):
                _per_column(mean[n], mu)
                s_dy[:] = 0.0
                s_dyx[:] = 0.0
                _grad_column_sums(dy[n], x[n], 0, HW, mu, s_dy, s_dyx)
                _bwd_coefficients(s_dy, s_dyx, rstd[n], w, m, dw, alpha, beta, gamma)
                for c in range(C):
                    db_part[blk, c] += s_dy[c]
                    dw_part[blk, c] += dw[c]
                _bwd_apply(dy[n], x[n], 0, HW, mu, alpha, beta, gamma, dx[n])
        return
    nb = -(-HW // rows_per_block)
    mu = np.empty((N, C))
    for n in prange(N):
        _per_column(mean[n], mu[n])
    part_dy = np.zeros((N, nb, C))
    part_dyx = np.zeros((N, nb, C))
    for u in prange(N * nb):
        n = u // nb
        blk = u % nb
        r0 = blk * rows_per_block
        _grad_column_sums(dy[n], x[n], r0, min(HW, r0 + rows_per_block), mu[n],
                          part_dy[n, blk], part_dyx[n, blk])
    s_dyx = np.zeros((N, C))
    alpha = np.empty((N, C))
    beta = np.empty((N, C))
    gamma = np.empty((N, C))
    for n in prange(N):
        for blk in range(nb):  # in block order: the sums are fixed by the shape
            for c in range(C):
                db_part[n, c] += part_dy[n, blk, c]
                s_dyx[n, c] += part_dyx[n, blk, c]
        _bwd_coefficients(db_part[n], s_dyx[n], rstd[n], w, m, dw_part[n], alpha[n], beta[n],
                          gamma[n])
    for u in prange(N * nb):
        n = u // nb
        blk = u % nb
        r0 = blk * rows_per_block
        _bwd_apply(dy[n], x[n], r0, min(HW, r0 + rows_per_block), mu[n], alpha[n], beta[n],
                   gamma[n], dx[n])


# --------------------------------------------------------------------------- launchers

def _plan(x, axis, G):
    """How x (and arrays laid out like it) is viewed and split among iterations.

    Returns (layout, shape, blocks, channels_last). Channels first: shape
    (N*G, Cg, HW), blocks = (runs per block, block count). Channels last (channels
    stored last, or 2-D): shape (N, HW, C), blocks = (samples per block, rows per
    block, sample block count); all fixed by the shape.
    """
    N, C = x.shape[0], x.shape[axis]
    layout = ChannelLayout(x, axis, keep_first=True)
    A, _, B = layout.shape3
    HW = A // N * B
    if B > 1:
        return layout, (N * G, C // G, HW), block_rows(N * G), False
    if N >= _MIN_SAMPLES:
        per_block, nb = block_rows(N)
        return layout, (N, HW, C), (per_block, HW, nb), True
    # Few samples: row blocks, for about REDUCE_BLOCKS iterations in all.
    rows = block_rows(HW, max(1, min(-(-REDUCE_BLOCKS // N), HW // _MIN_BLOCK_ROWS)))[0]
    return layout, (N, HW, C), (1, rows, N), True


def group_norm(x, G, weight, bias, eps, axis, out):
    y, mean, rstd = out
    N, C = x.shape[0], x.shape[axis]
    var = np.zeros((N, G))
    if x.size == 0:
        mean[...] = 0.0
        rstd[...] = 1.0 / np.sqrt(eps)
        return var
    layout, shape, blocks, channels_last = _plan(x, axis, G)
    w, b = param(weight, C, x.dtype, 1.0), param(bias, C, x.dtype, 0.0)
    xv, yv = layout.input(x).reshape(shape), layout.output(y)
    mt, rt = target(mean), target(rstd)
    if channels_last:
        _group_norm_fwd_rows(xv, w, b, eps, blocks[0], blocks[1], yv.reshape(shape), mt, rt,
                             var)
    else:
        _group_norm_fwd_groups(xv, w, b, eps, blocks[0], yv.reshape(shape), mt.reshape(N * G),
                               rt.reshape(N * G), var.reshape(N * G))
    layout.finish(y, yv)
    finish(mean, mt), finish(rstd, rt)
    return var


def group_norm_backward(dy, x, mean, rstd, G, weight, axis, out):
    dx, dweight, dbias = out
    N, C = x.shape[0], x.shape[axis]
    if x.size == 0:
        reduce_blocks(np.zeros((0, C)), dweight)
        reduce_blocks(np.zeros((0, C)), dbias)
        return
    layout, shape, blocks, channels_last = _plan(x, axis, G)
    w = param(weight, C, x.dtype, 1.0)
    dyv, xv = layout.input(dy).reshape(shape), layout.input(x).reshape(shape)
    dxv = layout.output(dx)
    m, r = np.ascontiguousarray(mean), np.ascontiguousarray(rstd)
    if channels_last:
        dw_part, db_part = np.zeros((blocks[2], C)), np.zeros((blocks[2], C))
        _group_norm_bwd_rows(dyv, xv, m, r, w, blocks[0], blocks[1], dxv.reshape(shape),
                             dw_part, db_part)
    else:
        dw_part, db_part = np.empty((N, C)), np.empty((N, C))  # per (n, c), all written
        _group_norm_bwd_groups(dyv, xv, m.reshape(N * G), r.reshape(N * G), w,
                               dxv.reshape(shape), dw_part.reshape(N * G, C // G),
                               db_part.reshape(N * G, C // G))
    layout.finish(dx, dxv)
    reduce_blocks(dw_part, dweight)
    reduce_blocks(db_part, dbias)
