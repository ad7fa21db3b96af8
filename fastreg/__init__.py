"""fastreg: fused compiled kernels for normalization and regularization layers."""

from . import random
from ._backend import CompileError, use_backend
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
    batch_norm_apply,
    batch_norm_backward,
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_norm_combine,
    batch_norm_stats,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from .prox import (
    adam_step,
    adamw_step,
    cross_entropy_label_smoothing,
    max_norm,
    min_max_scale,
    prox_elastic_net,
    prox_group_l1,
    prox_l1,
    sgd_step,
    standardize,
)

__version__ = "0.1.0"

__all__ = [
    "use_backend", "CompileError",
    "layer_norm", "layer_norm_backward",
    "rms_norm", "rms_norm_backward",
    "batch_norm", "batch_norm_backward",
    "batch_norm_stats", "batch_norm_combine", "batch_norm_apply",
    "batch_norm_backward_reduce", "batch_norm_backward_apply",
    "group_norm", "group_norm_backward",
    "instance_norm", "instance_norm_backward",
    "random",
    "dropout", "dropout_backward", "DropoutMask",
    "gaussian_noise", "gaussian_dropout", "gaussian_dropout_backward", "GaussianMask",
    "drop_connect", "drop_connect_backward", "drop_connect_inference", "DropConnectMask",
    "dropout_add_layer_norm", "dropout_add_layer_norm_backward",
    "prox_l1", "prox_elastic_net", "prox_group_l1", "max_norm",
    "sgd_step", "adam_step", "adamw_step",
    "cross_entropy_label_smoothing", "standardize", "min_max_scale",
]
