"""Small stateful layers for NumPy training loops, over fastreg's public kernels.

Every layer has ``forward(x, training=True)`` and ``backward(dy)``, and two
dicts: ``params`` (name -> array, updated in place by the optimizers) and
``grads`` (the same names, written by ``backward``). Running statistics live
in ``buffers``. A layer keeps what its backward needs from the last forward,
so ``backward`` belongs to the latest ``forward`` call.

Buffers are reused between steps: once the shapes are known, a training step
allocates no large arrays. The arrays a layer returns (outputs and input
gradients) are its own buffers and are overwritten by its next call; copy
them to keep them. Inputs are not modified.

>>> rng = np.random.default_rng(0)
>>> model = Sequential(Linear(64, 32, rng=rng), LayerNorm(32), ReLU(), Linear(32, 10, rng=rng))
>>> logits = model.forward(x, training=True)
>>> dx = model.backward(dlogits)            # fills model.grads

The random layers (``Dropout``, ``GaussianNoise``, ``DropConnectLinear``) own
a :class:`fastreg.random.Generator` and advance it by the Philox blocks each
training call uses, so a run started from the same seeds draws the same masks
(on every backend, at any thread count). Inference draws nothing.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _checks
from . import norm as _norm
from . import prox as _prox
from . import random as _random
# the package re-exports the function ``dropout`` under the submodule's name
from .dropout import (_BITS, _MASK_KINDS, _MODES, _nwords, drop_connect, drop_connect_backward,
                      dropout, dropout_backward, gaussian_noise)

__all__ = ["Module", "Linear", "ReLU", "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d",
           "GroupNorm", "Dropout", "GaussianNoise", "DropConnectLinear", "Sequential",
           "SGD", "AdamW", "MaxNorm", "CrossEntropyLoss", "EarlyStopping"]


def _check_array(layer, x):
    """A forward's input must be an array (what it is beyond that, the kernels check)."""
    if _backend.array_kind(x) is None:
        raise TypeError(f"{type(layer).__name__}.forward: 'x' must be a NumPy or CuPy array, "
                        f"got {type(x).__name__}.")


class Module:
    """Base class: ``params``, ``grads``, ``buffers`` dicts and a buffer cache."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self._cache = {}

    def forward(self, x, training=True):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x, training=True):
        return self.forward(x, training)

    def _buffer(self, name, shape, dtype):
        """A reused array of this shape and dtype (allocated when either changes)."""
        shape = tuple(int(s) for s in shape)
        a = self._cache.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = np.empty(shape, dtype)
            self._cache[name] = a
        return a

    def _add_param(self, name, value):
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)

    def _need_forward(self):
        if getattr(self, "_saved", None) is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward(x, training=True) "
                               "first.")

    def state_dict(self):
        """Copies of the parameters and buffers."""
        return {**{k: v.copy() for k, v in self.params.items()},
                **{k: v.copy() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        """Copy arrays into the parameters and buffers (in place: optimizers keep them)."""
        names = {**self.params, **self.buffers}
        missing = sorted(set(names) - set(state))
        unexpected = sorted(set(state) - set(names))
        if missing or unexpected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}.")
        for k, target in names.items():
            src = np.asarray(state[k])
            if src.shape != target.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{k}' must have shape "
                                 f"{target.shape}, got {src.shape}.")
            target[...] = src

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def num_parameters(self):
        return sum(p.size for p in self.params.values())


def _dtype(dtype, caller):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{caller}: 'dtype' must be float32 or float64, got {dt}.")
    return dt


def _generator(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _positive_int(name, value, caller):
    return _checks.integer(name, value, caller=caller, ge=1)


def _philox(rng, caller):
    """The Philox generator a random layer owns and advances.

    A ``fastreg.random.Generator`` is used as is (shared with whoever else
    holds it); an int seeds ``Generator(seed, 0)``; a NumPy Generator gives a
    seed (one draw); None takes a fresh seed from the OS (not reproducible).
    """
    if rng is None:
        return _random.Generator(np.random.SeedSequence().entropy % _random.SEED_LIMIT)
    if isinstance(rng, np.random.Generator):
        return _random.Generator(int(rng.integers(0, _random.SEED_LIMIT, dtype=np.uint64)))
    return _random.check_rng(rng, caller)


# --------------------------------------------------------------------------- Linear, ReLU

class Linear(Module):
    """``y = x @ weight.T + bias`` over the last axis (PyTorch's layout and initialisation:
    weight and bias uniform in ±1/sqrt(in_features))."""

    def __init__(self, in_features, out_features, bias=True, *, rng=None, dtype=np.float32):
        super().__init__()
        self._init_weights("Linear", in_features, out_features, bias, _generator(rng), dtype)
        self._saved = None

    def _init_weights(self, caller, in_features, out_features, bias, gen, dtype):
        self.in_features = _positive_int("in_features", in_features, caller)
        self.out_features = _positive_int("out_features", out_features, caller)
        dt = _dtype(dtype, caller)
        bound = 1.0 / math.sqrt(self.in_features)
        self._add_param("weight", gen.uniform(-bound, bound, (self.out_features,
                                                              self.in_features)).astype(dt))
        if bias:
            self._add_param("bias", gen.uniform(-bound, bound, self.out_features).astype(dt))

    def _check_input(self, x):
        w = self.params["weight"]
        caller = f"{type(self).__name__}.forward"
        _checks.array("x", x, caller=caller, dtypes=(w.dtype,), min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{caller}: 'x' must have {self.in_features} features in its "
                             f"last axis, got shape {x.shape}.")

    def forward(self, x, training=True):
        self._check_input(x)
        w = self.params["weight"]
        x2 = x.reshape(-1, self.in_features)
        y = self._buffer("y", (x2.shape[0], self.out_features), w.dtype)
        np.matmul(x2, w.T, out=y)
        if "bias" in self.params:
            y += self.params["bias"]
        self._saved = x2
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy):
        self._need_forward()
        x2 = self._saved
        dy2 = np.asarray(dy).reshape(-1, self.out_features)
        np.matmul(dy2.T, x2, out=self.grads["weight"])
        if "bias" in self.params:
            np.sum(dy2, axis=0, out=self.grads["bias"])
        dx = self._buffer("dx", x2.shape, x2.dtype)
        np.matmul(dy2, self.params["weight"], out=dx)
        return dx.reshape(*np.shape(dy)[:-1], self.in_features)


class ReLU(Module):
    """``y = max(x, 0)``; the backward passes dy where y > 0."""

    def forward(self, x, training=True):
        _check_array(self, x)
        y = self._buffer("y", x.shape, x.dtype)
        np.maximum(x, 0, out=y)
        self._saved = y
        return y

    def backward(self, dy):
        self._need_forward()
        y = self._saved
        keep = self._buffer("keep", y.shape, np.bool_)
        np.greater(y, 0, out=keep)
        dx = self._buffer("dx", y.shape, y.dtype)
        np.multiply(dy, keep, out=dx)
        return dx


# --------------------------------------------------------------------------- normalization

class _Affine(Module):
    def _affine(self, shape, dtype, weight=True, bias=True):
        if weight:
            self._add_param("weight", np.ones(shape, dtype))
        if bias:
            self._add_param("bias", np.zeros(shape, dtype))

    def _wb(self):
        return self.params.get("weight"), self.params.get("bias")

    def _grad_out(self, dx):
        return (dx, self.grads.get("weight"), self.grads.get("bias"))


class LayerNorm(_Affine):
    """Layer normalization over the trailing ``normalized_shape`` (``fastreg.layer_norm``)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 dtype=np.float32):
        super().__init__()
        shape = ((normalized_shape,) if isinstance(normalized_shape, (int, np.integer))
                 else tuple(normalized_shape))
        self.normalized_shape = tuple(_positive_int("normalized_shape", s, "LayerNorm")
                                      for s in shape)
        self.eps = _checks.scalar("eps", eps, caller="LayerNorm", gt=0)
        dt = _dtype(dtype, "LayerNorm")
        self._affine(self.normalized_shape, dt, elementwise_affine, elementwise_affine and bias)
        self._saved = None

    def forward(self, x, training=True):
        _check_array(self, x)
        k = len(self.normalized_shape)
        w, b = self._wb()
        batch = x.shape[:x.ndim - k] if x.ndim >= k else ()
        out = (self._buffer("y", x.shape, x.dtype), self._buffer("mean", batch, _stat(x)),
               self._buffer("rstd", batch, _stat(x)))
        y, mean, rstd = _norm.layer_norm(x, w, b, self.eps, normalized_ndim=k, out=out)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, dy):
        self._need_forward()
        x, mean, rstd = self._saved
        w, b = self._wb()
        dx = self._buffer("dx", x.shape, x.dtype)
        return _norm.layer_norm_backward(dy, x, mean, rstd, w, b,
                                         normalized_ndim=len(self.normalized_shape),
                                         out=self._grad_out(dx))[0]


class RMSNorm(_Affine):
    """RMS normalization over the trailing ``normalized_shape`` (``fastreg.rms_norm``)."""

    def __init__(self, normalized_shape, eps=1e-6, elementwise_affine=True, *,
                 dtype=np.float32):
        super().__init__()
        shape = ((normalized_shape,) if isinstance(normalized_shape, (int, np.integer))
                 else tuple(normalized_shape))
        self.normalized_shape = tuple(_positive_int("normalized_shape", s, "RMSNorm")
                                      for s in shape)
        self.eps = _checks.scalar("eps", eps, caller="RMSNorm", gt=0)
        self._affine(self.normalized_shape, _dtype(dtype, "RMSNorm"), elementwise_affine, False)
        self._saved = None

    def forward(self, x, training=True):
        _check_array(self, x)
        k = len(self.normalized_shape)
        batch = x.shape[:x.ndim - k] if x.ndim >= k else ()
        out = (self._buffer("y", x.shape, x.dtype), self._buffer("rstd", batch, _stat(x)))
        y, rstd = _norm.rms_norm(x, self.params.get("weight"), self.eps, normalized_ndim=k,
                                 out=out)
        self._saved = (x, rstd)
        return y

    def backward(self, dy):
        self._need_forward()
        x, rstd = self._saved
        dx = self._buffer("dx", x.shape, x.dtype)
        return _norm.rms_norm_backward(dy, x, rstd, self.params.get("weight"),
                                       normalized_ndim=len(self.normalized_shape),
                                       out=(dx, self.grads.get("weight")))[0]


def _stat(x):
    return np.float64 if x.dtype == np.float64 else np.float32


class _BatchNorm(_Affine):
    _ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32):
        super().__init__()
        name = type(self).__name__
        self.num_features = _positive_int("num_features", num_features, name)
        self.eps = _checks.scalar("eps", eps, caller=name, gt=0)
        if momentum is not None:
            momentum = _checks.scalar("momentum", momentum, caller=name, ge=0, le=1)
        self.momentum = momentum
        self.axis = _checks.integer("axis", axis, caller=name) if axis != -1 else -1
        if self.axis not in (1, -1):
            raise ValueError(f"{name}: 'axis' must be 1 (channels first) or -1 (channels "
                             f"last), got {axis!r}.")
        dt = _dtype(dtype, name)
        self._affine((self.num_features,), dt, affine, affine)
        self.track_running_stats = bool(track_running_stats)
        if self.track_running_stats:
            self.buffers["running_mean"] = np.zeros(self.num_features, dt)
            self.buffers["running_var"] = np.ones(self.num_features, dt)
            self.buffers["num_batches_tracked"] = np.zeros((), np.int64)
        self._saved = None

    def _check_input(self, x):
        name = type(self).__name__
        _check_array(self, x)
        if x.ndim not in self._ndims:
            raise ValueError(f"{name}.forward: 'x' must be "
                             f"{' or '.join(f'{d}-D' for d in self._ndims)}, got shape {x.shape}.")

    def forward(self, x, training=True):
        self._check_input(x)
        use_batch = training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        rm = self.buffers.get("running_mean") if self.track_running_stats else None
        rv = self.buffers.get("running_var") if self.track_running_stats else None
        if training and self.track_running_stats:
            self.buffers["num_batches_tracked"] += 1
            if self.momentum is None:          # cumulative moving average
                momentum = 1.0 / int(self.buffers["num_batches_tracked"])
        C = self.num_features
        out = (self._buffer("y", x.shape, x.dtype), self._buffer("mean", (C,), _stat(x)),
               self._buffer("rstd", (C,), _stat(x)))
        w, b = self._wb()
        y, mean, rstd = _norm.batch_norm(x, w, b, rm if training or not use_batch else None,
                                         rv if training or not use_batch else None,
                                         training=use_batch, momentum=momentum, eps=self.eps,
                                         axis=self.axis, out=out)
        self._saved = (x, mean, rstd, use_batch)
        return y

    def backward(self, dy):
        self._need_forward()
        x, mean, rstd, use_batch = self._saved
        w, b = self._wb()
        dx = self._buffer("dx", x.shape, x.dtype)
        return _norm.batch_norm_backward(dy, x, mean, rstd, w, b, training=use_batch,
                                         axis=self.axis, out=self._grad_out(dx))[0]


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input (``axis=-1``: (N, L, C)).

    PyTorch's conventions: ``momentum`` is the weight of the new batch in the
    running statistics, ``momentum=None`` a cumulative average (1 / batches
    seen); in inference the running statistics normalize.
    """
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) input (``axis=-1``: NHWC). See BatchNorm1d."""
    _ndims = (4,)


class GroupNorm(_Affine):
    """Group normalization (``fastreg.group_norm``) of (N, C, ...) input (``axis=-1``:
    channels last)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, axis=1,
                 dtype=np.float32):
        super().__init__()
        self.num_groups = _positive_int("num_groups", num_groups, "GroupNorm")
        self.num_channels = _positive_int("num_channels", num_channels, "GroupNorm")
        if self.num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: 'num_groups' must divide num_channels "
                             f"{self.num_channels}, got {self.num_groups}.")
        self.eps = _checks.scalar("eps", eps, caller="GroupNorm", gt=0)
        self.axis = axis
        self._affine((self.num_channels,), _dtype(dtype, "GroupNorm"), affine, affine)
        self._saved = None

    def forward(self, x, training=True):
        _check_array(self, x)
        G, N = self.num_groups, x.shape[0]
        out = (self._buffer("y", x.shape, x.dtype), self._buffer("mean", (N, G), _stat(x)),
               self._buffer("rstd", (N, G), _stat(x)))
        w, b = self._wb()
        y, mean, rstd = _norm.group_norm(x, G, w, b, self.eps, axis=self.axis, out=out)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, dy):
        self._need_forward()
        x, mean, rstd = self._saved
        w, b = self._wb()
        dx = self._buffer("dx", x.shape, x.dtype)
        return _norm.group_norm_backward(dy, x, mean, rstd, self.num_groups, w, b,
                                         axis=self.axis, out=self._grad_out(dx))[0]


# --------------------------------------------------------------------------- random layers

class Dropout(Module):
    """Dropout (``fastreg.dropout``): zero each element with probability ``p`` in training.

    ``mode="inverted"`` scales the kept elements by ``1 / (1 - p)`` in training
    and is the identity at inference; ``mode="weight_scaling"`` trains
    unscaled and multiplies by ``1 - p`` at inference (Srivastava et al.).
    ``mask="bits"`` keeps 1 bit per element for the backward (a reused
    buffer of ``ceil(n / 32)`` uint32 words); ``mask="seed"`` keeps nothing
    and the backward regenerates the mask from its stream position.

    ``rng``: a ``fastreg.random.Generator`` (used and advanced), an int seed
    (the layer's own ``Generator(seed, 0)``), a NumPy Generator (one seed is
    drawn from it) or None (a fresh seed). Each training call advances
    ``self.rng`` by ``ceil(x.size / 4)`` blocks, so every step draws a new
    mask and a run is reproducible from its seed. ``last_mask`` is the
    ``DropoutMask`` of the latest forward.
    """

    def __init__(self, p=0.5, mode="inverted", mask="bits", *, rng=None):
        super().__init__()
        caller = "Dropout"
        self.p = _checks.scalar("p", p, caller=caller, ge=0, le=1)
        self.mode = _checks.choice("mode", mode, caller=caller, choices=_MODES)
        self.mask = _checks.choice("mask", mask, caller=caller, choices=_MASK_KINDS)
        self.rng = _philox(rng, caller)
        self._saved = None

    @property
    def last_mask(self):
        return self._saved

    def forward(self, x, training=True):
        _check_array(self, x)
        training = _checks.flag("training", training, caller="Dropout.forward")
        y = self._buffer("y", x.shape, x.dtype)
        bits = (self._buffer("bits", (_nwords(x.size),), _BITS)
                if training and self.mask == "bits" else None)
        y, self._saved = dropout(x, self.p, rng=self.rng, training=training, mode=self.mode,
                                 mask=self.mask, out=(y, bits))
        return y

    def backward(self, dy):
        self._need_forward()
        dx = self._buffer("dx", np.shape(dy), np.asarray(dy).dtype)
        return dropout_backward(dy, self._saved, out=dx)


class GaussianNoise(Module):
    """Additive Gaussian noise (``fastreg.gaussian_noise``): ``y = x + std * z`` in training,
    ``y = x`` at inference; the backward is the identity (``dx = dy``, copied).

    ``rng`` as in :class:`Dropout`; each training call advances ``self.rng``
    by ``ceil(x.size / 4)`` blocks.
    """

    def __init__(self, std, *, rng=None):
        super().__init__()
        self.std = _checks.scalar("std", std, caller="GaussianNoise", ge=0)
        self.rng = _philox(rng, "GaussianNoise")
        self._saved = None

    def forward(self, x, training=True):
        _check_array(self, x)
        training = _checks.flag("training", training, caller="GaussianNoise.forward")
        y = self._buffer("y", x.shape, x.dtype)
        gaussian_noise(x, self.std, rng=self.rng, training=training, out=y)
        self._saved = x.shape
        return y

    def backward(self, dy):
        self._need_forward()
        dy = np.asarray(dy)
        if dy.shape != self._saved:
            raise ValueError(f"GaussianNoise.backward: 'dy' must have the forward's shape "
                             f"{self._saved}, got {dy.shape}.")
        dx = self._buffer("dx", dy.shape, dy.dtype)
        np.copyto(dx, dy)
        return dx


class DropConnectLinear(Linear):
    """A Linear layer with DropConnect (``fastreg.drop_connect``): in training each weight
    is dropped with probability ``p`` (the bias is not), one mask per batch or, with
    ``per_example=True``, one per sample (Wan et al. 2013).

    ``mode="inverted"`` scales kept weights by ``1 / (1 - p)`` and uses
    ``weight`` at inference; ``"weight_scaling"`` trains unscaled and uses
    ``(1 - p) * weight`` at inference. The mask is never stored: the backward
    regenerates it from its stream position.

    ``rng`` initialises the weights as :class:`Linear` does (int, NumPy
    Generator or None); ``mask_rng`` is the Philox generator of the masks
    (as ``rng`` of :class:`Dropout`; default: a seed drawn from the
    initialisation generator after the weights, so one int seeds both). Each
    training call advances it by ``ceil(out * in / 4)`` blocks
    (``ceil(N * out * in / 4)`` per example).
    """

    def __init__(self, in_features, out_features, p=0.5, bias=True, per_example=False, *,
                 rng=None, mask_rng=None, mode="inverted", dtype=np.float32):
        Module.__init__(self)
        caller = "DropConnectLinear"
        gen = _generator(rng)
        self._init_weights(caller, in_features, out_features, bias, gen, dtype)
        self.p = _checks.scalar("p", p, caller=caller, ge=0, le=1)
        self.per_example = _checks.flag("per_example", per_example, caller=caller)
        self.mode = _checks.choice("mode", mode, caller=caller, choices=_MODES)
        self.mask_rng = _philox(gen if mask_rng is None else mask_rng, caller)
        self._saved = None

    def forward(self, x, training=True):
        self._check_input(x)
        training = _checks.flag("training", training, caller="DropConnectLinear.forward")
        w = self.params["weight"]
        y = self._buffer("y", x.shape[:-1] + (self.out_features,), w.dtype)
        y, mask = drop_connect(x, w, self.params.get("bias"), self.p, rng=self.mask_rng,
                               per_example=self.per_example, training=training, mode=self.mode,
                               out=y)
        self._saved = (x, mask)
        return y

    def backward(self, dy):
        self._need_forward()
        x, mask = self._saved
        w = self.params["weight"]
        dbias = self.grads.get("bias")
        if dbias is None:                       # the kernel always reduces dbias
            dbias = self._buffer("dbias", (self.out_features,), w.dtype)
        dx = self._buffer("dx", x.shape, w.dtype)
        drop_connect_backward(np.asarray(dy), x, w, mask, out=(dx, self.grads["weight"], dbias))
        return dx


# --------------------------------------------------------------------------- containers

class Sequential(Module):
    """Layers applied in order; ``params``/``grads``/``buffers`` hold every layer's arrays
    under ``"<index>.<name>"`` (the same arrays, so updates reach the layers)."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} must be a fastreg.nn.Module, got "
                                f"{type(layer).__name__}.")
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            for k in layer.params:
                self.params[f"{i}.{k}"] = layer.params[k]
                self.grads[f"{i}.{k}"] = layer.grads[k]
            for k in layer.buffers:
                self.buffers[f"{i}.{k}"] = layer.buffers[k]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


# --------------------------------------------------------------------------- optimizers

class _Optimizer:
    """Updates ``model.params`` in place from ``model.grads`` with one fused call over
    the chosen parameters (the list forms of ``fastreg.sgd_step`` / ``adam_step``).

    ``names`` picks the parameters (default: all of ``model.params``), so two
    optimizers over disjoint names act as PyTorch's parameter groups (e.g.
    decay on the weights only). ``constraints`` are objects with an
    ``apply()`` method (:class:`MaxNorm`), applied in order after each step.
    """

    def __init__(self, model, lr, caller, names=None, constraints=()):
        if not isinstance(model, Module):
            raise TypeError(f"{caller}: 'model' must be a fastreg.nn.Module, got "
                            f"{type(model).__name__}.")
        self.model = model
        self.names = _param_names(model, names, caller)
        self.lr = _checks.scalar("lr", lr, caller=caller, ge=0)
        self.constraints = list(constraints)
        for i, c in enumerate(self.constraints):
            if not callable(getattr(c, "apply", None)):
                raise TypeError(f"{caller}: 'constraints[{i}]' must have an apply() method "
                                f"(e.g. fastreg.nn.MaxNorm), got {type(c).__name__}.")
        self.steps = 0

    def _lists(self):
        return ([self.model.params[k] for k in self.names],
                [self.model.grads[k] for k in self.names])

    def _constrain(self):
        for c in self.constraints:
            c.apply()


def _param_names(model, names, caller):
    if names is None:
        return list(model.params)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [k for k in names if k not in model.params]
    if unknown:
        raise ValueError(f"{caller}: 'names' must name parameters of the model "
                         f"({', '.join(model.params)}), got unknown {unknown}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{caller}: 'names' must not repeat a parameter, got {names}.")
    return names


class SGD(_Optimizer):
    """SGD with PyTorch's semantics plus decoupled weight decay and an L1 prox.

    ``weight_decay`` is the coupled L2 penalty (added to the gradient, as in
    ``torch.optim.SGD``); ``decoupled_weight_decay`` shrinks the weights by
    ``1 - lr * decoupled_weight_decay`` each step; ``l1 > 0`` soft-thresholds
    the weights by ``lr * l1`` after the step, which leaves exact zeros. One
    pass over the parameters (``fastreg.sgd_step`` on the list); ``names`` and
    ``constraints`` as described in ``_Optimizer``.
    """

    def __init__(self, model, lr, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, decoupled_weight_decay=0.0, l1=0.0, *, names=None,
                 constraints=()):
        super().__init__(model, lr, "SGD", names, constraints)
        self.momentum = _checks.scalar("momentum", momentum, caller="SGD", ge=0)
        self.dampening = dampening
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.decoupled_weight_decay = decoupled_weight_decay
        self.l1 = l1
        self.buffers = ([np.empty_like(model.params[k]) for k in self.names]
                        if self.momentum > 0 else None)

    def step(self):
        ws, gs = self._lists()
        _prox.sgd_step(ws, gs, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                       nesterov=self.nesterov, weight_decay=self.weight_decay,
                       decoupled_weight_decay=self.decoupled_weight_decay, l1=self.l1,
                       momentum_buffer=self.buffers, first_step=self.steps == 0)
        self.steps += 1
        self._constrain()


class AdamW(_Optimizer):
    """Adam with PyTorch's semantics: decoupled weight decay (AdamW) or a coupled L2
    penalty (Adam), plus an L1 prox.

    ``decoupled_weight_decay`` (default 0.01, torch's AdamW default) shrinks the
    weights by ``1 - lr * decoupled_weight_decay`` before the Adam update;
    ``weight_decay`` instead adds ``weight_decay * w`` to the gradient (Adam
    with L2, whose effective decay is then rescaled per weight by Adam's
    denominator). Give one of the two: the fused step applies one kind of
    decay. ``l1 > 0`` soft-thresholds by ``lr * l1`` after the step.
    ``names`` and ``constraints`` as described in ``_Optimizer``.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=0.01, l1=0.0, amsgrad=False, *, names=None,
                 constraints=()):
        super().__init__(model, lr, "AdamW", names, constraints)
        wd = _checks.scalar("weight_decay", weight_decay, caller="AdamW", ge=0)
        dwd = _checks.scalar("decoupled_weight_decay", decoupled_weight_decay, caller="AdamW",
                             ge=0)
        if wd > 0 and dwd > 0:
            raise ValueError("AdamW: 'weight_decay' (coupled L2) and 'decoupled_weight_decay' "
                             f"cannot both be > 0, got {weight_decay!r} and "
                             f"{decoupled_weight_decay!r}; set the other to 0.")
        self.decoupled = wd == 0
        self.decay = dwd if self.decoupled else wd
        self.betas, self.eps, self.l1, self.amsgrad = betas, eps, l1, bool(amsgrad)
        self.exp_avg = [np.zeros_like(model.params[k]) for k in self.names]
        self.exp_avg_sq = [np.zeros_like(model.params[k]) for k in self.names]
        self.max_exp_avg_sq = ([np.zeros_like(model.params[k]) for k in self.names]
                               if self.amsgrad else None)

    def step(self):
        ws, gs = self._lists()
        self.steps += 1
        _prox.adam_step(ws, gs, self.exp_avg, self.exp_avg_sq, step=self.steps, lr=self.lr,
                        betas=self.betas, eps=self.eps, weight_decay=self.decay,
                        decoupled_weight_decay=self.decoupled, amsgrad=self.amsgrad,
                        max_exp_avg_sq=self.max_exp_avg_sq, l1=self.l1)
        self._constrain()


class MaxNorm:
    """Max-norm constraint (``fastreg.max_norm``, Keras's ``MaxNorm``), applied in place.

    ``apply()`` rescales, for each chosen parameter, every group whose L2 norm
    exceeds ``max_value``: ``w_g <- w_g * min(n, max_value) / (n + eps)``.
    Pass it to an optimizer's ``constraints`` to apply it after each step
    (Srivastava et al. 2014 pair it with dropout). ``axis=1`` makes a group
    of each output unit's incoming weights in the ``(out, in)`` layout of
    :class:`Linear`. ``names`` defaults to the model's 2-D parameters named
    ``weight`` (the Linear and DropConnectLinear weights; norm-layer gains are
    1-D and left alone).
    """

    def __init__(self, model, max_value, *, names=None, axis=1, eps=1e-7):
        caller = "MaxNorm"
        if not isinstance(model, Module):
            raise TypeError(f"{caller}: 'model' must be a fastreg.nn.Module, got "
                            f"{type(model).__name__}.")
        self.max_value = _checks.scalar("max_value", max_value, caller=caller, gt=0)
        self.eps = _checks.scalar("eps", eps, caller=caller, ge=0)
        if names is None:
            names = [k for k, v in model.params.items()
                     if k.rsplit(".", 1)[-1] == "weight" and v.ndim == 2]
        self.names = _param_names(model, names, caller)
        self.axis = axis
        for k in self.names:
            _checks.axes("axis", axis, caller=caller, ndim=model.params[k].ndim)
        self.params = [model.params[k] for k in self.names]

    def apply(self):
        for w in self.params:
            _prox.max_norm(w, self.max_value, axis=self.axis, eps=self.eps, out=w)


class CrossEntropyLoss:
    """Softmax cross-entropy with label smoothing and its gradient
    (``fastreg.cross_entropy_label_smoothing``), into reused buffers.

    ``loss, dlogits = CrossEntropyLoss(smoothing=0.1)(logits, target)`` with
    logits ``(..., K)`` and integer targets ``(...)``. ``style="uniform"``
    (PyTorch): the target distribution is ``(1 - s) * onehot + s / K``;
    ``"others"``: ``1 - s`` on the target and ``s / (K - 1)`` on each other
    class. ``loss`` is a float for ``reduction="mean"``/``"sum"`` and the
    per-row array for ``"none"``; ``dlogits`` (logits' shape) is the gradient
    of the loss (of its sum for ``"none"``) and is overwritten by the next call.
    """

    def __init__(self, smoothing=0.0, style="uniform", reduction="mean", ignore_index=None):
        caller = "CrossEntropyLoss"
        self.smoothing = _checks.scalar("smoothing", smoothing, caller=caller, ge=0, le=1)
        self.style = _checks.choice("style", style, caller=caller, choices=_prox._STYLES)
        self.reduction = _checks.choice("reduction", reduction, caller=caller,
                                        choices=_prox._REDUCTIONS)
        self.ignore_index = ignore_index
        self._cache = {}

    _buffer = Module._buffer

    def __call__(self, logits, target):
        if getattr(logits, "ndim", 0) < 1:
            raise ValueError("CrossEntropyLoss: 'logits' must be an array (..., K), got "
                             f"{type(logits).__name__} of shape {np.shape(logits)}.")
        K = logits.shape[-1]
        z = logits.reshape(-1, K)
        t = np.asarray(target).reshape(-1)
        loss = self._buffer("loss", (z.shape[0],) if self.reduction == "none" else (),
                            z.dtype)
        dz = self._buffer("dlogits", z.shape, z.dtype)
        _prox.cross_entropy_label_smoothing(z, t, smoothing=self.smoothing,
                                            reduction=self.reduction,
                                            ignore_index=self.ignore_index, style=self.style,
                                            out=(loss, dz))
        if self.reduction == "none":
            return loss.reshape(logits.shape[:-1]), dz.reshape(logits.shape)
        return float(loss), dz.reshape(logits.shape)


# --------------------------------------------------------------------------- early stopping

class EarlyStopping:
    """Stop training when a monitored value stops improving (Keras's EarlyStopping).

    After each epoch call ``step(value, model)``; it returns True when training
    should stop: ``patience`` epochs in a row without an improvement larger
    than ``min_delta`` (``value < best - min_delta`` for ``mode="min"``,
    ``value > best + min_delta`` for ``mode="max"``). With ``restore_best``,
    the model's parameters and buffers from the best epoch are kept
    (``model.state_dict()`` copies) and loaded back into the model when it
    stops; ``restore(model)`` does the same by hand (e.g. when the epoch budget
    ends first).

    Attributes: ``best`` (the best value), ``best_epoch`` (0-based),
    ``wait`` (epochs since it), ``stopped_epoch`` (None until it stops),
    ``epoch`` (epochs seen).
    """

    def __init__(self, patience=5, min_delta=0.0, mode="min", restore_best=True):
        caller = "EarlyStopping"
        self.patience = _checks.integer("patience", patience, caller=caller, ge=0)
        self.min_delta = abs(_checks.scalar("min_delta", min_delta, caller=caller))
        self.mode = _checks.choice("mode", mode, caller=caller, choices=("min", "max"))
        self.restore_best = _checks.flag("restore_best", restore_best, caller=caller)
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = None
        self.best_state = None
        self.wait = 0
        self.epoch = 0
        self.stopped_epoch = None

    def improved(self, value):
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value, model=None):
        value = _checks.scalar("value", value, caller="EarlyStopping.step")
        epoch = self.epoch
        self.epoch += 1
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best and model is not None:
                self.best_state = model.state_dict()
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            if self.restore_best and model is not None:
                self.restore(model)
            return True
        return False

    def restore(self, model):
        """Load the best epoch's parameters and buffers into ``model`` (if any were kept)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
