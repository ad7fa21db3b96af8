"""Batch norm kernels on the CPU (Numba), with the reference's signatures.

x is viewed as (A, C, B) around the channel axis (``_common.ChannelLayout``):
each channel c is the A chunks x[:, c, :] of B contiguous elements
(NCHW: (N, C, H*W); NHWC and 2-D: (rows, C, 1)). Per channel, in float64:

    mean = k + sum(x - k) / n                   k = the channel's first element
    var  = sum((x - k)**2) / n - (mean - k)**2  (biased)
    y    = act((x - mean) * rstd * w + b)       rstd = 1 / sqrt(var + eps)

One pass gives both moments; the shift k bounds the cancellation by
(mean - k)**2 / var instead of mean**2 / var, so float32 data with mean 1e4
and std 1 matches the float64 two-pass reference to float32 rounding.

Chunks (chunks of >= 128 bytes, NCHW), two walks:

- Memory order (``_chunk_tasks``): the (A, C) chunks are cut into tasks of a
  block of samples by a block of channels, fixed by the shape (channel blocks
  only where there are few samples). A task sums each of its chunks in
  registers and adds the sums to its sample block's per-channel partials,
  which are then summed per channel in block order; a second pass over the
  same tasks writes y (or dx). Used by inference, by training batches of
  8 MiB and more, and by the split kernels.
- A channel at a time (``_channel_group``): a channel's A chunks, C*B
  elements apart, are read from memory for the sums, then again from L2/L3
  for y or dx. Used by training batches under 8 MiB (one parallel region,
  data in cache) and by the fused backward, whose second pass re-reads dy and
  x from cache (memory order moved 5 passes for its 3 and ran 15-25% slower).

Read a channel at a time, memory ran at half its speed in memory order here
(64x64x56x56 float32, one process, interleaved: sums of x 1.76 ms against
0.84 ms; training forward 3.55 against 3.0 ms; inference 2.97 against 2.1 ms;
split backward sums 2.76 against 1.86 ms; dx 3.8 against 3.3 ms).

Rows (B == 1, i.e. NHWC and 2-D, and short chunks): x as (A, C*B) rows.
Fixed row blocks (set by the shape, see ``_row_blocks``) accumulate per-column
partial moments, vectorized along the row, four rows per update; the
partials are summed per channel in block order, then a second parallel pass
over the blocks writes y. x is read twice from memory: the statistics are
global, so no block can be normalized before every block has been read.
The least a backward over rows can do (per-channel sums of dy and dy * x,
then dx = a * dy + b * x + c) ran 1.20-1.37x PyTorch's time beside it
(64x56x56x64 and 16384x1024 float32, one process, PyTorch at its usual
7.8-12.1 ms); this backward was within 10% of it. Walking the second pass
from the last block back, for what L3 still holds, changed nothing beyond
noise (64 and 256 blocks: within 3%).
The per-column shifts and coefficients are re-read for every row, so they
are kept small (shifts in x's dtype, subtracted exactly in float64): at
C = 1024 they then stay in L1 beside the streams (2-D fwd and bwd ~8% faster).

Backward, with dz = dy * (y > 0) for the fused ReLU (else dy), xhat =
(x - mean) * rstd and sums over the n positions of a channel:

    dbias = sum(dz), dweight = rstd * sum(dz * (x - mean))
    dx = rstd * w * (dz - dbias / n - xhat * dweight / n)    (training)
    dx = rstd * w * dz                                       (inference)

with the same two strategies (the sums are taken about the given mean, in x's
dtype like every statistic), applied as dx = alpha * dz - beta * (x - mean) -
gamma per channel.

Every sum runs in an order fixed by the shape (a channel by one thread, or
blocks summed in block order; the walk is chosen by the shape), so results
are bitwise identical at any thread count.

Bytes (minimal): fwd read x, write y; bwd read dy, x (+ y for ReLU), write dx
(+ params and statistics). Both kernels read the inputs twice when a batch
does not fit in the cache.

The split kernels at the end (statistics, their merge, backward sums and dx
as separate steps, for fastreg.distributed) walk chunks in memory order and
rows as above.
"""

import numba
import numpy as np
from numba import prange

from ._common import (JIT, PARALLEL_JIT, REDUCE_BLOCKS, ChannelLayout, block_rows, contiguous,
                      param)


# Chunks shorter than this many bytes go to the row kernels: read channel by
# channel, each would use a sliver of its cache lines (16-byte chunks ran 6x slower).
_MIN_CHUNK_BYTES = 128


def _channels_first(B, itemsize):
    """Whether the (A, C, B) view is run by channels (else as rows of C*B)."""
    return B == 0 or B * itemsize >= _MIN_CHUNK_BYTES


# Batches of chunks smaller than this train a channel at a time (a channel's
# chunks read once from memory, then from L2 for y; one parallel region):
# 8x256x28x28 float32 0.19 ms against 0.22 in memory order, 16x64x56x56
# 0.63 ms against 0.43.
_CHANNELS_MAX_BYTES = 8 << 20

# Tasks of the chunk kernels: at least this many where A*C allows, so that both
# threads have work when there are few samples.
_MIN_TASKS = 16


def _chunk_tasks(A, C):
    """(samples per block, sample blocks, channels per block, channel blocks) of the
    chunk kernels.

    Sample blocks as for cross-row sums (at most REDUCE_BLOCKS), each split into
    channel blocks only as far as needed for ``_MIN_TASKS`` tasks. Fixed by the
    shape, so every sum runs in the same order at any thread count.
    """
    rows, nab = block_rows(A)
    ncb = max(1, min(C, -(-_MIN_TASKS // max(nab, 1))))
    cpb = max(1, C // ncb)
    return rows, nab, cpb, -(-C // cpb)


@numba.njit(**JIT)
def _task(task, rows, cpb, ncb, A, C):
    """Task ``task``'s sample block and its sample and channel ranges."""
    ablk = task // ncb
    c0 = (task % ncb) * cpb
    a0 = ablk * rows
    return ablk, a0, min(A, a0 + rows), c0, min(C, c0 + cpb)


@numba.njit(**JIT)
def _moments_task(x, shift, a0, a1, c0, c1, p1, p2):
    """p1[c], p2[c] = sums of (x - k) and (x - k)**2 over the task's chunks of channel c."""
    B = x.shape[2]
    p1[c0:c1] = 0.0
    p2[c0:c1] = 0.0
    for a in range(a0, a1):
        for c in range(c0, c1):
            k = np.float64(shift[c])
            s1 = 0.0
            s2 = 0.0
            for j in range(B):
                d = x[a, c, j] - k
                s1 += d
                s2 += d * d
            p1[c] += s1
            p2[c] += s2


@numba.njit(**JIT)
def _channel_statistics(s1, s2, k, inv_n, eps):
    """(mean, rstd, biased var) from the shifted sums s1, s2 of a channel (shift k)."""
    m1 = s1 * inv_n
    v = s2 * inv_n - m1 * m1
    if v < 0.0:  # rounding; NaN passes through
        v = 0.0
    return k + m1, 1.0 / np.sqrt(v + eps), v


@numba.njit(**JIT)
def _normalize_task(x, mean, rstd, w, b, lo, a0, a1, c0, c1, y):
    """y = act((x - mean) * rstd * w + b) over the task's chunks."""
    B = x.shape[2]
    for a in range(a0, a1):
        for c in range(c0, c1):
            mu = mean[c]
            s = rstd[c] * w[c]
            t = np.float64(b[c])
            for j in range(B):
                v = (x[a, c, j] - mu) * s + t
                y[a, c, j] = lo if v < lo else v  # lo = 0 (ReLU) or -inf; keeps NaN


@numba.njit(**JIT)
def _grad_sums_task(dy, x, y, mean, a0, a1, c0, c1, pg, pgx):
    """pg[c], pgx[c] = sums of dz and dz * (x - mean) over the task's chunks of channel c."""
    B = x.shape[2]
    pg[c0:c1] = 0.0
    pgx[c0:c1] = 0.0
    for a in range(a0, a1):
        for c in range(c0, c1):
            mu = mean[c]
            sg = 0.0
            sgx = 0.0
            for j in range(B):
                g = _dz(dy, y, (a, c, j))
                sg += g
                sgx += g * (x[a, c, j] - mu)
            pg[c] += sg
            pgx[c] += sgx


@numba.njit(**JIT)
def _dx_task(dy, x, y, mean, alpha, beta, gamma, a0, a1, c0, c1, dx):
    """dx = alpha * dz - beta * (x - mean) - gamma over the task's chunks."""
    B = x.shape[2]
    for a in range(a0, a1):
        for c in range(c0, c1):
            mu = mean[c]
            al = alpha[c]
            be = beta[c]
            ga = gamma[c]
            for j in range(B):
                g = _dz(dy, y, (a, c, j))
                dx[a, c, j] = g * al - (x[a, c, j] - mu) * be - ga


@numba.njit(**JIT)
def _sum_blocks_in_order(part, c):
    """part[0, c] + part[1, c] + ... in block order."""
    s = 0.0
    for blk in range(part.shape[0]):
        s += part[blk, c]
    return s


def _channel_group(A, B, C, itemsize):
    """Channels per ``prange`` iteration. Adjacent channels' chunks are contiguous,
    so a group of short chunks reads runs of up to 4 KB; the group's data stays
    within 256 KB (re-read from L2) and there are at least 8 groups where C allows."""
    chunk = max(B * itemsize, 1)
    return max(1, min(-(-4096 // chunk), 262144 // (A * chunk or 1), C // 8))


def _row_blocks(A):
    """Row blocks for the partial sums: blocks of >= 32 rows where A allows, so that
    the partials (16 bytes per column and block) stay small next to x."""
    return block_rows(A, max(1, min(REDUCE_BLOCKS, A // 32)))


# --------------------------------------------------------------------------- forward

@numba.njit(**PARALLEL_JIT)
def _batch_norm_fwd_channels(x, w, b, eps, training, lo, G, shift, y, mean, rstd, var):
    A, C, B = x.shape
    inv_n = 1.0 / max(A * B, 1)
    for grp in prange((C + G - 1) // G):
        c0 = grp * G
        c1 = min(C, c0 + G)
        if training:
            # mean and var first accumulate the shifted sums, chunk by chunk.
            _moments_task(x, shift, 0, A, c0, c1, mean, var)
            for c in range(c0, c1):
                mean[c], rstd[c], var[c] = _channel_statistics(mean[c], var[c], shift[c],
                                                               inv_n, eps)
        _normalize_task(x, mean, rstd, w, b, lo, 0, A, c0, c1, y)


@numba.njit(**PARALLEL_JIT)
def _batch_norm_fwd_chunks(x, w, b, eps, training, lo, rows, cpb, ncb, shift, y, mean, rstd, var,
                           part1, part2):
    A, C, B = x.shape
    tasks = part1.shape[0] * ncb
    if training:
        for task in prange(tasks):
            ablk, a0, a1, c0, c1 = _task(task, rows, cpb, ncb, A, C)
            _moments_task(x, shift, a0, a1, c0, c1, part1[ablk], part2[ablk])
        inv_n = 1.0 / max(A * B, 1)
        for c in range(C):
            mean[c], rstd[c], var[c] = _channel_statistics(
                _sum_blocks_in_order(part1, c), _sum_blocks_in_order(part2, c), shift[c], inv_n,
                eps)
    for task in prange(tasks):
        ablk, a0, a1, c0, c1 = _task(task, rows, cpb, ncb, A, C)
        _normalize_task(x, mean, rstd, w, b, lo, a0, a1, c0, c1, y)


@numba.njit(**PARALLEL_JIT)
def _batch_norm_fwd_rows(x, w, b, eps, training, lo, B, rows_per_block, shift, y, mean, rstd,
                         var, part1, part2):
    M, K = x.shape  # K = C*B columns; column j belongs to channel j // B
    C = mean.shape[0]
    nb = part1.shape[0]
    if training:
        k = np.empty(K, x.dtype)
        for j in range(K):
            k[j] = shift[j // B]
        for blk in prange(nb):
            p1 = part1[blk]
            p2 = part2[blk]
            p1[:] = 0.0
            p2[:] = 0.0
            # Four rows per update: the partials are loaded and stored a quarter as often.
            i0 = blk * rows_per_block
            i1 = min(M, i0 + rows_per_block)
            i4 = i0 + (i1 - i0) // 4 * 4
            for i in range(i0, i4, 4):
                for j in range(K):
                    kj = np.float64(k[j])
                    d0 = x[i, j] - kj
                    d1 = x[i + 1, j] - kj
                    d2 = x[i + 2, j] - kj
                    d3 = x[i + 3, j] - kj
                    p1[j] += (d0 + d1) + (d2 + d3)
                    p2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            for i in range(i4, i1):
                for j in range(K):
                    d = x[i, j] - np.float64(k[j])
                    p1[j] += d
                    p2[j] += d * d
        inv_n = 1.0 / max(M * B, 1)
        for c in prange(C):
            s1 = 0.0
            s2 = 0.0
            for blk in range(nb):
                for j in range(c * B, (c + 1) * B):
                    s1 += part1[blk, j]
                    s2 += part2[blk, j]
            m1 = s1 * inv_n
            v = s2 * inv_n - m1 * m1
            if v < 0.0:
                v = 0.0
            mean[c] = shift[c] + m1
            rstd[c] = 1.0 / np.sqrt(v + eps)
            var[c] = v
    # x - mu is exact in float64; offset takes up the rounding of mean to x's dtype.
    mu = np.empty(K, x.dtype)
    scale = np.empty(K)
    offset = np.empty(K)
    for j in range(K):
        c = j // B
        mu[j] = mean[c]
        scale[j] = rstd[c] * w[c]
        offset[j] = b[c] - (mean[c] - mu[j]) * scale[j]
    for blk in prange(nb):
        for i in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for j in range(K):
                v = (x[i, j] - np.float64(mu[j])) * scale[j] + offset[j]
                y[i, j] = lo if v < lo else v


def batch_norm(x, weight, bias, eps, axis, activation, training, out):
    y, mean, rstd = out
    layout = ChannelLayout(x, axis)
    A, C, B = layout.shape3
    x3, y3 = layout.input(x), layout.output(y)
    w, b = param(weight, C, x.dtype, 1.0), param(bias, C, x.dtype, 0.0)
    lo = 0.0 if activation == "relu" else -np.inf
    # The kernels keep the statistics in float64: written in training, read in inference.
    if training:
        mean64, rstd64 = np.empty(C), np.empty(C)
    else:
        mean64, rstd64 = mean.astype(np.float64), rstd.astype(np.float64)
    var = np.zeros(C)
    # Each channel's shift: its first element (exact in x's dtype).
    shift = x3[0, :, 0].copy() if A * B else np.zeros(C, x.dtype)
    if _channels_first(B, x.itemsize) and training and x3.nbytes < _CHANNELS_MAX_BYTES:
        _batch_norm_fwd_channels(x3, w, b, eps, training, lo, _channel_group(A, B, C, x.itemsize),
                                 shift, y3, mean64, rstd64, var)
    elif _channels_first(B, x.itemsize):
        rows, nab, cpb, ncb = _chunk_tasks(A, C)
        _batch_norm_fwd_chunks(x3, w, b, eps, training, lo, rows, cpb, ncb, shift, y3, mean64,
                               rstd64, var, np.empty((nab, C)), np.empty((nab, C)))
    else:
        rows, nb = _row_blocks(A)
        K = C * B
        _batch_norm_fwd_rows(x3.reshape(A, K), w, b, eps, training, lo, B, rows, shift,
                             y3.reshape(A, K), mean64, rstd64, var,
                             np.empty((nb, K)), np.empty((nb, K)))
    layout.finish(y, y3)
    if not training:
        return None
    mean[...] = mean64
    rstd[...] = rstd64
    return var


# --------------------------------------------------------------------------- backward

@numba.njit(inline="always")
def _dz(dy, y, idx):
    """dy[idx], times (y[idx] > 0) for the fused ReLU; y is None without it (pruned)."""
    return dy[idx] if y is None else dy[idx] * (1.0 if y[idx] > 0 else 0.0)


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_channels(dy, x, y, mean, rstd, w, training, sums, G, dx, dw, db):
    A, C, B = x.shape
    inv_n = 1.0 / max(A * B, 1)
    for grp in prange((C + G - 1) // G):
        c0 = grp * G
        c1 = min(C, c0 + G)
        if sums:
            # dw holds sum(dz * (x - mean)) until scaled by rstd
            _grad_sums_task(dy, x, y, mean, 0, A, c0, c1, db, dw)
            for c in range(c0, c1):
                dw[c] *= rstd[c]
        for a in range(A):
            for c in range(c0, c1):
                mu = mean[c]
                al = rstd[c] * w[c]
                be = al * rstd[c] * dw[c] * inv_n if training else 0.0
                ga = al * db[c] * inv_n if training else 0.0
                for j in range(B):  # coefficients as scalars: 15% faster than _dx_task at 6 MB
                    g = _dz(dy, y, (a, c, j))
                    dx[a, c, j] = g * al - (x[a, c, j] - mu) * be - ga


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_rows(dy, x, y, mean, rstd, w, training, sums, B, rows_per_block, dx, dw, db,
                         part_g, part_gx):
    M, K = x.shape  # K = C*B columns; column j belongs to channel j // B
    C = mean.shape[0]
    nb = part_g.shape[0]
    inv_n = 1.0 / max(M * B, 1)
    # Per-column coefficients, re-read for every row: mean comes in x's dtype (the
    # statistics' dtype), and the fewer bytes they take, the better they stay in L1.
    mu = np.empty(K, x.dtype)
    alpha = np.empty(K)
    beta = np.zeros(K)
    gamma = np.zeros(K)
    for j in range(K):
        c = j // B
        mu[j] = mean[c]
        alpha[j] = rstd[c] * w[c]
    if sums:
        for blk in prange(nb):
            pg = part_g[blk]
            pgx = part_gx[blk]
            pg[:] = 0.0
            pgx[:] = 0.0
            for i in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
                for j in range(K):
                    g = _dz(dy, y, (i, j))
                    pg[j] += g
                    pgx[j] += g * (x[i, j] - np.float64(mu[j]))
        for c in prange(C):
            sg = 0.0
            sgx = 0.0
            for blk in range(nb):
                for j in range(c * B, (c + 1) * B):
                    sg += part_g[blk, j]
                    sgx += part_gx[blk, j]
            db[c] = sg
            dw[c] = sgx * rstd[c]
            if training:
                a = rstd[c] * w[c]
                beta[c * B:(c + 1) * B] = a * rstd[c] * rstd[c] * sgx * inv_n
                gamma[c * B:(c + 1) * B] = a * sg * inv_n
    for blk in prange(nb):
        for i in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for j in range(K):
                g = _dz(dy, y, (i, j))
                dx[i, j] = g * alpha[j] - (x[i, j] - np.float64(mu[j])) * beta[j] - gamma[j]


def batch_norm_backward(dy, x, mean, rstd, weight, training, axis, y, out):
    dx, dweight, dbias = out
    layout = ChannelLayout(x, axis)
    A, C, B = layout.shape3
    dy3, x3, dx3 = layout.input(dy), layout.input(x), layout.output(dx)
    y3 = None if y is None else layout.input(y)
    mean64, rstd64 = mean.astype(np.float64), rstd.astype(np.float64)
    w = param(weight, C, x.dtype, 1.0)
    sums = training or dweight is not None or dbias is not None
    dw, db = np.zeros(C), np.zeros(C)
    if _channels_first(B, x.itemsize):
        _batch_norm_bwd_channels(dy3, x3, y3, mean64, rstd64, w, training, sums,
                                 _channel_group(A, B, C, x.itemsize), dx3, dw, db)
    else:
        rows, nb = _row_blocks(A)
        K = C * B
        _batch_norm_bwd_rows(dy3.reshape(A, K), x3.reshape(A, K),
                             None if y3 is None else y3.reshape(A, K), mean64, rstd64, w,
                             training, sums, B, rows, dx3.reshape(A, K), dw, db,
                             np.empty((nb, K)), np.empty((nb, K)))
    layout.finish(dx, dx3)
    if dweight is not None:
        dweight[...] = dw
    if dbias is not None:
        dbias[...] = db


# --------------------------------------------------------------------------- split kernels
#
# Batch norm split into local partials and an apply step, so that the
# statistics of a batch spread over several processes can be combined between
# the two (fastreg.distributed). Chunks are walked in memory order, rows as
# above; every sum runs in an order fixed by the shape. The forward apply step is the
# inference path of ``batch_norm`` above (normalize with given statistics).
#
#   stats:           count = n, mean = k + s1 / n, M2 = s2 - s1**2 / n
#                    (s1 = sum(x - k), s2 = sum((x - k)**2), k the channel's first element)
#   combine:         Chan's pairwise merge, ranks in index order
#   backward_reduce: sum_dy = sum(dz), sum_dy_xhat = rstd * sum(dz * (x - mean))
#   backward_apply:  dx = alpha * dz - beta * (x - mean) - gamma, with
#                    alpha = rstd * w, beta = alpha * rstd * sum_dy_xhat / n,
#                    gamma = alpha * sum_dy / n  (n the global count; beta = gamma = 0
#                    in inference)
#
# Bytes: stats read x; backward_reduce reads dy, x (+ y); backward_apply reads
# dy, x (+ y) and writes dx. Across the collective nothing stays in cache, so a
# training step reads x and dy once more than the single-process kernels do.

@numba.njit(**PARALLEL_JIT)
def _batch_norm_stats_chunks(x, rows, cpb, ncb, shift, count, mean, m2, part1, part2):
    A, C, B = x.shape
    for task in prange(part1.shape[0] * ncb):
        ablk, a0, a1, c0, c1 = _task(task, rows, cpb, ncb, A, C)
        _moments_task(x, shift, a0, a1, c0, c1, part1[ablk], part2[ablk])
    n = A * B
    inv_n = 1.0 / max(n, 1)
    for c in range(C):
        s1 = _sum_blocks_in_order(part1, c)
        m1 = s1 * inv_n
        v = _sum_blocks_in_order(part2, c) - s1 * m1
        if v < 0.0:  # rounding; NaN passes through
            v = 0.0
        mean[c] = shift[c] + m1
        m2[c] = v
        count[c] = n


@numba.njit(**PARALLEL_JIT)
def _batch_norm_stats_rows(x, B, rows_per_block, shift, count, mean, m2, part1, part2):
    M, K = x.shape  # K = C*B columns; column j belongs to channel j // B
    C = mean.shape[0]
    nb = part1.shape[0]
    k = np.empty(K, x.dtype)
    for j in range(K):
        k[j] = shift[j // B]
    for blk in prange(nb):
        p1 = part1[blk]
        p2 = part2[blk]
        p1[:] = 0.0
        p2[:] = 0.0
        i0 = blk * rows_per_block
        i1 = min(M, i0 + rows_per_block)
        i4 = i0 + (i1 - i0) // 4 * 4
        for i in range(i0, i4, 4):
            for j in range(K):
                kj = np.float64(k[j])
                d0 = x[i, j] - kj
                d1 = x[i + 1, j] - kj
                d2 = x[i + 2, j] - kj
                d3 = x[i + 3, j] - kj
                p1[j] += (d0 + d1) + (d2 + d3)
                p2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for i in range(i4, i1):
            for j in range(K):
                d = x[i, j] - np.float64(k[j])
                p1[j] += d
                p2[j] += d * d
    n = M * B
    inv_n = 1.0 / max(n, 1)
    for c in prange(C):
        s1 = 0.0
        s2 = 0.0
        for blk in range(nb):
            for j in range(c * B, (c + 1) * B):
                s1 += part1[blk, j]
                s2 += part2[blk, j]
        m1 = s1 * inv_n
        v = s2 - s1 * m1
        if v < 0.0:
            v = 0.0
        mean[c] = shift[c] + m1 if n else 0.0
        m2[c] = v
        count[c] = n


def batch_norm_stats(x, axis, out):
    count, mean, m2 = out
    layout = ChannelLayout(x, axis)
    A, C, B = layout.shape3
    x3 = layout.input(x)
    shift = x3[0, :, 0].copy() if A * B else np.zeros(C, x.dtype)
    n64, mean64, m264 = np.empty(C), np.empty(C), np.empty(C)
    if _channels_first(B, x.itemsize):
        rows, nab, cpb, ncb = _chunk_tasks(A, C)
        _batch_norm_stats_chunks(x3, rows, cpb, ncb, shift, n64, mean64, m264,
                                 np.empty((nab, C)), np.empty((nab, C)))
    else:
        rows, nb = _row_blocks(A)
        K = C * B
        _batch_norm_stats_rows(x3.reshape(A, K), B, rows, shift, n64, mean64, m264,
                               np.empty((nb, K)), np.empty((nb, K)))
    count[...] = n64
    mean[...] = mean64
    m2[...] = m264


@numba.njit(**JIT)
def _batch_norm_combine(counts, means, m2s, count, mean, var):
    R, C = counts.shape
    for c in range(C):
        n = 0.0
        mu = 0.0
        s = 0.0
        for r in range(R):  # rank order: the same merge on every process
            nb = np.float64(counts[r, c])
            if nb == 0.0:  # an empty rank's mean and M2 are not looked at
                continue
            tot = n + nb
            delta = means[r, c] - mu
            frac = nb / tot
            mu += delta * frac
            s += m2s[r, c] + delta * delta * n * frac
            n = tot
        count[c] = n
        mean[c] = mu
        var[c] = s / n if n > 0.0 else 0.0


def batch_norm_combine(counts, means, m2s, out):
    count, mean, var = out
    C = counts.shape[1]
    n64, mean64, var64 = np.empty(C), np.empty(C), np.empty(C)
    _batch_norm_combine(contiguous(counts), contiguous(means), contiguous(m2s),
                        n64, mean64, var64)
    count[...] = n64
    mean[...] = mean64
    var[...] = var64


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_reduce_chunks(dy, x, y, mean, rstd, rows, cpb, ncb, sum_dy, sum_dy_xhat,
                                  part_g, part_gx):
    A, C, B = x.shape
    for task in prange(part_g.shape[0] * ncb):
        ablk, a0, a1, c0, c1 = _task(task, rows, cpb, ncb, A, C)
        _grad_sums_task(dy, x, y, mean, a0, a1, c0, c1, part_g[ablk], part_gx[ablk])
    for c in range(C):
        sum_dy[c] = _sum_blocks_in_order(part_g, c)
        sum_dy_xhat[c] = _sum_blocks_in_order(part_gx, c) * rstd[c]


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_reduce_rows(dy, x, y, mean, rstd, B, rows_per_block, sum_dy, sum_dy_xhat,
                                part_g, part_gx):
    M, K = x.shape  # K = C*B columns; column j belongs to channel j // B
    C = mean.shape[0]
    nb = part_g.shape[0]
    # Sums about mu, the mean rounded to x's dtype (small, so it stays in L1);
    # sum(g * (x - mean)) = sum(g * (x - mu)) - (mean - mu) * sum(g) per channel.
    mu = np.empty(K, x.dtype)
    for j in range(K):
        mu[j] = mean[j // B]
    for blk in prange(nb):
        pg = part_g[blk]
        pgx = part_gx[blk]
        pg[:] = 0.0
        pgx[:] = 0.0
        for i in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for j in range(K):
                g = _dz(dy, y, (i, j))
                pg[j] += g
                pgx[j] += g * (x[i, j] - np.float64(mu[j]))
    for c in prange(C):
        sg = 0.0
        sgx = 0.0
        for blk in range(nb):
            for j in range(c * B, (c + 1) * B):
                sg += part_g[blk, j]
                sgx += part_gx[blk, j]
        sum_dy[c] = sg
        sum_dy_xhat[c] = (sgx - (mean[c] - np.float64(mu[c * B])) * sg) * rstd[c]


def batch_norm_backward_reduce(dy, x, mean, rstd, axis, y, out):
    sum_dy, sum_dy_xhat = out
    layout = ChannelLayout(x, axis)
    A, C, B = layout.shape3
    dy3, x3 = layout.input(dy), layout.input(x)
    y3 = None if y is None else layout.input(y)
    mean64, rstd64 = mean.astype(np.float64), rstd.astype(np.float64)
    sdy, sdx = np.empty(C), np.empty(C)
    if _channels_first(B, x.itemsize):
        rows, nab, cpb, ncb = _chunk_tasks(A, C)
        _batch_norm_bwd_reduce_chunks(dy3, x3, y3, mean64, rstd64, rows, cpb, ncb, sdy, sdx,
                                      np.empty((nab, C)), np.empty((nab, C)))
    else:
        rows, nb = _row_blocks(A)
        K = C * B
        _batch_norm_bwd_reduce_rows(dy3.reshape(A, K), x3.reshape(A, K),
                                    None if y3 is None else y3.reshape(A, K), mean64, rstd64,
                                    B, rows, sdy, sdx, np.empty((nb, K)), np.empty((nb, K)))
    sum_dy[...] = sdy
    sum_dy_xhat[...] = sdx


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_dx_chunks(dy, x, y, mean, alpha, beta, gamma, rows, cpb, ncb, nab, dx):
    A, C, B = x.shape
    for task in prange(nab * ncb):
        ablk, a0, a1, c0, c1 = _task(task, rows, cpb, ncb, A, C)
        _dx_task(dy, x, y, mean, alpha, beta, gamma, a0, a1, c0, c1, dx)


@numba.njit(**PARALLEL_JIT)
def _batch_norm_bwd_dx_rows(dy, x, y, mean, alpha, beta, gamma, B, rows_per_block, nb, dx):
    M, K = x.shape  # K = C*B columns; column j belongs to channel j // B
    # Per-column coefficients with mu, the mean in x's dtype; gamma takes up the
    # rounding: (x - mean) * beta = (x - mu) * beta + (mu - mean) * beta.
    mu = np.empty(K, x.dtype)
    al = np.empty(K)
    be = np.empty(K)
    ga = np.empty(K)
    for j in range(K):
        c = j // B
        mu[j] = mean[c]
        al[j] = alpha[c]
        be[j] = beta[c]
        ga[j] = gamma[c] + (np.float64(mu[j]) - mean[c]) * beta[c]
    for blk in prange(nb):
        for i in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for j in range(K):
                g = _dz(dy, y, (i, j))
                dx[i, j] = g * al[j] - (x[i, j] - np.float64(mu[j])) * be[j] - ga[j]


def batch_norm_backward_apply(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training,
                              axis, y, out):
    (dx,) = out
    layout = ChannelLayout(x, axis)
    A, C, B = layout.shape3
    dy3, x3, dx3 = layout.input(dy), layout.input(x), layout.output(dx)
    y3 = None if y is None else layout.input(y)
    mean64, rstd64 = mean.astype(np.float64), rstd.astype(np.float64)
    alpha = rstd64 * (1.0 if weight is None else weight.astype(np.float64))
    if training:
        inv_n = 1.0 / max(count, 1)
        beta = alpha * rstd64 * sum_dy_xhat.astype(np.float64) * inv_n
        gamma = alpha * sum_dy.astype(np.float64) * inv_n
    else:
        beta, gamma = np.zeros(C), np.zeros(C)
    alpha = np.ascontiguousarray(np.broadcast_to(alpha, (C,)))
    if _channels_first(B, x.itemsize):
        rows, nab, cpb, ncb = _chunk_tasks(A, C)
        _batch_norm_bwd_dx_chunks(dy3, x3, y3, mean64, alpha, beta, gamma, rows, cpb, ncb, nab,
                                  dx3)
    else:
        rows, nb = _row_blocks(A)
        K = C * B
        _batch_norm_bwd_dx_rows(dy3.reshape(A, K), x3.reshape(A, K),
                                None if y3 is None else y3.reshape(A, K), mean64, alpha, beta,
                                gamma, B, rows, nb, dx3.reshape(A, K))
    layout.finish(dx, dx3)
