"""Proximal operators, fused optimizer steps, cross-entropy and scaling on the CPU (Numba).

Same signatures as ``fastreg/reference/prox.py``; arguments arrive validated.

Elementwise ops (prox_l1, prox_elastic_net, sgd_step, adam_step) compute the
update rules of ``fastreg.prox``'s docstring in the parameter's dtype, one
IEEE-rounded operation at a time: these kernels are compiled without
fast-math flags, so LLVM neither reassociates nor contracts ``a * b + c`` into
a fused multiply-add. Every element's result is then the same whether it
lands in a vector body or a scalar remainder, whichever thread runs it, and
whether its tensor came alone or in a list. Scalars are formed in float64
on the host and rounded once to the dtype; the kernels contain no float
literals, which would promote float32 arithmetic to float64. Loops run over
slices from index 0 (Numba wraps negative indices, and LLVM vectorizes only
where it sees that no index is negative), and an in-place call has loops of
its own (a loop over two arrays is vectorized after a run-time check that
they do not overlap, which the same array passed twice fails).

Optimizer steps over many tensors: the host builds a table of the tensors'
addresses and sizes (one row per tensor, one column per stream: w, g, state)
and cuts every tensor into chunks of ``CHUNK`` elements; one ``prange`` runs
over all chunks of all tensors, each chunk finding its tensor by a binary
search of the chunk offsets and viewing its memory through ``numba.carray``.
A single tensor is a table of one row, so a list gives bitwise what a call per
tensor gives. Arrays that are not C-contiguous go through contiguous
temporaries, copied back after the kernel.

Bytes (minimal): sgd read w, g (+ buffer), write w (+ buffer); adam read w,
g, m, v (+ vmax), write w, m, v (+ vmax); prox read w (+ array thresholds),
write y. One pass each.

Group ops (prox_group_l1, max_norm, standardize, min_max_scale): x is viewed
as (P, Q, R) with the reduced axes in the middle (Q), the groups indexed by
(p, r). A C-contiguous array whose reduced axes are adjacent needs no copy
(rows: R = 1; columns: P = 1); other layouts go through a transposed
contiguous copy. Statistics accumulate in float64 over fixed blocks of Q
(set by the shape, never by the thread count) into partials that are
combined in block order; then one pass writes ``y = (x - shift) * scale +
offset`` with per-group coefficients formed on the host. Memory sees x read
twice (statistics, then y) unless a group fits in cache. Group lasso and
max-norm over contiguous rows of up to 1 MiB take one pass instead
(``_norm_scale_rows``: a row's norm, then its rescaling while it is in L2).

Cross-entropy: one row per ``prange`` iteration; the row (K * itemsize
bytes) stays in L2 across its three passes (max and sum; exp stored into
dlogits and summed in float64; dlogits rescaled), so memory sees logits read
once and dlogits written once. Row sums go through 8 lane accumulators in a
fixed order (see _LANES). float32 rows take exp from a polynomial LLVM
vectorizes (``_exp_row_f32``, under 2 ulp; the C library's expf, one call per
element, made the kernel compute-bound at a third of the speed); float64 rows
use the C library's exp.
"""

import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from ._common import CACHE, PARALLEL_JIT, contiguous, finish
from ._common import target as writable_target

# Elementwise kernels: no fast-math (see the module docstring).
SERIAL_EXACT_JIT = dict(nogil=True, cache=CACHE, error_model="numpy")
EXACT_JIT = dict(SERIAL_EXACT_JIT, parallel=True)

# Elements per chunk of the elementwise kernels (256 KiB of float32 per stream).
CHUNK = 1 << 16

# Up to this many elements in all, a call runs on the calling thread: waking
# Numba's thread pool costs more than the work (the chunks and results are the
# same either way).
_SERIAL_ELEMENTS = 1 << 17


@intrinsic
def _pointer(typingctx, address, like):
    """An integer address as a typed pointer to elements of ``like``'s dtype."""
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


def _address(a):
    return a.__array_interface__["data"][0]


# --------------------------------------------------------------------------- elementwise prox

@numba.njit(**SERIAL_EXACT_JIT)
def _soft(v, th):
    """soft(v, th) = v - clamp(v, -th, th): v -+ th outside [-th, th], exactly 0 inside."""
    cl = v if v < th else th
    cl = cl if cl > -th else -th
    return v - cl


@numba.njit(**SERIAL_EXACT_JIT)
def _prox_chunk(x, out, t, t_step, l2, l2_step, shrink, inplace, c):
    """Chunk ``c`` of out = soft(x, t) (/ (1 + l2) when ``shrink``); t and l2 are
    arrays read with step 0 (one value) or 1 (one per element).

    ``inplace`` (out is x) has its own loops: LLVM vectorizes a loop over two
    arrays only after a run-time check that they do not overlap, and the same
    array passed twice fails it, which would leave the in-place call scalar.
    """
    one = l2.dtype.type(1)
    lo = c * CHUNK
    hi = min(x.size, lo + CHUNK)
    # loops run over slices from index 0: LLVM then knows no index is negative
    # (Numba wraps negative indices) and vectorizes
    xs = x[lo:hi]
    os_ = out[lo:hi]
    if t_step == 0 and l2_step == 0:
        th = t[0]
        den = one + l2[0]
        if inplace and shrink:
            for k in range(xs.size):
                xs[k] = _soft(xs[k], th) / den
        elif inplace:
            for k in range(xs.size):
                xs[k] = _soft(xs[k], th)
        elif shrink:
            for k in range(xs.size):
                os_[k] = _soft(xs[k], th) / den
        else:
            for k in range(xs.size):
                os_[k] = _soft(xs[k], th)
    else:
        ts = t[lo * t_step:hi * t_step + 1 - t_step]
        ds = l2[lo * l2_step:hi * l2_step + 1 - l2_step]
        if inplace:
            for k in range(xs.size):
                y = _soft(xs[k], ts[k * t_step])
                xs[k] = y / (one + ds[k * l2_step]) if shrink else y
        else:
            for k in range(xs.size):
                y = _soft(xs[k], ts[k * t_step])
                os_[k] = y / (one + ds[k * l2_step]) if shrink else y


@numba.njit(**EXACT_JIT)
def _prox_flat(x, out, t, t_step, l2, l2_step, shrink, inplace):
    for c in prange((x.size + CHUNK - 1) // CHUNK):
        _prox_chunk(x, out, t, t_step, l2, l2_step, shrink, inplace, c)


@numba.njit(**SERIAL_EXACT_JIT)
def _prox_flat_serial(x, out, t, t_step, l2, l2_step, shrink, inplace):
    for c in range((x.size + CHUNK - 1) // CHUNK):
        _prox_chunk(x, out, t, t_step, l2, l2_step, shrink, inplace, c)


def _param(p, shape, dtype):
    """A scalar or broadcast parameter as (flat array, step)."""
    if not isinstance(p, np.ndarray):
        return np.array([p], dtype), 0
    if p.shape == shape and p.flags.c_contiguous:
        return p.reshape(-1), 1
    if p.size == 1:
        return p.reshape(1).astype(dtype), 0
    return np.ascontiguousarray(np.broadcast_to(p, shape)).reshape(-1), 1


def _prox(w, l1, l2, out, shrink):
    dtype = w.dtype
    t, ts = _param(l1, w.shape, dtype)
    d, ds = _param(l2, w.shape, dtype)
    x = contiguous(w)
    o = writable_target(out)
    inplace = np.may_share_memory(x, o)   # validated: then o is x (the same view)
    kernel = _prox_flat if w.size > _SERIAL_ELEMENTS else _prox_flat_serial
    kernel(x.reshape(-1), o.reshape(-1), t, ts, d, ds, shrink, inplace)
    finish(out, o)


def prox_l1(w, threshold, out):
    _prox(w, threshold, 0.0, out, False)


def prox_elastic_net(w, l1, l2, out):
    _prox(w, l1, l2, out, True)


# --------------------------------------------------------------------------- tensor tables

def _tables(columns, written):
    """Address tables for the elementwise optimizer kernels.

    ``columns`` holds one list per stream (w first; None for an unused
    stream) with one array per tensor; streams whose index is in ``written``
    are updated in place. Returns ``(tables, copies, keep)``: per dtype
    ``(addr (T, S) int64, sizes, first_chunk, n_chunks)``; the (array,
    temporary) pairs to copy back after the kernel; temporaries to keep alive.
    """
    rows = {}
    copies, keep = [], []
    for i, w in enumerate(columns[0]):
        if w.size == 0:
            continue
        row = []
        for k, col in enumerate(columns):
            if col is None:
                row.append(0)
                continue
            a = col[i]
            if not a.flags.c_contiguous:
                tmp = np.ascontiguousarray(a)
                keep.append(tmp)
                if k in written:
                    copies.append((a, tmp))
                a = tmp
            row.append(_address(a))
        rows.setdefault(w.dtype, ([], []))
        rows[w.dtype][0].append(row)
        rows[w.dtype][1].append(w.size)
    tables = {}
    for dtype, (addr, sizes) in rows.items():
        sizes = np.array(sizes, np.int64)
        chunks = (sizes + CHUNK - 1) // CHUNK
        tables[dtype] = (np.array(addr, np.int64), sizes, np.cumsum(chunks) - chunks,
                         int(chunks.sum()))
    return tables, copies, keep


def _write_back(copies):
    for a, tmp in copies:
        a[...] = tmp


# --------------------------------------------------------------------------- SGD

# scalars of the SGD kernel, in this order (rounded to the parameter dtype)
_SGD_SIGN, _SGD_WD, _SGD_MOM, _SGD_DAMP1, _SGD_DECAY, _SGD_NEGLR, _SGD_T = range(7)
_SGD_NO_BUFFER, _SGD_FIRST, _SGD_MOMENTUM = range(3)


@numba.njit(**SERIAL_EXACT_JIT)
def _sgd_chunk(addr, sizes, first_chunk, c, s, mode, coupled, nesterov):
    """One SGD step (fastreg.prox "Update rules") over chunk ``c`` of the tensor table.

    addr[i] = (w, g, buffer) addresses; ``mode``: no buffer, first step (the
    buffer is only written) or momentum; ``coupled``: weight_decay != 0.
    """
    sign = s[_SGD_SIGN]
    wd = s[_SGD_WD]
    mom = s[_SGD_MOM]
    damp1 = s[_SGD_DAMP1]
    decay = s[_SGD_DECAY]
    neglr = s[_SGD_NEGLR]
    th = s[_SGD_T]
    isz = s.itemsize
    i = np.searchsorted(first_chunk, c, side="right") - 1
    lo = (c - first_chunk[i]) * CHUNK
    n = min(CHUNK, sizes[i] - lo)
    w = numba.carray(_pointer(addr[i, 0] + lo * isz, s), n)
    g = numba.carray(_pointer(addr[i, 1] + lo * isz, s), n)
    if mode == _SGD_NO_BUFFER:
        for k in range(n):
            x = w[k]
            d = g[k] * sign
            if coupled:
                d = d + wd * x
            x = x * decay + neglr * d
            cl = x if x < th else th
            cl = cl if cl > -th else -th
            w[k] = x - cl
    else:
        b = numba.carray(_pointer(addr[i, 2] + lo * isz, s), n)
        for k in range(n):
            x = w[k]
            d = g[k] * sign
            if coupled:
                d = d + wd * x
            if mode == _SGD_FIRST:
                bk = d
            else:
                bk = b[k] * mom + damp1 * d
            b[k] = bk
            if nesterov:
                d = d + mom * bk
            else:
                d = bk
            x = x * decay + neglr * d
            cl = x if x < th else th
            cl = cl if cl > -th else -th
            w[k] = x - cl


@numba.njit(**EXACT_JIT)
def _sgd_tensors(addr, sizes, first_chunk, n_chunks, s, mode, coupled, nesterov):
    for c in prange(n_chunks):
        _sgd_chunk(addr, sizes, first_chunk, c, s, mode, coupled, nesterov)


@numba.njit(**SERIAL_EXACT_JIT)
def _sgd_tensors_serial(addr, sizes, first_chunk, n_chunks, s, mode, coupled, nesterov):
    for c in range(n_chunks):
        _sgd_chunk(addr, sizes, first_chunk, c, s, mode, coupled, nesterov)


def sgd_step(ws, gs, bufs, lr, momentum, dampening, nesterov, maximize, weight_decay,
             decoupled_weight_decay, l1, first_step):
    use_buf = momentum != 0
    tables, copies, keep = _tables([ws, gs, bufs if use_buf else None],
                                   written={0, 2})
    mode = _SGD_NO_BUFFER if not use_buf else _SGD_FIRST if first_step else _SGD_MOMENTUM
    values = [-1.0 if maximize else 1.0, weight_decay, momentum, 1.0 - dampening,
              1.0 - lr * decoupled_weight_decay, -lr, lr * l1]
    for dtype, (addr, sizes, first, n_chunks) in tables.items():
        kernel = _sgd_tensors if sizes.sum() > _SERIAL_ELEMENTS else _sgd_tensors_serial
        kernel(addr, sizes, first, n_chunks, np.array(values, dtype), mode, weight_decay != 0,
               nesterov)
    _write_back(copies)
    del keep


# --------------------------------------------------------------------------- Adam / AdamW

(_AD_SIGN, _AD_WD, _AD_DECAY, _AD_LERP_W, _AD_LERP_1MW, _AD_BETA2, _AD_1MBETA2, _AD_BC2_SQRT,
 _AD_EPS, _AD_NEG_STEP_SIZE, _AD_T) = range(11)


@numba.njit(**SERIAL_EXACT_JIT)
def _adam_chunk(addr, sizes, first_chunk, c, s, amsgrad, coupled, lerp_small):
    """One Adam/AdamW step (fastreg.prox "Update rules") over chunk ``c`` of the tensor table.

    addr[i] = (w, g, exp_avg, exp_avg_sq, max_exp_avg_sq) addresses;
    ``coupled``: L2 added to the gradient (the decoupled decay factor is 1
    then); ``lerp_small``: 1 - beta1 < 0.5 (the branch torch's lerp takes).
    """
    sign = s[_AD_SIGN]
    wd = s[_AD_WD]
    decay = s[_AD_DECAY]
    lw = s[_AD_LERP_W]
    lw1 = s[_AD_LERP_1MW]
    beta2 = s[_AD_BETA2]
    omb2 = s[_AD_1MBETA2]
    bc2s = s[_AD_BC2_SQRT]
    eps = s[_AD_EPS]
    negss = s[_AD_NEG_STEP_SIZE]
    th = s[_AD_T]
    isz = s.itemsize
    i = np.searchsorted(first_chunk, c, side="right") - 1
    lo = (c - first_chunk[i]) * CHUNK
    n = min(CHUNK, sizes[i] - lo)
    w = numba.carray(_pointer(addr[i, 0] + lo * isz, s), n)
    g = numba.carray(_pointer(addr[i, 1] + lo * isz, s), n)
    m = numba.carray(_pointer(addr[i, 2] + lo * isz, s), n)
    v = numba.carray(_pointer(addr[i, 3] + lo * isz, s), n)
    if amsgrad:
        vm = numba.carray(_pointer(addr[i, 4] + lo * isz, s), n)
    else:
        vm = v
    for k in range(n):
        x = w[k]
        d = g[k] * sign
        if coupled:
            d = d + wd * x
        x = x * decay
        diff = d - m[k]
        if lerp_small:
            mk = m[k] + lw * diff
        else:
            mk = d - diff * lw1
        vk = v[k] * beta2 + (omb2 * d) * d
        m[k] = mk
        v[k] = vk
        if amsgrad:
            u = vm[k]
            u = vk if vk > u else u
            vm[k] = u
        else:
            u = vk
        x = x + (negss * mk) / (math.sqrt(u) / bc2s + eps)
        cl = x if x < th else th
        cl = cl if cl > -th else -th
        w[k] = x - cl


@numba.njit(**EXACT_JIT)
def _adam_tensors(addr, sizes, first_chunk, n_chunks, s, amsgrad, coupled, lerp_small):
    for c in prange(n_chunks):
        _adam_chunk(addr, sizes, first_chunk, c, s, amsgrad, coupled, lerp_small)


@numba.njit(**SERIAL_EXACT_JIT)
def _adam_tensors_serial(addr, sizes, first_chunk, n_chunks, s, amsgrad, coupled, lerp_small):
    for c in range(n_chunks):
        _adam_chunk(addr, sizes, first_chunk, c, s, amsgrad, coupled, lerp_small)


def adam_step(ws, gs, ms, vs, vmaxs, step, lr, beta1, beta2, eps, weight_decay, decoupled,
              amsgrad, l1, maximize):
    tables, copies, keep = _tables([ws, gs, ms, vs, vmaxs if amsgrad else None],
                                   written={0, 2, 3, 4})
    coupled = weight_decay != 0 and not decoupled
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    lerp_w = 1.0 - beta1
    for dtype, (addr, sizes, first, n_chunks) in tables.items():
        lw = dtype.type(lerp_w)
        values = [-1.0 if maximize else 1.0, weight_decay if coupled else 0.0, decay, lw,
                  dtype.type(1) - lw, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2 ** step), eps,
                  -(lr / (1.0 - beta1 ** step)), lr * l1]
        kernel = _adam_tensors if sizes.sum() > _SERIAL_ELEMENTS else _adam_tensors_serial
        kernel(addr, sizes, first, n_chunks, np.array(values, dtype), amsgrad, coupled,
               abs(lerp_w) < 0.5)
    _write_back(copies)
    del keep


# --------------------------------------------------------------------------- group statistics

# Q-blocks of the statistics: at least this many elements each, at most
# _MAX_QBLOCKS of them per group; r-blocks of this many contiguous elements.
_QBLOCK_ELEMENTS = 1 << 15
_MAX_QBLOCKS = 32
_RBLOCK = 2048


def _blocks(P, Q, R):
    """(rows per Q-block, Q-blocks, R-blocks), fixed by the shape alone."""
    q_rows = max(1, -(-_QBLOCK_ELEMENTS // max(R, 1)))
    q_rows = max(q_rows, -(-Q // _MAX_QBLOCKS))
    nqb = max(1, -(-Q // q_rows))
    nrb = max(1, -(-R // _RBLOCK))
    return q_rows, nqb, nrb


@numba.njit(**SERIAL_EXACT_JIT)
def _task(task, Q, R, q_rows, nqb, nrb):
    """Task -> (p, Q-block b, r0, r1, q0, q1)."""
    p = task // (nqb * nrb)
    b = (task // nrb) % nqb
    r0 = (task % nrb) * _RBLOCK
    q0 = b * q_rows
    return p, b, r0, min(R, r0 + _RBLOCK), q0, min(Q, q0 + q_rows)


# The group kernels take x as (P, Q * R) and loop over slices from index 0
# (see _prox_chunk): row p, Q-block b and R-block [r0, r1) form one task.

@numba.njit(**PARALLEL_JIT)
def _sumsq_pqr(x, Q, R, q_rows, nqb, nrb, part):
    """part[p, b, r] = sum of x[p, q, r]**2 over the rows q of Q-block b (float64)."""
    for task in prange(x.shape[0] * nqb * nrb):
        p, b, r0, r1, q0, q1 = _task(task, Q, R, q_rows, nqb, nrb)
        row = x[p]
        if R == 1:
            xs = row[q0:q1]
            s = 0.0
            for k in range(xs.size):
                v = np.float64(xs[k])
                s += v * v
            part[p, b, 0] = s
        else:
            acc = part[p, b, r0:r1]
            acc[:] = 0.0
            for q in range(q0, q1):
                xs = row[q * R + r0:q * R + r1]
                for k in range(xs.size):
                    v = np.float64(xs[k])
                    acc[k] += v * v


@numba.njit(**PARALLEL_JIT)
def _moments_pqr(x, Q, R, q_rows, nqb, nrb, part1, part2):
    """Shifted sums over each Q-block: part1 = sum(x - k), part2 = sum((x - k)**2),
    k = x[p, 0, r] (the group's first element), in float64."""
    for task in prange(x.shape[0] * nqb * nrb):
        p, b, r0, r1, q0, q1 = _task(task, Q, R, q_rows, nqb, nrb)
        row = x[p]
        if R == 1:
            k0 = np.float64(row[0])
            xs = row[q0:q1]
            s1 = 0.0
            s2 = 0.0
            for k in range(xs.size):
                d = xs[k] - k0
                s1 += d
                s2 += d * d
            part1[p, b, 0] = s1
            part2[p, b, 0] = s2
        else:
            a1 = part1[p, b, r0:r1]
            a2 = part2[p, b, r0:r1]
            a1[:] = 0.0
            a2[:] = 0.0
            shift = row[r0:r1]
            for q in range(q0, q1):
                xs = row[q * R + r0:q * R + r1]
                for k in range(xs.size):
                    d = xs[k] - np.float64(shift[k])
                    a1[k] += d
                    a2[k] += d * d


@numba.njit(**PARALLEL_JIT)
def _minmax_pqr(x, Q, R, q_rows, nqb, nrb, lo_part, hi_part):
    """Minimum and maximum over each Q-block; a NaN makes both NaN."""
    for task in prange(x.shape[0] * nqb * nrb):
        p, b, r0, r1, q0, q1 = _task(task, Q, R, q_rows, nqb, nrb)
        row = x[p]
        lo = lo_part[p, b, r0:r1]
        hi = hi_part[p, b, r0:r1]
        lo[:] = row[q0 * R + r0:q0 * R + r1]
        hi[:] = lo
        for q in range(q0 + 1, q1):
            xs = row[q * R + r0:q * R + r1]
            for k in range(xs.size):
                v = xs[k]
                if v < lo[k] or v != v:
                    lo[k] = v if lo[k] == lo[k] else lo[k]
                if v > hi[k] or v != v:
                    hi[k] = v if hi[k] == hi[k] else hi[k]


@numba.njit(**EXACT_JIT)
def _affine_pqr(x, Q, R, shift, scale, offset, q_rows, nqb, nrb, y, inplace):
    """y[p, q, r] = (x[p, q, r] - shift[p, r]) * scale[p, r] + offset[p, r]; with
    ``inplace`` (y is x) x is rewritten through x alone (see _prox_chunk)."""
    for task in prange(x.shape[0] * nqb * nrb):
        p, b, r0, r1, q0, q1 = _task(task, Q, R, q_rows, nqb, nrb)
        row = x[p]
        out = y[p]
        sh = shift[p, r0:r1]
        sc = scale[p, r0:r1]
        of = offset[p, r0:r1]
        if R == 1:
            xs = row[q0:q1]
            ys = out[q0:q1]
            if inplace:
                for k in range(xs.size):
                    xs[k] = (xs[k] - sh[0]) * sc[0] + of[0]
            else:
                for k in range(xs.size):
                    ys[k] = (xs[k] - sh[0]) * sc[0] + of[0]
        else:
            for q in range(q0, q1):
                xs = row[q * R + r0:q * R + r1]
                ys = out[q * R + r0:q * R + r1]
                if inplace:
                    for k in range(xs.size):
                        xs[k] = (xs[k] - sh[k]) * sc[k] + of[k]
                else:
                    for k in range(xs.size):
                        ys[k] = (xs[k] - sh[k]) * sc[k] + of[k]


class _Groups:
    """x viewed as (P, Q, R), reducing over Q; per-group values as (P, R).

    Without a copy when x is C-contiguous and the reduced axes are adjacent;
    else through a contiguous copy with the kept axes first (R = 1).
    """

    def __init__(self, x, axis):
        nd = x.ndim
        keep = tuple(k for k in range(nd) if k not in axis)
        adjacent = not axis or axis == tuple(range(axis[0], axis[-1] + 1))
        if not axis:                       # every element its own group
            self.shape3 = (x.size, 1, 1)
            self.perm = None
        elif adjacent and x.flags.c_contiguous:
            size = lambda ks: int(math.prod([x.shape[k] for k in ks]))
            self.shape3 = (size(range(axis[0])), size(axis), size(range(axis[-1] + 1, nd)))
            self.perm = None
        else:
            self.perm = keep + axis
            self.shape3 = (int(math.prod([x.shape[k] for k in keep])),
                           int(math.prod([x.shape[k] for k in axis])), 1)
        self.stats_shape = tuple(x.shape[k] for k in keep)
        self.blocks = _blocks(*self.shape3)

    def input(self, x):
        if self.perm is None:
            return contiguous(x).reshape(self.shape3)
        return np.ascontiguousarray(x.transpose(self.perm)).reshape(self.shape3)

    def output(self, out):
        if self.perm is None and out.flags.c_contiguous:
            return out.reshape(self.shape3)
        return np.empty(self.shape3, out.dtype)

    def finish(self, out, y3):
        if self.perm is None:
            if not np.may_share_memory(out, y3):
                out[...] = y3.reshape(out.shape)
        else:
            out.transpose(self.perm)[...] = y3.reshape([out.shape[k] for k in self.perm])

    def per_group(self, values):
        """(P, R) group values as an array of the statistics' shape."""
        return values.reshape(self.stats_shape)

    def from_stats(self, stats, dtype):
        """An array of the statistics' shape as (P, R) values of ``dtype``."""
        P, _, R = self.shape3
        return np.ascontiguousarray(np.asarray(stats, dtype).reshape(P, R))

    def sumsq(self, x3):
        P, Q, R = self.shape3
        q_rows, nqb, nrb = self.blocks
        part = np.empty((P, nqb, R), np.float64)
        _sumsq_pqr(x3.reshape(P, Q * R), Q, R, q_rows, nqb, nrb, part)
        return _sum_blocks(part)

    def moments(self, x3):
        """Mean and biased variance per group, float64 (P, R)."""
        P, Q, R = self.shape3
        q_rows, nqb, nrb = self.blocks
        p1 = np.empty((P, nqb, R), np.float64)
        p2 = np.empty((P, nqb, R), np.float64)
        _moments_pqr(x3.reshape(P, Q * R), Q, R, q_rows, nqb, nrb, p1, p2)
        s1, s2 = _sum_blocks(p1), _sum_blocks(p2)
        m1 = s1 / Q
        var = np.maximum(s2 / Q - m1 * m1, 0.0)
        var = np.where(np.isnan(s2), np.nan, var)
        return np.asarray(x3[:, 0, :], np.float64) + m1, var

    def minmax(self, x3):
        P, Q, R = self.shape3
        q_rows, nqb, nrb = self.blocks
        lo = np.empty((P, nqb, R), x3.dtype)
        hi = np.empty((P, nqb, R), x3.dtype)
        _minmax_pqr(x3.reshape(P, Q * R), Q, R, q_rows, nqb, nrb, lo, hi)
        return lo.min(axis=1), hi.max(axis=1)

    def apply(self, x3, shift, scale, offset, y3):
        P, Q, R = self.shape3
        q_rows, nqb, nrb = self.blocks
        dt = x3.dtype
        _affine_pqr(x3.reshape(P, Q * R), Q, R, np.ascontiguousarray(shift, dt),
                    np.ascontiguousarray(scale, dt), np.ascontiguousarray(offset, dt),
                    q_rows, nqb, nrb, y3.reshape(P, Q * R), np.may_share_memory(x3, y3))


def _sum_blocks(part):
    """Partials (P, blocks, R) summed over the blocks in block order."""
    total = part[:, 0, :].copy()
    for b in range(1, part.shape[1]):
        total += part[:, b, :]
    return total


def _group_op(x, axis, out, coefficients):
    """Shared driver: statistics -> per-group (shift, scale, offset) -> y."""
    groups = _Groups(x, axis)
    x3 = groups.input(x)
    shift, scale, offset = coefficients(groups, x3)
    y3 = groups.output(out)
    groups.apply(x3, shift, scale, offset, y3)
    groups.finish(out, y3)
    return groups


def _keepdims(x, axis):
    return tuple(1 if k in axis else n for k, n in enumerate(x.shape))


def _as_groups(values, x, axis):
    """A threshold (scalar or array broadcasting to the keepdims shape) as a float64
    array of the statistics' shape."""
    keep = tuple(n for k, n in enumerate(x.shape) if k not in axis)
    v = np.broadcast_to(np.asarray(values, np.float64), _keepdims(x, axis))
    return v.reshape(keep)


# Rows up to this many bytes are rescaled by _norm_scale_rows, one row per
# task: the row is still in L2 when it is written, so memory sees w read once.
_ROW_BYTES = 1 << 20
_GROUP_L1, _MAX_NORM = 0, 1


@numba.njit(**PARALLEL_JIT)
def _norm_scale_rows(x, t, max_value, eps, mode, y, inplace):
    """Per row of x (G, S): n = |x_g| (float64), then y_g = x_g * scale with
    group lasso's max(0, 1 - t_g / n) (mode _GROUP_L1) or max-norm's
    min(n, max_value) / (n + eps) (mode _MAX_NORM); see _prox_chunk for ``inplace``."""
    for g in prange(x.shape[0]):
        xs = x[g]
        ss = 0.0
        for k in range(xs.size):
            v = np.float64(xs[k])
            ss += v * v
        n = math.sqrt(ss)
        if mode == _GROUP_L1:
            scale = 0.0 if n <= t[g] else 1.0 - t[g] / n   # NaN n: NaN scale
        elif n + eps == 0.0:
            scale = 1.0
        else:
            scale = (max_value if n > max_value else n) / (n + eps)
        sc = xs.dtype.type(scale)
        if inplace:
            for k in range(xs.size):
                xs[k] = xs[k] * sc
        else:
            ys = y[g]
            for k in range(xs.size):
                ys[k] = xs[k] * sc


def _rows_fused(w, axis, out, t, max_value, eps, mode):
    """The one-pass row kernel when the groups are contiguous rows that fit in L2;
    False when the layout needs the general path."""
    groups = _Groups(w, axis)
    P, Q, R = groups.shape3
    if groups.perm is not None or R != 1 or P < 2 or Q * w.itemsize > _ROW_BYTES:
        return False
    x2 = contiguous(w).reshape(P, Q)
    o = writable_target(out)
    tv = np.ascontiguousarray(groups.from_stats(_as_groups(t, w, axis), np.float64).reshape(P))
    _norm_scale_rows(x2, tv, max_value, eps, mode, o.reshape(P, Q), np.may_share_memory(x2, o))
    finish(out, o)
    return True


def prox_group_l1(w, threshold, axis, out):
    if _rows_fused(w, axis, out, threshold, 0.0, 0.0, _GROUP_L1):
        return

    def coefficients(groups, x3):
        n = np.sqrt(groups.sumsq(x3))
        t = groups.from_stats(_as_groups(threshold, w, axis), np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(n <= t, 0.0, 1.0 - t / n)
        zero = np.zeros_like(scale)
        return zero, scale, zero
    _group_op(w, axis, out, coefficients)


def max_norm(w, max_value, axis, eps, out):
    if _rows_fused(w, axis, out, 0.0, max_value, eps, _MAX_NORM):
        return

    def coefficients(groups, x3):
        n = np.sqrt(groups.sumsq(x3))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(n > max_value, max_value, n) / (n + eps)
        scale = np.where(n + eps == 0, 1.0, scale)
        zero = np.zeros_like(scale)
        return zero, scale, zero
    _group_op(w, axis, out, coefficients)


def constant_features(var, mean, n):
    """scikit-learn's test for a feature indistinguishable from a constant."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


def standardize(x, axis, eps, mean, std, out):
    y, mean_out, std_out = out

    def coefficients(groups, x3):
        dt = x.dtype
        if mean is None:
            P, Q, R = x3.shape
            m, var = groups.moments(x3) if Q else (np.zeros((P, R)), np.zeros((P, R)))
            s = np.where(constant_features(var, m, Q), 1.0, np.sqrt(var + eps))
            mean_out[...] = groups.per_group(m.astype(dt))
            std_out[...] = groups.per_group(s.astype(dt))
            shift, sd = groups.from_stats(mean_out, dt), groups.from_stats(std_out, dt)
        else:
            shift, sd = groups.from_stats(mean, dt), groups.from_stats(std, dt)
        one = np.ones((), dt)
        return shift, one / sd, np.zeros_like(shift)
    _group_op(x, axis, y, coefficients)


def min_max_scale(x, axis, feature_range, data_min, data_max, out):
    y, min_out, max_out = out
    a, b = feature_range

    def coefficients(groups, x3):
        dt = x.dtype
        if data_min is None:
            lo, hi = groups.minmax(x3)
            min_out[...] = groups.per_group(lo)
            max_out[...] = groups.per_group(hi)
            lo, hi = groups.from_stats(min_out, dt), groups.from_stats(max_out, dt)
        else:
            lo, hi = groups.from_stats(data_min, dt), groups.from_stats(data_max, dt)
        rng = hi.astype(np.float64) - lo
        rng = np.where(rng < 10 * np.finfo(dt).eps, 1.0, rng)
        return lo, (b - a) / rng, np.full(lo.shape, a)
    _group_op(x, axis, y, coefficients)


# --------------------------------------------------------------------------- cross-entropy

# Row sums of the cross-entropy go through _LANES independent accumulators
# combined in a fixed order: the order is then set by the source alone. (With
# reassociation allowed, LLVM's vectorized and scalar versions of a loop sum
# in different orders, and which one runs depends on whether dlogits aliases
# the logits, so an in-place call would differ from a fresh one.)
_LANES = 8


@numba.njit(**SERIAL_EXACT_JIT)
def _row_max_sum(zr):
    """Max (NaN ignored) and float64 sum of a row, through _LANES accumulators."""
    K = zr.size
    K8 = K - K % _LANES
    mx = np.full(_LANES, zr[0])
    sm = np.zeros(_LANES)
    for j0 in range(0, K8, _LANES):
        for u in range(_LANES):
            v = zr[j0 + u]
            mx[u] = v if v > mx[u] else mx[u]
            sm[u] += v
    m = mx[0]
    sz = 0.0
    for u in range(_LANES):
        m = mx[u] if mx[u] > m else m
        sz += sm[u]
    for j in range(K8, K):
        v = zr[j]
        m = v if v > m else m
        sz += v
    return m, sz


@numba.njit(**SERIAL_EXACT_JIT)
def _lane_sum(er):
    """float64 sum of a row through _LANES accumulators, combined in lane order."""
    K = er.size
    K8 = K - K % _LANES
    se = np.zeros(_LANES)
    for j0 in range(0, K8, _LANES):
        for u in range(_LANES):
            se[u] += er[j0 + u]
    s = 0.0
    for u in range(_LANES):
        s += se[u]
    for j in range(K8, K):
        s += er[j]
    return s


@numba.njit(**SERIAL_EXACT_JIT)
def _exp_row(zr, m, er):
    """er = exp(zr - m) with the C library's exp, one element at a time."""
    for j in range(zr.size):
        er[j] = math.exp(zr[j] - m)


# exp for float32 rows, in arithmetic LLVM vectorizes (the C library's expf is
# one call per element): exp(x) = 2**n * p(r), n = round(x / ln 2),
# r = x - n ln 2 in two parts, p the degree-7 polynomial of Cephes' expf
# (relative error under 2 ulp); x is clamped at -87 (exp(-87) = 1.6e-38), so
# 2**n stays a normal number and is added to the exponent bits.
_E_LOG2E = np.float32(1.44269504088896341)
_E_LN2_HI = np.float32(0.693359375)
_E_LN2_LO = np.float32(-2.12194440e-4)
_E_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
        np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))
_E_MIN = np.float32(-87.0)
_E_HALF = np.float32(0.5)
_E_ONE = np.float32(1.0)
_E_BLOCK = 512


@numba.njit(**SERIAL_EXACT_JIT)
def _exp_row_f32(zr, m, er, nbuf):
    """er = exp(zr - m) for float32 rows (see _E_*); nbuf: int32 scratch of _E_BLOCK."""
    p0, p1, p2, p3, p4, p5 = _E_P
    for j0 in range(0, zr.size, _E_BLOCK):
        zs = zr[j0:j0 + _E_BLOCK]
        es = er[j0:j0 + _E_BLOCK]
        for k in range(zs.size):
            xn = zs[k] - m
            x = xn if xn > _E_MIN else _E_MIN
            fx = np.floor(x * _E_LOG2E + _E_HALF)
            r = x - fx * _E_LN2_HI
            r = r - fx * _E_LN2_LO
            y = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * (r * r) + r + _E_ONE
            # a NaN (a NaN logit, or inf - inf) stays NaN: the clamp would make it
            # exp(-87), and a shifted exponent would turn its bits into a number
            nan = xn != xn
            es[k] = xn if nan else y
            nbuf[k] = np.int32(0) if nan else np.int32(fx)
        bits = es.view(np.int32)
        for k in range(zs.size):
            bits[k] += nbuf[k] << 23


@numba.njit(**SERIAL_EXACT_JIT)
def _ce_row(zr, dr, t, on, off, c, o, ot, nbuf, fast_exp):
    """One row: returns the loss (float64) and writes dr = c * (softmax(zr) - q)."""
    m, sz = _row_max_sum(zr)
    zt = np.float64(zr[t])               # read before dr (possibly zr) is overwritten
    if fast_exp:
        _exp_row_f32(zr, m, dr, nbuf)
    else:
        _exp_row(zr, m, dr)
    s = _lane_sum(dr)
    inv = dr.dtype.type(1.0 / s)
    et = dr[t]
    for j in range(dr.size):
        dr[j] = (dr[j] * inv - o) * c
    dr[t] = (et * inv - ot) * c
    # a term of weight 0 adds 0, also for -inf logits (a masked vocabulary), as PyTorch
    return (np.float64(m) + math.log(s) - (on * zt if on != 0.0 else 0.0)
            - (off * sz if off != 0.0 else 0.0))


@numba.njit(**EXACT_JIT)
def _ce_rows(z, target, keep, on, off, scale, loss, dl, fast_exp):
    """Per row: loss[i] (float64) and dl[i] = scale * (softmax(z[i]) - q), q = off +
    on * onehot(target[i]); rows with keep[i] == 0 get 0. dl may be z itself.
    ``fast_exp``: float32 rows through _exp_row_f32."""
    N, K = z.shape
    c = dl.dtype.type(scale)
    o = dl.dtype.type(off)
    ot = dl.dtype.type(off + on)
    for i in prange(N):
        if not keep[i]:
            loss[i] = 0.0
            dl[i, :] = 0
            continue
        nbuf = np.empty(_E_BLOCK if fast_exp else 0, np.int32)
        loss[i] = _ce_row(z[i], dl[i], target[i], on, off, c, o, ot, nbuf, fast_exp)


def cross_entropy_label_smoothing(logits, target, smoothing, reduction, ignore_index, style,
                                  out):
    loss_out, dlogits = out
    N, K = logits.shape
    if style == "uniform":
        on, off = 1.0 - smoothing, smoothing / K
    else:
        off = smoothing / (K - 1) if K > 1 else 0.0
        on = 1.0 - smoothing - off
    keep = np.ones(N, np.bool_) if ignore_index is None else np.asarray(target != ignore_index)
    n_valid = int(np.count_nonzero(keep))
    scale = (1.0 / n_valid if n_valid else 0.0) if reduction == "mean" else 1.0
    tgt = np.where(keep, target, 0).astype(np.int64)
    loss = np.empty(N, np.float64)
    z = contiguous(logits)
    dl = writable_target(dlogits)       # logits itself when out[1] is logits (in place)
    _ce_rows(z, tgt, keep, on, off, scale, loss, dl, logits.dtype == np.float32)
    finish(dlogits, dl)
    if reduction == "none":
        loss_out[...] = loss
    elif reduction == "sum":
        loss_out[...] = loss.sum()
    else:
        loss_out[...] = loss.sum() / n_valid if n_valid else np.nan
