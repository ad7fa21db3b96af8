"""Normalization layers for PyTorch on fastreg's kernels: Functions, functional API, modules.

Three thin layers, each calling only the one below it:

- ``*Function``: a ``torch.autograd.Function`` per forward/backward pair of
  ``fastreg.norm``. Tensors go to the kernels as zero-copy views
  (``_bridge``); every output (y, the statistics, the gradients) is
  allocated by PyTorch and written through ``out=``. The backward is
  ``once_differentiable``: asking for a second derivative raises PyTorch's
  "differentiate twice" error.
- functional (``fastreg.torch.functional``): ``torch.nn.functional``'s
  signatures. Each call either runs the Function (or, when autograd need not
  record it, the same forward without the autograd bookkeeping) or, for what
  fastreg does not run, PyTorch's own op with a one-time
  :class:`FallbackWarning`.
- modules: subclasses of PyTorch's modules that override ``forward`` only, so
  the constructor arguments, parameters, buffers, ``state_dict`` keys,
  ``extra_repr`` and ``isinstance`` checks are PyTorch's own.

Memory formats: batch, group and instance norm keep a channels-last input's
layout (the kernels run ``axis=-1`` on its (N, *spatial, C) storage) and
return channels-last outputs; layer and RMS norm run on contiguous rows as
PyTorch's do. Other layouts are copied to contiguous once.

Bytes: for contiguous and channels-last tensors the adapter moves none of its
own (views in, PyTorch-allocated outputs written in place); the kernels move
what ``fastreg.norm`` documents. An input or incoming gradient in another
layout costs one copy (as ``.contiguous()``).

Saved for backward: x, weight, bias, mean, rstd (and y for the fused ReLU),
as PyTorch's native ops save them.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import fastreg

from . import _bridge as B

__all__ = [
    "LayerNormFunction", "RMSNormFunction", "BatchNormFunction", "GroupNormFunction",
    "InstanceNormFunction",
    "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm",
    "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
]

_ACTIVATIONS = (None, "relu")


def _stats_dtype(dtype):
    """fastreg's statistics dtype: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_param_grad(p):
    return None if p is None else torch.empty(p.shape, dtype=p.dtype, device=p.device)


def _eps_reason(eps):
    if isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0:
        return None
    return f"eps={eps!r} (fastreg needs a finite eps > 0)"


def _momentum_reason(momentum):
    if isinstance(momentum, numbers.Real) and 0.0 <= momentum <= 1.0:
        return None
    return f"momentum={momentum!r} (fastreg blends running statistics with 0 <= momentum <= 1)"


def _running_reason(running_mean):
    if running_mean is None or running_mean.dtype in (torch.float32, torch.float64):
        return None
    return f"running statistics of dtype {str(running_mean.dtype)[6:]} (fastreg keeps them " \
           "in float32 or float64)"


def _param_shapes_ok(shape, *params):
    return all(p is None or tuple(p.shape) == tuple(shape) for p in params)


# --------------------------------------------------------------------------- layer norm

def _layer_norm_forward(x, weight, bias, normalized_ndim, eps):
    x = x.contiguous()
    y = torch.empty_like(x)
    mean = x.new_empty(x.shape[:x.dim() - normalized_ndim], dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    with B.on_stream(x):
        fastreg.layer_norm(B.array(x), B.array(weight), B.array(bias), eps,
                           normalized_ndim=normalized_ndim,
                           out=(B.array(y), B.array(mean), B.array(rstd)))
    return y, (x, weight, bias, mean, rstd)


class LayerNormFunction(torch.autograd.Function):
    """``y = LayerNormFunction.apply(x, weight, bias, normalized_ndim, eps)``.

    Layer norm over the trailing ``normalized_ndim`` axes of x (weight, bias
    of that shape, or None), by ``fastreg.layer_norm`` and
    ``fastreg.layer_norm_backward``. Saves x, mean and rstd (as PyTorch does).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_ndim, eps):
        y, saved = _layer_norm_forward(x, weight, bias, normalized_ndim, eps)
        ctx.save_for_backward(*saved)
        ctx.normalized_ndim = normalized_ndim
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias = bias if need_b else None  # dbias is computed iff bias is passed
        dy = dy.contiguous()
        dx, dw, db = torch.empty_like(x), _empty_param_grad(weight), _empty_param_grad(bias)
        with B.on_stream(x):
            fastreg.layer_norm_backward(B.array(dy), B.array(x), B.array(mean), B.array(rstd),
                                        B.array(weight), B.array(bias),
                                        normalized_ndim=ctx.normalized_ndim,
                                        out=(B.array(dx), B.array(dw), B.array(db)))
        return dx if need_x else None, dw if need_w else None, db, None, None


def _shape_tuple(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        return tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        return None


def _row_norm_reason(x, shape, *params):
    if shape is None or not 0 < len(shape) <= x.dim() or tuple(x.shape[x.dim() - len(shape):]) \
            != shape or not _param_shapes_ok(shape, *params):
        return B.INVALID
    return None


def _layer_norm(layer, x, normalized_shape, weight, bias, eps):
    shape = _shape_tuple(normalized_shape)
    reason = B.why_not(x, weight, bias) or _row_norm_reason(x, shape, weight, bias) \
        or _eps_reason(eps)
    if reason:
        B.fallback(layer, reason)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if B.needs_grad(x, weight, bias):
        return LayerNormFunction.apply(x, weight, bias, len(shape), eps)
    return _layer_norm_forward(x, weight, bias, len(shape), eps)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on fastreg's kernels (PyTorch's op where
    fastreg does not run the case, with a one-time :class:`FallbackWarning`)."""
    return _layer_norm("layer_norm", input, normalized_shape, weight, bias, eps)


# --------------------------------------------------------------------------- RMS norm

def _rms_norm_forward(x, weight, normalized_ndim, eps):
    x = x.contiguous()
    y = torch.empty_like(x)
    rstd = x.new_empty(x.shape[:x.dim() - normalized_ndim], dtype=_stats_dtype(x.dtype))
    with B.on_stream(x):
        fastreg.rms_norm(B.array(x), B.array(weight), eps, normalized_ndim=normalized_ndim,
                         out=(B.array(y), B.array(rstd)))
    return y, (x, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    """``y = RMSNormFunction.apply(x, weight, normalized_ndim, eps)``: RMS norm over the
    trailing ``normalized_ndim`` axes by ``fastreg.rms_norm`` (+ ``_backward``)."""

    @staticmethod
    def forward(ctx, x, weight, normalized_ndim, eps):
        y, saved = _rms_norm_forward(x, weight, normalized_ndim, eps)
        ctx.save_for_backward(*saved)
        ctx.normalized_ndim = normalized_ndim
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dy = dy.contiguous()
        dx, dw = torch.empty_like(x), _empty_param_grad(weight)
        with B.on_stream(x):
            fastreg.rms_norm_backward(B.array(dy), B.array(x), B.array(rstd), B.array(weight),
                                      normalized_ndim=ctx.normalized_ndim,
                                      out=(B.array(dx), B.array(dw)))
        return dx if need_x else None, dw if need_w else None, None, None


def _rms_norm(layer, x, normalized_shape, weight, eps):
    shape = _shape_tuple(normalized_shape)
    reason = B.why_not(x, weight) or _row_norm_reason(x, shape, weight)
    if not reason and eps is None:  # PyTorch's default: the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    reason = reason or _eps_reason(eps)
    if reason:
        B.fallback(layer, reason)
        return F.rms_norm(x, normalized_shape, weight, eps)
    if B.needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, len(shape), eps)
    return _rms_norm_forward(x, weight, len(shape), eps)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on fastreg's kernels (eps None: the machine
    epsilon of the input's dtype, as PyTorch)."""
    return _rms_norm("rms_norm", input, normalized_shape, weight, eps)


# --------------------------------------------------------------------------- batch norm

def _batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        activation):
    x, axis = B.channel_layout(x)
    y = torch.empty_like(x)
    mean = x.new_empty((x.shape[1],), dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    with B.on_stream(x):
        fastreg.batch_norm(B.array(B.kernel_view(x, axis)), B.array(weight), B.array(bias),
                           B.array(running_mean), B.array(running_var), training=training,
                           momentum=momentum, eps=eps, axis=axis, activation=activation,
                           out=(B.array(B.kernel_view(y, axis)), B.array(mean), B.array(rstd)))
    return y, (x, weight, bias, mean, rstd, y if activation else None), axis


class BatchNormFunction(torch.autograd.Function):
    """``y = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training,
    momentum, eps, activation)``.

    Batch norm of x (N, C, *spatial) over every axis but 1, by
    ``fastreg.batch_norm`` (+ ``_backward``). ``training=True`` normalizes
    with the batch statistics and, when running statistics are given, updates
    them in place (``stat = (1 - momentum) * stat + momentum * batch``, the
    variance unbiased, as PyTorch); ``training=False`` normalizes with the
    running statistics. ``activation="relu"`` fuses a ReLU (the backward then
    uses the saved output). Channels-last x stays channels-last.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation):
        y, saved, axis = _batch_norm_forward(x, weight, bias, running_mean, running_var,
                                             training, momentum, eps, activation)
        ctx.save_for_backward(*saved)
        ctx.axis, ctx.training, ctx.activation = axis, training, activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias = bias if need_b else None
        axis = ctx.axis
        dy = B.like_layout(dy, axis)
        dx, dw, db = torch.empty_like(x), _empty_param_grad(weight), _empty_param_grad(bias)
        with B.on_stream(x):
            fastreg.batch_norm_backward(
                B.array(B.kernel_view(dy, axis)), B.array(B.kernel_view(x, axis)),
                B.array(mean), B.array(rstd), B.array(weight), B.array(bias),
                training=ctx.training, axis=axis,
                y=None if y is None else B.array(B.kernel_view(y, axis)),
                activation=ctx.activation,
                out=(B.array(B.kernel_view(dx, axis)), B.array(dw), B.array(db)))
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 6


def _torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                      activation):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(y) if activation == "relu" else y


def _batch_norm(layer, x, running_mean, running_var, weight, bias, training, momentum, eps,
                activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{layer}: 'activation' must be None or 'relu', got {activation!r}.")
    reason = B.why_not(x, weight, bias, running_mean, running_var)
    if not reason:
        C = x.shape[1] if x.dim() >= 2 else -1
        if (x.dim() < 2 or not _param_shapes_ok((C,), weight, bias, running_mean, running_var)
                or (running_mean is None) != (running_var is None)
                or (not training and running_mean is None)
                or (training and x.numel() // C == 1)
                or (training and not eps > 0)):
            reason = B.INVALID  # PyTorch raises its own error for each of these
        else:
            reason = _eps_reason(eps) or _running_reason(running_mean) or (
                _momentum_reason(momentum) if training and running_mean is not None else None)
    if reason:
        B.fallback(layer, reason)
        return _torch_batch_norm(x, running_mean, running_var, weight, bias, training,
                                 momentum, eps, activation)
    args = (x, weight, bias, running_mean, running_var, bool(training), float(momentum),
            float(eps), activation)
    if B.needs_grad(x, weight, bias):
        return BatchNormFunction.apply(*args)
    return _batch_norm_forward(*args)[0]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None):
    """``torch.nn.functional.batch_norm`` on fastreg's kernels; running statistics are
    updated in place in training, as PyTorch does. ``activation="relu"`` fuses a
    ReLU into the kernels (same result as ``F.relu(F.batch_norm(...))``)."""
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training,
                       momentum, eps, activation)


# --------------------------------------------------------------------------- group norm

def _group_norm_forward(x, num_groups, weight, bias, eps):
    x, axis = B.channel_layout(x)
    y = torch.empty_like(x)
    mean = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    with B.on_stream(x):
        fastreg.group_norm(B.array(B.kernel_view(x, axis)), num_groups, B.array(weight),
                           B.array(bias), eps, axis=axis,
                           out=(B.array(B.kernel_view(y, axis)), B.array(mean), B.array(rstd)))
    return y, (x, weight, bias, mean, rstd), axis


class GroupNormFunction(torch.autograd.Function):
    """``y = GroupNormFunction.apply(x, num_groups, weight, bias, eps)``: group norm of
    x (N, C, *spatial) by ``fastreg.group_norm`` (+ ``_backward``); channels-last x
    stays channels-last."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        y, saved, axis = _group_norm_forward(x, num_groups, weight, bias, eps)
        ctx.save_for_backward(*saved)
        ctx.axis, ctx.num_groups = axis, num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        bias = bias if need_b else None
        axis = ctx.axis
        dy = B.like_layout(dy, axis)
        dx, dw, db = torch.empty_like(x), _empty_param_grad(weight), _empty_param_grad(bias)
        with B.on_stream(x):
            fastreg.group_norm_backward(
                B.array(B.kernel_view(dy, axis)), B.array(B.kernel_view(x, axis)),
                B.array(mean), B.array(rstd), ctx.num_groups, B.array(weight), B.array(bias),
                axis=axis, out=(B.array(B.kernel_view(dx, axis)), B.array(dw), B.array(db)))
        return dx if need_x else None, None, dw if need_w else None, db, None


def _group_norm(layer, x, num_groups, weight, bias, eps):
    reason = B.why_not(x, weight, bias)
    if not reason:
        if (x.dim() < 2 or isinstance(num_groups, bool)
                or not isinstance(num_groups, numbers.Integral) or num_groups < 1
                or x.shape[1] % num_groups
                or not _param_shapes_ok((x.shape[1],), weight, bias)
                or x.shape[0] * (x.shape[1] // num_groups) * math.prod(x.shape[2:]) == 1):
            reason = B.INVALID
        else:
            reason = _eps_reason(eps)
    if reason:
        B.fallback(layer, reason)
        return F.group_norm(x, num_groups, weight, bias, eps)
    if B.needs_grad(x, weight, bias):
        return GroupNormFunction.apply(x, int(num_groups), weight, bias, float(eps))
    return _group_norm_forward(x, int(num_groups), weight, bias, float(eps))[0]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` on fastreg's kernels."""
    return _group_norm("group_norm", input, num_groups, weight, bias, eps)


# --------------------------------------------------------------------------- instance norm

def _instance_norm_forward(x, weight, bias, running_mean, running_var, use_input_stats,
                           momentum, eps):
    x, axis = B.channel_layout(x)
    y = torch.empty_like(x)
    mean = x.new_empty(x.shape[:2], dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    with B.on_stream(x):
        fastreg.instance_norm(B.array(B.kernel_view(x, axis)), B.array(weight), B.array(bias),
                              B.array(running_mean), B.array(running_var),
                              use_input_stats=use_input_stats, momentum=momentum, eps=eps,
                              axis=axis,
                              out=(B.array(B.kernel_view(y, axis)), B.array(mean),
                                   B.array(rstd)))
    return y, (x, weight, bias, mean, rstd), axis


class InstanceNormFunction(torch.autograd.Function):
    """``y = InstanceNormFunction.apply(x, weight, bias, running_mean, running_var,
    use_input_stats, momentum, eps)``.

    Instance norm of x (N, C, *spatial), at least 3-D, by
    ``fastreg.instance_norm`` (+ ``_backward``). With ``use_input_stats`` each
    (sample, channel) is normalized over its positions and the running
    statistics, if given, are updated in place as PyTorch does; without, the
    running statistics normalize.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum,
                eps):
        y, saved, axis = _instance_norm_forward(x, weight, bias, running_mean, running_var,
                                                use_input_stats, momentum, eps)
        ctx.save_for_backward(*saved)
        ctx.axis, ctx.use_input_stats = axis, use_input_stats
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias = bias if need_b else None
        axis = ctx.axis
        dy = B.like_layout(dy, axis)
        dx, dw, db = torch.empty_like(x), _empty_param_grad(weight), _empty_param_grad(bias)
        with B.on_stream(x):
            fastreg.instance_norm_backward(
                B.array(B.kernel_view(dy, axis)), B.array(B.kernel_view(x, axis)),
                B.array(mean), B.array(rstd), B.array(weight), B.array(bias),
                use_input_stats=ctx.use_input_stats, axis=axis,
                out=(B.array(B.kernel_view(dx, axis)), B.array(dw), B.array(db)))
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 5


def _instance_norm(layer, x, running_mean, running_var, weight, bias, use_input_stats,
                   momentum, eps):
    reason = B.why_not(x, weight, bias, running_mean, running_var)
    if not reason:
        if (x.dim() < 3
                or not _param_shapes_ok((x.shape[1],), weight, bias, running_mean, running_var)
                or (running_mean is None) != (running_var is None)
                or (not use_input_stats and running_mean is None)
                or (use_input_stats and math.prod(x.shape[2:]) == 1)):
            reason = B.INVALID
        else:
            reason = _eps_reason(eps) or _running_reason(running_mean) or (
                _momentum_reason(momentum) if use_input_stats and running_mean is not None
                else None)
    if reason:
        B.fallback(layer, reason)
        return F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    args = (x, weight, bias, running_mean, running_var, bool(use_input_stats), float(momentum),
            float(eps))
    if B.needs_grad(x, weight, bias):
        return InstanceNormFunction.apply(*args)
    return _instance_norm_forward(*args)[0]


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` on fastreg's kernels; running statistics
    are updated in place when given with ``use_input_stats``, as PyTorch does."""
    return _instance_norm("instance_norm", input, running_mean, running_var, weight, bias,
                          use_input_stats, momentum, eps)


# --------------------------------------------------------------------------- modules

class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` running fastreg's kernels: same
    arguments (``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None``), parameters and ``state_dict``."""

    def forward(self, input):
        return _layer_norm(type(self).__name__, input, self.normalized_shape, self.weight,
                           self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` (``normalized_shape, eps=None,
    elementwise_affine=True, device=None, dtype=None``) running fastreg's kernels."""

    def forward(self, x):
        return _rms_norm(type(self).__name__, x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` (``num_groups, num_channels, eps=1e-5,
    affine=True, device=None, dtype=None``) running fastreg's kernels."""

    def forward(self, input):
        return _group_norm(type(self).__name__, input, self.num_groups, self.weight, self.bias,
                           self.eps)


class _BatchNorm:
    """fastreg's forward for PyTorch's batch norm modules, plus an optional fused ReLU.

    PyTorch's semantics, step for step: in training with
    ``track_running_stats``, ``num_batches_tracked`` grows by one and the
    running statistics are blended with ``momentum`` (``momentum=None``: the
    cumulative average, weight ``1 / num_batches_tracked``); in eval the
    running statistics normalize, or the batch statistics when the module
    has none.
    """

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: 'activation' must be None or 'relu', "
                             f"got {activation!r}.")
        self.activation = activation

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return _batch_norm(type(self).__name__, input,
                           self.running_mean if tracked else None,
                           self.running_var if tracked else None,
                           self.weight, self.bias, use_batch_stats, factor, self.eps,
                           getattr(self, "activation", None))

    def extra_repr(self):
        text = super().extra_repr()
        activation = getattr(self, "activation", None)
        return text + (f", activation={activation!r}" if activation else "")


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` (``num_features, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, device=None, dtype=None``) running
    fastreg's kernels; ``activation="relu"`` (keyword) fuses a following ReLU."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` running fastreg's kernels;
    channels_last inputs stay channels_last. ``activation="relu"`` fuses a ReLU."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` running fastreg's kernels;
    channels_last_3d inputs stay channels_last_3d. ``activation="relu"`` fuses a ReLU."""


class _InstanceNorm:
    """fastreg's forward for PyTorch's instance norm modules: batch statistics in
    training or without tracked statistics, else the running ones; unbatched
    input is handled as a batch of one; ``momentum=None`` leaves the running
    statistics unchanged (PyTorch passes 0 for it)."""

    def forward(self, input):
        self._check_input_dim(input)
        no_batch_dim = self._get_no_batch_dim()
        feature_dim = input.dim() - no_batch_dim
        if input.size(feature_dim) != self.num_features and self.affine:
            raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                             f" ({self.num_features}), but got: {input.size(feature_dim)}.")
        if input.size(feature_dim) != self.num_features:
            # PyTorch's warning, word for word
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                          "You can silence this warning by not passing in num_features, "
                          "which is not used because affine=False", stacklevel=2)
        unbatched = input.dim() == no_batch_dim
        x = input.unsqueeze(0) if unbatched else input
        y = _instance_norm(type(self).__name__, x, self.running_mean, self.running_var,
                           self.weight, self.bias, self.training or not self.track_running_stats,
                           self.momentum if self.momentum is not None else 0.0, self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """Drop-in for :class:`torch.nn.InstanceNorm1d` (``num_features, eps=1e-5,
    momentum=0.1, affine=False, track_running_stats=False, device=None,
    dtype=None``) running fastreg's kernels."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """Drop-in for :class:`torch.nn.InstanceNorm2d` running fastreg's kernels."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """Drop-in for :class:`torch.nn.InstanceNorm3d` running fastreg's kernels."""


# PyTorch module -> fastreg module for ``fastreg.torch.convert``.
SWAPS = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}
