"""Dropout layers for PyTorch on fastreg's kernels: Functions, functional API, modules.

The same three layers as ``norm.py``: ``*Function`` (``torch.autograd.Function``
per forward/backward pair of ``fastreg.dropout``, tensors passed as zero-copy
views, outputs allocated by PyTorch), functional (``fastreg.torch.functional``)
and modules.

- :class:`Dropout`: drop-in for :class:`torch.nn.Dropout`.
- :class:`DropConnectLinear`: :class:`torch.nn.Linear` whose weights (not
  activations) are dropped in training (Wan et al., 2013).
- :class:`DropoutAddLayerNorm`: ``LayerNorm(residual + dropout(x))`` in one
  kernel each way, the exit of a transformer sublayer.

Random numbers
--------------
fastreg's masks come from its Philox4x32-10 stream (``fastreg.random``), not
from PyTorch's generator, so **the masks differ from PyTorch's**: outputs in
training mode differ from ``torch.nn.Dropout``'s by design (the same
distribution, other draws); in eval mode they are identical. Each training
call draws one 63-bit seed from PyTorch's default CPU generator (or the
``generator=`` passed to the functional form) and runs at stream offset 0,
so ``torch.manual_seed(s)`` makes a run reproducible exactly as it does for
PyTorch's layers, and the draw advances PyTorch's CPU generator by one
number. For CUDA tensors too the seed comes from the CPU generator (reading
one from the CUDA generator would synchronize the device). The seed fixes
the mask bit for bit on every fastreg backend and thread count.

Element ``i`` of the stream is the ``i``-th element of the input in memory
order (a channels_last tensor's mask follows its (N, H, W, C) storage), so
no layout is copied; inputs with gaps or overlaps are copied to contiguous
first.

Masks kept for the backward
---------------------------
``mask="bits"`` keeps 1 bit per element (``ceil(n / 32)`` int32 words, a
32nd of a float32 input; PyTorch keeps 1 byte per element);
``mask="seed"`` keeps nothing and the backward regenerates the mask from its
seed (a Philox pass instead of a bit read). DropConnect always regenerates.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import fastreg

from . import _bridge as B
from .norm import _eps_reason, _row_norm_reason, _shape_tuple, _stats_dtype

__all__ = [
    "DropoutFunction", "DropConnectFunction", "DropoutAddLayerNormFunction",
    "dropout", "drop_connect_linear", "dropout_add_layer_norm", "draw_seed",
    "Dropout", "DropConnectLinear", "DropoutAddLayerNorm",
]

_MASK_KINDS = ("bits", "seed")


def draw_seed(generator=None):
    """One 63-bit seed from PyTorch's CPU generator (default: ``torch.default_generator``,
    the one ``torch.manual_seed`` seeds), as a Python int."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def _check_mask(layer, mask):
    if mask not in _MASK_KINDS:
        raise ValueError(f"{layer}: 'mask' must be 'bits' or 'seed', got {mask!r}.")
    return mask


def _p_ok(p):
    return isinstance(p, numbers.Real) and not isinstance(p, bool) and 0.0 <= p <= 1.0


def _check_p(layer, p):
    """PyTorch's check of a dropout probability, with its words."""
    if not _p_ok(p):
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _bits_words(x, kind, training=True):
    """The int32 words of a "bits" mask of x (None otherwise), allocated by PyTorch."""
    if not training or kind != "bits":
        return None
    return torch.empty(((x.numel() + 31) // 32,), dtype=torch.int32, device=x.device)


def _uint32(bits):
    """The mask words as the uint32 array fastreg writes (None stays None)."""
    return None if bits is None else B.array(bits).view(np.uint32)


# --------------------------------------------------------------------------- dropout

def _dropout_forward(x, p, seed, mask_kind):
    x, perm = B.dense(x)
    y = torch.empty_like(x)
    bits = _bits_words(x, mask_kind)
    with B.on_stream(x):
        _, mask = fastreg.dropout(B.array(B.permuted(x, perm)), p, rng=seed, mask=mask_kind,
                                  out=(B.array(B.permuted(y, perm)), _uint32(bits)))
    return y, mask, bits, perm


def _dropout_backward(dy, mask, perm):
    dy = B.permuted(dy, perm).contiguous()  # no copy when dy has the input's layout
    dx = torch.empty_like(dy)
    with B.on_stream(dy):
        fastreg.dropout_backward(B.array(dy), mask, out=B.array(dx))
    return B.unpermuted(dx, perm)


class DropoutFunction(torch.autograd.Function):
    """``y = DropoutFunction.apply(x, p, seed, mask, inplace)``.

    Inverted dropout of x by ``fastreg.dropout`` with the stream at
    ``(seed, 0)``: ``y = x * keep / (1 - p)``, ``keep_i = word_i >=
    floor(p * 2**32)`` for element ``i`` in x's memory order. ``mask`` is
    "bits" (1 bit per element saved) or "seed" (nothing saved; the backward
    regenerates the mask). ``inplace=True`` writes y into x and returns x
    (marked dirty, as PyTorch's in-place ops). The backward is
    ``dx = dy * keep / (1 - p)`` (``fastreg.dropout_backward``).
    """

    @staticmethod
    def forward(ctx, x, p, seed, mask, inplace):
        y, ctx.mask, ctx.bits, ctx.perm = _dropout_forward(x, p, seed, mask)
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _dropout_backward(dy, ctx.mask, ctx.perm), None, None, None, None


def _dropout(layer, x, p, training, inplace, mask_kind, generator):
    _check_mask(layer, mask_kind)
    if not _p_ok(p) or not training or p == 0:
        # PyTorch raises its error for a bad p; otherwise dropout is the identity
        # (PyTorch returns the input itself).
        return F.dropout(x, p, training, inplace)
    reason = B.why_not(x, autocast=False) or B.backend_lacks(x, "dropout", "dropout")
    if reason:
        B.fallback(layer, reason)
        return F.dropout(x, p, training, inplace)
    seed = draw_seed(generator)
    if B.needs_grad(x):
        return DropoutFunction.apply(x, float(p), seed, mask_kind, bool(inplace))
    y = _dropout_forward(x, float(p), seed, mask_kind)[0]
    if inplace:
        return x.copy_(y)
    return y


def dropout(input, p=0.5, training=True, inplace=False, *, mask="bits", generator=None):
    """``torch.nn.functional.dropout`` on fastreg's kernels (masks from fastreg's
    stream, seeded from ``generator``, PyTorch's default CPU generator when None).

    ``mask``: "bits" (1 bit per element kept for the backward) or "seed"
    (nothing kept). Eval mode and ``p = 0`` return ``input`` itself, as PyTorch.
    """
    return _dropout("dropout", input, p, training, inplace, mask, generator)


# --------------------------------------------------------------------------- DropConnect

def _drop_connect_forward(x, weight, bias, p, seed, per_example):
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    with B.on_stream(x):
        _, mask = fastreg.drop_connect(B.array(x), B.array(weight), B.array(bias), p, rng=seed,
                                       per_example=per_example, out=B.array(y))
    return y, x, mask


class DropConnectFunction(torch.autograd.Function):
    """``y = DropConnectFunction.apply(x, weight, bias, p, seed, per_example)``.

    DropConnect linear layer by ``fastreg.drop_connect`` (+ ``_backward``):
    ``y = x @ (keep * weight / (1 - p)).T + bias`` with one mask of
    ``weight.shape`` per call, or one per sample (``per_example=True``), drawn
    from the stream at ``(seed, 0)``. Saves x and weight; the mask is
    regenerated in the backward (0 bytes kept).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p, seed, per_example):
        y, x, ctx.mask = _drop_connect_forward(x, weight, bias, p, seed, per_example)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        db = dy.new_empty((weight.shape[0],))  # always computed by the kernel
        with B.on_stream(x):
            fastreg.drop_connect_backward(B.array(dy), B.array(x), B.array(weight), ctx.mask,
                                          out=(B.array(dx), B.array(dw), B.array(db)))
        return (dx if need_x else None, dw if need_w else None,
                db if need_b and ctx.has_bias else None, None, None, None)


def _torch_drop_connect(x, weight, bias, p, per_example):
    """DropConnect in PyTorch's own ops (its generator, its kernels): the fallback."""
    y = F.linear(x, weight, bias)  # PyTorch's errors for bad shapes and dtypes first
    keep_shape = (x.shape[:-1] if per_example else ()) + tuple(weight.shape)
    keep = torch.empty(keep_shape, dtype=weight.dtype, device=weight.device).bernoulli_(1 - p)
    masked = weight * keep * (0.0 if p == 1 else 1.0 / (1.0 - p))
    if not per_example:
        return F.linear(x, masked, bias)
    y = torch.einsum("...oi,...i->...o", masked, x)
    return y if bias is None else y + bias


def _linear_reason(x, weight, bias):
    if (x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or (bias is not None and tuple(bias.shape) != (weight.shape[0],))):
        return B.INVALID
    return None


def _drop_connect(layer, x, weight, bias, p, training, per_example, generator):
    p = _check_p(layer, p)
    if not training or p == 0:
        return F.linear(x, weight, bias)  # the mean weight of inverted DropConnect
    reason = B.why_not(x, weight, bias) or _linear_reason(x, weight, bias) \
        or B.backend_lacks(x, "dropout", "drop_connect")
    if reason:
        B.fallback(layer, reason)
        return _torch_drop_connect(x, weight, bias, p, per_example)
    seed = draw_seed(generator)
    if B.needs_grad(x, weight, bias):
        return DropConnectFunction.apply(x, weight, bias, p, seed, bool(per_example))
    return _drop_connect_forward(x, weight, bias, p, seed, bool(per_example))[0]


def drop_connect_linear(input, weight, bias=None, p=0.5, training=True, *, per_example=False,
                        generator=None):
    """``torch.nn.functional.linear`` with DropConnect on the weight in training.

    ``y = input @ (keep * weight / (1 - p)).T + bias`` (one mask per call, or
    per sample with ``per_example=True``); in eval mode (or ``p = 0``) exactly
    ``F.linear(input, weight, bias)``, the mean weight.
    """
    return _drop_connect("drop_connect_linear", input, weight, bias, p, training, per_example,
                         generator)


# --------------------------------------------------------------------------- dropout + add + LN

def _dal_forward(x, residual, weight, bias, normalized_ndim, eps, p, seed, training, mask_kind):
    x, residual = x.contiguous(), residual.contiguous()
    y, s = torch.empty_like(x), torch.empty_like(x)
    mean = x.new_empty(x.shape[:x.dim() - normalized_ndim], dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    bits = _bits_words(x, mask_kind, training)
    with B.on_stream(x):
        *_, mask = fastreg.dropout_add_layer_norm(
            B.array(x), B.array(residual), B.array(weight), B.array(bias), p,
            rng=seed if training else None, eps=eps, training=training, mask=mask_kind,
            normalized_ndim=normalized_ndim,
            out=(B.array(y), B.array(s), B.array(mean), B.array(rstd), _uint32(bits)))
    return y, s, mean, rstd, mask, bits


class DropoutAddLayerNormFunction(torch.autograd.Function):
    """``y, s = DropoutAddLayerNormFunction.apply(x, residual, weight, bias, normalized_ndim,
    eps, p, seed, training, mask)``.

    ``s = residual + dropout(x)``, ``y = layer_norm(s)`` over the trailing
    ``normalized_ndim`` axes, by ``fastreg.dropout_add_layer_norm`` (one
    kernel: reads x and residual, writes y and s). Both outputs are
    differentiable: a pre-norm block carries s on as its residual stream, and
    its gradient joins the layer norm's in the backward
    (``fastreg.dropout_add_layer_norm_backward``, one kernel). Saves s, mean,
    rstd, weight and the mask (1 bit per element for ``mask="bits"``, nothing
    for "seed"); ``training=False`` drops nothing.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, normalized_ndim, eps, p, seed, training, mask):
        y, s, mean, rstd, ctx.mask, ctx.bits = _dal_forward(
            x, residual, weight, bias, normalized_ndim, eps, p, seed, training, mask)
        ctx.save_for_backward(s, mean, rstd, weight, bias)
        ctx.normalized_ndim = normalized_ndim
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds):
        s, mean, rstd, weight, bias = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        if dy is None and ds is None:
            return (None,) * 10
        dy = torch.zeros_like(s) if dy is None else dy.contiguous()
        ds = None if ds is None else ds.contiguous()
        bias = bias if need_b else None
        dx, dres = torch.empty_like(s), torch.empty_like(s)
        dw = None if weight is None else torch.empty_like(weight)
        db = None if bias is None else torch.empty_like(bias)
        with B.on_stream(s):
            fastreg.dropout_add_layer_norm_backward(
                B.array(dy), B.array(s), B.array(mean), B.array(rstd), B.array(weight),
                B.array(bias), ctx.mask, dresidual_sum=B.array(ds),
                normalized_ndim=ctx.normalized_ndim,
                out=(B.array(dx), B.array(dres), B.array(dw), B.array(db)))
        return (dx if need_x else None, dres if need_r else None, dw if need_w else None, db) \
            + (None,) * 6


def _dropout_add_layer_norm(layer, x, residual, normalized_shape, weight, bias, p, training,
                            eps, mask_kind, generator):
    _check_mask(layer, mask_kind)
    p = _check_p(layer, p)
    if residual is None:
        residual = torch.zeros_like(x)
    shape = _shape_tuple(normalized_shape)
    reason = B.why_not(x, residual, weight, bias)
    if not reason:
        reason = _row_norm_reason(x, shape, weight, bias) or (
            B.INVALID if residual.shape != x.shape else None) or _eps_reason(eps) \
            or B.backend_lacks(x, "dropout", "dropout_add_layer_norm")
    if reason:
        B.fallback(layer, reason)
        s = residual + F.dropout(x, p, training)
        return F.layer_norm(s, normalized_shape, weight, bias, eps), s
    training = bool(training) and p > 0
    seed = draw_seed(generator) if training else None
    args = (x, residual, weight, bias, len(shape), float(eps), p, seed, training, mask_kind)
    if B.needs_grad(x, residual, weight, bias):
        return DropoutAddLayerNormFunction.apply(*args)
    return tuple(_dal_forward(*args)[:2])


def dropout_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, p=0.1,
                           training=True, eps=1e-5, *, mask="seed", generator=None):
    """``s = residual + dropout(input, p)``, ``y = layer_norm(s, normalized_shape, weight,
    bias, eps)`` fused; returns ``(y, s)``.

    The same as ``s = residual + F.dropout(input, p, training)`` then
    ``F.layer_norm(s, ...)`` (with fastreg's mask), in one pass each way.
    ``residual=None`` means zeros. ``mask``: "seed" (nothing kept, the default)
    or "bits" (1 bit per element kept for the backward).
    """
    return _dropout_add_layer_norm("dropout_add_layer_norm", input, residual, normalized_shape,
                                   weight, bias, p, training, eps, mask, generator)


# --------------------------------------------------------------------------- modules

class Dropout(torch.nn.Dropout):
    """Drop-in for :class:`torch.nn.Dropout` (``p=0.5, inplace=False``) on fastreg's kernels.

    Training: ``y = x * keep / (1 - p)`` with fastreg's mask (see the module
    docstring: seeded from PyTorch's generator, different draws from
    PyTorch's); eval: ``y = x``, the input itself, as PyTorch.

    ``inplace=True`` keeps PyTorch's semantics: the result is written into
    the input's memory and the input is returned (its autograd version
    counter bumped, so a later backward that needs the old values raises,
    as with PyTorch). fastreg's dropout does not write over its input, so
    the result goes through a temporary and is copied back: in-place saves
    no memory here, unlike PyTorch's; leave it False where you can.

    ``mask`` (keyword): "bits" (default, 1 bit per element kept for the
    backward) or "seed" (nothing kept; the backward regenerates the mask).
    """

    def __init__(self, p=0.5, inplace=False, *, mask="bits"):
        super().__init__(p, inplace)
        self.mask = _check_mask(type(self).__name__, mask)

    def forward(self, input):
        return _dropout(type(self).__name__, input, self.p, self.training, self.inplace,
                        getattr(self, "mask", "bits"), None)

    def extra_repr(self):
        mask = getattr(self, "mask", "bits")
        return super().extra_repr() + (f", mask={mask!r}" if mask != "bits" else "")


class DropConnectLinear(torch.nn.Linear):
    """:class:`torch.nn.Linear` with DropConnect (Wan et al., 2013) on its weight in training.

    Same arguments (``in_features, out_features, bias=True, device=None,
    dtype=None``), parameters, initialization and ``state_dict`` keys
    (``weight``, ``bias``) as ``nn.Linear``, so a Linear checkpoint loads,
    plus keywords:

    p : float in [0, 1], default 0.5
        The drop probability of each weight (the bias is not masked).
    per_example : bool, default False
        False: one mask of ``weight.shape`` per call (the masked weight is
        formed once, then one GEMM). True: one mask per sample, as in the
        paper, fused into the product (no batch of weight matrices).

    Training: ``y = x @ (keep * weight / (1 - p)).T + bias``; eval:
    ``y = x @ weight.T + bias``, exactly ``nn.Linear`` (the mean weight).
    The mask is regenerated in the backward: nothing is kept.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 p=0.5, per_example=False):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.p = _check_p(type(self).__name__, p)
        self.per_example = bool(per_example)

    def forward(self, input):
        return _drop_connect(type(self).__name__, input, self.weight, self.bias, self.p,
                             self.training, self.per_example, None)

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}, per_example={self.per_example}"


class DropoutAddLayerNorm(torch.nn.LayerNorm):
    """``LayerNorm(residual + dropout(x))``: a transformer sublayer's exit, fused.

    A :class:`torch.nn.LayerNorm` (same arguments ``normalized_shape,
    eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None``,
    parameters and ``state_dict`` keys, so a LayerNorm checkpoint loads)
    whose forward takes the sublayer's output ``x`` and the residual::

        s = residual + dropout(x, p)      (fastreg's mask; identity in eval)
        y = layer_norm(s)

    Keywords: ``p`` (default 0.1, the transformer's), ``prenorm`` and
    ``mask`` ("seed", nothing kept for the backward, or "bits").

    What a block needs back:

    - post-norm (the original Transformer, BERT): ``x = norm(sublayer(x), x)``
      returns ``y``, the next sublayer's input and residual;
    - pre-norm (GPT-2 and later), ``prenorm=True``: ``h, s = norm(sublayer(h), s)``
      returns ``(y, s)``: ``y = LN(s)`` feeds the next sublayer, ``s`` is the
      residual stream carried to the next add (gradients reaching s flow
      back through it).

    ``forward(x, residual=None)``: None means no residual (``y = LN(dropout(x))``).
    One kernel reads x and residual and writes y and s (unfused: 7 passes).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, *, p=0.1, prenorm=False, mask="seed"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.p = _check_p(type(self).__name__, p)
        self.prenorm = bool(prenorm)
        self.mask = _check_mask(type(self).__name__, mask)

    def forward(self, input, residual=None):
        y, s = _dropout_add_layer_norm(type(self).__name__, input, residual,
                                       self.normalized_shape, self.weight, self.bias, self.p,
                                       self.training, self.eps, self.mask, None)
        return (y, s) if self.prenorm else y

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}, prenorm={self.prenorm}" + (
            f", mask={self.mask!r}" if self.mask != "seed" else "")


# PyTorch module -> fastreg module for ``fastreg.torch.convert`` (exact twins only:
# DropConnectLinear and DropoutAddLayerNorm have none).
SWAPS = {torch.nn.Dropout: Dropout}
