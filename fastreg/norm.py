"""Normalization layers: layer, RMS, batch, group and instance norm, forward and backward.

Each public function validates its arguments (``fastreg._checks``), picks the
implementation (``fastreg._backend``) and returns. Forward functions return the
output and the statistics the backward needs; backward functions take them
back explicitly, as PyTorch's ``native_*`` ops do.

Conventions shared by every function here:

- Statistics (mean, rstd) are float32 for float16, bfloat16 and float32
  input and float64 for float64 input; accumulation is in float64 on the CPU
  and in float32 (float64 for float64) in the CUDA kernels.
- Backends: NumPy arrays run the Numba kernels ("cpu") or the NumPy reference
  ("reference"); CuPy arrays run the CUDA kernels ("cuda"), which also accept
  float16 and bfloat16 (``ml_dtypes.bfloat16``); "cuda_emulator" runs those
  CUDA kernels on NumPy arrays under a host emulation. Every function here,
  the split batch-norm steps included, has CUDA kernels.
- The split batch-norm steps (``batch_norm_stats`` and the rest, for batches
  spread over processes) keep their per-channel partials and statistics in
  float64 for every input dtype: they are exchanged and merged, see
  ``batch_norm_stats``.
- ``out=`` is a tuple shaped like the returns; entries left None are
  allocated. Reusing buffers avoids the page faults of fresh outputs. A
  fresh NumPy output of 32 MiB or more starts on a 2 MiB boundary, so that
  all of it can be faulted in as transparent huge pages (its ``base`` is the
  allocation it was cut from).
- Inputs are never modified; ``running_mean``/``running_var`` are updated in
  place in training, as documented.
- Statistics of an empty set are mean 0 and variance 0 (rstd = 1/sqrt(eps));
  running statistics are left untouched by an empty batch.
- Results are bitwise identical run to run and at any thread count.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _checks

__all__ = [
    "layer_norm", "layer_norm_backward",
    "rms_norm", "rms_norm_backward",
    "batch_norm", "batch_norm_backward",
    "batch_norm_stats", "batch_norm_combine", "batch_norm_apply",
    "batch_norm_backward_reduce", "batch_norm_backward_apply",
    "group_norm", "group_norm_backward",
    "instance_norm", "instance_norm_backward",
]

_ACTIVATIONS = (None, "relu")


def _stats_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _setup(caller, backend, x, min_ndim=1, **others):
    """Validate x and pick the implementation; returns (impl, x.dtype)."""
    _checks.same_kind(caller, x=x, **others)
    impl, dtypes = _backend.dtypes("norm", x, *others.values(), backend=backend, caller=caller)
    _checks.array("x", x, caller=caller, dtypes=dtypes, min_ndim=min_ndim)
    return impl


def _check_dy(caller, dy, x):
    _checks.like("dy", dy, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)


def _normalized_ndim(caller, normalized_ndim, x):
    k = _checks.integer("normalized_ndim", normalized_ndim, caller=caller, ge=1)
    if k > x.ndim:
        raise ValueError(f"{caller}: 'normalized_ndim' must be <= x.ndim = {x.ndim}, got {k}.")
    return k


def _channel_axis(caller, axis, x, *, first_or_last=False):
    a = _checks.axis("axis", axis, caller=caller, ndim=x.ndim)
    if first_or_last and a not in (1, x.ndim - 1):
        raise ValueError(f"{caller}: 'axis' must be 1 (channels first) or -1 (channels last), "
                         f"got {axis!r}.")
    return a


# --------------------------------------------------------------------------- layer norm

def layer_norm(x, weight=None, bias=None, eps=1e-5, *, normalized_ndim=1, out=None,
               backend=None):
    """Layer normalization over the trailing ``normalized_ndim`` axes.

    ``y = (x - mean) * rstd * weight + bias``, ``rstd = 1 / sqrt(var + eps)``,
    with the biased variance over the normalized axes (Ba et al., 2016).

    Parameters
    ----------
    x : ndarray, shape ``(*batch, *normalized)``: float32 or float64 (CUDA
        backends: also float16 and bfloat16)
    weight, bias : ndarray of shape ``normalized`` and x's dtype, or None
    eps : float > 0
    normalized_ndim : int, how many trailing axes are normalized
    out : tuple ``(y, mean, rstd)`` of preallocated outputs (entries may be None)
    backend : None, "cpu", "reference", "cuda" or "cuda_emulator"

    Returns
    -------
    y : ndarray like x
    mean, rstd : ndarray of shape ``batch`` (float32, float64 for float64 x)

    Notes
    -----
    Bytes moved: read x, weight, bias; write y, mean, rstd. x is not modified.
    On the GPU the kernels launch on CuPy's current stream and do not synchronize.
    """
    caller = "layer_norm"
    impl = _setup(caller, backend, x, weight=weight, bias=bias)
    k = _normalized_ndim(caller, normalized_ndim, x)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    pshape = x.shape[x.ndim - k:]
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=pshape, dtype=x.dtype)
    sd = _stats_dtype(x.dtype)
    bshape = x.shape[:x.ndim - k]
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, None), ("mean", bshape, sd, None),
                                     ("rstd", bshape, sd, None)],
                       dict(x=x, weight=weight, bias=bias))
    impl.layer_norm(x, weight, bias, eps, k, outs)
    return tuple(outs)


def layer_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, normalized_ndim=1,
                        out=None, backend=None):
    """Gradients of :func:`layer_norm`.

    With ``xhat = (x - mean) * rstd`` and ``g = dy * weight``::

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the normalized axes)
        dweight = sum(dy * xhat), dbias = sum(dy)            (sums over the batch axes)

    ``bias`` is only looked at for presence: dbias is computed iff it is given
    (as ATen's ``output_mask``). Returns ``(dx, dweight, dbias)`` with None for
    an absent weight or bias. Bytes moved: read dy, x, weight, mean, rstd;
    write dx, dweight, dbias. dweight/dbias are reduced in a fixed order.
    """
    caller = "layer_norm_backward"
    impl = _setup(caller, backend, x, dy=dy, mean=mean, rstd=rstd, weight=weight, bias=bias)
    _check_dy(caller, dy, x)
    k = _normalized_ndim(caller, normalized_ndim, x)
    pshape, bshape, sd = x.shape[x.ndim - k:], x.shape[:x.ndim - k], _stats_dtype(x.dtype)
    _checks.like("mean", mean, caller=caller, shape=bshape, dtype=sd, none_ok=False)
    _checks.like("rstd", rstd, caller=caller, shape=bshape, dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=pshape, dtype=x.dtype)
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, None),
        ("dweight", pshape, None if weight is None else x.dtype, None),
        ("dbias", pshape, None if bias is None else x.dtype, None)],
        dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight))
    impl.layer_norm_backward(dy, x, mean, rstd, weight, k, outs)
    return tuple(outs)


# --------------------------------------------------------------------------- RMS norm

def rms_norm(x, weight=None, eps=1e-6, *, normalized_ndim=1, out=None, backend=None):
    """Root-mean-square normalization over the trailing ``normalized_ndim`` axes.

    ``y = x * rstd * weight``, ``rstd = 1 / sqrt(mean(x**2) + eps)``
    (Zhang & Sennrich, 2019). Returns ``(y, rstd)``; rstd has shape ``batch``.
    Bytes moved: read x, weight; write y, rstd.
    """
    caller = "rms_norm"
    impl = _setup(caller, backend, x, weight=weight)
    k = _normalized_ndim(caller, normalized_ndim, x)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    pshape, bshape, sd = x.shape[x.ndim - k:], x.shape[:x.ndim - k], _stats_dtype(x.dtype)
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, None), ("rstd", bshape, sd, None)],
                       dict(x=x, weight=weight))
    impl.rms_norm(x, weight, eps, k, outs)
    return tuple(outs)


def rms_norm_backward(dy, x, rstd, weight=None, *, normalized_ndim=1, out=None, backend=None):
    """Gradients of :func:`rms_norm`.

    With ``xhat = x * rstd`` and ``g = dy * weight``:
    ``dx = rstd * (g - xhat * mean(g * xhat))``, ``dweight = sum(dy * xhat)``.
    Returns ``(dx, dweight)`` (dweight None without weight).
    """
    caller = "rms_norm_backward"
    impl = _setup(caller, backend, x, dy=dy, rstd=rstd, weight=weight)
    _check_dy(caller, dy, x)
    k = _normalized_ndim(caller, normalized_ndim, x)
    pshape, bshape, sd = x.shape[x.ndim - k:], x.shape[:x.ndim - k], _stats_dtype(x.dtype)
    _checks.like("rstd", rstd, caller=caller, shape=bshape, dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, None),
        ("dweight", pshape, None if weight is None else x.dtype, None)],
        dict(dy=dy, x=x, rstd=rstd, weight=weight))
    impl.rms_norm_backward(dy, x, rstd, weight, k, outs)
    return tuple(outs)


# --------------------------------------------------------------------------- batch norm

def _update_running(running_mean, running_var, batch_mean, batch_var_unbiased, momentum):
    """PyTorch's rule: stat <- (1 - momentum) * stat + momentum * batch_stat, in place."""
    rm = running_mean.astype(np.float64)
    rv = running_var.astype(np.float64)
    running_mean[...] = (1.0 - momentum) * rm + momentum * batch_mean
    running_var[...] = (1.0 - momentum) * rv + momentum * batch_var_unbiased


def _check_running(caller, running_mean, running_var, C, required):
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{caller}: 'running_mean' and 'running_var' must be given together, "
                         f"got running_mean={'None' if running_mean is None else 'an array'} and "
                         f"running_var={'None' if running_var is None else 'an array'}.")
    if required and running_mean is None:
        raise ValueError(f"{caller}: 'running_mean' and 'running_var' must be arrays when "
                         "normalizing with running statistics, got None.")
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        _checks.floating_like(name, a, caller=caller, shape=(C,),
                              dtypes=(np.float32, np.float64), writeable=True)


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
               training=True, momentum=0.1, eps=1e-5, axis=1, activation=None, out=None,
               backend=None):
    """Batch normalization over every axis but the channel ``axis``.

    Training: ``y = act((x - mean) * rstd * weight + bias)`` with the batch mean
    and biased variance per channel; ``running_mean``/``running_var`` (if given)
    are updated in place with ``stat = (1 - momentum) * stat + momentum * batch``,
    the variance unbiased (PyTorch's convention; a cumulative average is
    ``momentum = 1 / num_batches``). Inference (``training=False``) normalizes
    with the running statistics, which are then required and left unchanged.

    Parameters
    ----------
    x : ndarray (N, C, ...) for ``axis=1`` (NCHW) or (N, ..., C) for ``axis=-1`` (NHWC)
    weight, bias : ndarray (C,) of x's dtype, or None
    running_mean, running_var : ndarray (C,), float32 or float64, or None
    activation : None or "relu" (fused; the backward then needs ``y``)

    Returns
    -------
    y : ndarray like x (same memory layout for a fresh output)
    mean, rstd : ndarray (C,) the statistics used (batch ones in training,
        running ones in inference), float32 (float64 for float64 x)

    Raises ValueError in training when a channel has exactly one value, as
    PyTorch does. Bytes moved: read x once, write y once.
    """
    caller = "batch_norm"
    impl = _setup(caller, backend, x, 2, weight=weight, bias=bias, running_mean=running_mean,
                  running_var=running_var)
    training = _checks.flag("training", training, caller=caller)
    momentum = _checks.scalar("momentum", momentum, caller=caller, ge=0, le=1)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C = x.shape[ax]
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    _check_running(caller, running_mean, running_var, C, required=not training)
    count = x.size // C if C else 0
    if training and count == 1:
        raise ValueError(f"{caller}: 'x' must have more than 1 value per channel when training, "
                         f"got shape {x.shape}.")
    sd = _stats_dtype(x.dtype)
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("mean", (C,), sd, None),
                                     ("rstd", (C,), sd, None)],
                       dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                            running_var=running_var))
    if not training:
        outs[1][...] = running_mean
        outs[2][...] = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    var = impl.batch_norm(x, weight, bias, eps, ax, activation, training, outs)
    if training and running_mean is not None and count > 0:
        _update_running(running_mean, running_var, outs[1].astype(np.float64),
                        var * (count / (count - 1)), momentum)
    return tuple(outs)


def batch_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, training=True, axis=1,
                        y=None, activation=None, out=None, backend=None):
    """Gradients of :func:`batch_norm`.

    With ``dz = dy * (y > 0)`` for ``activation="relu"`` (``y`` the saved
    output) or ``dz = dy``, ``xhat = (x - mean) * rstd``, sums and means over
    every axis but the channel axis::

        dbias = sum(dz), dweight = sum(dz * xhat)
        dx = weight * rstd * (dz - mean(dz) - xhat * mean(dz * xhat))   (training)
        dx = weight * rstd * dz                                          (inference)

    Returns ``(dx, dweight, dbias)``; dweight is computed iff weight is given,
    dbias iff bias is given.
    """
    caller = "batch_norm_backward"
    impl = _setup(caller, backend, x, 2, dy=dy, mean=mean, rstd=rstd, weight=weight, bias=bias,
                  y=y)
    _check_dy(caller, dy, x)
    training = _checks.flag("training", training, caller=caller)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C, sd = x.shape[ax], _stats_dtype(x.dtype)
    _checks.like("mean", mean, caller=caller, shape=(C,), dtype=sd, none_ok=False)
    _checks.like("rstd", rstd, caller=caller, shape=(C,), dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    if activation is not None:
        _checks.like("y", y, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, x),
        ("dweight", (C,), None if weight is None else x.dtype, None),
        ("dbias", (C,), None if bias is None else x.dtype, None)],
        dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight, y=y))
    impl.batch_norm_backward(dy, x, mean, rstd, weight, training, ax,
                             y if activation else None, outs)
    return tuple(outs)


# --------------------------------------------------------------------------- batch norm, split
# Batch norm in steps, for batches spread over processes (fastreg.distributed):
# each process computes its partial statistics, the partials of every process
# are merged (the same merge, in rank order, on every process), and each
# process normalizes its own slice with the merged statistics. The backward
# likewise: local sums, summed over processes, then dx.

_F64 = np.dtype(np.float64)
_STAT_DTYPES = (np.dtype(np.float32), _F64)


def _split_step(impl, name, caller):
    """The backend's function for one split step, or a clear error where a
    backend does not have the split kernels yet."""
    fn = getattr(impl, name, None)
    if fn is None:
        backend = impl.__name__.split(".")[1]
        raise RuntimeError(f"{caller}: the {backend!r} backend has no split batch norm "
                           "kernels yet; use NumPy arrays.")
    return fn


def _channel_stat(caller, name, a, C, *, required=True):
    """A per-channel statistic: shape (C,), float32 or float64."""
    if a is None and not required:
        return None
    _checks.like(name, a, caller=caller, shape=(C,), dtype=None, none_ok=False)
    return _checks.floating_like(name, a, caller=caller, shape=(C,), dtypes=_STAT_DTYPES)


def batch_norm_stats(x, *, axis=1, out=None, backend=None):
    """Per-channel partial statistics of this process's slice of a batch.

    For each channel c, over the n values of every axis but ``axis``::

        count[c] = n,  mean[c] = sum(x) / n,  m2[c] = sum((x - mean[c])**2)

    computed in one pass of shifted sums in float64 (shift: the channel's
    first value, so the cancellation is bounded by (mean - shift)**2 / var),
    summed in an order fixed by the shape. An empty slice gives count 0,
    mean 0 and m2 0. Merge the partials of several processes with
    :func:`batch_norm_combine`.

    Parameters
    ----------
    x : ndarray (N, C, ...) for ``axis=1`` (NCHW) or (N, ..., C) for ``axis=-1`` (NHWC),
        float32 or float64 (CUDA backends: also float16 and bfloat16), any memory
        layout; N may be 0
    axis : int, the channel axis
    out : tuple ``(count, mean, m2)`` of preallocated float64 (C,) arrays (entries may
        be None), e.g. rows of the buffer a collective sends

    Returns
    -------
    count, mean, m2 : float64 ndarrays of shape (C,)

    Notes
    -----
    The partials are float64 for every input dtype: they are 3*C numbers per
    process, and rounding them to float32 would move the merged mean by
    ``|mean| * 6e-8``, which y would then carry. Bytes moved: read x once.
    """
    caller = "batch_norm_stats"
    impl = _setup(caller, backend, x, 2)
    ax = _channel_axis(caller, axis, x)
    C = x.shape[ax]
    outs = _checks.out(caller, out, [("count", (C,), _F64, None), ("mean", (C,), _F64, None),
                                     ("m2", (C,), _F64, None)], dict(x=x))
    _split_step(impl, "batch_norm_stats", caller)(x, ax, outs)
    return tuple(outs)


def batch_norm_combine(counts, means, m2s, *, out=None, backend=None):
    """Merge per-process partial statistics into the batch's mean and variance.

    Chan et al.'s pairwise update, one process at a time in index order
    (r = 0, 1, ..., R-1), per channel::

        n' = n + n_r,  delta = mean_r - mean
        mean' = mean + delta * n_r / n'
        M2' = M2 + M2_r + delta**2 * n * n_r / n'

    then ``var = M2 / n`` (biased; 0 when n = 0). Processes may hold different
    counts, including 0 (their mean and M2 are then ignored). The merge never
    subtracts two large sums, so it is exact to rounding however far the
    data are from 0, and its fixed order gives every process bitwise the same
    statistics from the same gathered partials.

    Parameters
    ----------
    counts, means, m2s : ndarray (R, C), float32 or float64: row r holds process r's
        :func:`batch_norm_stats` (rows may be strided views of one gathered buffer)
    out : tuple ``(count, mean, var)`` of preallocated float64 (C,) arrays

    Returns
    -------
    count, mean, var : float64 ndarrays (C,), the statistics of the whole batch

    Raises
    ------
    ValueError
        when a count is negative or NaN (checked for NumPy arrays).
    """
    caller = "batch_norm_combine"
    _checks.same_kind(caller, counts=counts, means=means, m2s=m2s)
    impl, dtypes = _backend.dtypes("norm", counts, means, m2s, backend=backend, caller=caller)
    _checks.array("counts", counts, caller=caller, dtypes=_STAT_DTYPES, ndim=2)
    shape = counts.shape
    _checks.like("means", means, caller=caller, shape=shape, dtype=None, none_ok=False)
    _checks.floating_like("means", means, caller=caller, shape=shape, dtypes=_STAT_DTYPES)
    _checks.like("m2s", m2s, caller=caller, shape=shape, dtype=None, none_ok=False)
    _checks.floating_like("m2s", m2s, caller=caller, shape=shape, dtypes=_STAT_DTYPES)
    if _backend.array_kind(counts) == "numpy" and not np.all(counts >= 0):
        bad = counts[~(counts >= 0)]
        raise ValueError(f"{caller}: 'counts' must be >= 0, got {float(bad.flat[0])!r}.")
    C = shape[1]
    outs = _checks.out(caller, out, [("count", (C,), _F64, None), ("mean", (C,), _F64, None),
                                     ("var", (C,), _F64, None)],
                       dict(counts=counts, means=means, m2s=m2s))
    _split_step(impl, "batch_norm_combine", caller)(counts, means, m2s, outs)
    return tuple(outs)


def batch_norm_apply(x, mean, var, weight=None, bias=None, running_mean=None, running_var=None,
                     *, count=None, momentum=0.1, eps=1e-5, axis=1, activation=None, out=None,
                     backend=None):
    """Normalize with given batch statistics and update the running ones.

    ``y = act((x - mean) * rstd * weight + bias)`` with ``rstd = 1 / sqrt(var + eps)``,
    ``var`` the biased variance (as :func:`batch_norm_combine` returns it).
    Given running statistics are updated in place, PyTorch's rule with the
    variance made unbiased by the batch's (global) count::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var + momentum * var * count / (count - 1)

    A count of 0 (an empty batch) leaves them unchanged.

    Parameters
    ----------
    x : ndarray (N, C, ...) or (N, ..., C), float32 or float64 (CUDA backends: also
        float16 and bfloat16)
    mean, var : ndarray (C,), float32 or float64
    weight, bias : ndarray (C,) of x's dtype, or None
    running_mean, running_var : ndarray (C,), float32 or float64, or None (updated in place)
    count : int, the number of values per channel in the whole batch; required with
        running statistics, unused without
    activation : None or "relu"
    out : tuple ``(y, rstd)`` of preallocated outputs

    Returns
    -------
    y : ndarray like x (same memory layout for a fresh output)
    rstd : ndarray (C,) of var's dtype

    Raises
    ------
    ValueError
        when running statistics are given with ``count`` None or 1 (no unbiased variance).

    Notes
    -----
    Bytes moved: read x, write y. This is :func:`batch_norm`'s inference path,
    so y is bitwise what ``batch_norm`` gives for the same statistics.
    """
    caller = "batch_norm_apply"
    impl = _setup(caller, backend, x, 2, mean=mean, var=var, weight=weight, bias=bias,
                  running_mean=running_mean, running_var=running_var)
    ax = _channel_axis(caller, axis, x)
    C = x.shape[ax]
    _channel_stat(caller, "mean", mean, C)
    _channel_stat(caller, "var", var, C)
    momentum = _checks.scalar("momentum", momentum, caller=caller, ge=0, le=1)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    _check_running(caller, running_mean, running_var, C, required=False)
    if running_mean is not None:
        if count is None:
            raise ValueError(f"{caller}: 'count' must be the batch's count per channel when "
                             "running statistics are updated, got None.")
        count = _checks.scalar("count", count, caller=caller, ge=0)
        if count == 1:
            raise ValueError(f"{caller}: 'count' must not be 1 when running statistics are "
                             "updated (the unbiased variance needs 2 values), got 1.")
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("rstd", (C,), var.dtype, None)],
                       dict(x=x, mean=mean, var=var, weight=weight, bias=bias,
                            running_mean=running_mean, running_var=running_var))
    var64 = var.astype(np.float64)
    outs[1][...] = 1.0 / np.sqrt(var64 + eps)
    impl.batch_norm(x, weight, bias, eps, ax, activation, False, [outs[0], mean, outs[1]])
    if running_mean is not None and count > 0:
        _update_running(running_mean, running_var, mean.astype(np.float64),
                        var64 * (count / (count - 1)), momentum)
    return tuple(outs)


def batch_norm_backward_reduce(dy, x, mean, rstd, *, axis=1, y=None, activation=None, out=None,
                               backend=None):
    """This process's per-channel sums for the batch norm backward.

    With ``dz = dy * (y > 0)`` for ``activation="relu"`` (``y`` the saved
    output), else ``dz = dy``, and ``xhat = (x - mean) * rstd``, over every
    axis but the channel axis::

        sum_dy = sum(dz),  sum_dy_xhat = sum(dz * xhat)

    These are this slice's dbias and dweight. Summed over the processes, they
    are the batch's, and :func:`batch_norm_backward_apply` takes them.

    Parameters
    ----------
    dy, x : ndarray, same shape and dtype (float32 or float64; CUDA backends: also
        float16 and bfloat16)
    mean, rstd : ndarray (C,), float32 or float64, the batch's statistics
    out : tuple ``(sum_dy, sum_dy_xhat)`` of preallocated float64 (C,) arrays

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 ndarrays (C,)

    Notes
    -----
    Bytes moved: read dy, x (and y). Sums in float64, in an order fixed by
    the shape.
    """
    caller = "batch_norm_backward_reduce"
    impl = _setup(caller, backend, x, 2, dy=dy, mean=mean, rstd=rstd, y=y)
    _check_dy(caller, dy, x)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C = x.shape[ax]
    _channel_stat(caller, "mean", mean, C)
    _channel_stat(caller, "rstd", rstd, C)
    if activation is not None:
        _checks.like("y", y, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)
    outs = _checks.out(caller, out, [("sum_dy", (C,), _F64, None),
                                     ("sum_dy_xhat", (C,), _F64, None)],
                       dict(dy=dy, x=x, mean=mean, rstd=rstd, y=y))
    _split_step(impl, "batch_norm_backward_reduce", caller)(
        dy, x, mean, rstd, ax, y if activation else None, outs)
    return tuple(outs)


def batch_norm_backward_apply(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, *, count,
                              training=True, axis=1, y=None, activation=None, out=None,
                              backend=None):
    """dx of a batch norm from the batch's summed backward sums.

    With ``dz``, ``xhat`` as in :func:`batch_norm_backward_reduce`, ``sum_dy``
    and ``sum_dy_xhat`` summed over every process and ``n = count`` the
    batch's count per channel::

        dx = weight * rstd * (dz - sum_dy / n - xhat * sum_dy_xhat / n)   (training)
        dx = weight * rstd * dz                                           (inference)

    Parameters
    ----------
    dy, x : ndarray, same shape and dtype (float32 or float64; CUDA backends: also
        float16 and bfloat16)
    mean, rstd : ndarray (C,), float32 or float64
    weight : ndarray (C,) of x's dtype, or None
    sum_dy, sum_dy_xhat : ndarray (C,), float32 or float64 (unused, may be None, in inference)
    count : int >= 0 (unused, may be None, in inference)
    out : preallocated dx, or None

    Returns
    -------
    dx : ndarray like x (same memory layout for a fresh output)

    Notes
    -----
    Bytes moved: read dy, x (and y), write dx.
    """
    caller = "batch_norm_backward_apply"
    impl = _setup(caller, backend, x, 2, dy=dy, mean=mean, rstd=rstd, weight=weight,
                  sum_dy=sum_dy, sum_dy_xhat=sum_dy_xhat, y=y)
    _check_dy(caller, dy, x)
    training = _checks.flag("training", training, caller=caller)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C = x.shape[ax]
    _channel_stat(caller, "mean", mean, C)
    _channel_stat(caller, "rstd", rstd, C)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _channel_stat(caller, "sum_dy", sum_dy, C, required=training)
    _channel_stat(caller, "sum_dy_xhat", sum_dy_xhat, C, required=training)
    if training:
        if count is None:
            raise ValueError(f"{caller}: 'count' must be the batch's count per channel when "
                             "training, got None.")
        count = _checks.scalar("count", count, caller=caller, ge=0)
    if activation is not None:
        _checks.like("y", y, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)
    if out is not None and not isinstance(out, (tuple, list)):
        out = (out,)
    outs = _checks.out(caller, out, [("dx", x.shape, x.dtype, x)],
                       dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight, sum_dy=sum_dy,
                            sum_dy_xhat=sum_dy_xhat, y=y))
    _split_step(impl, "batch_norm_backward_apply", caller)(
        dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training, ax,
        y if activation else None, outs)
    return outs[0]


# --------------------------------------------------------------------------- group norm

def _check_groups(caller, num_groups, C):
    G = _checks.integer("num_groups", num_groups, caller=caller, ge=1)
    if C % G:
        raise ValueError(f"{caller}: 'num_groups' must divide the number of channels {C}, "
                         f"got {G}.")
    return G


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               backend=None):
    """Group normalization (Wu & He, 2018).

    The C channels are split into ``num_groups`` groups of consecutive
    channels; each sample's group is normalized over its channels and spatial
    positions (biased variance), then scaled per channel:
    ``y = (x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]``.

    Parameters
    ----------
    x : ndarray (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1``
    num_groups : int dividing C
    weight, bias : ndarray (C,) of x's dtype, or None

    Returns
    -------
    y : ndarray like x (same memory layout for a fresh output)
    mean, rstd : ndarray (N, num_groups)
    """
    caller = "group_norm"
    impl = _setup(caller, backend, x, 2, weight=weight, bias=bias)
    ax = _channel_axis(caller, axis, x, first_or_last=True)
    C = x.shape[ax]
    G = _check_groups(caller, num_groups, C)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    sd, N = _stats_dtype(x.dtype), x.shape[0]
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("mean", (N, G), sd, None),
                                     ("rstd", (N, G), sd, None)],
                       dict(x=x, weight=weight, bias=bias))
    impl.group_norm(x, G, weight, bias, eps, ax, outs)
    return tuple(outs)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, bias=None, *, axis=1,
                        out=None, backend=None):
    """Gradients of :func:`group_norm`.

    With ``xhat = (x - mean) * rstd`` and ``g = dy * weight[c]``, means over a
    sample's group: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
    ``dweight[c] = sum(dy * xhat)``, ``dbias[c] = sum(dy)`` over samples and
    positions. Returns ``(dx, dweight, dbias)``.
    """
    caller = "group_norm_backward"
    impl = _setup(caller, backend, x, 2, dy=dy, mean=mean, rstd=rstd, weight=weight, bias=bias)
    _check_dy(caller, dy, x)
    ax = _channel_axis(caller, axis, x, first_or_last=True)
    C = x.shape[ax]
    G = _check_groups(caller, num_groups, C)
    sd, N = _stats_dtype(x.dtype), x.shape[0]
    _checks.like("mean", mean, caller=caller, shape=(N, G), dtype=sd, none_ok=False)
    _checks.like("rstd", rstd, caller=caller, shape=(N, G), dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, x),
        ("dweight", (C,), None if weight is None else x.dtype, None),
        ("dbias", (C,), None if bias is None else x.dtype, None)],
        dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight))
    impl.group_norm_backward(dy, x, mean, rstd, G, weight, ax, outs)
    return tuple(outs)


# --------------------------------------------------------------------------- instance norm

def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1, out=None,
                  backend=None):
    """Instance normalization (Ulyanov et al., 2016): group norm with one channel per group.

    Each (sample, channel) is normalized over its spatial positions. With
    ``use_input_stats=True`` (PyTorch's training mode) and running statistics
    given, they are updated in place as PyTorch's InstanceNorm with
    ``track_running_stats=True`` does: the per-instance means and unbiased
    variances are averaged over the batch and blended with ``momentum``.
    With ``use_input_stats=False`` the running statistics normalize instead.

    x : ndarray (N, C, *spatial) for ``axis=1`` or (N, *spatial, C) for
    ``axis=-1``, at least 3-D. Returns ``(y, mean, rstd)``, mean/rstd of
    shape (N, C).
    """
    caller = "instance_norm"
    impl = _setup(caller, backend, x, 3, weight=weight, bias=bias, running_mean=running_mean,
                  running_var=running_var)
    use_input_stats = _checks.flag("use_input_stats", use_input_stats, caller=caller)
    momentum = _checks.scalar("momentum", momentum, caller=caller, ge=0, le=1)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    ax = _channel_axis(caller, axis, x, first_or_last=True)
    N, C = x.shape[0], x.shape[ax]
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    _check_running(caller, running_mean, running_var, C, required=not use_input_stats)
    HW = x.size // (N * C) if N * C else 0
    if use_input_stats and HW == 1:
        raise ValueError(f"{caller}: 'x' must have more than 1 spatial element per channel when "
                         f"using input statistics, got shape {x.shape}.")
    sd = _stats_dtype(x.dtype)
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("mean", (N, C), sd, None),
                                     ("rstd", (N, C), sd, None)],
                       dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                            running_var=running_var))
    if not use_input_stats:
        stats = [_backend.empty((C,), sd, inputs=dict(x=x)) for _ in range(2)]
        stats[0][...] = running_mean
        stats[1][...] = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        impl.batch_norm(x, weight, bias, eps, ax, None, False, [outs[0], *stats])
        outs[1][...] = stats[0]
        outs[2][...] = stats[1]
        return tuple(outs)
    var = impl.group_norm(x, C, weight, bias, eps, ax, outs)
    if running_mean is not None and N > 0 and HW > 0:
        _update_running(running_mean, running_var, outs[1].astype(np.float64).mean(axis=0),
                        (var * (HW / (HW - 1))).mean(axis=0), momentum)
    return tuple(outs)


def instance_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, use_input_stats=True,
                           axis=1, out=None, backend=None):
    """Gradients of :func:`instance_norm`: group-norm gradients with one channel
    per group, or, with ``use_input_stats=False``, ``dx = dy * weight * rstd``.
    Returns ``(dx, dweight, dbias)``."""
    caller = "instance_norm_backward"
    impl = _setup(caller, backend, x, 3, dy=dy, mean=mean, rstd=rstd, weight=weight, bias=bias)
    _check_dy(caller, dy, x)
    use_input_stats = _checks.flag("use_input_stats", use_input_stats, caller=caller)
    ax = _channel_axis(caller, axis, x, first_or_last=True)
    N, C, sd = x.shape[0], x.shape[ax], _stats_dtype(x.dtype)
    _checks.like("mean", mean, caller=caller, shape=(N, C), dtype=sd, none_ok=False)
    _checks.like("rstd", rstd, caller=caller, shape=(N, C), dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, x),
        ("dweight", (C,), None if weight is None else x.dtype, None),
        ("dbias", (C,), None if bias is None else x.dtype, None)],
        dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight))
    if use_input_stats:
        impl.group_norm_backward(dy, x, mean, rstd, C, weight, ax, outs)
    else:
        # Running statistics are the same for every sample: one row describes them.
        row_mean, row_rstd = (_backend.empty((C,), sd, inputs=dict(x=x)) for _ in range(2))
        row_mean[...] = mean[0] if N else 0.0
        row_rstd[...] = rstd[0] if N else 0.0
        impl.batch_norm_backward(dy, x, row_mean, row_rstd, weight, False, ax, None, outs)
    return tuple(outs)
