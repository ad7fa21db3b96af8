"""The prox family on the GPU: no kernels yet in this version of fastreg.

Every public prox function raises a RuntimeError naming itself when it meets
CuPy arrays (backend "cuda") or is asked for backend "cuda_emulator" (see
``fastreg._backend``), instead of failing on a missing module. The kernels,
when they come, implement the per-element rules of ``fastreg.prox`` ("Update
rules") with the CPU's rounding, so that their results can be compared bit
for bit.
"""

UNSUPPORTED = frozenset({
    "prox_l1", "prox_elastic_net", "prox_group_l1", "max_norm",
    "sgd_step", "adam_step", "adamw_step",
    "cross_entropy_label_smoothing", "standardize", "min_max_scale",
})
