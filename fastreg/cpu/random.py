"""Philox4x32-10 stream on the CPU (Numba), with the reference's signatures.

The kernels are in ``_philox.py`` (the contract and the vectorization notes
are there and in ``fastreg/random.py``). Outputs of any layout are written
through a C-contiguous view or temporary: the stream index is the C-order
index of the logical tensor.

Bytes: write 4 (bits), 4 or 8 (uniform, normal) bytes per element.
"""

import numpy as np

from ._philox import _normal, _philox_blocks, _random_bits, _uniform
from ._common import contiguous, finish, target


def stream_args(seed, offset):
    """The kernels' (k0, k1, offset) arguments for a (seed, offset) pair."""
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32), np.uint64(offset)


def philox4x32(counter, key, out):
    c = contiguous(counter).reshape(-1, 4)
    k = np.ascontiguousarray(np.broadcast_to(key, counter.shape[:-1] + (2,))).reshape(-1, 2)
    t = target(out)
    _philox_blocks(c, k, t.reshape(-1, 4))
    finish(out, t)


def _fill(kernel, seed, offset, out):
    t = target(out)
    kernel(*stream_args(seed, offset), t.reshape(-1))
    finish(out, t)


def random_bits(seed, offset, out):
    _fill(_random_bits, seed, offset, out)


def uniform(seed, offset, out):
    _fill(_uniform, seed, offset, out)


def normal(seed, offset, out):
    _fill(_normal, seed, offset, out)
