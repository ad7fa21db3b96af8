"""Reference normalization: the formulas, in float64, over explicit axes.

Same internal signatures as ``fastreg/cpu/norm.py``: each function writes into
the preallocated ``out`` list (validated by ``fastreg.norm``). Batch and group
norm return the biased variance of each normalized set (float64), from which
``fastreg.norm`` updates running statistics.

Statistics of an empty set are mean 0 and variance 0.
"""

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _moments(x, axes):
    """Mean and biased variance over ``axes`` (two passes), kept dims."""
    n = int(np.prod([x.shape[a] for a in axes]))
    mean = x.sum(axis=axes, keepdims=True) / max(n, 1)
    var = ((x - mean) ** 2).sum(axis=axes, keepdims=True) / max(n, 1)
    return mean, var, n


def _input_grad(g, xhat, rstd, axes, n):
    """rstd * (g - mean(g) - xhat * mean(g * xhat)), means over ``axes``."""
    n = max(n, 1)
    mean_g = g.sum(axis=axes, keepdims=True) / n
    mean_gx = (g * xhat).sum(axis=axes, keepdims=True) / n
    return rstd * (g - mean_g - xhat * mean_gx)


def _rows(x, k):
    """View x as (M, D): M the batch positions, D the normalized size."""
    D = int(np.prod(x.shape[x.ndim - k:]))
    M = int(np.prod(x.shape[:x.ndim - k]))
    return np.asarray(x, dtype=np.float64).reshape(M, D), M, D


# --------------------------------------------------------------------------- layer norm

def layer_norm(x, weight, bias, eps, normalized_ndim, out):
    y, mean_out, rstd_out = out
    xr, M, D = _rows(x, normalized_ndim)
    mean, var, _ = _moments(xr, (1,))
    rstd = 1.0 / np.sqrt(var + eps)
    yr = (xr - mean) * rstd
    if weight is not None:
        yr = yr * _f64(weight).reshape(1, D)
    if bias is not None:
        yr = yr + _f64(bias).reshape(1, D)
    y[...] = yr.reshape(x.shape)
    mean_out[...] = mean.reshape(mean_out.shape)
    rstd_out[...] = rstd.reshape(rstd_out.shape)


def layer_norm_backward(dy, x, mean, rstd, weight, normalized_ndim, out):
    dx, dweight, dbias = out
    xr, M, D = _rows(x, normalized_ndim)
    dyr, _, _ = _rows(dy, normalized_ndim)
    m, r = _f64(mean).reshape(M, 1), _f64(rstd).reshape(M, 1)
    xhat = (xr - m) * r
    g = dyr if weight is None else dyr * _f64(weight).reshape(1, D)
    dx[...] = _input_grad(g, xhat, r, (1,), D).reshape(x.shape)
    if dweight is not None:
        dweight[...] = (dyr * xhat).sum(axis=0).reshape(dweight.shape)
    if dbias is not None:
        dbias[...] = dyr.sum(axis=0).reshape(dbias.shape)


# --------------------------------------------------------------------------- RMS norm

def rms_norm(x, weight, eps, normalized_ndim, out):
    y, rstd_out = out
    xr, M, D = _rows(x, normalized_ndim)
    rstd = 1.0 / np.sqrt((xr * xr).sum(axis=1, keepdims=True) / max(D, 1) + eps)
    yr = xr * rstd
    if weight is not None:
        yr = yr * _f64(weight).reshape(1, D)
    y[...] = yr.reshape(x.shape)
    rstd_out[...] = rstd.reshape(rstd_out.shape)


def rms_norm_backward(dy, x, rstd, weight, normalized_ndim, out):
    dx, dweight = out
    xr, M, D = _rows(x, normalized_ndim)
    dyr, _, _ = _rows(dy, normalized_ndim)
    r = _f64(rstd).reshape(M, 1)
    xhat = xr * r
    g = dyr if weight is None else dyr * _f64(weight).reshape(1, D)
    mean_gx = (g * xhat).sum(axis=1, keepdims=True) / max(D, 1)
    dx[...] = (r * (g - xhat * mean_gx)).reshape(x.shape)
    if dweight is not None:
        dweight[...] = (dyr * xhat).sum(axis=0).reshape(dweight.shape)


# --------------------------------------------------------------------------- batch norm

def _channels(a, axis):
    """View a as (A, C, B): the channel axis in the middle."""
    s = a.shape
    A, B = int(np.prod(s[:axis])), int(np.prod(s[axis + 1:]))
    return np.asarray(a, dtype=np.float64).reshape(A, s[axis], B)


def batch_norm(x, weight, bias, eps, axis, activation, training, out):
    y, mean_out, rstd_out = out
    C = x.shape[axis]
    x3 = _channels(x, axis)
    var = None
    if training:
        mean, var, _ = _moments(x3, (0, 2))
        rstd = 1.0 / np.sqrt(var + eps)
        mean_out[...] = mean.reshape(C)
        rstd_out[...] = rstd.reshape(C)
        var = var.reshape(C)
    else:  # the statistics were filled in by the caller from the running ones
        mean, rstd = _f64(mean_out).reshape(1, C, 1), _f64(rstd_out).reshape(1, C, 1)
    y3 = (x3 - mean) * rstd
    if weight is not None:
        y3 = y3 * _f64(weight).reshape(1, C, 1)
    if bias is not None:
        y3 = y3 + _f64(bias).reshape(1, C, 1)
    if activation == "relu":
        y3 = np.maximum(y3, 0.0)
    y[...] = y3.reshape(x.shape)
    return var


def batch_norm_backward(dy, x, mean, rstd, weight, training, axis, y, out):
    dx, dweight, dbias = out
    C = x.shape[axis]
    x3, dz = _channels(x, axis), _channels(dy, axis)
    if y is not None:  # fused ReLU: the gradient passes where the output was positive
        dz = dz * (_channels(y, axis) > 0)
    m, r = _f64(mean).reshape(1, C, 1), _f64(rstd).reshape(1, C, 1)
    xhat = (x3 - m) * r
    w = np.ones((1, C, 1)) if weight is None else _f64(weight).reshape(1, C, 1)
    if training:
        g = dz * w
        dx3 = _input_grad(g, xhat, r, (0, 2), x3.shape[0] * x3.shape[2])
    else:
        dx3 = dz * w * r
    dx[...] = dx3.reshape(x.shape)
    if dweight is not None:
        dweight[...] = (dz * xhat).sum(axis=(0, 2))
    if dbias is not None:
        dbias[...] = dz.sum(axis=(0, 2))


# --------------------------------------------------------------------------- group norm

def _groups(a, G, axis):
    """View a as (N, G, Cg, S) (axis=1) or (N, S, G, Cg) (axis=-1); reduce axes; param shape."""
    N, C = a.shape[0], a.shape[axis]
    a = np.asarray(a, dtype=np.float64)
    if axis == 1:
        S = int(np.prod(a.shape[2:]))
        return a.reshape(N, G, C // G, S), (2, 3), (1, G, C // G, 1)
    S = int(np.prod(a.shape[1:-1]))
    return a.reshape(N, S, G, C // G), (1, 3), (1, 1, G, C // G)


def group_norm(x, G, weight, bias, eps, axis, out):
    y, mean_out, rstd_out = out
    N = x.shape[0]
    xg, axes, pshape = _groups(x, G, axis)
    mean, var, _ = _moments(xg, axes)
    rstd = 1.0 / np.sqrt(var + eps)
    yg = (xg - mean) * rstd
    if weight is not None:
        yg = yg * _f64(weight).reshape(pshape)
    if bias is not None:
        yg = yg + _f64(bias).reshape(pshape)
    y[...] = yg.reshape(x.shape)
    mean_out[...] = mean.reshape(N, G)
    rstd_out[...] = rstd.reshape(N, G)
    return var.reshape(N, G)


def group_norm_backward(dy, x, mean, rstd, G, weight, axis, out):
    dx, dweight, dbias = out
    xg, axes, pshape = _groups(x, G, axis)
    dyg, _, _ = _groups(dy, G, axis)
    stat_shape = [1, 1, 1, 1]
    stat_shape[0] = x.shape[0]
    stat_shape[1 if axis == 1 else 2] = G
    m, r = _f64(mean).reshape(stat_shape), _f64(rstd).reshape(stat_shape)
    xhat = (xg - m) * r
    g = dyg if weight is None else dyg * _f64(weight).reshape(pshape)
    n = xg.shape[axes[0]] * xg.shape[axes[1]]
    dx[...] = _input_grad(g, xhat, r, axes, n).reshape(x.shape)
    other = (0, 3) if axis == 1 else (0, 1)
    if dweight is not None:
        dweight[...] = (dyg * xhat).sum(axis=other).reshape(-1)
    if dbias is not None:
        dbias[...] = dyg.sum(axis=other).reshape(-1)


# --------------------------------------------------------------------------- batch norm, split
# The steps of a batch norm whose batch is spread over processes: local
# partials, their merge, and the apply steps (fastreg.distributed). The
# forward apply step is batch_norm above with training=False.

def batch_norm_stats(x, axis, out):
    count, mean_out, m2_out = out
    C = x.shape[axis]
    x3 = _channels(x, axis)
    mean, var, n = _moments(x3, (0, 2))
    count[...] = n
    mean_out[...] = mean.reshape(C)
    m2_out[...] = (var * n).reshape(C)


def batch_norm_combine(counts, means, m2s, out):
    """Chan et al.'s pairwise merge, one rank at a time in rank order; ranks
    with count 0 are skipped (their mean and M2 are not looked at)."""
    count, mean_out, var_out = out
    counts, means, m2s = _f64(counts), _f64(means), _f64(m2s)
    C = counts.shape[1]
    n, mean, m2 = np.zeros(C), np.zeros(C), np.zeros(C)
    for nb, mb, m2b in zip(counts, means, m2s):
        take = nb > 0
        tot = n + nb
        frac = np.divide(nb, tot, out=np.zeros(C), where=take)
        delta = np.where(take, mb - mean, 0.0)
        mean = mean + delta * frac
        m2 = m2 + np.where(take, m2b + delta * delta * n * frac, 0.0)
        n = tot
    count[...] = n
    mean_out[...] = mean
    var_out[...] = np.divide(m2, n, out=np.zeros(C), where=n > 0)


def batch_norm_backward_reduce(dy, x, mean, rstd, axis, y, out):
    sum_dy, sum_dy_xhat = out
    C = x.shape[axis]
    x3, dz = _channels(x, axis), _channels(dy, axis)
    if y is not None:
        dz = dz * (_channels(y, axis) > 0)
    xhat = (x3 - _f64(mean).reshape(1, C, 1)) * _f64(rstd).reshape(1, C, 1)
    sum_dy[...] = dz.sum(axis=(0, 2))
    sum_dy_xhat[...] = (dz * xhat).sum(axis=(0, 2))


def batch_norm_backward_apply(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training,
                              axis, y, out):
    (dx,) = out
    C = x.shape[axis]
    x3, dz = _channels(x, axis), _channels(dy, axis)
    if y is not None:
        dz = dz * (_channels(y, axis) > 0)
    r = _f64(rstd).reshape(1, C, 1)
    w = np.ones((1, C, 1)) if weight is None else _f64(weight).reshape(1, C, 1)
    if training:
        n = max(count, 1)
        xhat = (x3 - _f64(mean).reshape(1, C, 1)) * r
        dx3 = w * r * (dz - _f64(sum_dy).reshape(1, C, 1) / n
                       - xhat * _f64(sum_dy_xhat).reshape(1, C, 1) / n)
    else:
        dx3 = dz * w * r
    dx[...] = dx3.reshape(x.shape)
