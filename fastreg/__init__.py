"""fastreg: fused compiled kernels for normalization and regularization layers."""

from . import random
from ._backend import use_backend
from .dropout import (
    DropConnectMask,
    DropoutMask,
    GaussianMask,
    drop_connect,
    drop_connect_backward,
    drop_connect_inference,
    dropout,
    dropout_add_layer_norm,
    dropout_add_layer_norm_backward,
    dropout_backward,
    gaussian_dropout,
    gaussian_dropout_backward,
    gaussian_noise,
)
from .norm import (
    batch_norm,
    batch_norm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)

__version__ = "0.1.0"

__all__ = [
    "use_backend",
    "layer_norm", "layer_norm_backward",
    "rms_norm", "rms_norm_backward",
    "batch_norm", "batch_norm_backward",
    "group_norm", "group_norm_backward",
    "instance_norm", "instance_norm_backward",
    "random",
    "dropout", "dropout_backward", "DropoutMask",
    "gaussian_noise", "gaussian_dropout", "gaussian_dropout_backward", "GaussianMask",
    "drop_connect", "drop_connect_backward", "drop_connect_inference", "DropConnectMask",
    "dropout_add_layer_norm", "dropout_add_layer_norm_backward",
]
