"""The dropout family on the GPU: no kernels yet in this version of fastreg.

Every public dropout-family function raises a RuntimeError naming itself when
it meets CuPy arrays (backend "cuda") or is asked for backend "cuda_emulator"
(see ``fastreg._backend``), instead of failing on a missing module. The
kernels, when they come, draw from the Philox4x32-10 stream exactly as
``fastreg/cpu/_philox.py`` documents (element -> (counter, word) map, keep
test, bit layout), so the masks are identical bit for bit.
"""

UNSUPPORTED = frozenset({
    "dropout", "dropout_backward", "DropoutMask.to_bool",
    "gaussian_noise", "gaussian_dropout", "gaussian_dropout_backward",
    "drop_connect", "drop_connect_backward", "drop_connect_inference",
    "dropout_add_layer_norm", "dropout_add_layer_norm_backward",
})
