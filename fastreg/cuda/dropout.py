"""The dropout family on a CUDA device (CuPy arrays) or the host emulation (NumPy arrays).

Same function names and signatures as ``fastreg/reference/dropout.py`` and
``fastreg/cpu/dropout.py``; arguments arrive validated by ``fastreg.dropout``.
The kernels are ``kernels/dropout.cu`` (formulas, strategies, rounding,
byte counts in its header); this module holds the launch geometry.

dtypes: float16, bfloat16, float32, float64. Compute type float32 for the
16-bit types, the dtype itself otherwise. Keep decisions depend on the
stream alone (never on the dtype or the geometry). The dropout scale is
``1 / (1 - p)`` rounded to the dtype here, on the host, as the CPU rounds it
(``x.dtype.type(scale)``); ``y = x * scale`` then rounds once to the dtype
(16-bit: the product formed exactly in float32, then rounded), so dropout's
y and the fused op's residual sum equal the CPU and the reference bit for
bit. Inputs that are not C-contiguous are copied first, outputs that are
not are written through a temporary (the mask index is the C-order index).

Geometry:

- elementwise kernels (dropout, its backward, Gaussian noise, the mask
  expansion): ``fastreg.cuda.random.grid`` (8 elements per thread per
  iteration, 256-thread blocks, grid-stride beyond ``MAX_BLOCKS``);
- DropConnect per batch: the masked weight by ``dropout_fwd`` (16-bit
  weights: on a float32 copy, so the product is exact), then
  ``xp.matmul`` (cuBLAS on CuPy, NumPy under the emulation; 16-bit operands
  as float32 copies, the result rounded once), bias added after;
- DropConnect per example: 16 x 16-thread blocks (see the kernel header);
- moment matching: the mean and variance by two float64 GEMMs (as the CPU),
  then one thread per output;
- dropout + add + LN: layer norm's plan (``fastreg/cuda/norm.py``): the
  smallest row group R (32..1024 threads, a power of two) and slot count K
  in ``ROW_KERNELS`` with R * K * N >= D, N = 16 / itemsize; blocks of
  max(R, 128) threads forward, max(R, 256) backward with a grid of
  G = min(row groups, 132 * max(1, 512 // threads)) blocks fixed by the
  shapes (partial rows of dweight/dbias reduced in block order); beyond the
  registers one row per 512-thread block.
"""

from __future__ import annotations

import math

import numpy as np

from . import TAGS, VEC, _device
from . import norm as _norm
from . import random as _random
from .norm import _rows

MODULE = "dropout"

# (K, largest block) of the fused op's register-path instances, as instantiated at
# the end of kernels/dropout.cu (the block bound sets the register budget).
ROW_KERNELS = {
    "fwd": {"f16": ((1, 1024), (2, 512)), "bf16": ((1, 1024), (2, 512)),
            "f32": ((1, 1024), (4, 1024)), "f64": ((1, 1024), (4, 1024))},
    "bwd": {"f16": ((1, 512), (2, 512)), "bf16": ((1, 512), (2, 512)),
            "f32": ((1, 512), (4, 512)), "f64": ((1, 512), (2, 512))},
}
MIN_THREADS = {"fwd": 128, "bwd": 256}
LOOP_THREADS = 512
PARAMS_THREADS = 256
SUM_THREADS = 256
H100_SMS = 132
LOOP_PARTIAL_ROWS = 256
TILE = 16                      # DropConnect per example: 16 x 16-thread blocks
TILE_I = 64                    # backward: 64 columns of the input per block
MOMENT_THREADS = 256

_EXACT = (np.dtype(np.float32), np.dtype(np.float64))
_ACTIVATIONS = {None: 0, "relu": 1, "tanh": 2, "sigmoid": 3}

# Ops of this family without CUDA kernels (fastreg._backend.select refuses them). None.
UNSUPPORTED = frozenset()


def kernel_names():
    """Every kernel in kernels/dropout.cu (the compile checks cover each)."""
    names = list(_random.kernel_names()) + ["keep_mask"]
    for tag in VEC:
        names += [f"dropout_fwd_{tag}", f"dropout_bwd_bits_{tag}", f"gaussian_{tag}",
                  f"drop_connect_examples_fwd_{tag}", f"drop_connect_examples_bwd_{tag}",
                  f"moment_matching_{tag}", f"dropout_add_ln_fwd_{tag}_loop",
                  f"dropout_add_ln_bwd_{tag}_loop", f"dropout_add_ln_bwd_params_{tag}",
                  f"dropout_sum_partials_{tag}"]
        for direction in ("fwd", "bwd"):
            names += [f"dropout_add_ln_{direction}_{tag}_k{k}"
                      for k, _ in ROW_KERNELS[direction][tag]]
    return names


def hot_kernel_names():
    """The kernels that stream the large arrays (no spills allowed)."""
    return [n for n in kernel_names() if not n.startswith(("philox_blocks", "keep_mask",
                                                           "dropout_sum_partials",
                                                           "dropout_add_ln_bwd_params"))]


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _scale(dtype, scale):
    """The keep factor rounded to the dtype (as the CPU), passed in the compute type."""
    return _acc(dtype)(np.dtype(dtype).type(scale))


def _aligned(dev, *arrays):
    return all(a is None or dev.address(a) % 16 == 0 for a in arrays)


def _flat(dev, a):
    return dev.contiguous(a).reshape(-1)


def _stream(seed, offset, threshold):
    return (*_random.stream_args(seed, offset), np.uint64(threshold))


# =========================================================================== dropout

def _mask_pass(dev, x, y, bits, seed, offset, threshold, scale):
    """y = x * keep * scale over flat C-contiguous x, y; bits (or None) gets the keep bits."""
    n = x.size
    if n == 0:
        return
    dev.launch(MODULE, f"dropout_fwd_{TAGS[x.dtype]}", _random.grid(n), _random.THREADS,
               (x, y, bits, np.int64(n), *_stream(seed, offset, threshold),
                _scale(x.dtype, scale), np.int32(_aligned(dev, x, y))))


def dropout(x, seed, offset, threshold, scale, out):
    y, bits = out
    dev = _device.of(x)
    yt = dev.target(y)
    bt = None if bits is None else dev.target(bits)
    _mask_pass(dev, _flat(dev, x), yt.reshape(-1), bt, seed, offset, threshold, scale)
    dev.finish(y, yt)
    if bits is not None:
        dev.finish(bits, bt)


def dropout_backward(dy, bits, seed, offset, threshold, scale, out):
    (dx,) = out
    dev = _device.of(dy)
    dxt = dev.target(dx)
    d, o = _flat(dev, dy), dxt.reshape(-1)
    if bits is None:   # regenerate: the forward applied to dy
        _mask_pass(dev, d, o, None, seed, offset, threshold, scale)
    elif dy.size:
        dev.launch(MODULE, f"dropout_bwd_bits_{TAGS[dy.dtype]}", _random.grid(dy.size),
                   _random.THREADS, (d, dev.contiguous(bits), o, np.int64(dy.size),
                                     _scale(dy.dtype, scale), np.int32(_aligned(dev, d, o))))
    dev.finish(dx, dxt)


def keep_mask(bits, seed, offset, threshold, out):
    dev = _device.of(out)
    if out.size == 0:
        return
    t = dev.target(out)
    dev.launch(MODULE, "keep_mask", _random.grid(out.size), _random.THREADS,
               (None if bits is None else dev.contiguous(bits), t.reshape(-1).view(np.uint8),
                np.int64(out.size), *_stream(seed, offset, threshold)))
    dev.finish(out, t)


# =========================================================================== Gaussian

def _gaussian(x, seed, offset, std, multiplicative, y):
    dev = _device.of(x)
    if std == 0.0:
        y[...] = x
        return
    if x.size == 0:
        return
    xc, yt = _flat(dev, x), dev.target(y)
    o = yt.reshape(-1)
    dev.launch(MODULE, f"gaussian_{TAGS[x.dtype]}", _random.grid(x.size), _random.THREADS,
               (xc, o, np.int64(x.size), *_random.stream_args(seed, offset), np.float64(std),
                np.int32(multiplicative), np.int32(_aligned(dev, xc, o))))
    dev.finish(y, yt)


def gaussian_noise(x, seed, offset, std, out):
    _gaussian(x, seed, offset, std, False, out[0])


def gaussian_dropout(x, seed, offset, std, out):
    _gaussian(x, seed, offset, std, True, out[0])


# =========================================================================== DropConnect

def _masked_weight(dev, weight, seed, offset, threshold, scale):
    """keep * scale * weight, one pass: in the dtype for float32/float64, in float32
    (exact products) for 16-bit weights, ready for the GEMM."""
    w = dev.contiguous(weight)
    if w.dtype not in _EXACT:
        scale = float(np.dtype(w.dtype).type(scale))   # the dtype's factor, exact in float32
        w = w.astype(np.float32)
    wm = dev.empty(w.shape, w.dtype)
    _mask_pass(dev, w.reshape(-1), wm.reshape(-1), None, seed, offset, threshold, scale)
    return wm


def _gemm_operand(a):
    return a if a.dtype in _EXACT else a.astype(np.float32)


def _store(dev, dst, src):
    """dst[...] = src (rounded to dst's dtype), or nothing if they are the same array."""
    if src is not dst:
        dst[...] = src


def _lead(x):
    """Rows of an (..., features) array: explicit, since reshape(-1, 0) is ambiguous."""
    return math.prod(x.shape[:-1])


def drop_connect(x, weight, bias, seed, offset, threshold, scale, per_example, out):
    (y,) = out
    dev = _device.of(x)
    O, K = weight.shape
    x2 = dev.contiguous(x).reshape(_lead(x), K)
    N = x2.shape[0]
    if N == 0 or O == 0:
        return
    yt = dev.target(y)
    y2 = yt.reshape(N, O)
    if per_example:
        tag = TAGS[x.dtype]
        dev.launch(MODULE, f"drop_connect_examples_fwd_{tag}", (-(-N // TILE), -(-O // TILE)),
                   (TILE, TILE),
                   (x2, dev.contiguous(weight), None if bias is None else dev.contiguous(bias),
                    y2, np.int32(N), np.int32(O), np.int32(K), *_stream(seed, offset, threshold),
                    _scale(x.dtype, scale)))
    else:
        wm = _masked_weight(dev, weight, seed, offset, threshold, scale)
        exact = x.dtype in _EXACT
        acc = y2 if exact else dev.empty((N, O), np.float32)
        dev.xp.matmul(_gemm_operand(x2), wm.T, out=acc)
        if bias is not None:
            acc += _gemm_operand(bias)
        _store(dev, y2, acc)
    dev.finish(y, yt)


def drop_connect_backward(dy, x, weight, seed, offset, threshold, scale, per_example, out):
    dx, dweight, dbias = out
    dev = _device.of(x)
    O, K = weight.shape
    x2 = dev.contiguous(x).reshape(_lead(x), K)
    N = x2.shape[0]
    dy2 = dev.contiguous(dy).reshape(N, O)
    dxt, dwt = dev.target(dx), dev.target(dweight)
    dx2 = dxt.reshape(N, K)
    if per_example:
        tag, args = TAGS[x.dtype], (*_stream(seed, offset, threshold), _scale(x.dtype, scale))
        if N and K:
            dev.launch(MODULE, f"drop_connect_examples_bwd_{tag}", (-(-K // TILE_I), -(-N // TILE)),
                       (TILE, TILE), (dy2, dev.contiguous(weight), dx2, np.int32(N), np.int32(O),
                                      np.int32(K), np.int64(O), np.int64(1), *args))
        if O and K:
            dev.launch(MODULE, f"drop_connect_examples_bwd_{tag}", (-(-K // TILE_I), -(-O // TILE)),
                       (TILE, TILE), (dy2, x2, dwt, np.int32(O), np.int32(N), np.int32(K),
                                      np.int64(1), np.int64(O), *args))
    else:
        exact = x.dtype in _EXACT
        wm = _masked_weight(dev, weight, seed, offset, threshold, scale)
        g, a = _gemm_operand(dy2), _gemm_operand(x2)
        if exact:
            dev.xp.matmul(g, wm, out=dx2)
        else:
            dx2[...] = dev.xp.matmul(g, wm)
        grad = g.T @ a                 # the unmasked weight gradient, masked in one pass
        if exact:
            _mask_pass(dev, grad.reshape(-1), dwt.reshape(-1), None, seed, offset, threshold,
                       scale)
        else:
            gm = dev.empty(grad.shape, np.float32)
            _mask_pass(dev, grad.reshape(-1), gm.reshape(-1), None, seed, offset, threshold,
                       float(np.dtype(x.dtype).type(scale)))
            dwt[...] = gm
    dev.finish(dx, dxt)
    dev.finish(dweight, dwt)
    dbias[...] = dy2.sum(axis=0, dtype=np.float64)


def drop_connect_inference(x, weight, bias, seed, offset, mean_scale, var_scale, activation,
                           n_samples, out):
    (y,) = out
    dev = _device.of(x)
    O, K = weight.shape
    x2 = dev.contiguous(x).reshape(_lead(x), K).astype(np.float64)
    R = x2.shape[0] * O
    if R == 0:
        return
    w = weight.astype(np.float64)
    mean = x2 @ w.T
    mean *= mean_scale
    if bias is not None:
        mean += bias.astype(np.float64)
    x2 *= x2
    w *= w
    var = x2 @ w.T
    var *= var_scale
    yt = dev.target(y)
    dev.launch(MODULE, f"moment_matching_{TAGS[x.dtype]}",
               max(1, min(-(-R // MOMENT_THREADS), _random.MAX_BLOCKS)), MOMENT_THREADS,
               (mean.reshape(-1), var.reshape(-1), yt.reshape(-1), np.int64(R),
                np.int32(n_samples), *_random.stream_args(seed, offset),
                np.int32(_ACTIVATIONS[activation])))
    dev.finish(y, yt)


# =========================================================================== dropout + add + LN

def row_plan(direction, tag, D):
    """(R, K, max_threads) of the fused op's register path (the row kernels' rule,
    over this module's instances), or None (loop path)."""
    return _norm.row_plan(direction, tag, D, ROW_KERNELS)


def backward_blocks(row_groups, threads):
    """Grid of the fused op's register-path backward (the row kernels' rule)."""
    return _norm.backward_blocks(row_groups, threads, H100_SMS)


def _param(dev, a, D):
    return None if a is None else dev.contiguous(a).reshape(D)


def dropout_add_layer_norm(x, residual, weight, bias, seed, offset, threshold, scale, eps,
                           normalized_ndim, out):
    y, s, mean, rstd, bits = out
    dev = _device.of(x)
    M, D = _rows(x, normalized_ndim)
    if M == 0:
        return
    tag, acc = TAGS[x.dtype], _acc(x.dtype)
    xc, rc = dev.contiguous(x).reshape(M, D), dev.contiguous(residual).reshape(M, D)
    w, b = _param(dev, weight, D), _param(dev, bias, D)
    yt, st, mt, rt = dev.target(y), dev.target(s), dev.target(mean), dev.target(rstd)
    bt = None if bits is None else dev.target(bits)
    vec = D % VEC[tag] == 0 and _aligned(dev, xc, rc, yt, st, w, b)
    plan = row_plan("fwd", tag, D)
    if plan is not None:
        R, K, _ = plan
        threads = max(R, MIN_THREADS["fwd"])
        name, grid = f"dropout_add_ln_fwd_{tag}_k{K}", -(-M // (threads // R))
    else:
        R, threads, name, grid = 0, LOOP_THREADS, f"dropout_add_ln_fwd_{tag}_loop", M
    dev.launch(MODULE, name, grid, threads,
               (xc, rc, w, b, yt, st, mt, rt, bt, np.int32(M), np.int32(D), acc(eps), np.int32(R),
                np.int32(vec), *_stream(seed, offset, threshold), _scale(x.dtype, scale)))
    for o, t in ((y, yt), (s, st), (mean, mt), (rstd, rt), (bits, bt)):
        if o is not None:
            dev.finish(o, t)


def dropout_add_layer_norm_backward(dy, s, mean, rstd, weight, bits, seed, offset, threshold,
                                    scale, dresidual_sum, normalized_ndim, out):
    dx, dresidual, dweight, dbias = out
    dev = _device.of(s)
    M, D = _rows(s, normalized_ndim)
    if M == 0 or D == 0:
        for g in (dweight, dbias):   # sums over no rows are 0; with D = 0 they are empty
            if g is not None:
                g[...] = 0
        return
    tag, acc = TAGS[s.dtype], _acc(s.dtype)
    sc, dyc = dev.contiguous(s).reshape(M, D), dev.contiguous(dy).reshape(M, D)
    mc, rc = dev.contiguous(mean).reshape(M), dev.contiguous(rstd).reshape(M)
    w = _param(dev, weight, D)
    din = None if dresidual_sum is None else dev.contiguous(dresidual_sum).reshape(M, D)
    bc = None if bits is None else dev.contiguous(bits)
    dxt, drt = dev.target(dx), dev.target(dresidual)
    vec = D % VEC[tag] == 0 and _aligned(dev, sc, dyc, dxt, drt, w, din)
    wanted = [g for g in (dweight, dbias) if g is not None]
    stream = (*_stream(seed, offset, threshold), acc(scale))
    plan = row_plan("bwd", tag, D)
    if plan is not None:
        R, K, _ = plan
        threads = max(R, MIN_THREADS["bwd"])
        groups = threads // R
        G = backward_blocks(-(-M // groups), threads)
        parts = [dev.empty((G, D), acc) if g is not None else None for g in (dweight, dbias)]
        shared = groups * D * np.dtype(acc).itemsize if groups > 1 and wanted else 0
        dev.launch(MODULE, f"dropout_add_ln_bwd_{tag}_k{K}", G, threads,
                   (dyc, sc, mc, rc, w, din, bc, dxt, drt, parts[0], parts[1], np.int32(M),
                    np.int32(D), np.int32(R), np.int32(vec), *stream), shared_mem=shared)
    else:
        dev.launch(MODULE, f"dropout_add_ln_bwd_{tag}_loop", M, LOOP_THREADS,
                   (dyc, sc, mc, rc, w, din, bc, dxt, drt, None, None, np.int32(M), np.int32(D),
                    np.int32(0), np.int32(vec), *stream))
        rows_per_part = -(-M // LOOP_PARTIAL_ROWS)
        G = -(-M // rows_per_part)
        parts = [dev.empty((G, D), acc) if g is not None else None for g in (dweight, dbias)]
        if wanted:
            dev.launch(MODULE, f"dropout_add_ln_bwd_params_{tag}", (-(-D // PARAMS_THREADS), G),
                       PARAMS_THREADS,
                       (dyc, sc, mc, rc, None, None, None, None, None, parts[0], parts[1],
                        np.int32(M), np.int32(D), np.int32(rows_per_part), np.int32(0), *stream))
    dev.finish(dx, dxt)
    dev.finish(dresidual, drt)
    for g, part in zip((dweight, dbias), parts):
        if g is None:
            continue
        gt = dev.target(g)
        dev.launch(MODULE, f"dropout_sum_partials_{tag}", -(-D // SUM_THREADS), SUM_THREADS,
                   (part, np.int32(G), np.int32(D), gt.reshape(D)))
        dev.finish(g, gt)

