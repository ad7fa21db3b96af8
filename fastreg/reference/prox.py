"""Reference proximal operators, optimizer steps, cross-entropy and scaling: the formulas in float64.

Same internal signatures as ``fastreg/cpu/prox.py``. Arguments arrive
validated by ``fastreg.prox``: ``axis`` as a sorted tuple, thresholds as
floats or arrays broadcasting to their target, ``out`` preallocated (possibly
the input itself: results are computed before anything is written).

The optimizer steps take lists of tensors and follow the update rules of
``fastreg.prox``'s docstring line by line, in float64, storing each state in
its own dtype.
"""

import numpy as np

f64 = np.float64


def _f64(a):
    return np.asarray(a, dtype=f64)


def _soft(x, t):
    """sign(x) * max(|x| - t, 0), with +0 inside [-t, t]."""
    return np.where(np.abs(x) > t, x - np.sign(x) * t, 0.0)


# --------------------------------------------------------------------------- elementwise prox

def prox_l1(w, threshold, out):
    out[...] = _soft(_f64(w), _f64(threshold))


def prox_elastic_net(w, l1, l2, out):
    out[...] = _soft(_f64(w), _f64(l1)) / (1.0 + _f64(l2))


# --------------------------------------------------------------------------- group prox

def _group_norms(w, axis):
    w64 = _f64(w)
    return w64, np.sqrt(np.sum(w64 * w64, axis=axis, keepdims=True))


def prox_group_l1(w, threshold, axis, out):
    w64, n = _group_norms(w, axis)
    t = _f64(threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        # n <= t: the group is 0; NaN norms fall through to a NaN scale
        scale = np.where(n <= t, 0.0, 1.0 - t / n)
    out[...] = w64 * scale


def max_norm(w, max_value, axis, eps, out):
    w64, n = _group_norms(w, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(n > max_value, max_value, n) / (n + eps)
    scale = np.where(n + eps == 0, 1.0, scale)   # an all-zero group with eps = 0 stays 0
    out[...] = w64 * scale


# --------------------------------------------------------------------------- optimizer steps

def sgd_step(ws, gs, bufs, lr, momentum, dampening, nesterov, maximize, weight_decay,
             decoupled_weight_decay, l1, first_step):
    for i, (w, g) in enumerate(zip(ws, gs)):
        w64 = _f64(w)
        d = -_f64(g) if maximize else _f64(g)
        if weight_decay != 0:
            d = d + weight_decay * w64
        if momentum != 0:
            b = d.copy() if first_step else _f64(bufs[i]) * momentum + (1.0 - dampening) * d
            bufs[i][...] = b
            d = d + momentum * b if nesterov else b
        w64 = w64 * (1.0 - lr * decoupled_weight_decay) - lr * d
        w[...] = _soft(w64, lr * l1)


def adam_step(ws, gs, ms, vs, vmaxs, step, lr, beta1, beta2, eps, weight_decay, decoupled,
              amsgrad, l1, maximize):
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = np.sqrt(1.0 - beta2 ** step)
    for i, (w, g) in enumerate(zip(ws, gs)):
        w64 = _f64(w)
        d = -_f64(g) if maximize else _f64(g)
        if weight_decay != 0:
            if decoupled:
                w64 = w64 * (1.0 - lr * weight_decay)
            else:
                d = d + weight_decay * w64
        m = beta1 * _f64(ms[i]) + (1.0 - beta1) * d
        v = beta2 * _f64(vs[i]) + (1.0 - beta2) * d * d
        ms[i][...] = m
        vs[i][...] = v
        if amsgrad:
            v = np.maximum(_f64(vmaxs[i]), v)
            vmaxs[i][...] = v
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        w64 = w64 - (lr / bias_correction1) * m / denom
        w[...] = _soft(w64, lr * l1)


# --------------------------------------------------------------------------- cross-entropy

def _smoothing_weights(K, smoothing, style):
    """(on_target, off_target): q = off + on * onehot(t)."""
    if style == "uniform":
        return 1.0 - smoothing, smoothing / K
    off = smoothing / (K - 1) if K > 1 else 0.0
    return 1.0 - smoothing - off, off


def cross_entropy_label_smoothing(logits, target, smoothing, reduction, ignore_index, style,
                                  out):
    loss_out, dlogits = out
    z = _f64(logits)
    N, K = z.shape
    on, off = _smoothing_weights(K, smoothing, style)
    keep = np.ones(N, bool) if ignore_index is None else (target != ignore_index)
    t = np.where(keep, target, 0).astype(np.int64)
    zmax = z.max(axis=1, keepdims=True) if K else np.zeros((N, 1))
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    q = np.full((N, K), off)
    q[np.arange(N), t] += on
    # terms of weight 0 add 0 (not 0 * -inf = NaN for masked logits, as PyTorch)
    with np.errstate(invalid="ignore"):
        qz = np.where(q != 0, q * z, 0.0).sum(axis=1)
    loss = np.where(keep, lse - qz, 0.0)
    p = np.exp(z - lse[:, None])
    n_valid = int(keep.sum())
    if reduction == "mean":
        scale = 1.0 / n_valid if n_valid else 0.0
        loss_out[...] = loss.sum() / n_valid if n_valid else np.nan
    else:
        scale = 1.0
        loss_out[...] = loss.sum() if reduction == "sum" else loss
    dlogits[...] = np.where(keep[:, None], (p - q) * scale, 0.0)


# --------------------------------------------------------------------------- data scaling

def _stats_shape(shape, axis):
    return tuple(n for k, n in enumerate(shape) if k not in axis)


def _keep(a, shape, axis):
    """Statistics of shape x.shape without ``axis`` reshaped to broadcast against x."""
    return _f64(a).reshape(tuple(1 if k in axis else n for k, n in enumerate(shape)))


def constant_features(var, mean, n):
    """scikit-learn's test for a feature indistinguishable from a constant."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


def standardize(x, axis, eps, mean, std, out):
    y, mean_out, std_out = out
    x64 = _f64(x)
    if mean is None:
        n = int(np.prod([x.shape[k] for k in axis]))
        # n == 0 (no features, or nothing to fit: validated before) gives empty statistics
        m = x64.mean(axis=axis, keepdims=True) if n else \
            np.zeros(tuple(1 if k in axis else d for k, d in enumerate(x.shape)))
        var = ((x64 - m) ** 2).mean(axis=axis, keepdims=True) if n else np.zeros_like(m)
        s = np.where(constant_features(var, m, n), 1.0, np.sqrt(var + eps))
        mean_out[...] = m.reshape(mean_out.shape)
        std_out[...] = s.reshape(std_out.shape)
        mean, std = mean_out, std_out
    y[...] = (x64 - _keep(mean, x.shape, axis)) / _keep(std, x.shape, axis)


def min_max_scale(x, axis, feature_range, data_min, data_max, out):
    y, min_out, max_out = out
    x64 = _f64(x)
    if data_min is None:
        min_out[...] = x64.min(axis=axis).reshape(min_out.shape) if x.size else 0
        max_out[...] = x64.max(axis=axis).reshape(max_out.shape) if x.size else 0
        data_min, data_max = min_out, max_out
    lo, hi = _keep(data_min, x.shape, axis), _keep(data_max, x.shape, axis)
    rng = hi - lo
    rng = np.where(rng < 10 * np.finfo(x.dtype).eps, 1.0, rng)
    a, b = feature_range
    y[...] = (x64 - lo) * ((b - a) / rng) + a
