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

Overlapping Philox with memory: a chunk's words are computed before its
elements are read, and the hardware prefetchers see no loads meanwhile, so
the kernels that read big inputs fill their words in pieces of
``PIECE_BLOCKS`` blocks and, after each piece, prefetch the next lines of
the inputs the words are for (:func:`_fill_blocks_prefetch`). The words take
about 0.27 ns each per core; hiding part of that under the loads made dropout
forward 3-8% and the fused dropout + add + LN forward about 10% faster.

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

from ._common import JIT

# _common.JIT (nogil, cache=True unless FASTREG_NUMBA_CACHE=0) with the fast-math
# flags narrowed as the module docstring explains.
_ELEMENTWISE = dict(JIT, fastmath=False)
_REDUCING = dict(JIT, fastmath={"reassoc"})
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


@intrinsic
def _prefetch(typingctx, a, i):
    """Hint the cache line of ``a.flat[i]`` into L1 (``llvm.prefetch``, read,
    high locality); no effect on results. ``a``: a C-contiguous array."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), i8p)
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                             "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen


# Blocks per piece of an interleaved fill: the words of 256 elements, after
# which the next 1 KiB of each prefetched array is requested.
PIECE_BLOCKS = 64


@numba.njit(**_SERIAL)
def _fill_blocks_prefetch(w, nblocks, k0, k1, first, a, b, e0, m):
    """:func:`_fill_blocks`, with a[e0:e0+m] and b[e0:e0+m] (1-D, C order; b may
    be a) prefetched line by line between pieces of the fill, so the memory
    of the chunk streams in while Philox computes its words."""
    step = 64 // a.itemsize          # elements per cache line
    per_piece = 4 * PIECE_BLOCKS
    for q in range(0, nblocks, PIECE_BLOCKS):
        nb = min(PIECE_BLOCKS, nblocks - q)
        _fill_blocks(w[4 * q:], nb, k0, k1, first + np.uint64(q))
        lo = e0 + 4 * q
        hi = min(e0 + m, lo + per_piece)
        for e in range(lo, hi, step):
            _prefetch(a, e)
            _prefetch(b, e)


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


@intrinsic
def _f64_bits(typingctx, x):
    """The IEEE-754 bits of a float64 as an int64 (a bitcast)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(x), codegen


@intrinsic
def _f64_from_bits(typingctx, i):
    """The float64 whose IEEE-754 bits are the int64 ``i`` (a bitcast)."""
    if i != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(i), codegen


# fdlibm's log (e_log.c) and sin/cos kernels (FreeBSD k_sin.c, k_cos.c): each
# within 1 ulp, branch-free here, so the Box-Muller loop vectorizes (Numba
# calls libm one element at a time, 5-10x slower).
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
LG1, LG2, LG3, LG4 = 6.666666666666735130e-01, 3.999999999940941908e-01, \
    2.857142874366239149e-01, 2.222219843214978396e-01
LG5, LG6, LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
S1, S2, S3 = -1.66666666666666324348e-01, 8.33333333332248946124e-03, \
    -1.98412698298579493134e-04
S4, S5, S6 = 2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10
C1, C2, C3 = 4.16666666666666019037e-02, -1.38888888888741095749e-03, \
    2.48015872894767294178e-05
C4, C5, C6 = -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11
TURN_24 = 2.0 * np.pi * 2.0**-24       # radians per 2**-24 of a turn


@numba.njit(inline="always", **_SERIAL)
def _log(x):
    """Natural log of a normal, positive, finite float64 (fdlibm's algorithm)."""
    bits = _f64_bits(x)
    hx = bits >> 32
    k = (hx >> 20) - 1023
    hx &= 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000
    # x scaled by a power of 2 into [sqrt(2)/2, sqrt(2))
    m = _f64_from_bits(((hx | (i ^ 0x3FF00000)) << 32) | (bits & 0xFFFFFFFF))
    k += i >> 20
    f = m - 1.0
    s = f / (2.0 + f)
    dk = np.float64(k)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    near = dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
    far = dk * LN2_HI - ((s * (f - r) - dk * LN2_LO) - f)
    return near if ((hx - 0x6147A) | (0x6B851 - hx)) > 0 else far


@numba.njit(inline="always", **_SERIAL)
def _cos_sin_turns(j):
    """(cos, sin) of 2*pi*j/2**24 for an integer 0 <= j < 2**24. The reduction to
    [-pi/4, pi/4] is exact (integer arithmetic on j); then fdlibm's kernels."""
    q = (j + (1 << 21)) >> 22             # nearest quarter turn, 0..4
    a = np.float64(j - (q << 22)) * TURN_24
    z = a * a
    w = z * z
    rs = S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6)
    sa = a + z * a * (S1 + z * rs)
    rc = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6))
    hz = 0.5 * z
    v = 1.0 - hz
    ca = v + (((1.0 - v) - hz) + z * rc)
    # rotate by q quarter turns: (ca, sa), (-sa, ca), (-ca, -sa), (sa, -ca), written
    # as one swap and two signs (a chain of selects kept LLVM from vectorizing)
    odd = (q & 1) == 1
    sign_c = 1.0 - 2.0 * np.float64(((q + 1) >> 1) & 1)
    sign_s = 1.0 - 2.0 * np.float64((q >> 1) & 1)
    return (sa if odd else ca) * sign_c, (ca if odd else sa) * sign_s


@numba.njit(**_SERIAL)
def _box_muller(w, nblocks, z):
    """z[4b .. 4b+3] = the four standard normals of the block words w[4b .. 4b+3]:
    for each word pair (2p, 2p+1) (the pairs (0, 1) and (2, 3) of a block),
    r = sqrt(-2 log(1 - u_2p)), t = 2 pi u_2p+1, z = (r cos t, r sin t),
    u = (word >> 8) * 2**-24, as in fastreg/random.py's contract. Vectorized:
    3.9 ns per block against 21.6 with libm's scalar log/sin/cos."""
    for p in range(2 * nblocks):
        r = np.sqrt(-2.0 * _log(1.0 - np.float64(np.int64(w[2 * p]) >> 8) * INV24))
        c, s = _cos_sin_turns(np.int64(w[2 * p + 1]) >> 8)
        z[2 * p] = r * c
        z[2 * p + 1] = r * s


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
            _fill_blocks_prefetch(w, (m + 3) // 4, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS),
                                  x, x, e0, m)
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


# =========================================================================== Gaussian noise

@numba.njit(**_PARALLEL)
def _gaussian_fwd(x, k0, k1, offset, std, multiplicative, y):
    """y = x + std * z (additive) or x * (1 + std * z), in float64, rounded once."""
    n = x.size
    for ch in prange((n + CHUNK - 1) // CHUNK):
        e0 = ch * CHUNK
        m = min(CHUNK, n - e0)
        nb = (m + 3) // 4
        w = np.empty(CHUNK, np.uint32)
        z = np.empty(CHUNK, np.float64)
        _fill_blocks(w, nb, k0, k1, offset + np.uint64(ch * CHUNK_BLOCKS))
        _box_muller(w, nb, z)
        xs = x[e0:e0 + m]
        ys = y[e0:e0 + m]
        if multiplicative:
            for j in range(m):
                ys[j] = np.float64(xs[j]) * (1.0 + std * z[j])
        else:
            for j in range(m):
                ys[j] = np.float64(xs[j]) + std * z[j]


# =========================================================================== DropConnect

# (sample, output) rows per prange iteration of the per-example kernels
_ROWS = 16


@numba.njit(**_REDUCING)
def _masked_dot(x, w, words, threshold):
    """sum_i x[i] * w[i] over kept i, in float64."""
    acc = 0.0
    for i in range(x.size):
        acc += np.float64(x[i]) * np.float64(w[i]) * (1.0 if words[i] >= threshold else 0.0)
    return acc


@numba.njit(**_REDUCING)
def _masked_axpy(acc, g, v, words, threshold):
    """acc[i] += g * v[i] over kept i (float64)."""
    for i in range(acc.size):
        acc[i] += g * np.float64(v[i]) * (1.0 if words[i] >= threshold else 0.0)


@numba.njit(**_PARALLEL_REDUCING)
def _drop_connect_fwd_examples(x, w, b, k0, k1, offset, threshold, scale, y):
    """y[s, o] = scale * sum_i keep[s, o, i] * w[o, i] * x[s, i] + b[o]; the keep bit
    of (s, o, i) is stream element (s * O + o) * K + i."""
    N, K = x.shape
    O = w.shape[0]
    R = N * O
    for blk in prange((R + _ROWS - 1) // _ROWS):
        words = np.empty(K + 8, np.uint32)
        for r in range(blk * _ROWS, min(R, (blk + 1) * _ROWS)):
            s = r // O
            o = r - s * O
            lead = _fill_range(words, r * K, K, k0, k1, offset)
            acc = _masked_dot(x[s], w[o], words[lead:lead + K], threshold)
            y[s, o] = acc * scale + np.float64(b[o])


@numba.njit(**_PARALLEL_REDUCING)
def _drop_connect_bwd_dx_examples(dy, w, k0, k1, offset, threshold, scale, dx):
    """dx[s, :] = sum_o dy[s, o] * scale * keep[s, o, :] * w[o, :], o in order."""
    N, K = dx.shape
    O = w.shape[0]
    for s in prange(N):
        words = np.empty(K + 8, np.uint32)
        acc = np.zeros(K, np.float64)
        for o in range(O):
            lead = _fill_range(words, (s * O + o) * K, K, k0, k1, offset)
            _masked_axpy(acc, np.float64(dy[s, o]) * scale, w[o], words[lead:lead + K],
                         threshold)
        for i in range(K):
            dx[s, i] = acc[i]


@numba.njit(**_PARALLEL_REDUCING)
def _drop_connect_bwd_dw_examples(dy, x, k0, k1, offset, threshold, scale, dw):
    """dw[o, :] = sum_s dy[s, o] * scale * keep[s, o, :] * x[s, :], s in order."""
    N, K = x.shape
    O = dw.shape[0]
    for o in prange(O):
        words = np.empty(K + 8, np.uint32)
        acc = np.zeros(K, np.float64)
        for s in range(N):
            lead = _fill_range(words, (s * O + o) * K, K, k0, k1, offset)
            _masked_axpy(acc, np.float64(dy[s, o]) * scale, x[s], words[lead:lead + K],
                         threshold)
        for i in range(K):
            dw[o, i] = acc[i]


@numba.njit(**_REDUCING)
def _activation_mean(mu, sd, z, activation):
    """mean over k of act(mu + sd * z[k]); one loop per activation so each vectorizes."""
    acc = 0.0
    if activation == 0:
        for k in range(z.size):
            acc += mu + sd * z[k]
    elif activation == 1:
        for k in range(z.size):
            acc += max(mu + sd * z[k], 0.0)
    elif activation == 2:
        for k in range(z.size):
            acc += np.tanh(mu + sd * z[k])
    else:
        for k in range(z.size):
            acc += 1.0 / (1.0 + np.exp(-(mu + sd * z[k])))
    return acc / max(z.size, 1)


@numba.njit(**_PARALLEL_REDUCING)
def _moment_matching(mean, var, k0, k1, offset, S, activation, y):
    """y[r] = mean over k < S of act(mean[r] + sqrt(var[r]) * z[r * S + k]).
    activation: 0 identity, 1 relu, 2 tanh, 3 sigmoid. The normals of a block of
    rows are one contiguous stream range, drawn in one go (about 4096 at a time)."""
    R = mean.size
    rows = max(1, 4096 // max(S, 1))
    for blk in prange((R + rows - 1) // rows):
        r0 = blk * rows
        r1 = min(R, r0 + rows)
        count = (r1 - r0) * S
        words = np.empty(count + 8, np.uint32)
        z = np.empty(count + 8, np.float64)
        lead = _fill_range(words, r0 * S, count, k0, k1, offset)
        _box_muller(words, (lead + count + 3) // 4, z)
        for r in range(r0, r1):
            base = lead + (r - r0) * S
            y[r] = _activation_mean(mean[r], np.sqrt(var[r]), z[base:base + S], activation)


# =========================================================================== dropout + add + LN

@numba.njit(**_PARALLEL_REDUCING)
def _dropout_add_ln_fwd(x, res, w, b, k0, k1, offset, threshold, scale, eps, rows_per_block,
                        y, s, mean, rstd, bits):
    """Per row i (one stream element per (i, j), index i * D + j):
    s = x * keep * scale + res (two roundings in the dtype);
    one shifted float64 pass for mean/var (shift: the row's first s), then y.

    Rows go in blocks of ``rows_per_block`` whose stream range starts on a
    multiple of 32 elements (the caller picks it): the block's words come from
    one Philox pass and, when ``bits`` is not empty, its keep bits are whole
    mask words, so no two threads write the same word."""
    M, D = x.shape
    inv_d = 1.0 / max(D, 1)
    zero = scale - scale
    store = bits.size > 0
    xf = x.reshape(-1)
    rf = res.reshape(-1)
    for blk in prange((M + rows_per_block - 1) // rows_per_block):
        i0 = blk * rows_per_block
        i1 = min(M, i0 + rows_per_block)
        count = (i1 - i0) * D
        words = np.empty((count + 31) // 32 * 32 + 8, np.uint32)
        if threshold != 0:
            # lead 0 (i0 * D % 32 == 0); x and res of the block stream in meanwhile
            _fill_blocks_prefetch(words, (count + 3) // 4, k0, k1,
                                  offset + np.uint64(i0 * D // 4), xf, rf, i0 * D, count)
        for i in range(i0, i1):
            wd = words[(i - i0) * D:(i - i0 + 1) * D]
            xi = x[i]
            ri = res[i]
            si = s[i]
            k = 0.0
            if D:
                k = np.float64(xi[0] * (scale if wd[0] >= threshold else zero) + ri[0])
            s1 = 0.0
            s2 = 0.0
            for j in range(D):
                v = xi[j] * (scale if wd[j] >= threshold else zero) + ri[j]
                si[j] = v
                d = np.float64(v) - k
                s1 += d
                s2 += d * d
            m1 = s1 * inv_d
            var = s2 * inv_d - m1 * m1
            if var < 0.0:  # rounding; NaN passes through
                var = 0.0
            mu = k + m1
            r = 1.0 / np.sqrt(var + eps)
            yi = y[i]
            for j in range(D):
                yi[j] = (si[j] - mu) * r * w[j] + b[j]
            mean[i] = mu
            rstd[i] = r
        if store:
            _pack_bits(bits[i0 * D // 32:(i1 * D + 31) // 32], words, count, threshold)


@numba.njit(**_SERIAL)
def _keep_factors_from_bits(bits, e0, scale, kf):
    """kf[j] = scale if bit e0 + j of the mask bits is set, else 0: the bits up to
    the first word boundary one by one, then 32 per word (a loop that vectorizes)."""
    n = kf.size
    head = min(n, (32 - e0 % 32) % 32)
    for j in range(head):
        e = e0 + j
        kf[j] = scale if (bits[e >> 5] >> (e & 31)) & 1 else 0.0
    words = bits[(e0 + head) // 32:]
    body = kf[head:]
    full = (n - head) // 32
    for q in range(full):
        word = words[q]
        for t in range(32):
            body[32 * q + t] = scale if (word >> t) & 1 else 0.0
    for j in range(32 * full, n - head):
        body[j] = scale if (words[j >> 5] >> (j & 31)) & 1 else 0.0


@numba.njit(**_PARALLEL_REDUCING)
def _dropout_add_ln_bwd(dy, s, mean, rstd, w, dres_in, bits, k0, k1, offset, threshold, scale,
                        rows_per_block, dx, dres, dw_part, db_part):
    """ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dres_in, g = dy * w;
    dres = ds, dx = ds * keep * scale (keep read from ``bits`` when it is not
    empty, else regenerated for the rows' stream range).

    As layer norm's backward (cpu/norm.py), rows in groups of 4: the sums of each
    row; the 4 rows' keep factors (one contiguous stream range, regenerated
    while the next 4 rows are prefetched, or unpacked from ``bits``) into a
    small scratch, except when every row is whole mask words: the bits are then
    applied word by word; dres and dx row by row; then the dweight/dbias partial of the row
    block updated once per 4 rows from the cached rows. The three loops are
    separate because one loop touching every array did not vectorize (too many
    pointers for LLVM's runtime alias checks) and ran 4x slower.
    ``dres_in`` None (no incoming residual gradient) compiles its own variant."""
    M, D = s.shape
    inv_d = 1.0 / max(D, 1)
    zero = scale - scale
    # Whole mask words per row: the bits are applied directly (27% faster
    # than going through per-element factors).
    direct = bits.size > 0 and D % 32 == 0
    dyf = dy.reshape(-1)
    sf = s.reshape(-1)
    for blk in prange(dw_part.shape[0]):
        pw = dw_part[blk]
        pb = db_part[blk]
        pw[:] = 0.0
        pb[:] = 0.0
        i0 = blk * rows_per_block
        i1 = min(M, i0 + rows_per_block)
        words = np.empty(4 * D + 8, np.uint32)
        kf = np.empty((4, D))      # scale or 0 per element of the 4 rows
        mu = np.empty(4)
        r = np.empty(4)
        a = np.empty(4)            # mean(g)
        c = np.empty(4)            # mean(g * (s - mean)) * rstd**2
        for g0 in range(i0, i1, 4):
            n = min(4, i1 - g0)
            for t in range(n):
                i = g0 + t
                mu[t] = mean[i]
                r[t] = rstd[i]
                sg = 0.0
                sgx = 0.0
                for j in range(D):
                    g = np.float64(dy[i, j]) * w[j]
                    sg += g
                    sgx += g * (s[i, j] - mu[t])
                a[t] = sg * inv_d
                c[t] = sgx * inv_d * r[t] * r[t]
            if direct:
                pass
            elif bits.size > 0:
                for t in range(n):
                    _keep_factors_from_bits(bits, (g0 + t) * D, scale, kf[t])
            elif threshold != 0:
                # the next 4 rows of dy and s stream in while Philox computes
                fb0 = (g0 * D) // 4
                nxt = min(4, i1 - g0 - 4) * D if g0 + 4 < i1 else 0
                _fill_blocks_prefetch(words, (g0 * D + n * D + 3) // 4 - fb0, k0, k1,
                                      offset + np.uint64(fb0), dyf, sf, (g0 + 4) * D, nxt)
                lead = g0 * D - 4 * fb0
                for t in range(n):
                    wt = words[lead + t * D:lead + (t + 1) * D]
                    kt = kf[t]
                    for j in range(D):
                        kt[j] = scale if wt[j] >= threshold else 0.0
            else:
                kf[:] = scale
            for t in range(n):
                i = g0 + t
                mt, rt, at, ct = mu[t], r[t], a[t], c[t]
                if direct:      # keep bits applied word by word, as _apply_bits
                    bw = bits[i * (D // 32):(i + 1) * (D // 32)]
                    dyi = dy[i]
                    si = s[i]
                    dri = dres[i]
                    dxi = dx[i]
                    for q in range(D // 32):
                        word = bw[q]
                        for u in range(32):
                            j = 32 * q + u
                            e = rt * (np.float64(dyi[j]) * w[j] - at - (si[j] - mt) * ct)
                            if dres_in is not None:
                                e += dres_in[i, j]
                            dri[j] = e
                            dxi[j] = e * (scale if (word >> u) & 1 else zero)
                    continue
                for j in range(D):
                    e = rt * (np.float64(dy[i, j]) * w[j] - at - (s[i, j] - mt) * ct)
                    if dres_in is not None:
                        e += dres_in[i, j]
                    dres[i, j] = e
                    dx[i, j] = e * kf[t, j]
            if n == 4:
                m0, m1, m2, m3 = mu[0], mu[1], mu[2], mu[3]
                r0, r1, r2, r3 = r[0], r[1], r[2], r[3]
                for j in range(D):
                    d0 = np.float64(dy[g0, j])
                    d1 = np.float64(dy[g0 + 1, j])
                    d2 = np.float64(dy[g0 + 2, j])
                    d3 = np.float64(dy[g0 + 3, j])
                    pw[j] += ((d0 * (s[g0, j] - m0) * r0 + d1 * (s[g0 + 1, j] - m1) * r1)
                              + (d2 * (s[g0 + 2, j] - m2) * r2 + d3 * (s[g0 + 3, j] - m3) * r3))
                    pb[j] += (d0 + d1) + (d2 + d3)
            else:  # the block's last rows
                for t in range(n):
                    i = g0 + t
                    for j in range(D):
                        d = np.float64(dy[i, j])
                        pw[j] += d * (s[i, j] - mu[t]) * r[t]
                        pb[j] += d
