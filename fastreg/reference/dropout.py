"""Reference dropout family: the formulas in NumPy, on the stream of ``reference/random.py``.

Same internal signatures as ``fastreg/cpu/dropout.py``; each function writes
into its preallocated outputs (validated by ``fastreg.dropout``).

Rounding, so that the CPU kernels can match bit for bit where they promise to:
dropout is ``x * m`` in x's dtype with ``m = scale`` (rounded to the dtype) or
0; the fused residual sum is ``x * m + residual``, two roundings in the dtype.
Noise is formed in float64 and the result rounded once. Everything with a
reduction (layer norm, DropConnect, moment matching) is float64 throughout.
"""

import math

import numpy as np

from . import norm as _norm
from .random import keep_mask as _keep_mask
from .random import normal_values


def _factor(keep, scale, dtype):
    """Per-element factor ``scale`` (kept) or 0 (dropped), in ``dtype``."""
    return np.where(keep, dtype.type(scale), dtype.type(0))


def _keep(seed, offset, shape, threshold):
    if threshold == 0:          # keeps everything (inference, p = 0): nothing to draw
        return np.ones(shape, bool)
    return _keep_mask(seed, offset, shape, threshold)


def pack_bits(keep):
    """1 bit per element, LSB first, in uint32 words (bits past the end are 0)."""
    flat = np.ascontiguousarray(keep).reshape(-1)
    nwords = (flat.size + 31) // 32
    packed = np.zeros(4 * nwords, np.uint8)
    packed[:(flat.size + 7) // 8] = np.packbits(flat, bitorder="little")
    return packed.view("<u4").astype(np.uint32)


def unpack_bits(bits, shape):
    size = int(np.prod(shape))
    flat = np.unpackbits(bits.astype("<u4").view(np.uint8), count=size, bitorder="little")
    return flat.astype(bool).reshape(shape)


# =========================================================================== dropout

def dropout(x, seed, offset, threshold, scale, out):
    y, bits = out
    keep = _keep(seed, offset, x.shape, threshold)
    with np.errstate(invalid="ignore"):      # a dropped Inf is Inf * 0 = NaN, as PyTorch
        y[...] = x * _factor(keep, scale, x.dtype)
    if bits is not None:
        bits[...] = pack_bits(keep)


def dropout_backward(dy, bits, seed, offset, threshold, scale, out):
    (dx,) = out
    keep = unpack_bits(bits, dy.shape) if bits is not None else \
        _keep(seed, offset, dy.shape, threshold)
    with np.errstate(invalid="ignore"):
        dx[...] = dy * _factor(keep, scale, dy.dtype)


def keep_mask(bits, seed, offset, threshold, out):
    out[...] = unpack_bits(bits, out.shape) if bits is not None else \
        _keep(seed, offset, out.shape, threshold)


# =========================================================================== Gaussian

def gaussian_noise(x, seed, offset, std, out):
    (y,) = out
    if std == 0.0:
        y[...] = x
        return
    z = normal_values(seed, offset, x.size).reshape(x.shape)
    y[...] = x.astype(np.float64) + std * z


def gaussian_dropout(x, seed, offset, std, out):
    (y,) = out
    if std == 0.0:
        y[...] = x
        return
    z = normal_values(seed, offset, x.size).reshape(x.shape)
    y[...] = x.astype(np.float64) * (1.0 + std * z)


# =========================================================================== DropConnect

def _masked_weights(weight, seed, offset, threshold, scale, batch):
    """keep * scale * weight in float64: (out, in), or batch + (out, in)."""
    shape = tuple(batch) + weight.shape
    keep = _keep(seed, offset, shape, threshold)
    return np.where(keep, scale, 0.0) * weight.astype(np.float64)


def _bias64(bias, n):
    return np.zeros(n) if bias is None else bias.astype(np.float64)


def _lead(x):
    """Rows of an (..., features) array: explicit, since reshape(-1, 0) is ambiguous."""
    return math.prod(x.shape[:-1])


def drop_connect(x, weight, bias, seed, offset, threshold, scale, per_example, out):
    (y,) = out
    O, K = weight.shape
    x2 = x.astype(np.float64).reshape(_lead(x), K)
    if per_example:
        wm = _masked_weights(weight, seed, offset, threshold, scale, (x2.shape[0],))
        y2 = np.einsum("noi,ni->no", wm, x2)        # N masked matrices, one per sample
    else:
        wm = _masked_weights(weight, seed, offset, threshold, scale, ())
        y2 = x2 @ wm.T
    y[...] = (y2 + _bias64(bias, O)).reshape(y.shape)


def drop_connect_backward(dy, x, weight, seed, offset, threshold, scale, per_example, out):
    dx, dweight, dbias = out
    O, K = weight.shape
    x2 = x.astype(np.float64).reshape(_lead(x), K)
    dy2 = dy.astype(np.float64).reshape(_lead(x), O)
    if per_example:
        wm = _masked_weights(weight, seed, offset, threshold, scale, (x2.shape[0],))
        m = np.where(_keep(seed, offset, (x2.shape[0], O, K), threshold), scale, 0.0)
        dx[...] = np.einsum("no,noi->ni", dy2, wm).reshape(dx.shape)
        dweight[...] = np.einsum("no,ni,noi->oi", dy2, x2, m)
    else:
        wm = _masked_weights(weight, seed, offset, threshold, scale, ())
        m = np.where(_keep(seed, offset, (O, K), threshold), scale, 0.0)
        dx[...] = (dy2 @ wm).reshape(dx.shape)
        dweight[...] = m * (dy2.T @ x2)
    dbias[...] = dy2.sum(axis=0)


_ACTIVATIONS = {
    None: lambda u: u,
    "relu": lambda u: np.maximum(u, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda u: 1.0 / (1.0 + np.exp(-u)),
}


def drop_connect_inference(x, weight, bias, seed, offset, mean_scale, var_scale, activation,
                           n_samples, out):
    (y,) = out
    O, K = weight.shape
    x2 = x.astype(np.float64).reshape(_lead(x), K)
    w = weight.astype(np.float64)
    mean = mean_scale * (x2 @ w.T) + _bias64(bias, O)
    var = var_scale * ((x2 * x2) @ (w * w).T)
    z = normal_values(seed, offset, mean.size * n_samples).reshape(*mean.shape, n_samples)
    u = mean[..., None] + np.sqrt(var)[..., None] * z
    y[...] = _ACTIVATIONS[activation](u).mean(axis=-1).reshape(y.shape)


# ====================================================================== fused dropout + add + LN

def dropout_add_layer_norm(x, residual, weight, bias, seed, offset, threshold, scale, eps,
                           normalized_ndim, out):
    y, s, mean, rstd, bits = out
    keep = _keep(seed, offset, x.shape, threshold)
    s[...] = x * _factor(keep, scale, x.dtype) + residual
    _norm.layer_norm(s, weight, bias, eps, normalized_ndim, [y, mean, rstd])
    if bits is not None:
        bits[...] = pack_bits(keep)


def dropout_add_layer_norm_backward(dy, s, mean, rstd, weight, bits, seed, offset, threshold,
                                    scale, dresidual_sum, normalized_ndim, out):
    dx, dresidual, dweight, dbias = out
    ds = np.empty(s.shape, np.float64)
    _norm.layer_norm_backward(dy, s, mean, rstd, weight, normalized_ndim, [ds, dweight, dbias])
    if dresidual_sum is not None:
        ds += dresidual_sum
    keep = unpack_bits(bits, s.shape) if bits is not None else \
        _keep(seed, offset, s.shape, threshold)
    dresidual[...] = ds
    dx[...] = ds * np.where(keep, scale, 0.0)
