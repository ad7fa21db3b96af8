"""The host emulation of CUDA (kernels/emu/cuda_emu.h) against NumPy models of CUDA's rules.

The kernels are tests/kernels/emu_checks.cu (compiled for sm_90 with NVRTC
as well, in test_cuda_compile.py). Both schedulers run: fibers (the default)
and real threads (one OS thread per CUDA thread).
"""

import pathlib
import threading

import ml_dtypes
import numpy as np
import pytest

from fastreg.cuda import _emulator

pytestmark = pytest.mark.gpu

HERE = pathlib.Path(__file__).resolve().parent
MODES = ["fibers", "threads"]


@pytest.fixture(scope="module")
def lib():
    if _emulator.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) for the CUDA host emulation")
    return _emulator.library("emu_checks", HERE / "kernels")


@pytest.fixture(params=MODES)
def mode(request, lib):
    lib.set_mode(request.param)
    yield request.param
    lib.set_mode("fibers")


def test_barrier_exchanges_shared_memory_in_3d_blocks(lib, mode):
    grid, block = (2, 3, 2), (4, 2, 3)
    nt, nb = int(np.prod(block)), int(np.prod(grid))
    out = np.full(nb * nt, -1, np.int32)
    lib.launch("mirror", grid, block, (out,))
    expected = np.concatenate([b * nt + np.arange(nt)[::-1] for b in range(nb)])
    np.testing.assert_array_equal(out, expected)


def test_threads_that_return_early_leave_the_barriers(lib, mode):
    n, blocks = 64, 3
    out = np.full(n * blocks, -1, np.int32)
    lib.launch("early_exit", blocks, n, (out,))
    t = np.arange(n)
    row = np.where(t % 2 == 0, 10 * ((t + 2) % n) + 1, -1)
    np.testing.assert_array_equal(out, np.tile(row, blocks))


def _shfl_model(v, width, offset):
    """CUDA's shuffle rules (Programming Guide, warp shuffle functions), lane by lane."""
    n = len(v)
    out = np.empty((4, n), v.dtype)
    for i in range(n):
        lane, base = i % 32, i - i % 32
        group = lane // width
        src = lane ^ offset                                  # xor: later groups give own value
        out[0, i] = v[base + (src if src < (group + 1) * width else lane)]
        src = lane + offset                                  # down
        out[1, i] = v[base + (src if src < (group + 1) * width else lane)]
        src = lane - offset                                  # up
        out[2, i] = v[base + (src if src >= group * width else lane)]
        out[3, i] = v[base + group * width + offset % width]  # idx
    return out


@pytest.mark.parametrize("width,offset", [(32, 1), (32, 16), (32, 5), (16, 3), (8, 8), (4, 1),
                                          (2, 1), (32, 31)])
def test_shuffles_and_votes_follow_cuda_rules(lib, mode, width, offset, rng):
    n = 64
    v = rng.standard_normal(n).astype(np.float32)
    out = np.full(4 * n, np.nan, np.float32)
    votes = np.zeros(3 * n, np.uint32)
    lib.launch("shuffles", 1, n, (v, out, votes, np.int32(width), np.int32(offset)))
    np.testing.assert_array_equal(out.reshape(4, n), _shfl_model(v, width, offset))
    pred = v > 0
    for w in range(n // 32):
        lanes = pred[32 * w:32 * w + 32]
        ballot = int(sum(1 << i for i in range(32) if lanes[i]))
        got = votes.reshape(n, 3)[32 * w:32 * w + 32]
        assert (got[:, 0] == ballot).all()
        assert (got[:, 1] == int(lanes.all())).all() and (got[:, 2] == int(lanes.any())).all()


def test_dynamic_shared_memory_is_per_block_and_poisoned(lib, mode):
    n, blocks = 32, 2
    out = np.zeros(n * blocks, np.float32)
    lib.launch("dynamic_shared", blocks, n, (out,), shared_mem=4 * (n + 1))
    got = out.reshape(blocks, n)
    for b in range(blocks):
        np.testing.assert_array_equal(got[b, :-1], b * 1000 + np.arange(1, n))
        assert np.isnan(got[b, -1]), "the slot nobody wrote must hold the poison (NaN)"


def test_fibers_expose_a_missing_barrier(lib):
    """Even blocks run their threads in increasing order, odd ones in decreasing
    order: a read of a neighbour's value without a barrier is stale in one of them."""
    lib.set_mode("fibers")
    n = 64
    out = np.zeros(2 * n, np.float32)
    lib.launch("missing_barrier", 2, n, (out,))
    expected = np.array([(np.arange(n) + 1) % n + 100 * b for b in range(2)])
    got = out.reshape(2, n)
    assert (got[0, :-1] != expected[0, :-1]).all()   # writer t + 1 had not run yet
    np.testing.assert_array_equal(got[1, :-1], expected[1, :-1])
    assert got[1, -1] != expected[1, -1]             # thread 0 runs last in odd blocks


def test_deadlock_is_reported_not_hung(lib, mode):
    lib.set_barrier_timeout(0.5)
    try:
        with pytest.raises(_emulator.EmulatorError, match="deadlock"):
            lib.launch("divergent_barrier", 1, 64, (np.zeros(64, np.float32),))
    finally:
        lib.set_barrier_timeout(60.0)


def test_partial_mask_collectives_are_rejected(lib, mode):
    with pytest.raises(_emulator.EmulatorError, match="mask 0x0000ffff.*live lanes are 0xffffffff"):
        lib.launch("half_mask", 1, 32, (np.zeros(32, np.float32),))


def _conversion_inputs(rng):
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    random = bits.view(np.float32)
    # every midpoint between neighbouring finite float16 / bfloat16 values (ties to even)
    h = np.arange(0, 0x7c00, dtype=np.uint16).view(np.float16).astype(np.float32)
    b = np.arange(0, 0x7f80, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    mids = np.concatenate([(h[:-1].astype(np.float64) + h[1:]) / 2,
                           (b[:-1].astype(np.float64) + b[1:]) / 2]).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.996,
                        5.96e-8, 2.98e-8, 2.99e-8, 1e-45, 3.4e38], np.float32)
    x = np.concatenate([random, mids, -mids, special])
    return x


def test_half_and_bfloat16_conversions_round_like_cuda(lib, rng):
    """float32 -> float16/bfloat16 round to nearest even (NumPy and ml_dtypes do too);
    NaN becomes 0x7fff, CUDA's canonical NaN."""
    x = _conversion_inputs(rng)
    n = len(x)
    vh, vb = np.empty(n, np.float32), np.empty(n, np.float32)
    hb, bb = np.empty(n, np.uint16), np.empty(n, np.uint16)
    lib.launch("convert", -(-n // 256), 256, (x, vh, vb, hb, bb, np.int32(n)))
    nan = np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
        want_b = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(hb[~nan], want_h[~nan])
    np.testing.assert_array_equal(bb[~nan], want_b[~nan])
    assert (hb[nan] == 0x7FFF).all() and (bb[nan] == 0x7FFF).all()
    np.testing.assert_array_equal(vh[~nan], want_h[~nan].view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(vb[~nan],
                                  want_b[~nan].view(ml_dtypes.bfloat16).astype(np.float32))


def _butterfly(v):
    """Sum over each warp by xor butterfly, in float32, as warp_sum does."""
    v = v.reshape(-1, 32).copy()
    lanes = np.arange(32)
    for offset in (16, 8, 4, 2, 1):
        v = v + v[:, lanes ^ offset]
    return v


@pytest.mark.parametrize("R", [32, 64, 128, 256])
def test_group_sum_order_is_fixed_and_shared_by_the_group(lib, R, rng):
    block, blocks = 256, 3
    x = rng.standard_normal(block * blocks).astype(np.float32) * 1e3
    out = np.empty_like(x)
    lib.launch("group_sums", blocks, block, (x, out, np.int32(R)))
    warp_totals = _butterfly(x)[:, 0]
    expected = np.empty_like(x)
    per = R // 32
    for g in range(len(x) // R):
        s = warp_totals[g * per]
        for k in range(1, per):
            s = np.float32(s + warp_totals[g * per + k])
        expected[g * R:(g + 1) * R] = s
    np.testing.assert_array_equal(out, expected)


def test_block_welford_matches_two_pass_moments(lib, rng):
    block, per = 96, 5
    x = rng.standard_normal((2, block * per)) * 3 + 1e4
    out = np.empty((2, block, 3))
    lib.launch("block_moments", 2, block, (x.reshape(-1), out.reshape(-1), np.int32(per)))
    for b in range(2):
        assert (out[b] == out[b, 0]).all(), "every thread must get the same bits"
        n, mean, m2 = out[b, 0]
        assert n == block * per
        np.testing.assert_allclose(mean, x[b].mean(), rtol=1e-15)
        np.testing.assert_allclose(m2, ((x[b] - x[b].mean()) ** 2).sum(), rtol=1e-11)


@pytest.mark.parametrize("dtype,name", [(np.float16, "vec_f16"), (ml_dtypes.bfloat16, "vec_bf16"),
                                        (np.float32, "vec_f32"), (np.float64, "vec_f64")])
def test_vector_loads_and_stores_keep_element_order(lib, dtype, name, rng):
    threads = 64
    n = threads * 16 // np.dtype(dtype).itemsize
    x = rng.standard_normal(n).astype(dtype)
    out = np.zeros_like(x)
    lib.launch(name, 1, threads, (x, out))
    acc = np.float64 if dtype == np.float64 else np.float32
    np.testing.assert_array_equal(out, (x.astype(acc) * acc(1.1)).astype(dtype))


def test_arguments_are_checked_against_the_kernel_signature(lib):
    assert lib.signature("signature_probe") == "pilfdIL"
    ok = (np.zeros(1, np.float32), np.int32(1), np.int64(2), np.float32(3), np.float64(4),
          np.uint32(5), np.uint64(6))
    lib.launch("signature_probe", 1, 32, ok)
    with pytest.raises(TypeError, match="argument 1"):
        lib.launch("signature_probe", 1, 32, (ok[0], np.int64(1), *ok[2:]))
    with pytest.raises(TypeError, match="takes 7 arguments"):
        lib.launch("signature_probe", 1, 32, ok[:-1])
    with pytest.raises(ValueError, match="C-contiguous"):
        lib.launch("signature_probe", 1, 32, (np.zeros(4, np.float32)[::2], *ok[1:]))


def test_launches_beyond_the_limits_fail(lib):
    out = np.zeros(4096, np.float32)
    with pytest.raises(_emulator.EmulatorError, match="invalid block"):
        lib.launch("dynamic_shared", 1, 2048, (out,))
    with pytest.raises(_emulator.EmulatorError, match="48 KiB"):
        lib.launch("dynamic_shared", 1, 32, (out,), shared_mem=48 * 1024 + 4)


def test_concurrent_launches_from_python_threads_serialize(lib):
    errors = []

    def worker(seed):
        try:
            for k in range(10):
                grid, block = (1 + (seed + k) % 3, 2, 1), (32, 1 + k % 4, 1)
                nt, nb = int(np.prod(block)), int(np.prod(grid))
                out = np.full(nb * nt, -1, np.int32)
                lib.launch("mirror", grid, block, (out,))
                expected = np.concatenate([b * nt + np.arange(nt)[::-1] for b in range(nb)])
                np.testing.assert_array_equal(out, expected)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
