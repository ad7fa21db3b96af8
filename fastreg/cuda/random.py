"""The Philox4x32-10 stream on the GPU: no kernels yet in this version of fastreg.

The public draws raise a RuntimeError naming themselves on CuPy arrays (see
``fastreg._backend``). The contract they will follow is in ``fastreg/random.py``.
"""

UNSUPPORTED = frozenset({"philox4x32", "random_bits", "uniform", "normal"})
