"""Batch norm across processes for PyTorch: ``SyncBatchNorm`` on ``fastreg.distributed``.

A drop-in for :class:`torch.nn.SyncBatchNorm`. Each process computes its
partial statistics with fastreg's kernels; ``torch.distributed`` moves them
(:class:`fastreg.distributed.TorchComm` over the layer's ``process_group``:
gloo for CPU tensors, NCCL for CUDA tensors): one allgather of 3 float64 per
channel forward, one allreduce of 2 per channel backward, nothing else.
Unlike PyTorch's, it runs CPU tensors too (over gloo).

Gradients follow PyTorch's SyncBatchNorm: the input gradient uses the sums
of the whole batch (every process), the weight and bias gradients are this
process's own sums (``reduce_param_grads=False``), which
DistributedDataParallel then averages over processes as it does every
parameter gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastreg.distributed import TorchComm, sync_batch_norm, sync_batch_norm_backward

from . import _bridge as B
from .norm import (
    _ACTIVATIONS,
    _BatchNorm,
    _batch_norm,
    _empty_param_grad,
    _eps_reason,
    _momentum_reason,
    _param_shapes_ok,
    _running_reason,
)

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction"]


def _sync_forward(x, weight, bias, running_mean, running_var, momentum, eps, process_group,
                  activation):
    comm = TorchComm(process_group)
    x, axis = B.channel_layout(x)
    y = torch.empty_like(x)
    mean = x.new_empty((x.shape[1],), dtype=torch.float64)
    rstd = torch.empty_like(mean)
    with B.on_stream(x):
        *_, count = sync_batch_norm(
            B.array(B.kernel_view(x, axis)), B.array(weight), B.array(bias),
            B.array(running_mean), B.array(running_var), comm=comm, training=True,
            momentum=momentum, eps=eps, axis=axis, activation=activation,
            out=(B.array(B.kernel_view(y, axis)), B.array(mean), B.array(rstd)))
    return y, (x, weight, bias, mean, rstd, y if activation else None), axis, count, comm


class SyncBatchNormFunction(torch.autograd.Function):
    """``y = SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum,
    eps, process_group, activation)``.

    Training-mode batch norm of this process's slice x (N, C, *spatial) with
    the statistics of the whole batch over ``process_group``
    (``fastreg.distributed.sync_batch_norm``); running statistics, if given,
    are updated in place identically on every process. The backward
    (``sync_batch_norm_backward`` with ``reduce_param_grads=False``) returns
    this slice's dx under the whole batch's sums and this process's own
    dweight and dbias, as PyTorch's SyncBatchNorm. Channels-last x stays
    channels-last. Every process of the group must call it (and its
    backward) together.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group,
                activation):
        y, saved, ctx.axis, ctx.count, ctx.comm = _sync_forward(
            x, weight, bias, running_mean, running_var, momentum, eps, process_group,
            activation)
        ctx.save_for_backward(*saved)
        ctx.activation = activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        axis = ctx.axis
        dy = B.like_layout(dy, axis)
        dx, dw, db = torch.empty_like(x), _empty_param_grad(weight), _empty_param_grad(bias)
        with B.on_stream(x):
            sync_batch_norm_backward(
                B.array(B.kernel_view(dy, axis)), B.array(B.kernel_view(x, axis)),
                B.array(mean), B.array(rstd), ctx.count, B.array(weight), B.array(bias),
                comm=ctx.comm, training=True, axis=axis,
                y=None if y is None else B.array(B.kernel_view(y, axis)),
                activation=ctx.activation, reduce_param_grads=False,
                out=(B.array(B.kernel_view(dx, axis)), B.array(dw), B.array(db)))
        return (dx if need_x else None, dw if need_w else None, db if need_b else None) \
            + (None,) * 6


class SyncBatchNorm(_BatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` on fastreg's kernels.

    Same arguments (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None,
    *, bias=True``), parameters, buffers, ``state_dict`` and
    ``convert_sync_batchnorm``, plus the keyword ``activation="relu"`` to
    fuse a following ReLU.

    A sibling of PyTorch's class, not a subclass: both derive from
    ``torch.nn.modules.batchnorm._BatchNorm``, but
    ``isinstance(layer, torch.nn.SyncBatchNorm)`` is False, because
    DistributedDataParallel refuses CPU modules that hold a
    ``torch.nn.SyncBatchNorm`` (it tests exactly that), and this layer runs
    CPU tensors over gloo under DDP.

    PyTorch's rules for when statistics cross processes: only in training,
    when ``torch.distributed`` is initialized and the group (``process_group``,
    else the default group) has more than one process. Otherwise (eval mode,
    a single process, no process group) it is plain batch norm, on fastreg's
    kernels (``fastreg.torch.BatchNorm*d``'s forward). ``num_batches_tracked``
    and ``momentum=None`` (cumulative average) as PyTorch.

    Runs CPU tensors (gloo) as well as CUDA tensors (NCCL, with CuPy and
    fastreg's CUDA backend); a case fastreg does not run (e.g. a dtype its
    backend lacks) runs PyTorch's SyncBatchNorm, with a one-time
    :class:`fastreg.torch.FallbackWarning` (PyTorch's accepts only GPU input
    when it synchronizes). A process holding no samples still takes part.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True, activation=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias, activation=activation)
        self.process_group = process_group

    # PyTorch's SyncBatchNorm checks, with its words
    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        name = type(self).__name__
        activation = getattr(self, "activation", None)
        group = None
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if bn_training and self.training and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) <= 1:
                group = None
        if group is not None:
            reason = self._sync_reason(input)
            if reason:  # before the running statistics move: PyTorch's forward moves them
                B.fallback(name, reason)
                y = torch.nn.SyncBatchNorm.forward(self, input)
                return F.relu(y) if activation == "relu" else y
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        if group is None:
            return _batch_norm(name, input, running_mean, running_var, self.weight, self.bias,
                               bn_training, factor, self.eps, activation)
        args = (input, self.weight, self.bias, running_mean, running_var, float(factor),
                float(self.eps), group, activation)
        if B.needs_grad(input, self.weight, self.bias):
            return SyncBatchNormFunction.apply(*args)
        return _sync_forward(*args)[0]

    def _sync_reason(self, x):
        """Why fastreg cannot run the synchronized forward (None when it can). A
        process with no samples must still join the collectives: empty is fine."""
        tracked = self.track_running_stats
        rm = self.running_mean if tracked else None
        rv = self.running_var if tracked else None
        reason = B.why_not(x, self.weight, self.bias, rm, rv)
        if reason == B.EMPTY:
            reason = None
        if reason:
            return reason
        if getattr(self, "activation", None) not in _ACTIVATIONS \
                or not _param_shapes_ok((x.shape[1],), self.weight, self.bias, rm, rv):
            return B.INVALID
        return _eps_reason(self.eps) or _running_reason(rm) or (
            _momentum_reason(self.momentum) if self.momentum is not None and tracked else None)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch norm layer of ``module`` (``torch.nn.BatchNorm*d``,
        fastreg's, or a SyncBatchNorm) with this class, as
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does: the new
        layers share the old ones' parameters and buffers and keep their
        training mode (and a fastreg layer's fused activation). Returns the
        module, or the new layer when ``module`` itself is a batch norm."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group,
                         bias=module.bias is not None,
                         activation=getattr(module, "activation", None))
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output


# PyTorch module -> fastreg module for ``fastreg.torch.convert``.
SWAPS = {torch.nn.SyncBatchNorm: SyncBatchNorm}
