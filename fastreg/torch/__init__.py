"""fastreg for PyTorch: autograd Functions and drop-in modules on fastreg's kernels.

``import fastreg`` never imports PyTorch; ``import fastreg.torch`` needs it.

- Modules, drop-ins for PyTorch's (same arguments, parameters, buffers and
  ``state_dict`` keys; subclasses of PyTorch's classes): ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``.
- ``Dropout``, ``DropConnectLinear``, ``DropoutAddLayerNorm``: the dropout
  family (``Dropout`` a drop-in for PyTorch's; fastreg's masks, seeded from
  PyTorch's generator).
- ``SyncBatchNorm``: drop-in for :class:`torch.nn.SyncBatchNorm` on
  ``fastreg.distributed`` (CPU tensors over gloo too).
- ``fastreg.torch.optim``: ``SGD``, ``Adam``, ``AdamW``, subclasses of
  PyTorch's with fastreg's fused steps and an ``l1=`` proximal step.
- :func:`convert` swaps those layers of an existing model in place.
- ``fastreg.torch.functional``: ``torch.nn.functional``'s signatures.
- ``*Function``: the ``torch.autograd.Function`` of each forward/backward pair.

Tensors reach the kernels without copies: CPU tensors as NumPy views, CUDA
tensors as CuPy views through DLPack on torch's current stream. What fastreg
does not run (a dtype the backend lacks, autocast, torch.compile, other
devices) runs PyTorch's own op, with a :class:`FallbackWarning` once per
layer type and reason.

CPU threads: PyTorch and Numba each run their own OpenMP runtime, and by
default OpenMP threads spin for a while after a parallel region, taking the
cores the other runtime's threads need next. Where PyTorch ops and fastreg
kernels alternate (a training step), start Python with
``OMP_WAIT_POLICY=PASSIVE`` (read when each runtime loads): on the 2-core
development machine a small LayerNorm training step took 198 us instead of
1100-1500 us.

Layout of this package, one file per fastreg family (as fastreg itself):
``norm.py``, ``dropout.py``, ``distributed.py`` (SyncBatchNorm) and
``optim.py`` (the prox family's steps); ``_bridge.py`` holds the zero-copy
views, the stream and the fallback rules they all share, ``_convert.py`` the
table ``convert`` uses.
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without torch
    raise ImportError("fastreg.torch needs PyTorch: pip install 'fastreg[torch]'") from error

from . import functional, optim
from ._bridge import FallbackWarning
from ._convert import convert
from .distributed import SyncBatchNorm, SyncBatchNormFunction
from .dropout import (
    DropConnectFunction,
    DropConnectLinear,
    Dropout,
    DropoutAddLayerNorm,
    DropoutAddLayerNormFunction,
    DropoutFunction,
)
from .norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormFunction,
    GroupNorm,
    GroupNormFunction,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    InstanceNormFunction,
    LayerNorm,
    LayerNormFunction,
    RMSNorm,
    RMSNormFunction,
)

__all__ = [
    "convert", "functional", "optim", "FallbackWarning",
    "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "SyncBatchNorm",
    "Dropout", "DropConnectLinear", "DropoutAddLayerNorm",
    "LayerNormFunction", "RMSNormFunction", "BatchNormFunction", "GroupNormFunction",
    "InstanceNormFunction", "SyncBatchNormFunction",
    "DropoutFunction", "DropConnectFunction", "DropoutAddLayerNormFunction",
]
