"""The Philox4x32-10 stream: known answers, the element -> (counter, word) contract,
CPU against the reference bit for bit, thread counts, the Generator, and
statistical sanity of the bits, uniforms and normals."""

import math

import numba
import numpy as np
import pytest

import fastreg
from _assert import assert_bitwise, assert_close
from fastreg.random import Generator
from fastreg.reference import random as ref_random

BACKENDS = ["cpu", "reference"]

# Random123's kat_vectors (D. E. Shaw Research), the philox4x32 lines:
# rounds, counter (4 words), key (2 words), expected output (4 words).
KAT = [
    (7, [0, 0, 0, 0], [0, 0], [0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48]),
    (7, [0xffffffff] * 4, [0xffffffff] * 2, [0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662]),
    (7, [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a]),
    (10, [0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    (10, [0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    (10, [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
]
KAT10 = [k for k in KAT if k[0] == 10]


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox4x32_10_matches_random123_known_answers(backend):
    counter = np.array([k[1] for k in KAT10], np.uint32)
    key = np.array([k[2] for k in KAT10], np.uint32)
    got = fastreg.random.philox4x32(counter, key, backend=backend)
    for row, (_, c, k, want) in zip(got, KAT10):
        assert row.tolist() == want, f"{backend}: counter {c} key {k}: got " \
            f"{[hex(v) for v in row]}, want {[hex(v) for v in want]}"


@pytest.mark.parametrize("rounds,counter,key,want", KAT)
def test_reference_philox_rounds_match_known_answers(rounds, counter, key, want):
    """The 7-round vectors pin down the round function and the key schedule separately."""
    out = np.empty(4, np.uint32)
    ref_random.philox4x32(np.array(counter, np.uint32), np.array(key, np.uint32), out, rounds)
    assert out.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox4x32_broadcasts_one_key_and_keeps_shapes(backend, rng):
    counter = rng.integers(0, 2**32, (2, 3, 4), dtype=np.uint32)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    got = fastreg.random.philox4x32(counter, key, backend=backend)
    each = fastreg.random.philox4x32(counter.reshape(-1, 4), np.tile(key, (6, 1)),
                                     backend="reference")
    assert got.shape == (2, 3, 4) and np.array_equal(got.reshape(-1, 4), each)
    out = np.zeros_like(counter)
    view = out[:, ::2]
    assert fastreg.random.philox4x32(counter[:, ::2], key, out=view, backend=backend) is view
    assert np.array_equal(out[:, ::2], got[:, ::2]) and not out[:, 1::2].any()


def _contract_words(seed, offset, size):
    """Element i = word i % 4 of Philox(counter (n & 0xFFFFFFFF, n >> 32, 0, 0),
    key (seed & 0xFFFFFFFF, seed >> 32)), n = offset + i // 4 mod 2**64, written out."""
    out = []
    for i in range(size):
        n = (offset + i // 4) % 2**64
        c = np.array([n & 0xFFFFFFFF, n >> 32, 0, 0], np.uint32)
        k = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
        w = np.empty(4, np.uint32)
        ref_random.philox4x32(c, k, w)
        out.append(w[i % 4])
    return np.array(out, np.uint32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 1, 2**32 - 2, 2**64 - 3])
def test_stream_element_takes_word_i_mod_4_of_block_offset_plus_i_div_4(offset, backend, rng):
    seed = int(rng.integers(0, 2**63)) * 2 + 1          # both key words non-trivial
    got = fastreg.random.random_bits((3, 5), rng=Generator(seed, offset), backend=backend)
    assert np.array_equal(got.reshape(-1), _contract_words(seed, offset, 15))


SIZES = [0, 1, 2, 3, 4, 5, 31, 32, 33, 2047, 2048, 2049, 4099, 10007]


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 1000, 2**64 - 700])
@pytest.mark.parametrize("size", SIZES)
def test_cpu_stream_is_bitwise_the_reference(size, offset, rng):
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    for fn, dtypes in ((fastreg.random.random_bits, [None]),
                       (fastreg.random.uniform, [np.float32, np.float64])):
        for dtype in dtypes:
            kw = {} if dtype is None else {"dtype": dtype}
            a = fn(size, rng=Generator(seed, offset), backend="cpu", **kw)
            b = fn(size, rng=Generator(seed, offset), backend="reference", **kw)
            assert_bitwise(a, b, case=f"{fn.__name__} {dtype} size={size} offset={offset}")
    for dtype, t in ((np.float32, 1e-6), (np.float64, 1e-13)):
        a = fastreg.random.normal(size, rng=Generator(seed, offset), dtype=dtype)
        b = fastreg.random.normal(size, rng=Generator(seed, offset), dtype=dtype,
                                  backend="reference")
        assert_close(a, b, rtol=t, atol=t, case=f"normal {np.dtype(dtype).name} size={size}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_index_is_the_c_order_index_of_any_output_layout(backend):
    out = np.zeros((6, 10), np.uint32)
    view = out[:, ::2]
    fastreg.random.random_bits(view.shape, rng=9, out=view, backend=backend)
    assert np.array_equal(view, fastreg.random.random_bits((6, 5), rng=9))
    assert not out[:, 1::2].any()


def test_stream_identical_at_1_and_2_threads():
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [fastreg.random.random_bits(100_003, rng=Generator(7, 2**32 - 11)),
               fastreg.random.normal(50_001, rng=8, dtype=np.float64)]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = [fastreg.random.random_bits(100_003, rng=Generator(7, 2**32 - 11)),
               fastreg.random.normal(50_001, rng=8, dtype=np.float64)]
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(one, two):
        assert_bitwise(a, b, case="1 vs 2 threads")


def test_uniform_and_normal_are_functions_of_the_words(rng):
    seed = int(rng.integers(0, 2**63))
    w = fastreg.random.random_bits(4000, rng=seed).astype(np.float64)
    u = fastreg.random.uniform(4000, rng=seed, dtype=np.float64)
    assert np.array_equal(u, np.floor(w / 256) * 2.0**-24)
    z = fastreg.random.normal(4000, rng=seed, dtype=np.float64)
    ub = u.reshape(-1, 4)
    r01, r23 = np.sqrt(-2 * np.log(1 - ub[:, 0])), np.sqrt(-2 * np.log(1 - ub[:, 2]))
    t01, t23 = 2 * np.pi * ub[:, 1], 2 * np.pi * ub[:, 3]
    expected = np.stack([r01 * np.cos(t01), r01 * np.sin(t01), r23 * np.cos(t23),
                         r23 * np.sin(t23)], axis=1).reshape(-1)
    assert_close(z, expected, rtol=1e-13, atol=1e-13, case="Box-Muller")
    assert np.abs(z).max() <= math.sqrt(2 * 24 * math.log(2)) + 1e-12


def test_cpu_log_and_sincos_are_accurate_on_every_24_bit_input():
    """The CPU's Box-Muller uses its own vectorizable log and sin/cos (fdlibm's):
    checked on all 2**24 values each can receive."""
    from fastreg.cpu import _philox

    @numba.njit(cache=False)
    def logs(v, out):
        for i in range(v.size):
            out[i] = _philox._log(v[i])

    @numba.njit(cache=False)
    def turns(j, c, s):
        for i in range(j.size):
            c[i], s[i] = _philox._cos_sin_turns(j[i])

    v = 1.0 - np.arange(2**24) * 2.0**-24            # every 1 - u: [2**-24, 1]
    got = np.empty_like(v)
    logs(v, got)
    ulps = np.abs(got - np.log(v)) / np.spacing(np.abs(np.log(v)) + 1e-300)
    assert ulps.max() <= 2, f"log: {ulps.max()} ulps from NumPy at v={v[np.argmax(ulps)]}"
    assert got[0] == 0.0 and got[-1] == -24 * math.log(2)
    j = np.arange(2**24, dtype=np.int64)
    c, s = np.empty(2**24), np.empty(2**24)
    turns(j, c, s)
    t = 2 * np.pi * (j * 2.0**-24)
    # NumPy rounds the angle first (up to 4.4e-16 off); the kernel reduces exactly
    assert np.abs(c - np.cos(t)).max() < 1e-15 and np.abs(s - np.sin(t)).max() < 1e-15
    assert c[0] == 1.0 and s[0] == 0.0 and c[2**22] == 0.0 and s[2**22] == 1.0
    if np.finfo(np.longdouble).nmant >= 63:          # x87 extended: check the error itself
        th = 2 * np.arccos(np.longdouble(-1)) * j.astype(np.longdouble) / 2**24
        assert np.abs(c - np.cos(th)).max() < 1.5e-16
        assert np.abs(s - np.sin(th)).max() < 1.5e-16


# --------------------------------------------------------------------------- statistics

def test_uniform_mean_and_variance(rng):
    n = 2_000_000
    u = fastreg.random.uniform(n, rng=int(rng.integers(2**63)), dtype=np.float64)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)     # Var(U^2-ish): 1/180
    # 64 equal bins: chi-square with 63 degrees of freedom, far tail bound
    counts = np.bincount((u * 64).astype(int), minlength=64)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 63 + 8 * math.sqrt(2 * 63), chi2


def test_random_bits_are_balanced_per_bit_and_per_word_position(rng):
    n = 1_000_000
    w = fastreg.random.random_bits(n, rng=int(rng.integers(2**63)))
    bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    per_bit = bits.mean(axis=0)
    assert np.all(np.abs(per_bit - 0.5) < 6 * math.sqrt(0.25 / n)), per_bit
    per_word = w.reshape(-1, 4).astype(np.float64).mean(axis=0) / 2**32
    assert np.all(np.abs(per_word - 0.5) < 6 * math.sqrt(1 / 12 / (n // 4))), per_word
    # consecutive words are uncorrelated
    u = w.astype(np.float64) / 2**32 - 0.5
    corr = (u[1:] * u[:-1]).mean() * 12
    assert abs(corr) < 6 / math.sqrt(n), corr


def test_normal_moments(rng):
    n = 2_000_000
    z = fastreg.random.normal(n, rng=int(rng.integers(2**63)), dtype=np.float64)
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**3).mean()) < 6 * math.sqrt(15 / n)
    assert abs((z**4).mean() - 3) < 6 * math.sqrt(96 / n)
    # the four normals of a block are independent of one another
    b = z.reshape(-1, 4)
    c = np.corrcoef(b, rowvar=False)[np.triu_indices(4, 1)]
    assert np.all(np.abs(c) < 6 / math.sqrt(b.shape[0])), c


# --------------------------------------------------------------------------- Generator

def test_generator_takes_and_advances_by_blocks():
    g = Generator(5)
    assert g.state == (5, 0)
    assert g.take(3) == (5, 0) and g.offset == 3
    x = fastreg.random.uniform((2, 5), rng=g)                       # 10 elements: 3 blocks
    assert g.offset == 6
    assert np.array_equal(x, fastreg.random.uniform((2, 5), rng=Generator(5, 3)))
    g.advance(2**64 - 6)                                            # offsets wrap mod 2**64
    assert g.offset == 0
    assert repr(Generator(1, 2)) == "fastreg.random.Generator(seed=1, offset=2)"
    assert Generator(*Generator(9, 4).state).state == (9, 4)


def test_an_int_rng_is_a_fresh_generator_at_offset_0():
    a = fastreg.random.random_bits(10, rng=123)
    assert np.array_equal(a, fastreg.random.random_bits(10, rng=123))
    assert np.array_equal(a, fastreg.random.random_bits(10, rng=Generator(123, 0)))
    assert np.array_equal(a, fastreg.random.random_bits(10, rng=np.uint64(123)))


def test_seed_words_are_the_key():
    """seed = k0 + 2**32 * k1: the high word matters."""
    a = fastreg.random.random_bits(8, rng=1)
    b = fastreg.random.random_bits(8, rng=1 + 2**32)
    assert not np.array_equal(a, b)
    c = np.zeros((2, 4), np.uint32)
    c[1, 0] = 1
    expected = fastreg.random.philox4x32(c, np.array([1, 1], np.uint32)).reshape(-1)
    assert np.array_equal(b, expected)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: Generator(-1), ValueError, r"Generator: 'seed' must be an integer in \[0, 2\*\*64\)"),
    (lambda: Generator(2**64), ValueError, r"Generator: 'seed'"),
    (lambda: Generator(1.5), TypeError, r"Generator: 'seed' must be an integer"),
    (lambda: Generator(True), TypeError, r"Generator: 'seed'"),
    (lambda: Generator(1, -1), ValueError, r"Generator: 'offset'"),
    (lambda: Generator(1, 2**64), ValueError, r"Generator: 'offset'"),
    (lambda: Generator(1).advance(-1), ValueError, r"Generator.advance: 'blocks' must be an "
                                                   r"integer >= 0"),
    (lambda: fastreg.random.uniform(3, rng="x"), TypeError, r"uniform: 'rng' must be a "
                                                            r"fastreg.random.Generator"),
    (lambda: fastreg.random.uniform(3, rng=None), TypeError, r"uniform: 'rng'"),
    (lambda: fastreg.random.uniform(3, rng=1, dtype=np.int32), TypeError,
     r"uniform: 'dtype' must be one of float32, float64"),
    (lambda: fastreg.random.normal((2, -1), rng=1), ValueError, r"normal: 'shape'"),
    (lambda: fastreg.random.normal("ab", rng=1), TypeError, r"normal: 'shape'"),
    (lambda: fastreg.random.random_bits(4, rng=1, out=np.empty(4, np.int32)), TypeError,
     r"random_bits: 'out\[0\] \(out\)' must be of dtype uint32"),
    (lambda: fastreg.random.philox4x32(np.zeros((2, 3), np.uint32), np.zeros(2, np.uint32)),
     ValueError, r"philox4x32: 'counter' must have shape \(\.\.\., 4\)"),
    (lambda: fastreg.random.philox4x32(np.zeros((2, 4), np.uint32), np.zeros(3, np.uint32)),
     ValueError, r"philox4x32: 'key' must have shape \(2,\) or \(2, 2\)"),
    (lambda: fastreg.random.philox4x32(np.zeros((2, 4), np.int64), np.zeros(2, np.uint32)),
     TypeError, r"philox4x32: 'counter' must be of dtype uint32"),
])
def test_bad_arguments_raise_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
