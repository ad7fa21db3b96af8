"""Dropout family on the CPU (Numba), with the reference's signatures.

The kernels are in ``_philox.py`` beside the Philox helpers they call (the
stream contract, the bit layout and the vectorization notes are there).
Elementwise ops view their arrays as 1-D C-order: a non-contiguous input is
copied first and a non-contiguous output written through a temporary,
because the stream index is the C-order index of the logical tensor.

- dropout: one pass, ``y = x * keep * scale`` and the packed keep bits
  (bytes: read x, write y and n/8 of bits). Backward reads the bits (read dy
  and n/8, write dx) or regenerates the words (read dy, write dx).
- Gaussian noise/dropout: one pass; Box-Muller in float64 with vectorized
  fdlibm log and sin/cos kernels (within 1 ulp; libm's scalar calls were
  5.5x slower). Still compute-bound: about 1 ns per element per core.
- DropConnect per batch: the masked, scaled weight in one pass, then BLAS
  (``np.matmul``); backward regenerates it. Per example: fused kernels, one
  Philox word per (sample, weight) read, never a batch of matrices in memory.
- dropout + add + layer norm: one kernel per direction. Forward: a row per
  iteration (the row stays in cache between its passes). Backward: rows in
  groups of 4 as layer norm's backward, the mask of the 4 rows regenerated
  as one stream range.
"""

import math

import numpy as np

from ._common import block_rows, contiguous, finish, param, reduce_blocks, target
from ._philox import (
    _dropout_add_ln_bwd,
    _dropout_add_ln_fwd,
    _dropout_bwd_bits,
    _dropout_fwd,
    _drop_connect_bwd_dw_examples,
    _drop_connect_bwd_dx_examples,
    _drop_connect_fwd_examples,
    _gaussian_fwd,
    _moment_matching,
    _random_bits,
    _unpack_bits,
)
from .random import stream_args

_NO_BITS = np.empty(0, np.uint32)
_ACTIVATION_CODES = {None: 0, "relu": 1, "tanh": 2, "sigmoid": 3}


def _flat(a):
    return contiguous(a).reshape(-1)


# =========================================================================== dropout

def dropout(x, seed, offset, threshold, scale, out):
    y, bits = out
    yt = target(y)
    _dropout_fwd(_flat(x), *stream_args(seed, offset), np.uint64(threshold),
                 x.dtype.type(scale), yt.reshape(-1), _NO_BITS if bits is None else bits)
    finish(y, yt)


def dropout_backward(dy, bits, seed, offset, threshold, scale, out):
    (dx,) = out
    dxt = target(dx)
    if bits is None:    # regenerate: the forward applied to dy
        _dropout_fwd(_flat(dy), *stream_args(seed, offset), np.uint64(threshold),
                     dy.dtype.type(scale), dxt.reshape(-1), _NO_BITS)
    else:
        _dropout_bwd_bits(_flat(dy), bits, dy.dtype.type(scale), dxt.reshape(-1))
    finish(dx, dxt)


def keep_mask(bits, seed, offset, threshold, out):
    if bits is not None:
        keep = np.empty(out.size, np.uint8)
        _unpack_bits(bits, keep)
        out[...] = keep.view(bool).reshape(out.shape)
    elif threshold == 0:
        out[...] = True
    else:
        words = np.empty(out.size, np.uint32)
        _random_bits(*stream_args(seed, offset), words)
        out[...] = (words.astype(np.uint64) >= np.uint64(threshold)).reshape(out.shape)


# =========================================================================== Gaussian

def _gaussian(x, seed, offset, std, multiplicative, y):
    if std == 0.0:
        y[...] = x
        return
    yt = target(y)
    _gaussian_fwd(_flat(x), *stream_args(seed, offset), float(std), multiplicative,
                  yt.reshape(-1))
    finish(y, yt)


def gaussian_noise(x, seed, offset, std, out):
    _gaussian(x, seed, offset, std, False, out[0])


def gaussian_dropout(x, seed, offset, std, out):
    _gaussian(x, seed, offset, std, True, out[0])


# =========================================================================== DropConnect

def _masked_weight(weight, seed, offset, threshold, scale):
    """keep * scale * weight in the weight's dtype, one pass (a fresh array)."""
    wm = np.empty(weight.shape, weight.dtype)
    _dropout_fwd(_flat(weight), *stream_args(seed, offset), np.uint64(threshold),
                 weight.dtype.type(scale), wm.reshape(-1), _NO_BITS)
    return wm


def _lead(x):
    """Rows of an (..., features) array: explicit, since reshape(-1, 0) is ambiguous."""
    return math.prod(x.shape[:-1])


def drop_connect(x, weight, bias, seed, offset, threshold, scale, per_example, out):
    (y,) = out
    O, K = weight.shape
    x2 = contiguous(x).reshape(_lead(x), K)
    yt = target(y)
    y2 = yt.reshape(_lead(x), O)
    if per_example:
        _drop_connect_fwd_examples(x2, contiguous(weight), param(bias, O, x.dtype, 0.0),
                                   *stream_args(seed, offset), np.uint64(threshold),
                                   float(scale), y2)
    else:
        np.matmul(x2, _masked_weight(weight, seed, offset, threshold, scale).T, out=y2)
        if bias is not None:
            y2 += bias
    finish(y, yt)


def drop_connect_backward(dy, x, weight, seed, offset, threshold, scale, per_example, out):
    dx, dweight, dbias = out
    O, K = weight.shape
    x2 = contiguous(x).reshape(_lead(x), K)
    dy2 = contiguous(dy).reshape(_lead(x), O)
    dxt, dwt = target(dx), target(dweight)
    dx2 = dxt.reshape(_lead(x), K)
    if per_example:
        args = (*stream_args(seed, offset), np.uint64(threshold), float(scale))
        _drop_connect_bwd_dx_examples(dy2, contiguous(weight), *args, dx2)
        _drop_connect_bwd_dw_examples(dy2, x2, *args, dwt)
    else:
        np.matmul(dy2, _masked_weight(weight, seed, offset, threshold, scale), out=dx2)
        grad = dy2.T @ x2            # the unmasked weight gradient; masked in one pass
        _dropout_fwd(grad.reshape(-1), *stream_args(seed, offset), np.uint64(threshold),
                     grad.dtype.type(scale), dwt.reshape(-1), _NO_BITS)
    finish(dx, dxt), finish(dweight, dwt)
    dbias[...] = dy2.sum(axis=0, dtype=np.float64)


def drop_connect_inference(x, weight, bias, seed, offset, mean_scale, var_scale, activation,
                           n_samples, out):
    (y,) = out
    O, K = weight.shape
    x2 = contiguous(x).reshape(_lead(x), K).astype(np.float64)
    w = weight.astype(np.float64)
    mean = x2 @ w.T
    mean *= mean_scale
    if bias is not None:
        mean += bias
    x2 *= x2
    w *= w
    var = x2 @ w.T
    var *= var_scale
    yt = target(y)
    _moment_matching(mean.reshape(-1), var.reshape(-1), *stream_args(seed, offset),
                     int(n_samples), _ACTIVATION_CODES[activation], yt.reshape(-1))
    finish(y, yt)


# =========================================================================== dropout + add + LN

def _rows(a, k):
    D = int(math.prod(a.shape[a.ndim - k:]))
    return int(math.prod(a.shape[:a.ndim - k])), D


def _word_aligned_rows(D, elements=8192):
    """Rows per block: a multiple of 32 / gcd(D, 32), so every block's stream range
    starts on a mask word, near ``elements`` elements."""
    r0 = 32 // math.gcd(max(D, 1), 32)
    return r0 * max(1, elements // (r0 * max(D, 1)))


def dropout_add_layer_norm(x, residual, weight, bias, seed, offset, threshold, scale, eps,
                           normalized_ndim, out):
    y, s, mean, rstd, bits = out
    M, D = _rows(x, normalized_ndim)
    yt, st, mt, rt = target(y), target(s), target(mean), target(rstd)
    _dropout_add_ln_fwd(contiguous(x).reshape(M, D), contiguous(residual).reshape(M, D),
                        param(weight, D, x.dtype, 1.0), param(bias, D, x.dtype, 0.0),
                        *stream_args(seed, offset), np.uint64(threshold), x.dtype.type(scale),
                        float(eps), _word_aligned_rows(D), yt.reshape(M, D), st.reshape(M, D),
                        mt.reshape(M), rt.reshape(M), _NO_BITS if bits is None else bits)
    finish(y, yt), finish(s, st), finish(mean, mt), finish(rstd, rt)


def dropout_add_layer_norm_backward(dy, s, mean, rstd, weight, bits, seed, offset, threshold,
                                    scale, dresidual_sum, normalized_ndim, out):
    dx, dresidual, dweight, dbias = out
    M, D = _rows(s, normalized_ndim)
    rows, nb = block_rows(M)
    dw_part = np.empty((nb, D), np.float64)
    db_part = np.empty((nb, D), np.float64)
    dres_in = None if dresidual_sum is None else contiguous(dresidual_sum).reshape(M, D)
    dxt, drt = target(dx), target(dresidual)
    _dropout_add_ln_bwd(contiguous(dy).reshape(M, D), contiguous(s).reshape(M, D),
                        contiguous(mean).reshape(M), contiguous(rstd).reshape(M),
                        param(weight, D, s.dtype, 1.0), dres_in,
                        _NO_BITS if bits is None else bits, *stream_args(seed, offset),
                        np.uint64(threshold), float(scale), rows, dxt.reshape(M, D),
                        drt.reshape(M, D), dw_part, db_part)
    finish(dx, dxt), finish(dresidual, drt)
    reduce_blocks(dw_part, dweight)
    reduce_blocks(db_part, dbias)
