"""Philox4x32-10 on the CPU, and every Numba kernel that draws from it.

The stream contract is in ``fastreg/random.py``; in short, element ``i`` of a
call with ``(seed, offset)`` takes word ``i % 4`` of the Philox4x32-10 block
with counter ``(n & 0xFFFFFFFF, n >> 32, 0, 0)``, ``n = offset + i // 4``
(mod 2**64), key ``(seed & 0xFFFFFFFF, seed >> 32)``. The element -> word map
depends on ``i`` alone, so any split of the elements over threads (or CUDA
blocks) reproduces the same bits.

Every kernel of the random and dropout families lives in this one file:
Numba's cache does not notice edits to jitted helpers in other files, and
they all call the helpers below.

How Philox vectorizes here
--------------------------
Words are held in uint64 variables (values < 2**32), so ``M * c`` is the exact
64-bit product and its high/low words are ``>> 32`` and ``& 0xFFFFFFFF``:
LLVM turns this into ``vpmuludq`` on 8 blocks at a time (AVX-512) when the
block loop (:func:`_fill_blocks`) is a plain counted loop over a fresh array.
Kernels work in chunks of ``CHUNK`` elements (``CHUNK / 4`` blocks): one
``prange`` iteration fills a scratch array with the chunk's words (one block
-> 4 consecutive words, element ``j`` of the chunk uses word ``j``), then runs
the element loop on array *slices* indexed from 0. (Indexing a whole array as
``x[e0 + j]`` kept LLVM from vectorizing; the slices do not.)

Mask bits (``mask="bits"``): a uint32 array of ``ceil(size / 32)`` words;
element ``i`` is bit ``i % 32`` of word ``i // 32`` (least significant bit
first), bits past ``size`` are 0. Its bytes on a little-endian machine are
``np.packbits(keep, bitorder="little")``; on a GPU one warp's
``__ballot_sync`` over 32 consecutive elements is one word. The 32 compares of
a word are packed by one vector compare (:func:`_keep_bits32`, an LLVM
``icmp uge <32 x i32>`` bitcast to ``i32``: ``vpcmpud`` + ``kmovd`` on
AVX-512); a shift-and-or loop did not vectorize and cost as much as the rest
of the kernel.

Floating point: the elementwise kernels use no fast-math (``y = x * s`` and
``y = x + n`` round exactly as NumPy does, so the CPU matches the reference
bit for bit); the kernels with reductions allow reassociation only, never
contraction into FMA, so ``x * s + r`` rounds twice, as NumPy does.
Reductions run in an order fixed by the shapes (results are identical at any
thread count).
"""

import llvmlite.ir as ir
import numba
import numpy as np
from numba import prange
from numba.core import types
from numba.extending import intrinsic

from ._common import CACHE

_ELEMENTWISE = dict(nogil=True, cache=CACHE, error_model="numpy", boundscheck=False)
_REDUCING = dict(_ELEMENTWISE, fastmath={"reassoc"})
_SERIAL = _ELEMENTWISE
_PARALLEL = dict(_ELEMENTWISE, parallel=True)
_PARALLEL_REDUCING = dict(_REDUCING, parallel=True)

M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)
LO = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)
ZERO = np.uint64(0)
INV24 = 2.0**-24
TWO_PI = 2.0 * np.pi

# Elements per prange iteration: a multiple of 32 (whole mask words); its
# words, x and y chunks (8 KiB each for float32) stay in L1.
CHUNK = 2048
CHUNK_BLOCKS = CHUNK // 4


# =========================================================================== Philox

@numba.njit(inline="always", **_SERIAL)
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 variables holding 32-bit words."""
    for r in range(10):
        if r:
            k0 = (k0 + W0) & LO
            k1 = (k1 + W1) & LO
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> S32) ^ c1 ^ k0, p1 & LO, (p0 >> S32) ^ c3 ^ k1, p0 & LO
    return c0, c1, c2, c3


@numba.njit(**_SERIAL)
def _fill_blocks(w, nblocks, k0, k1, first):
    """w[4b + j] = word j of the block at counter first + b (mod 2**64), b < nblocks."""
    for b in range(nblocks):
        n = first + np.uint64(b)
        r0, r1, r2, r3 = _philox(n & LO, n >> S32, ZERO, ZERO, k0, k1)
        w[4 * b] = r0
        w[4 * b + 1] = r1
        w[4 * b + 2] = r2
        w[4 * b + 3] = r3


@numba.njit(**_SERIAL)
def _fill_range(w, e0, m, k0, k1, offset):
    """Words of elements e0 .. e0+m-1 into w; returns ``lead``: element e0 + j
    has its word at ``w[lead + j]``. w needs m + 6 entries."""
    b0 = e0 // 4
    nblocks = (e0 + m + 3) // 4 - b0
    _fill_blocks(w, nblocks, k0, k1, offset + np.uint64(b0))
    return e0 - 4 * b0


@numba.njit(**_SERIAL)
def _philox_blocks(counter, key, out):
    """out[b] = Philox4x32-10(counter[b], key[b]) for arbitrary counters (known answers)."""
    for b in range(counter.shape[0]):
        r0, r1, r2, r3 = _philox(np.uint64(counter[b, 0]), np.uint64(counter[b, 1]),
                                 np.uint64(counter[b, 2]), np.uint64(counter[b, 3]),
                                 np.uint64(key[b, 0]), np.uint64(key[b, 1]))
        out[b, 0] = r0
        out[b, 1] = r1
        out[b, 2] = r2
        out[b, 3] = r3


@intrinsic
def _keep_bits32(typingctx, w, start, threshold):
    """Bit j of the result = ``w[start + j] >= threshold`` for j < 32, as one vector
    compare. ``w``: 1-D C-contiguous uint32 with ``start + 32 <= w.size``;
    ``threshold``: uint64 (2**32 gives 0)."""
    if not (isinstance(w, types.Array) and w.dtype == types.uint32 and w.ndim == 1
            and w.layout == "C"):
        return None
    sig = types.uint32(w, start, threshold)

    def codegen(context, builder, signature, args):
        words = context.make_array(signature.args[0])(context, builder, args[0])
        i32 = ir.IntType(32)
        vec = ir.VectorType(i32, 32)
        ptr = builder.gep(words.data, [args[1]])
        v = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)
        t = builder.insert_element(ir.Constant(vec, ir.Undefined), builder.trunc(args[2], i32),
                                   ir.Constant(i32, 0))
        t = builder.shuffle_vector(t, ir.Constant(vec, ir.Undefined), ir.Constant(vec, [0] * 32))
        bits = builder.bitcast(builder.icmp_unsigned(">=", v, t), i32)
        drop_all = builder.icmp_unsigned(">", args[2], ir.Constant(ir.IntType(64), 0xFFFFFFFF))
        return builder.select(drop_all, ir.Constant(i32, 0), bits)

    return sig, codegen


@numba.njit(**_SERIAL)
def _pack_bits(bits, w, m, threshold):
    """bits[q] = the keep bits of w[32q .. 32q+31] (w: CHUNK entries); bits of
    elements >= m are 0."""
    for q in range(bits.size):
        word = _keep_bits32(w, 32 * q, threshold)
        rest = m - 32 * q
        if rest < 32:
            word &= np.uint32((1 << rest) - 1)
        bits[q] = word


@numba.njit(**_SERIAL)
def _box_muller(w, nblocks, z):
    """z[4b .. 4b+3] = the four standard normals of the block words w[4b .. 4b+3]."""
    for b in range(nblocks):
        u0 = np.float64(w[4 * b] >> 8) * INV24
        u1 = np.float64(w[4 * b + 1] >> 8) * INV24
        u2 = np.float64(w[4 * b + 2] >> 8) * INV24
        u3 = np.float64(w[4 * b + 3] >> 8) * INV24
        r01 = np.sqrt(-2.0 * np.log(1.0 - u0))
        t01 = TWO_PI * u1
        r23 = np.sqrt(-2.0 * np.log(1.0 - u2))
        t23 = TWO_PI * u3
        z[4 * b] = r01 * np.cos(t01)
        z[4 * b + 1] = r01 * np.sin(t01)
        z[4 * b + 2] = r23 * np.cos(t23)
        z[4 * b + 3] = r23 * np.sin(t23)


# =========================================================================== random family

@numba.njit(**_PARALLEL)
def _random_bits(k0, k1, offset, out):
    n = out.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        w = np.empty(CHUNK, np.uint32)
        _fill_blocks(w, (m + 3) // 4, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS))
        o = out[e0:e0 + m]
        for j in range(m):
            o[j] = w[j]


@numba.njit(**_PARALLEL)
def _uniform(k0, k1, offset, out):
    n = out.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        w = np.empty(CHUNK, np.uint32)
        _fill_blocks(w, (m + 3) // 4, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS))
        o = out[e0:e0 + m]
        for j in range(m):
            o[j] = np.float64(w[j] >> 8) * INV24


@numba.njit(**_PARALLEL)
def _normal(k0, k1, offset, out):
    n = out.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        nb = (m + 3) // 4
        w = np.empty(CHUNK, np.uint32)
        z = np.empty(CHUNK, np.float64)
        _fill_blocks(w, nb, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS))
        _box_muller(w, nb, z)
        o = out[e0:e0 + m]
        for j in range(m):
            o[j] = z[j]


# =========================================================================== dropout

@numba.njit(**_SERIAL)
def _apply_keep(x, y, w, threshold, scale):
    """y[j] = x[j] * (scale if w[j] >= threshold else 0), in x's dtype."""
    zero = scale - scale
    for j in range(x.size):
        y[j] = x[j] * (scale if w[j] >= threshold else zero)


@numba.njit(**_PARALLEL)
def _dropout_fwd(x, k0, k1, offset, threshold, scale, y, bits):
    """y = x * keep * scale over 1-D C-contiguous x, y; keep bits into ``bits``
    unless it is empty. threshold 0 keeps all: the words are not generated."""
    n = x.size
    store = bits.size > 0
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        w = np.empty(CHUNK, np.uint32)
        if threshold != 0:
            _fill_blocks(w, (m + 3) // 4, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS))
        _apply_keep(x[e0:e0 + m], y[e0:e0 + m], w, threshold, scale)
        if store:
            _pack_bits(bits[e0 // 32:(e0 + m + 31) // 32], w, m, threshold)


@numba.njit(**_SERIAL)
def _apply_bits(dy, bits, scale, dx):
    """dx[j] = dy[j] * (scale if bit j of bits else 0)."""
    zero = scale - scale
    full = dy.size // 32
    for q in range(full):
        word = bits[q]
        for j in range(32):
            dx[32 * q + j] = dy[32 * q + j] * (scale if (word >> j) & 1 else zero)
    for j in range(32 * full, dy.size):
        dx[j] = dy[j] * (scale if (bits[j // 32] >> (j % 32)) & 1 else zero)


@numba.njit(**_PARALLEL)
def _dropout_bwd_bits(dy, bits, scale, dx):
    n = dy.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        _apply_bits(dy[e0:e0 + m], bits[e0 // 32:(e0 + m + 31) // 32], scale, dx[e0:e0 + m])


@numba.njit(**_PARALLEL)
def _unpack_bits(bits, keep):
    """keep[i] = bit i % 32 of bits[i // 32]."""
    n = keep.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        bs = bits[e0 // 32:(e0 + m + 31) // 32]
        k = keep[e0:e0 + m]
        for j in range(m):
            k[j] = (bs[j >> 5] >> (j & 31)) & 1
