"""The Philox4x32-10 stream on a CUDA device (CuPy arrays) or the host emulation (NumPy arrays).

Same function names and signatures as ``fastreg/reference/random.py`` and
``fastreg/cpu/random.py``; the kernels are in ``kernels/dropout.cu`` (with
the dropout family's) on ``kernels/philox.cuh`` (the contract, as
``fastreg/random.py`` states it). Outputs of any layout are written through
a C-contiguous temporary: the stream index is the C-order index of the
logical tensor. dtypes: uint32 (bits); float16, bfloat16, float32, float64
(uniform, normal: computed in float64 and rounded once to the dtype).

Geometry of every elementwise kernel of the two families (one place):
a thread owns units of 8 consecutive elements (2 Philox blocks), blocks of
``THREADS`` threads, ``ceil(units / THREADS)`` blocks up to ``MAX_BLOCKS``,
beyond which the kernels loop (grid-stride). The random numbers never
depend on it; tests/test_cuda_dropout.py changes both and compares bits.
"""

from __future__ import annotations

import numpy as np

from . import TAGS, _device

MODULE = "dropout"
THREADS = 256                 # a multiple of 32: the mask ballots need whole warps
MAX_BLOCKS = 8 * 132 * 4      # 4 waves of 8 resident 256-thread blocks on a 132-SM H100
UNIT = 8                      # elements per thread and loop iteration

# Ops of this family without CUDA kernels (fastreg._backend.select refuses them). None.
UNSUPPORTED = frozenset()


def kernel_names():
    """The kernels of this family (all in kernels/dropout.cu)."""
    return (["random_bits", "philox_blocks"] + [f"uniform_{t}" for t in TAGS.values()]
            + [f"normal_{t}" for t in TAGS.values()])


def stream_args(seed, offset):
    """The kernels' (k0, k1, offset) arguments for a (seed, offset) pair."""
    return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), np.uint64(offset)


def grid(n):
    """Blocks for an elementwise kernel over n elements (grid-stride beyond MAX_BLOCKS)."""
    units = -(-int(n) // UNIT)
    return max(1, min(-(-units // THREADS), MAX_BLOCKS))


def philox4x32(counter, key, out):
    dev = _device.of(out)
    nblocks = counter.size // 4
    if nblocks == 0:
        return
    c = dev.contiguous(counter).reshape(-1)
    k = dev.contiguous(key).reshape(-1)
    t = dev.target(out)
    dev.launch(MODULE, "philox_blocks", max(1, min(-(-nblocks // THREADS), MAX_BLOCKS)), THREADS,
               (c, k, t.reshape(-1), np.int64(nblocks), np.int32(0 if k.size == 2 else 2)))
    dev.finish(out, t)


def _fill(kernel, seed, offset, out):
    dev = _device.of(out)
    if out.size == 0:
        return
    t = dev.target(out)
    dev.launch(MODULE, kernel, grid(out.size), THREADS,
               (t.reshape(-1), np.int64(out.size), *stream_args(seed, offset)))
    dev.finish(out, t)


def random_bits(seed, offset, out):
    _fill("random_bits", seed, offset, out)


def uniform(seed, offset, out):
    _fill(f"uniform_{TAGS[out.dtype]}", seed, offset, out)


def normal(seed, offset, out):
    _fill(f"normal_{TAGS[out.dtype]}", seed, offset, out)
