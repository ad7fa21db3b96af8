"""``torch.nn.functional``'s normalization functions on fastreg's kernels.

Same signatures as PyTorch's; each runs PyTorch's own op (with a one-time
:class:`fastreg.torch.FallbackWarning`) for what fastreg does not run.
The dropout family's functions join them here.
"""

from .norm import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]
