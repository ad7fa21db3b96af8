"""``fastreg.torch.convert``: swap a model's PyTorch layers for fastreg's, in place."""

from __future__ import annotations

import math
import numbers

import torch

from . import _bridge as B
from . import distributed, dropout, norm

# PyTorch layer -> fastreg subclass of it, exact twins only. Each family adds its
# table here (DropConnectLinear and DropoutAddLayerNorm have no PyTorch twin).
SWAPS = {**norm.SWAPS, **dropout.SWAPS, **distributed.SWAPS}


def _runnable(module):
    """Whether fastreg can run this layer as configured (else it stays PyTorch's)."""
    tensors = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if t.is_floating_point()]
    if tensors and B.why_not(*tensors) not in (None, B.EMPTY):
        return False
    eps = getattr(module, "eps", None)
    if eps is not None and not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        return False
    momentum = getattr(module, "momentum", None)
    if momentum is not None and not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
        return False
    return True


def convert(model, *, fuse_relu=False):
    """Swap the supported PyTorch layers of ``model`` for fastreg's, in place; returns ``model``.

    Supported: ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``,
    ``InstanceNorm1d/2d/3d``, ``SyncBatchNorm`` and ``Dropout`` (exactly these
    classes; subclasses may override ``forward`` and are left alone). A
    converted ``Dropout`` draws fastreg's masks, not PyTorch's: in training
    its outputs differ from PyTorch's by design (the same distribution, other
    draws; see ``fastreg.torch.dropout``); in eval mode they are identical.
    A converted layer keeps its identity: its class becomes fastreg's
    subclass of its PyTorch class, so its parameters, buffers, hooks,
    train/eval mode, device and dtype, ``isinstance`` checks and every
    reference to it (an optimizer's parameter list) are unchanged; only
    ``forward`` runs fastreg's kernels. ``model`` may itself be a layer.
    ``SyncBatchNorm`` is the exception: fastreg's is a sibling of PyTorch's
    class, not a subclass (see :class:`fastreg.torch.SyncBatchNorm`).

    Layers fastreg cannot run as configured stay PyTorch's: parameters or
    buffers of a dtype or on a device fastreg does not run (e.g. float16 or
    bfloat16 on the CPU; CUDA without CuPy or fastreg's CUDA backend),
    ``eps <= 0``, ``momentum`` outside [0, 1]. Cases met only at run time
    (an input's dtype, autocast) fall back per call with a one-time
    :class:`fastreg.torch.FallbackWarning`.

    Parameters
    ----------
    model : torch.nn.Module
    fuse_relu : bool
        Also fuse ``BatchNorm -> ReLU`` pairs that follow each other in an
        ``nn.Sequential`` (the ReLU becomes ``nn.Identity``; the batch norm
        applies it in its kernels). Off by default because it changes the
        ReLU module (hooks on it would no longer fire).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: 'model' must be a torch.nn.Module, got {type(model).__name__}.")
    for module in list(model.modules()):
        swap = SWAPS.get(type(module))
        if swap is not None and _runnable(module):
            module.__class__ = swap
            if isinstance(module, norm._BatchNorm):
                module.activation = None
    if fuse_relu:
        for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
            children = list(seq)
            for i in range(len(children) - 1):
                bn, nxt = children[i], children[i + 1]
                if (isinstance(bn, norm._BatchNorm) and bn.activation is None
                        and type(nxt) is torch.nn.ReLU):
                    bn.activation = "relu"
                    seq[i + 1] = torch.nn.Identity()
                    children[i + 1] = seq[i + 1]
    return model
