"""Dropout family: dropout, Gaussian noise and dropout, DropConnect, and the fused
dropout + residual add + LayerNorm, forward and backward.

Every op draws from the Philox4x32-10 stream of ``fastreg.random`` (read its
docstring for the exact contract): a call with ``rng`` takes a ``(seed,
offset)`` pair from it and uses ``ceil(n / 4)`` blocks for ``n`` random
elements, so the same seed and offset give the same mask on NumPy (the
reference), Numba (CPU) and CUDA, at any thread count. Element ``i`` is the
C-order index of the logical tensor named in each docstring, whatever the
strides of the arrays.

Conventions shared by every function here:

- ``p`` is the DROP probability (PyTorch, Keras). Element ``i`` is kept iff
  its stream word is ``>= floor(p * 2**32)``; ``p = 1`` drops everything.
- ``mode="inverted"`` (default) scales kept units by ``1 / (1 - p)`` in
  training and is the identity at inference; ``mode="weight_scaling"`` keeps
  training unscaled and multiplies by ``1 - p`` at inference (the classic
  rule of Srivastava et al.).
- A dropped element is ``x * 0`` (as PyTorch: a NaN or Inf input stays NaN).
- ``rng`` is a :class:`fastreg.random.Generator` (advanced by the blocks a
  call used) or an integer seed (``Generator(seed, 0)``: the same mask every
  call). It is only needed in training; ``training=False`` draws nothing.
- ``out=`` takes preallocated outputs (a tuple like the returned arrays);
  inputs are never modified. The masks returned are small objects, not
  arrays: :class:`DropoutMask` and :class:`GaussianMask`.
- dtypes: float32 and float64 on the CPU (NumPy arrays); float16, bfloat16,
  float32 and float64 on the GPU (CuPy arrays) and its host emulation
  (backend "cuda_emulator"). The keep decisions never depend on the dtype;
  16-bit values compute in float32 and round once to the dtype, so dropout's
  y (and the fused op's residual sum) round as the reference does in the
  dtype, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _checks
from . import random as _random

__all__ = [
    "DropoutMask", "DropConnectMask", "GaussianMask",
    "dropout", "dropout_backward",
    "gaussian_noise", "gaussian_dropout", "gaussian_dropout_backward",
    "drop_connect", "drop_connect_backward", "drop_connect_inference",
    "dropout_add_layer_norm", "dropout_add_layer_norm_backward",
]

_MODES = ("inverted", "weight_scaling")
_MASK_KINDS = ("bits", "seed")
_ACTIVATIONS = (None, "relu", "tanh", "sigmoid")
_BITS = np.dtype(np.uint32)


# =========================================================================== masks

class DropoutMask:
    """Which elements a dropout kept, as 1 bit per element or as its stream position.

    Attributes
    ----------
    kind : "bits" | "seed" | "none"
        "bits": ``bits`` holds 1 bit per element. "seed": nothing is stored;
        the mask is regenerated from ``(seed, offset)``. "none": inference, no
        element was dropped (every element is scaled by ``scale``).
    shape : tuple, the logical shape the mask covers
    p : float, the drop probability
    scale : float, the factor applied to kept elements (``1/(1-p)``, 1 or
        ``1-p``; 0 when ``p = 1``)
    seed, offset : int, the stream position (None for "none")
    bits : uint32 array of ``ceil(size / 32)`` words, or None. Element ``i``
        is bit ``i % 32`` of word ``i // 32`` (least significant bit first);
        bits past ``size`` are 0. Its bytes are
        ``np.packbits(keep, bitorder="little")`` (zero-padded to 4 bytes).
    nbytes : int, bytes held (``bits.nbytes`` or 0)
    """

    __slots__ = ("kind", "shape", "p", "scale", "seed", "offset", "bits")

    def __init__(self, kind, shape, p, scale, seed=None, offset=None, bits=None):
        self.kind = kind
        self.shape = tuple(shape)
        self.p = float(p)
        self.scale = float(scale)
        self.seed = seed
        self.offset = offset
        self.bits = bits

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def threshold(self):
        """Keep iff word >= threshold; 0 for "none" (keeps everything)."""
        return 0 if self.kind == "none" else _random.threshold(self.p)

    @property
    def nbytes(self):
        return 0 if self.bits is None else int(self.bits.nbytes)

    def to_bool(self, *, backend=None):
        """The mask as a boolean array of ``shape`` (True = kept): a CuPy array for
        bits held on the GPU, else a NumPy array (a "seed" mask is regenerated on
        the CPU: the same bits as on every backend)."""
        impl = _backend.select("dropout", self.bits, backend=backend, caller="DropoutMask.to_bool")
        out = _backend.empty(self.shape, bool, inputs={"bits": self.bits})
        impl.keep_mask(self.bits, self.seed or 0, self.offset or 0, self.threshold, out)
        return out

    def __repr__(self):
        where = "" if self.kind == "none" else f", seed={self.seed}, offset={self.offset}"
        return (f"{type(self).__name__}(kind={self.kind!r}, shape={self.shape}, p={self.p}, "
                f"scale={self.scale}{where}, nbytes={self.nbytes})")


class DropConnectMask(DropoutMask):
    """The mask of a :func:`drop_connect` call (always regenerated: ``kind="seed"``).

    ``shape`` is ``weight.shape`` for one mask per batch, or
    ``batch + weight.shape`` with ``per_example=True``.
    """

    __slots__ = ("per_example",)

    def __init__(self, kind, shape, p, scale, seed=None, offset=None, *, per_example):
        super().__init__(kind, shape, p, scale, seed, offset)
        self.per_example = bool(per_example)

    def __repr__(self):
        return super().__repr__()[:-1] + f", per_example={self.per_example})"


class GaussianMask:
    """The multiplicative noise of a :func:`gaussian_dropout` call (0 bytes: regenerated).

    The factor of element ``i`` is ``1 + std * z_i`` with ``z_i`` the stream's
    standard normal at ``(seed, offset)`` (``std = 0`` at inference).
    """

    __slots__ = ("shape", "p", "std", "seed", "offset")
    kind = "seed"
    nbytes = 0

    def __init__(self, shape, p, std, seed=None, offset=None):
        self.shape = tuple(shape)
        self.p = float(p)
        self.std = float(std)
        self.seed = seed
        self.offset = offset

    def to_factor(self, *, dtype=np.float64, backend=None):
        """The factors ``1 + std * z`` as an array of ``shape``."""
        if self.std == 0.0:
            return np.ones(self.shape, dtype)
        z = _random.normal(self.shape, rng=_random.Generator(self.seed, self.offset),
                           dtype=np.float64, backend=backend)
        return (1.0 + self.std * z).astype(dtype)

    def __repr__(self):
        return (f"GaussianMask(shape={self.shape}, p={self.p}, std={self.std}, "
                f"seed={self.seed}, offset={self.offset})")


# =========================================================================== helpers

def _setup(caller, backend, x, name="x", **others):
    """Validate the main array and pick the implementation."""
    _checks.same_kind(caller, **{name: x}, **others)
    impl, dtypes = _backend.dtypes("dropout", x, *others.values(), backend=backend,
                                   caller=caller)
    _checks.array(name, x, caller=caller, dtypes=dtypes)
    return impl


def _keep_scale(p, mode, training):
    """The factor applied to kept elements."""
    if not training:
        return 1.0 if mode == "inverted" else 1.0 - p
    if mode == "weight_scaling":
        return 1.0
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _common(caller, p, rng, training, mode, p_max_open=False):
    p = _checks.scalar("p", p, caller=caller, ge=0, **({"lt": 1} if p_max_open else {"le": 1}))
    training = _checks.flag("training", training, caller=caller)
    mode = _checks.choice("mode", mode, caller=caller, choices=_MODES)
    rng = _random.check_rng(rng, caller, required=training)
    return p, rng, training, mode


def _mask_of(caller, mask, cls):
    if not isinstance(mask, cls):
        raise TypeError(f"{caller}: 'mask' must be a fastreg.dropout.{cls.__name__}, "
                        f"got {type(mask).__name__}.")
    return mask


def _mask_shape(caller, mask, shape, shape_name):
    if tuple(shape) != mask.shape:
        raise ValueError(f"{caller}: 'mask' covers shape {mask.shape}, but {shape_name} has "
                         f"shape {tuple(shape)}.")


def _one(out):
    """``out=`` of a single-output function: an array or a 1-tuple."""
    return out if out is None or isinstance(out, (tuple, list)) else (out,)


def _nwords(size):
    return (size + 31) // 32


# =========================================================================== dropout

def dropout(x, p, *, rng=None, training=True, mode="inverted", mask="bits", out=None,
            backend=None):
    """Dropout: zero each element with probability ``p``; scale the kept ones.

    ``y = x * keep * scale`` with ``keep_i = word_i >= floor(p * 2**32)`` from
    the stream at ``(seed, offset)`` (element ``i`` = C-order index in x's
    shape) and ``scale = 1 / (1 - p)`` (``mode="inverted"``) or 1
    (``mode="weight_scaling"``). At inference (``training=False``) ``y = x``
    (inverted) or ``y = x * (1 - p)`` (weight scaling), and nothing is drawn.

    Parameters
    ----------
    x : ndarray, float32 or float64, any shape and strides
    p : float in [0, 1], the drop probability
    rng : fastreg.random.Generator or int, required when training
    training : bool
    mode : "inverted" | "weight_scaling"
    mask : "bits" | "seed"
        "bits" keeps 1 bit per element (``ceil(n/32)`` uint32 words);
        "seed" keeps nothing and :func:`dropout_backward` regenerates the
        mask from the stream (a Philox pass instead of a bit read).
    out : tuple ``(y, bits)``, optional
        ``y`` like x; ``bits`` a uint32 array of shape ``(ceil(n/32),)`` to
        reuse for ``mask="bits"`` (must be None otherwise).
    backend : None, "cpu", "reference", "cuda" or "cuda_emulator"

    Returns
    -------
    y : ndarray like x
    mask : DropoutMask

    Notes
    -----
    Bytes moved: read x, write y and n/8 bytes of mask bits ("bits"). The
    result is bitwise identical on every backend and thread count. x is not
    modified.

    References
    ----------
    Srivastava et al., "Dropout: a simple way to prevent neural networks from
    overfitting", JMLR 15, 2014.

    Examples
    --------
    >>> gen = fastreg.random.Generator(1234)
    >>> y, mask = fastreg.dropout(x, 0.1, rng=gen)            # 1 bit per element kept
    >>> dx = fastreg.dropout_backward(dy, mask)
    >>> y2, m2 = fastreg.dropout(x, 0.1, rng=gen, mask="seed")  # 0 bytes kept
    >>> mask.nbytes, m2.nbytes
    (128, 0)                                                  # x.size == 1024
    """
    caller = "dropout"
    impl = _setup(caller, backend, x)
    p, rng, training, mode = _common(caller, p, rng, training, mode)
    kind = _checks.choice("mask", mask, caller=caller, choices=_MASK_KINDS)
    store = training and kind == "bits"
    y, bits = _checks.out(caller, out, [("y", x.shape, x.dtype, x),
                                        ("mask", (_nwords(x.size),), _BITS if store else None,
                                         None)], dict(x=x))
    scale = _keep_scale(p, mode, training)
    if not training:
        impl.dropout(x, 0, 0, 0, scale, [y, None])
        return y, DropoutMask("none", x.shape, p, scale)
    seed, offset = _random.draw(rng, x.size)
    threshold = _random.threshold(p)
    impl.dropout(x, seed, offset, threshold, scale, [y, bits])
    return y, DropoutMask(kind, x.shape, p, scale, seed, offset, bits)


def dropout_backward(dy, mask, *, out=None, backend=None):
    """Gradient of :func:`dropout`: ``dx = dy * keep * scale``.

    Parameters
    ----------
    dy : ndarray of ``mask.shape``, float32 or float64
    mask : DropoutMask from :func:`dropout`. A "bits" mask is read; a "seed"
        mask is regenerated from its stream position (the same dx, bit for bit).
    out : ndarray like dy (or a 1-tuple), optional

    Returns
    -------
    dx : ndarray like dy

    Notes
    -----
    Bytes moved: read dy and n/8 bytes of bits ("bits"), write dx.
    """
    caller = "dropout_backward"
    _mask_of(caller, mask, DropoutMask)
    impl = _setup(caller, backend, dy, "dy", mask=mask.bits)
    _mask_shape(caller, mask, dy.shape, "dy")
    (dx,) = _checks.out(caller, _one(out), [("dx", dy.shape, dy.dtype, dy)],
                        dict(dy=dy, mask=mask.bits))
    impl.dropout_backward(dy, mask.bits, mask.seed or 0, mask.offset or 0, mask.threshold,
                          mask.scale, [dx])
    return dx


# =========================================================================== Gaussian

def gaussian_noise(x, std, *, rng=None, training=True, out=None, backend=None):
    """Additive Gaussian noise: ``y = x + std * z`` (the identity at inference).

    ``z_i`` is the stream's standard normal of element ``i`` (Box-Muller, see
    ``fastreg.random``); ``x + std * z`` is computed in float64 and rounded
    once to x's dtype. The gradient is the identity (``dx = dy``), so there is
    no backward function.

    Parameters
    ----------
    x : ndarray, float32 or float64
    std : float >= 0
    rng : Generator or int, required when training
    out : ndarray like x (or a 1-tuple), optional

    Returns
    -------
    y : ndarray like x

    Notes
    -----
    Bytes moved: read x, write y. Uses ``ceil(n/4)`` blocks of the stream.
    """
    caller = "gaussian_noise"
    impl = _setup(caller, backend, x)
    std = _checks.scalar("std", std, caller=caller, ge=0)
    training = _checks.flag("training", training, caller=caller)
    rng = _random.check_rng(rng, caller, required=training)
    (y,) = _checks.out(caller, _one(out), [("y", x.shape, x.dtype, x)], dict(x=x))
    if not training:
        impl.gaussian_noise(x, 0, 0, 0.0, [y])
        return y
    seed, offset = _random.draw(rng, x.size)
    impl.gaussian_noise(x, seed, offset, std, [y])
    return y


def gaussian_dropout(x, p, *, rng=None, training=True, out=None, backend=None):
    """Multiplicative Gaussian dropout: ``y = x * (1 + sigma * z)``, ``sigma = sqrt(p / (1 - p))``.

    The noise has mean 1 and the variance ``p / (1 - p)`` of inverted
    Bernoulli dropout with drop probability ``p`` (Srivastava et al. 2014,
    section 10; Keras' ``GaussianDropout(rate=p)``). The identity at inference.
    The factor is computed in float64 and the product rounded once.

    Parameters
    ----------
    x : ndarray, float32 or float64
    p : float in [0, 1)
    rng : Generator or int, required when training
    out : ndarray like x (or a 1-tuple), optional

    Returns
    -------
    y : ndarray like x
    mask : GaussianMask (0 bytes; :func:`gaussian_dropout_backward` regenerates z)

    Notes
    -----
    Bytes moved: read x, write y. Uses ``ceil(n/4)`` blocks of the stream.
    """
    caller = "gaussian_dropout"
    impl = _setup(caller, backend, x)
    p = _checks.scalar("p", p, caller=caller, ge=0, lt=1)
    training = _checks.flag("training", training, caller=caller)
    rng = _random.check_rng(rng, caller, required=training)
    (y,) = _checks.out(caller, _one(out), [("y", x.shape, x.dtype, x)], dict(x=x))
    if not training:
        impl.gaussian_dropout(x, 0, 0, 0.0, [y])
        return y, GaussianMask(x.shape, p, 0.0)
    std = math.sqrt(p / (1.0 - p))
    seed, offset = _random.draw(rng, x.size)
    impl.gaussian_dropout(x, seed, offset, std, [y])
    return y, GaussianMask(x.shape, p, std, seed, offset)


def gaussian_dropout_backward(dy, mask, *, out=None, backend=None):
    """Gradient of :func:`gaussian_dropout`: ``dx = dy * (1 + sigma * z)``, z regenerated.

    Returns dx (like dy). Bytes moved: read dy, write dx.
    """
    caller = "gaussian_dropout_backward"
    _mask_of(caller, mask, GaussianMask)
    impl = _setup(caller, backend, dy, "dy")
    _mask_shape(caller, mask, dy.shape, "dy")
    (dx,) = _checks.out(caller, _one(out), [("dx", dy.shape, dy.dtype, dy)], dict(dy=dy))
    impl.gaussian_dropout(dy, mask.seed or 0, mask.offset or 0, mask.std, [dx])
    return dx


# =========================================================================== DropConnect

def _linear_args(caller, backend, x, weight, bias, dy=None):
    impl = _setup(caller, backend, x, weight=weight, bias=bias, dy=dy)
    if x.ndim < 1:
        raise ValueError(f"{caller}: 'x' must have at least 1 dimension (..., in_features), "
                         f"got shape {x.shape}.")
    if _backend.array_kind(weight) is None:
        raise TypeError(f"{caller}: 'weight' must be a NumPy or CuPy array, "
                        f"got {type(weight).__name__}.")
    if weight.ndim != 2:
        raise ValueError(f"{caller}: 'weight' must be a 2-D array (out_features, in_features), "
                         f"got shape {weight.shape}.")
    O, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{caller}: 'x' must have shape (..., {K}) to match weight.shape[1], "
                         f"got shape {x.shape}.")
    _checks.like("weight", weight, caller=caller, shape=(O, K), dtype=x.dtype, none_ok=False)
    _checks.like("bias", bias, caller=caller, shape=(O,), dtype=x.dtype)
    return impl, O, K


def drop_connect(x, weight, bias, p, *, rng=None, per_example=False, training=True,
                 mode="inverted", out=None, backend=None):
    """DropConnect linear layer: ``y = x @ (keep * weight * scale).T + bias``.

    Each weight (not each activation) is dropped with probability ``p``
    (Wan et al., 2013). The bias is not masked.

    - ``per_example=False``: one mask for the whole batch, of ``weight.shape``
      (stream element ``o * in + i``). It is generated, scaled and applied to
      the weight in one pass, then the product runs through BLAS; the backward
      regenerates it.
    - ``per_example=True``: one mask per sample, the logical tensor of shape
      ``batch + weight.shape`` (stream element ``(s * out + o) * in + i``, s
      the flat sample index), as in the paper. The mask is fused into the
      product (``y[s, o] = scale * sum_i keep[s, o, i] * weight[o, i] *
      x[s, i] + bias[o]``, accumulated in float64): no batch of weight
      matrices is materialized. Costs one Philox word per (sample, weight).

    At inference (``training=False``) the layer uses the mean weight
    (``weight`` for inverted, ``(1 - p) * weight`` for weight scaling); see
    :func:`drop_connect_inference` for the paper's moment-matching inference.

    Parameters
    ----------
    x : ndarray of shape ``(..., in)``, float32 or float64
    weight : ndarray of shape ``(out, in)`` (PyTorch's Linear layout), x's dtype
    bias : ndarray of shape ``(out,)`` or None
    p : float in [0, 1], the drop probability of each weight
    rng : Generator or int, required when training
    per_example : bool
    mode : "inverted" (kept weights scaled by 1/(1-p)) | "weight_scaling"
    out : ndarray of shape ``(..., out)`` (or a 1-tuple), optional

    Returns
    -------
    y : ndarray of shape ``(..., out)``
    mask : DropConnectMask (kind "seed": 0 bytes)

    Notes
    -----
    Uses ``ceil(out * in / 4)`` blocks (``ceil(N * out * in / 4)`` per example).
    Bytes moved (per batch): read weight, write the masked weight, then the
    GEMM's reads of x and the masked weight and write of y.

    References
    ----------
    Wan, Zeiler, Zhang, LeCun, Fergus, "Regularization of neural networks
    using DropConnect", ICML 2013.
    """
    caller = "drop_connect"
    impl, O, K = _linear_args(caller, backend, x, weight, bias)
    p, rng, training, mode = _common(caller, p, rng, training, mode)
    per_example = _checks.flag("per_example", per_example, caller=caller)
    yshape = x.shape[:-1] + (O,)
    (y,) = _checks.out(caller, _one(out), [("y", yshape, x.dtype, None)],
                       dict(x=x, weight=weight, bias=bias))
    mshape = (x.shape[:-1] if per_example else ()) + (O, K)
    scale = _keep_scale(p, mode, training)
    if not training:
        impl.drop_connect(x, weight, bias, 0, 0, 0, scale, False, [y])
        return y, DropConnectMask("none", mshape, p, scale, per_example=per_example)
    seed, offset = _random.draw(rng, math.prod(mshape))
    threshold = _random.threshold(p)
    impl.drop_connect(x, weight, bias, seed, offset, threshold, scale, per_example, [y])
    return y, DropConnectMask("seed", mshape, p, scale, seed, offset, per_example=per_example)


def drop_connect_backward(dy, x, weight, mask, *, out=None, backend=None):
    """Gradients of :func:`drop_connect`, the mask regenerated from the stream.

    With ``m = keep * scale``: ``dx = dy @ (m * weight)``,
    ``dweight = m * (dy.T @ x)`` (per batch) or
    ``dweight[o, i] = sum_s dy[s, o] * m[s, o, i] * x[s, i]`` (per example),
    ``dbias = sum_s dy[s]``.

    Per example, dx is computed per sample (prange over samples) and dweight
    per output row (prange over rows, samples in order), each regenerating the
    mask: two Philox passes, no stored mask, bitwise identical at any thread
    count. Returns ``(dx, dweight, dbias)``; dbias is always computed.
    """
    caller = "drop_connect_backward"
    impl, O, K = _linear_args(caller, backend, x, weight, None, dy=dy)
    _checks.like("dy", dy, caller=caller, shape=x.shape[:-1] + (O,), dtype=x.dtype,
                 none_ok=False)
    _mask_of(caller, mask, DropConnectMask)
    expected = (x.shape[:-1] if mask.per_example else ()) + (O, K)
    _mask_shape(caller, mask, expected, "the layer (x, weight)")
    outs = _checks.out(caller, out, [("dx", x.shape, x.dtype, None),
                                     ("dweight", (O, K), x.dtype, None),
                                     ("dbias", (O,), x.dtype, None)],
                       dict(dy=dy, x=x, weight=weight))
    impl.drop_connect_backward(dy, x, weight, mask.seed or 0, mask.offset or 0, mask.threshold,
                               mask.scale, mask.per_example, outs)
    return tuple(outs)


def drop_connect_inference(x, weight, bias, p, *, activation, n_samples, rng, mode="inverted",
                           out=None, backend=None):
    """DropConnect inference by Gaussian moment matching (Wan et al. 2013, Algorithm 2).

    The pre-activation of a training pass, ``u = (keep * scale * weight) @ x +
    bias``, is a sum of many independent terms; it is approximated by a
    Gaussian with the same mean and variance::

        q = 1 - p  (the paper's p is this KEEP probability)
        inverted:        mean = weight @ x + bias,        var = p / q * (weight**2) @ (x**2)
        weight_scaling:  mean = q * weight @ x + bias,    var = p * q * (weight**2) @ (x**2)

    (weight scaling is the paper's N(pWv, p(1-p)(W*W)(v*v)) with its p = q),
    and ``y = mean over n_samples of activation(u_k)``, ``u_k ~ N(mean, var)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., in)``, float32 or float64
    weight : ``(out, in)``; bias : ``(out,)`` or None
    p : float in [0, 1) for "inverted", [0, 1] for "weight_scaling"
    activation : None | "relu" | "tanh" | "sigmoid"
    n_samples : int >= 1
    rng : Generator or int
    out : ndarray of shape ``(..., out)`` (or a 1-tuple), optional

    Returns
    -------
    y : ndarray of shape ``(..., out)``

    Notes
    -----
    Mean and variance by two float64 GEMMs; the sampling kernel draws the
    normals of the logical tensor ``batch + (out, n_samples)`` (stream element
    ``(s * out + o) * n_samples + k``) and averages in float64.
    """
    caller = "drop_connect_inference"
    impl, O, K = _linear_args(caller, backend, x, weight, bias)
    mode = _checks.choice("mode", mode, caller=caller, choices=_MODES)
    p = _checks.scalar("p", p, caller=caller, ge=0,
                       **({"lt": 1} if mode == "inverted" else {"le": 1}))
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    S = _checks.integer("n_samples", n_samples, caller=caller, ge=1)
    rng = _random.check_rng(rng, caller)
    yshape = x.shape[:-1] + (O,)
    (y,) = _checks.out(caller, _one(out), [("y", yshape, x.dtype, None)],
                       dict(x=x, weight=weight, bias=bias))
    q = 1.0 - p
    mean_scale, var_scale = (1.0, p / q) if mode == "inverted" else (q, p * q)
    seed, offset = _random.draw(rng, math.prod(yshape) * S)
    impl.drop_connect_inference(x, weight, bias, seed, offset, mean_scale, var_scale,
                                activation, S, [y])
    return y


# ====================================================================== fused dropout + add + LN

def _row_shapes(caller, normalized_ndim, x):
    k = _checks.integer("normalized_ndim", normalized_ndim, caller=caller, ge=1)
    if k > x.ndim:
        raise ValueError(f"{caller}: 'normalized_ndim' must be <= x.ndim = {x.ndim}, got {k}.")
    sd = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    return k, x.shape[x.ndim - k:], x.shape[:x.ndim - k], sd


def dropout_add_layer_norm(x, residual, weight, bias, p, *, rng=None, eps=1e-5, training=True,
                           mode="inverted", mask="seed", normalized_ndim=1, out=None,
                           backend=None):
    """Fused ``s = dropout(x) + residual``, ``y = layer_norm(s)`` (a transformer's sublayer exit).

    ::

        s = x * keep * scale + residual          (rounded in x's dtype, as two NumPy ops)
        y = (s - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)

    with the statistics over the trailing ``normalized_ndim`` axes (float64
    accumulation) and the keep mask of :func:`dropout` over x's shape (the
    same stream elements: ``dropout(x, p, rng=...)`` with the same
    ``(seed, offset)`` gives the same mask).

    Returns
    -------
    y : ndarray like x
    residual_sum : ndarray like x, ``s`` (the next sublayer's residual, and
        what the backward normalizes again)
    mean, rstd : ndarray of the batch shape (float32; float64 for float64 x)
    mask : DropoutMask. The backward needs the dropout mask; the four arrays
        do not hold it, so this fifth return value does. By default (kind
        "seed", 0 bytes) it records only the stream position ``(seed,
        offset)`` and the backward regenerates the mask from it; with
        ``mask="bits"`` it also keeps 1 bit per element, and the backward
        reads the bits instead of running Philox again (on the 2-core test
        machine both backwards take the same time: the memory traffic bounds
        them). Unpack as ``y, s, mean, rstd, mask = ...``.

    Parameters
    ----------
    x, residual : ndarray of the same shape and dtype (float32 or float64)
    weight, bias : ndarray of the normalized shape, or None
    p : float in [0, 1]; rng : Generator or int, required when training
    eps : float > 0
    mask : "seed" (default) | "bits", as in :func:`dropout`
    out : tuple ``(y, residual_sum, mean, rstd)`` or, to reuse the bits of
        ``mask="bits"``, ``(y, residual_sum, mean, rstd, bits)``; optional

    Notes
    -----
    One kernel: bytes moved read x, residual (+ weight, bias); write y, s
    (+ mean, rstd, and n/8 bytes of bits for ``mask="bits"``). Unfused, dropout + add + layer_norm move x, y1, y1,
    residual, s, s, y (7 passes instead of 4) plus the mask bits.

    Examples
    --------
    >>> y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(
    ...     x, residual, weight, bias, 0.1, rng=gen)
    >>> dx, dres, dw, db = fastreg.dropout_add_layer_norm_backward(
    ...     dy, s, mean, rstd, weight, bias, mask)
    """
    caller = "dropout_add_layer_norm"
    impl = _setup(caller, backend, x, residual=residual, weight=weight, bias=bias)
    _checks.like("residual", residual, caller=caller, shape=x.shape, dtype=x.dtype,
                 none_ok=False)
    p, rng, training, mode = _common(caller, p, rng, training, mode)
    kind = _checks.choice("mask", mask, caller=caller, choices=_MASK_KINDS)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    k, pshape, bshape, sd = _row_shapes(caller, normalized_ndim, x)
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=pshape, dtype=x.dtype)
    if isinstance(out, (tuple, list)) and len(out) == 4:
        out = (*out, None)
    store = training and kind == "bits"
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, None),
                                     ("residual_sum", x.shape, x.dtype, None),
                                     ("mean", bshape, sd, None), ("rstd", bshape, sd, None),
                                     ("mask", (_nwords(x.size),), _BITS if store else None,
                                      None)],
                       dict(x=x, residual=residual, weight=weight, bias=bias))
    scale = _keep_scale(p, mode, training)
    if training:
        seed, offset = _random.draw(rng, x.size)
        threshold = _random.threshold(p)
    else:
        seed, offset, threshold, kind = None, None, 0, "none"
    impl.dropout_add_layer_norm(x, residual, weight, bias, seed or 0, offset or 0, threshold,
                                scale, eps, k, outs)
    return (*outs[:4], DropoutMask(kind, x.shape, p, scale, seed, offset, outs[4]))


def dropout_add_layer_norm_backward(dy, residual_sum, mean, rstd, weight, bias, mask, *,
                                    dresidual_sum=None, normalized_ndim=1, out=None,
                                    backend=None):
    """Gradients of :func:`dropout_add_layer_norm`, in one kernel, the mask regenerated.

    With ``xhat = (s - mean) * rstd`` and ``g = dy * weight``::

        ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dresidual_sum
        dresidual = ds,   dx = ds * keep * scale
        dweight = sum(dy * xhat),   dbias = sum(dy)     (over the batch axes)

    Parameters
    ----------
    dy : gradient of y; residual_sum, mean, rstd : from the forward
    weight : the forward's weight or None; bias : looked at for presence only
        (dbias is computed iff it is given, as in :func:`fastreg.layer_norm_backward`)
    mask : the DropoutMask returned by the forward (any DropoutMask of this
        shape works): its bits are read when it has them, else the mask is
        regenerated from its stream position
    dresidual_sum : gradient flowing into ``residual_sum`` from elsewhere
        (pre-norm transformers pass s on), added to ds; None for none.

    Returns
    -------
    dx, dresidual : ndarray like dy
    dweight, dbias : ndarray of the normalized shape, or None

    Notes
    -----
    Bytes moved: read dy, s (+ dresidual_sum, weight, mean, rstd, the n/8
    bytes of a "bits" mask); write dx, dresidual (+ dweight, dbias). dweight/dbias are reduced from per-block
    partials in a fixed order: bitwise identical at any thread count.
    """
    caller = "dropout_add_layer_norm_backward"
    impl = _setup(caller, backend, residual_sum, "residual_sum", dy=dy, mean=mean, rstd=rstd,
                  weight=weight, bias=bias, dresidual_sum=dresidual_sum)
    x = residual_sum
    _checks.like("dy", dy, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)
    _checks.like("dresidual_sum", dresidual_sum, caller=caller, shape=x.shape, dtype=x.dtype)
    k, pshape, bshape, sd = _row_shapes(caller, normalized_ndim, x)
    _checks.like("mean", mean, caller=caller, shape=bshape, dtype=sd, none_ok=False)
    _checks.like("rstd", rstd, caller=caller, shape=bshape, dtype=sd, none_ok=False)
    _checks.like("weight", weight, caller=caller, shape=pshape, dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=pshape, dtype=x.dtype)
    _mask_of(caller, mask, DropoutMask)
    _mask_shape(caller, mask, x.shape, "residual_sum")
    outs = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, None), ("dresidual", x.shape, x.dtype, None),
        ("dweight", pshape, None if weight is None else x.dtype, None),
        ("dbias", pshape, None if bias is None else x.dtype, None)],
        dict(dy=dy, residual_sum=x, mean=mean, rstd=rstd, weight=weight,
             dresidual_sum=dresidual_sum))
    _checks.same_kind(caller, residual_sum=x, mask=mask.bits)
    impl.dropout_add_layer_norm_backward(dy, x, mean, rstd, weight, mask.bits, mask.seed or 0,
                                         mask.offset or 0, mask.threshold, mask.scale,
                                         dresidual_sum, k, outs)
    return tuple(outs)
