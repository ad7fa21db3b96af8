"""The prox family on a CUDA device (CuPy arrays) or the host emulation (NumPy arrays).

Same function names and signatures as ``fastreg/reference/prox.py`` and
``fastreg/cpu/prox.py``; arguments arrive validated by ``fastreg.prox``. The
kernels are ``kernels/prox.cu`` (formulas, strategies, reduction orders and
byte counts in its header); this module holds the launch geometry.

dtypes: float16, bfloat16 (``ml_dtypes.bfloat16``), float32, float64.
Compute type: float32 for float16/bfloat16, the dtype itself otherwise.
Scalars (thresholds, learning rates, ``1 - beta1``, ...) are formed in float64
here, as on the CPU, and rounded once to the compute type. Optimizer state has
the parameter's dtype (as torch keeps it); for 16-bit parameters it is
loaded to float32, updated, used for the step and stored rounded, as torch's
fused CUDA Adam does (its non-fused Adam rounds each intermediate to the
state's dtype instead).

Rounding: the elementwise prox, the optimizer steps and the apply pass of the
group ops round every operation of fastreg.prox's "Update rules" on its own
(``__fmul_rn`` & co., never fused into multiply-adds, chosen over a
module-wide ``-fmad=false`` so that the cross-entropy keeps its FMAs), so
their float32/float64 results equal the CPU's bit for bit (CuPy's
``-ftz=true`` aside, which flushes float32 denormals on the GPU). The
cross-entropy (``expf``/``exp``) and the group statistics (sums over other
trees than the CPU's) agree with the reference within tolerances.

Geometry (fixed by the shapes alone, so results are bitwise identical run to run):

- prox: 256-thread blocks, grid-stride over 16-byte vectors (4 per thread:
  ceil(n / (256 * 4 * N)) blocks); a broadcast threshold array that is not
  one value per element is expanded to w's shape first.
- sgd/adam: one block of 256 threads per chunk of ``CHUNK`` elements; a list
  of tensors is one launch per dtype over a table uploaded in one copy (7
  int64 per tensor: 5 stream addresses, size, first chunk). Host work per
  call: a Python loop over the tensors' addresses and one small upload.
  Tensors that are not C-contiguous go through contiguous temporaries.
- cross-entropy: ``ce_plan`` picks the smallest row group R (32..1024) and
  then the fewest slots KS (``CE_SLOTS``, each instance with its largest
  block) that hold a row in registers: R * KS * N >= K, N = 16 / itemsize
  ((8192, 32000): float32 R = 1024, KS = 8; 16-bit R = 512, KS = 8). Blocks of
  max(R, 128) threads, one row per group. Longer rows (float32 K > 32768, 16-bit K > 32768, float64
  K > 8192): the loop kernel, one row per 1024-thread block. Rows take
  16-byte loads when K % N == 0 and the logits and the gradient are 16-byte
  aligned, else the scalar instance. "mean" with ``ignore_index`` counts the
  rows on the device (no host synchronization).
- groups: x as (P, Q, R) reduced over Q (contiguous; other layouts through a
  transposed copy, as on the CPU). Blocks of (RT, QT, PT) = (threads along
  r, q, p), 256 in all: RT = min(32, pow2 >= R), QT = min(256 / RT, pow2 >= Q),
  PT = the rest; Q-blocks of ``q_rows`` rows (at least ``GROUP_ELEMENTS`` /
  RT), so that P * nqb * nrb blocks cover x.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from . import _device

MODULE = "prox"
TAGS = {np.dtype(np.float16): "f16", np.dtype(ml_dtypes.bfloat16): "bf16",
        np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
VEC = {"f16": 8, "bf16": 8, "f32": 4, "f64": 2}  # elements per 16 bytes

THREADS = 256                 # elementwise prox and optimizer blocks
VECTORS_PER_THREAD = 4        # prox: 16-byte vectors per thread (grid size)
CHUNK = 1 << 14               # optimizer steps: elements per block (a multiple of 8)
# (KS, largest block) of the register-path instances, as instantiated at the end of
# kernels/prox.cu: the block bound sets the register budget (65536 / threads)
CE_SLOTS = {"f16": ((1, 1024), (2, 1024), (4, 512), (8, 512)),
            "bf16": ((1, 1024), (2, 1024), (4, 512), (8, 512)),
            "f32": ((1, 1024), (2, 1024), (4, 1024), (8, 1024)),
            "f64": ((1, 1024), (2, 1024), (4, 1024))}
CE_MIN_THREADS = 128
CE_LOOP_THREADS = 1024
CE_REDUCE_THREADS = 1024      # cross_entropy_count / cross_entropy_loss: one block
GROUP_THREADS = 256
GROUP_ELEMENTS = 1 << 13      # group ops: elements per block at least, when Q is split

# modes, statistics and ops of kernels/prox.cu
_SGD_NO_BUFFER, _SGD_FIRST, _SGD_MOMENTUM = 0, 1, 2
_STAT_SUMSQ, _STAT_MOMENTS, _STAT_MINMAX = 0, 1, 2
_GROUP_L1, _MAX_NORM, _STD_FIT, _STD_APPLY, _MINMAX_FIT, _MINMAX_APPLY = range(6)
_TABLE_COLS = 7


def kernel_names():
    """Every kernel the launchers may launch (the compile checks cover each)."""
    names = []
    for tag in VEC:
        names += [f"prox_elementwise_{tag}", f"sgd_step_{tag}", f"adam_step_{tag}"]
        for ks, _ in CE_SLOTS[tag]:
            names += [f"cross_entropy_rows_k{ks}_{tag}", f"cross_entropy_rows_k{ks}_scalar_{tag}"]
        names += [f"cross_entropy_loop_{tag}", f"cross_entropy_loss_{tag}",
                  f"group_stats_{tag}", f"group_coefficients_{tag}", f"group_apply_{tag}"]
    return names + ["cross_entropy_count_i64"]


def hot_kernel_names():
    """The kernels that stream the large arrays (no spills allowed)."""
    return [n for n in kernel_names() if not n.startswith(("cross_entropy_count",
                                                           "cross_entropy_loss",
                                                           "group_coefficients"))]


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _aligned(dev, *arrays):
    return all(a is None or dev.address(a) % 16 == 0 for a in arrays)


# --------------------------------------------------------------------------- elementwise prox

def _param(dev, p, shape, acc):
    """A scalar or broadcast parameter as (array or None, scalar value, step)."""
    if not isinstance(p, dev.xp.ndarray):
        return None, acc(p), 0
    if p.size == 1:
        return p.reshape(1), acc(0), 0
    if tuple(p.shape) == tuple(shape) and p.flags.c_contiguous:
        return p.reshape(-1), acc(0), 1
    return dev.xp.ascontiguousarray(dev.xp.broadcast_to(p, shape)).reshape(-1), acc(0), 1


def _prox(w, l1, l2, out, shrink):
    dev = _device.of(w)
    n = w.size
    if n == 0:
        return
    tag, acc = TAGS[w.dtype], _acc(w.dtype)
    t, tv, ts = _param(dev, l1, w.shape, acc)
    d, dv, ds = _param(dev, l2, w.shape, acc)
    x = dev.contiguous(w).reshape(-1)
    o = dev.target(out)
    y = o.reshape(-1)
    N = VEC[tag]
    vec = _aligned(dev, x, y, t if ts else None, d if ds else None)
    blocks = max(1, -(-n // (THREADS * N * VECTORS_PER_THREAD)))
    dev.launch(MODULE, f"prox_elementwise_{tag}", min(blocks, 2**31 - 1), THREADS,
               (x, y, np.int64(n), t, tv, np.int32(ts), d, dv, np.int32(ds), np.int32(shrink),
                np.int32(vec)))
    dev.finish(out, o)


def prox_l1(w, threshold, out):
    _prox(w, threshold, 0.0, out, False)


def prox_elastic_net(w, l1, l2, out):
    _prox(w, l1, l2, out, True)


# --------------------------------------------------------------------------- tensor tables

class _Table:
    """The tensors of one dtype: the device table and the number of chunks."""

    def __init__(self, dev, rows, sizes):
        sizes = np.array(sizes, np.int64)
        chunks = (sizes + CHUNK - 1) // CHUNK
        host = np.zeros((len(rows), _TABLE_COLS), np.int64)
        host[:, :5] = rows
        host[:, 5] = sizes
        host[:, 6] = np.cumsum(chunks) - chunks
        self.table = dev.xp.asarray(host)          # one upload (NumPy: the array itself)
        self.tensors = len(rows)
        self.chunks = int(chunks.sum())


def _tables(dev, columns, written):
    """Per dtype a _Table over the non-empty tensors; ``columns`` holds one list per
    stream (w first; None for an unused stream). Returns (tables, copies, keep):
    the (array, temporary) pairs to copy back after the kernels and the
    temporaries to keep alive until then."""
    rows = {}
    copies, keep = [], []
    for i, w in enumerate(columns[0]):
        if w.size == 0:
            continue
        row = [0] * 5
        for k, col in enumerate(columns):
            if col is None:
                continue
            a = col[i]
            if not a.flags.c_contiguous:
                tmp = dev.xp.ascontiguousarray(a)
                keep.append(tmp)
                if k in written:
                    copies.append((a, tmp))
                a = tmp
            row[k] = dev.address(a)
        entry = rows.setdefault(np.dtype(w.dtype), ([], []))
        entry[0].append(row)
        entry[1].append(w.size)
    tables = {dt: _Table(dev, r, s) for dt, (r, s) in rows.items()}
    return tables, copies, keep


def _write_back(copies):
    for a, tmp in copies:
        a[...] = tmp


# --------------------------------------------------------------------------- optimizer steps

def sgd_step(ws, gs, bufs, lr, momentum, dampening, nesterov, maximize, weight_decay,
             decoupled_weight_decay, l1, first_step):
    dev = _device.of(ws[0])
    use_buf = momentum != 0
    tables, copies, keep = _tables(dev, [ws, gs, bufs if use_buf else None], written={0, 2})
    mode = _SGD_NO_BUFFER if not use_buf else _SGD_FIRST if first_step else _SGD_MOMENTUM
    values = (-1.0 if maximize else 1.0, weight_decay, momentum, 1.0 - dampening,
              1.0 - lr * decoupled_weight_decay, -lr, lr * l1)
    for dtype, tab in tables.items():
        acc = _acc(dtype)
        dev.launch(MODULE, f"sgd_step_{TAGS[dtype]}", tab.chunks, THREADS,
                   (tab.table, np.int32(tab.tensors), np.int64(CHUNK), *(acc(v) for v in values),
                    np.int32(mode), np.int32(weight_decay != 0), np.int32(nesterov)))
    _write_back(copies)
    del keep


def adam_step(ws, gs, ms, vs, vmaxs, step, lr, beta1, beta2, eps, weight_decay, decoupled,
              amsgrad, l1, maximize):
    dev = _device.of(ws[0])
    tables, copies, keep = _tables(dev, [ws, gs, ms, vs, vmaxs if amsgrad else None],
                                   written={0, 2, 3, 4})
    coupled = weight_decay != 0 and not decoupled
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    lerp_w = 1.0 - beta1
    for dtype, tab in tables.items():
        acc = _acc(dtype)
        lw = acc(lerp_w)
        values = (acc(-1.0 if maximize else 1.0), acc(weight_decay if coupled else 0.0),
                  acc(decay), lw, acc(1) - lw, acc(beta2), acc(1.0 - beta2),
                  acc(math.sqrt(1.0 - beta2 ** step)), acc(eps),
                  acc(-(lr / (1.0 - beta1 ** step))), acc(lr * l1))
        dev.launch(MODULE, f"adam_step_{TAGS[dtype]}", tab.chunks, THREADS,
                   (tab.table, np.int32(tab.tensors), np.int64(CHUNK), *values,
                    np.int32(amsgrad), np.int32(coupled), np.int32(abs(lerp_w) < 0.5)))
    _write_back(copies)
    del keep


# --------------------------------------------------------------------------- cross-entropy

def ce_plan(tag, K):
    """(R, KS) of the register path for rows of K classes, or None (loop path)."""
    N = VEC[tag]
    R = 32
    while R <= 1024:
        for ks, max_threads in CE_SLOTS[tag]:
            if R <= max_threads and R * ks * N >= K:
                return R, ks
        R *= 2
    return None


def cross_entropy_label_smoothing(logits, target, smoothing, reduction, ignore_index, style,
                                  out):
    loss_out, dlogits = out
    dev = _device.of(logits)
    xp = dev.xp
    M, K = logits.shape
    if M >= 2**31 or K >= 2**31:
        raise ValueError(f"cross_entropy_label_smoothing: {M} rows of {K} classes exceed the "
                         "kernels' 2**31 limits")
    if style == "uniform":
        on, off = 1.0 - smoothing, smoothing / K
    else:
        off = smoothing / (K - 1) if K > 1 else 0.0
        on = 1.0 - smoothing - off
    if M == 0:
        loss_out[...] = np.nan if reduction == "mean" else 0
        return
    tag = TAGS[logits.dtype]
    z = dev.contiguous(logits)
    dl = dev.target(dlogits)                # logits itself when out[1] is logits (in place)
    tg = target if target.dtype == np.int64 and target.flags.c_contiguous else \
        xp.ascontiguousarray(target, dtype=np.int64)
    has_ignore = ignore_index is not None
    ignore = np.int64(ignore_index if has_ignore else 0)
    count = None
    if reduction == "mean" and has_ignore:
        count = dev.empty((1,), np.int64)
        dev.launch(MODULE, "cross_entropy_count_i64", 1, CE_REDUCE_THREADS,
                   (tg, np.int32(M), ignore, count))
    scale = 1.0 / M if reduction == "mean" else 1.0
    if reduction == "none":
        lt = dev.target(loss_out)
        row_loss, row_loss_t = None, lt
    else:
        row_loss, row_loss_t = dev.empty((M,), np.float64), None
    N = VEC[tag]
    vec = K % N == 0 and _aligned(dev, z, dl)
    args = (z, tg, dl, row_loss, row_loss_t, count, np.float64(scale), np.float64(on),
            np.float64(off), ignore, np.int32(has_ignore), np.int32(M), np.int32(K))
    plan = ce_plan(tag, K)
    if plan is not None:
        R, ks = plan
        threads = max(R, CE_MIN_THREADS)
        name = f"cross_entropy_rows_k{ks}_{tag}" if vec else \
            f"cross_entropy_rows_k{ks}_scalar_{tag}"
        dev.launch(MODULE, name, -(-M // (threads // R)), threads,
                   args + (np.int32(R), np.int32(vec)))
    else:
        dev.launch(MODULE, f"cross_entropy_loop_{tag}", M, CE_LOOP_THREADS,
                   args + (np.int32(0), np.int32(vec)))
    dev.finish(dlogits, dl)
    if reduction == "none":
        dev.finish(loss_out, lt)
    else:
        lo = dev.target(loss_out)
        dev.launch(MODULE, f"cross_entropy_loss_{tag}", 1, CE_REDUCE_THREADS,
                   (row_loss, np.int32(M), count, np.int32(reduction == "mean"), lo.reshape(1)))
        dev.finish(loss_out, lo)


# --------------------------------------------------------------------------- group ops

def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


class _Groups:
    """x viewed as (P, Q, R), reducing over Q; per-group values as (P, R) = P * R
    entries in the order of the statistics' shape (fastreg/cpu/prox.py's
    _Groups, with the launch tiling)."""

    def __init__(self, x, axis):
        nd = x.ndim
        keep = tuple(k for k in range(nd) if k not in axis)
        adjacent = not axis or axis == tuple(range(axis[0], axis[-1] + 1))
        size = lambda ks: int(np.prod([x.shape[k] for k in ks]))  # noqa: E731
        if not axis:
            self.shape3, self.perm = (x.size, 1, 1), None
        elif adjacent and x.flags.c_contiguous:
            self.shape3 = (size(range(axis[0])), size(axis), size(range(axis[-1] + 1, nd)))
            self.perm = None
        else:
            self.perm = keep + axis
            self.shape3 = (size(keep), size(axis), 1)
        P, Q, R = self.shape3
        if Q >= 2**31 or R >= 2**31:
            raise ValueError(f"groups of {Q} elements x {R} exceed the kernels' 2**31 limits")
        RT = 1 if R == 1 else min(32, _pow2(R))
        QT = min(GROUP_THREADS // RT, _pow2(Q))
        PT = GROUP_THREADS // (RT * QT)
        if QT >= Q:
            q_rows = max(Q, 1)
        else:
            q_rows = max(QT, -(-GROUP_ELEMENTS // RT))
            q_rows = -(-q_rows // QT) * QT
        self.tile = (RT, QT)
        self.q_rows, self.nqb, self.nrb = q_rows, max(1, -(-Q // q_rows)), -(-R // RT)
        self.grid = -(-P // PT) * self.nqb * self.nrb
        if self.grid >= 2**31:
            raise ValueError(f"{self.grid} blocks exceed the CUDA grid limit")

    def input(self, dev, x):
        if self.perm is None:
            return dev.contiguous(x).reshape(-1)
        return dev.xp.ascontiguousarray(x.transpose(self.perm)).reshape(-1)

    def output(self, dev, out):
        """Where the apply kernel writes: ``out`` itself when C-contiguous in the
        kernel's order, else a temporary that :meth:`finish` copies back."""
        self._direct = self.perm is None and out.flags.c_contiguous
        return out.reshape(-1) if self._direct else dev.empty((out.size,), out.dtype)

    def finish(self, out, y):
        if self._direct:
            return
        if self.perm is None:
            out[...] = y.reshape(out.shape)
        else:
            out.transpose(self.perm)[...] = y.reshape([out.shape[k] for k in self.perm])

    def tiling(self):
        P, Q, R = self.shape3
        return (np.int64(P), np.int32(Q), np.int32(R), np.int32(self.q_rows),
                np.int32(self.nqb), np.int32(self.nrb), np.int32(self.tile[0]),
                np.int32(self.tile[1]))


def _flat_stats(dev, a, G):
    """A statistics array (given, or an output) as G contiguous values."""
    return None if a is None else dev.contiguous(a).reshape(G)


def _group_op(x, axis, y_out, op, kind, in_a=None, in_b=None, consts=(0.0, 0.0, 0.0),
              out_a=None, out_b=None):
    """Statistics (kind, or None in apply mode) -> coefficients (op) -> y."""
    dev = _device.of(x)
    if x.size == 0:
        return
    tag, acc = TAGS[x.dtype], _acc(x.dtype)
    groups = _Groups(x, axis)
    P, Q, R = groups.shape3
    G = P * R
    xf = groups.input(dev, x)
    tiling = groups.tiling()
    part1 = part2 = None
    if kind is not None:
        part1 = dev.empty((P * groups.nqb * R,), np.float64)
        part2 = None if kind == _STAT_SUMSQ else dev.empty((P * groups.nqb * R,), np.float64)
        dev.launch(MODULE, f"group_stats_{tag}", groups.grid, GROUP_THREADS,
                   (xf, np.int32(kind), *tiling, part1, part2))
    ta = None if out_a is None else dev.target(out_a)
    tb = None if out_b is None else dev.target(out_b)
    shift, scale, offset = (dev.empty((G,), acc) for _ in range(3))
    dev.launch(MODULE, f"group_coefficients_{tag}", -(-G // GROUP_THREADS), GROUP_THREADS,
               (np.int32(op), part1, part2, np.int32(groups.nqb), np.int64(G), np.int32(Q),
                np.int32(R), xf, _flat_stats(dev, in_a, G), _flat_stats(dev, in_b, G),
                *(np.float64(c) for c in consts),
                None if ta is None else ta.reshape(G), None if tb is None else tb.reshape(G),
                shift, scale, offset))
    for o, t in ((out_a, ta), (out_b, tb)):
        if o is not None:
            dev.finish(o, t)
    y = groups.output(dev, y_out)
    dev.launch(MODULE, f"group_apply_{tag}", groups.grid, GROUP_THREADS,
               (xf, y, shift, scale, offset, *tiling))
    groups.finish(y_out, y)


def _group_threshold(dev, threshold, x, axis):
    """An array threshold as one value per group (statistics order), or None."""
    if not isinstance(threshold, dev.xp.ndarray):
        return None
    keepdims = tuple(1 if k in axis else n for k, n in enumerate(x.shape))
    stats = tuple(n for k, n in enumerate(x.shape) if k not in axis)
    return dev.xp.ascontiguousarray(dev.xp.broadcast_to(threshold, keepdims).reshape(stats))


def prox_group_l1(w, threshold, axis, out):
    dev = _device.of(w)
    t = _group_threshold(dev, threshold, w, axis)
    _group_op(w, axis, out, _GROUP_L1, _STAT_SUMSQ, in_a=t,
              consts=(0.0 if t is not None else float(threshold), 0.0, 0.0))


def max_norm(w, max_value, axis, eps, out):
    _group_op(w, axis, out, _MAX_NORM, _STAT_SUMSQ, consts=(max_value, eps, 0.0))


def standardize(x, axis, eps, mean, std, out):
    y, mean_out, std_out = out
    if mean is None:
        _group_op(x, axis, y, _STD_FIT, _STAT_MOMENTS, consts=(eps, 0.0, 0.0), out_a=mean_out,
                  out_b=std_out)
    else:
        _group_op(x, axis, y, _STD_APPLY, None, in_a=mean, in_b=std)


def _tiny_range(dtype):
    """scikit-learn's constant-feature range: 10 * machine epsilon of the dtype."""
    return 10 * float(ml_dtypes.finfo(dtype).eps)


def min_max_scale(x, axis, feature_range, data_min, data_max, out):
    y, min_out, max_out = out
    a, b = feature_range
    consts = (a, b, _tiny_range(x.dtype))
    if data_min is None:
        _group_op(x, axis, y, _MINMAX_FIT, _STAT_MINMAX, consts=consts, out_a=min_out,
                  out_b=max_out)
    else:
        _group_op(x, axis, y, _MINMAX_APPLY, None, in_a=data_min, in_b=data_max, consts=consts)
