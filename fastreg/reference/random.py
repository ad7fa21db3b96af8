"""Reference Philox4x32-10 stream: vectorized NumPy, the contract of ``fastreg.random``.

All arithmetic is on uint64 arrays holding 32-bit values, so the 32 x 32-bit
products are exact and their high and low words are a shift and a mask away.
Same internal signatures as ``fastreg/cpu/random.py``: each function writes
into its preallocated output.
"""

import numpy as np

M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)
LO = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)
TWO_PI = 2.0 * np.pi


def philox_rounds(c0, c1, c2, c3, k0, k1, rounds=10):
    """Philox4x32 on uint64 arrays holding 32-bit words; returns the four output words."""
    for r in range(rounds):
        if r:
            k0 = (k0 + W0) & LO
            k1 = (k1 + W1) & LO
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> S32) ^ c1 ^ k0, p1 & LO, (p0 >> S32) ^ c3 ^ k1, p0 & LO
    return c0, c1, c2, c3


def philox4x32(counter, key, out, rounds=10):
    c = counter.astype(np.uint64).reshape(-1, 4)
    k = np.broadcast_to(key.astype(np.uint64), counter.shape[:-1] + (2,)).reshape(-1, 2)
    words = philox_rounds(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[:, 0], k[:, 1], rounds)
    out[...] = np.stack(words, axis=-1).astype(np.uint32).reshape(out.shape)


def stream_blocks(seed, offset, nblocks):
    """The ``nblocks`` blocks at counters ``offset, offset + 1, ...`` (mod 2**64):
    a uint32 array of shape (nblocks, 4)."""
    n = np.arange(nblocks, dtype=np.uint64) + np.uint64(offset)   # wraps mod 2**64
    zero = np.zeros_like(n)
    k0 = np.full_like(n, seed & 0xFFFFFFFF)
    k1 = np.full_like(n, seed >> 32)
    words = philox_rounds(n & LO, n >> S32, zero, zero, k0, k1)
    return np.stack(words, axis=-1).astype(np.uint32)


def stream_words(seed, offset, size):
    """Word ``i % 4`` of block ``offset + i // 4`` for ``i < size``: uint32 of shape (size,)."""
    return stream_blocks(seed, offset, (size + 3) // 4).reshape(-1)[:size]


def keep_mask(seed, offset, shape, threshold):
    """Bernoulli keep mask of the logical tensor ``shape``: ``word >= threshold`` (64-bit)."""
    size = int(np.prod(shape))
    return (stream_words(seed, offset, size).astype(np.uint64) >= np.uint64(threshold)
            if threshold < 2**32 else np.zeros(size, bool)).reshape(shape)


def uniform_words(words):
    """(word >> 8) * 2**-24 in float64 (exact)."""
    return (words >> np.uint32(8)).astype(np.float64) * 2.0**-24


def normal_blocks(blocks):
    """Box-Muller on word pairs (0, 1) and (2, 3): float64 of shape (nblocks, 4)."""
    u = uniform_words(blocks)
    r01 = np.sqrt(-2.0 * np.log(1.0 - u[:, 0]))
    t01 = TWO_PI * u[:, 1]
    r23 = np.sqrt(-2.0 * np.log(1.0 - u[:, 2]))
    t23 = TWO_PI * u[:, 3]
    return np.stack([r01 * np.cos(t01), r01 * np.sin(t01), r23 * np.cos(t23),
                     r23 * np.sin(t23)], axis=-1)


def normal_values(seed, offset, size):
    """Standard normals of elements 0..size-1 of the stream, float64 of shape (size,)."""
    return normal_blocks(stream_blocks(seed, offset, (size + 3) // 4)).reshape(-1)[:size]


# --------------------------------------------------------------------------- family functions

def random_bits(seed, offset, out):
    out[...] = stream_words(seed, offset, out.size).reshape(out.shape)


def uniform(seed, offset, out):
    out[...] = uniform_words(stream_words(seed, offset, out.size)).reshape(out.shape)


def normal(seed, offset, out):
    out[...] = normal_values(seed, offset, out.size).reshape(out.shape)
