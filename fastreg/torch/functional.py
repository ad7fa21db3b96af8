"""``torch.nn.functional``'s normalization and dropout functions on fastreg's kernels.

Same signatures as PyTorch's (plus keywords); each runs PyTorch's own op
(with a one-time :class:`fastreg.torch.FallbackWarning`) for what fastreg
does not run. ``drop_connect_linear`` and ``dropout_add_layer_norm`` have no
PyTorch counterpart: their fallbacks are PyTorch's ops composed.
"""

from .dropout import drop_connect_linear, dropout, dropout_add_layer_norm
from .norm import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm",
           "dropout", "drop_connect_linear", "dropout_add_layer_norm"]
