"""The dropout family: CPU kernels against the NumPy reference, and the ops' properties.

Table-driven part (tests/dropout_cases.py): every op, forward and backward,
float32 and float64, two stream positions (one where the counter's low word
carries mid-call), outputs poisoned before the call and fresh, inputs checked
unchanged, generators advanced alike. Property tests follow: the mask is the
stream's definition, C-order on any layout, "bits" and "seed" give the same
dx, keep rates within binomial bounds, inference rules, DropConnect against
N explicitly masked matrices and finite differences, moment matching against
its closed form and a Monte Carlo of real DropConnect, the fused dropout +
add + LayerNorm against the composition of the separate ops and finite
differences, thread counts, validation. PyTorch checks: test_dropout_torch.py.
"""

import math
import os
import pathlib
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastreg
from _assert import assert_bitwise, assert_close, tol
from dropout_cases import all_cases, gen
from fastreg.random import Generator
from fastreg.reference import random as ref_random

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _run_dropout_ops  # noqa: E402

CASES = list(all_cases())
DTYPES = [np.float32, np.float64]


def _poison(a):
    out = np.empty_like(a)
    out[...] = np.nan if np.issubdtype(a.dtype, np.floating) else np.iinfo(a.dtype).max
    return out


def _snapshot(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _assert_unchanged(before, after, case):
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, after[k], equal_nan=True), f"{case}: input '{k}' modified"


def _assert_same_mask(got, ref, case):
    assert type(got) is type(ref), case
    for attr in ("kind", "shape", "p", "seed", "offset"):
        assert getattr(got, attr) == getattr(ref, attr), f"{case}: mask.{attr}"
    if hasattr(ref, "bits"):
        assert got.scale == ref.scale and got.nbytes == ref.nbytes, case
        if ref.bits is not None:
            assert_bitwise(got.bits, ref.bits, case=f"{case} mask bits")
        assert np.array_equal(got.to_bool(), ref.to_bool(backend="reference")), case


def _compare(got, ref, bitwise, kind, dtype, case):
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is None:
            assert g is None, f"{case}: out[{i}] should be None"
        elif isinstance(r, np.ndarray):
            assert g.shape == r.shape and g.dtype == r.dtype, f"{case}: out[{i}] {g.dtype}"
            if i in bitwise:
                assert_bitwise(g, r, case=f"{case} out[{i}]")
            else:
                rtol, atol = tol(dtype, kind)
                scale = max(1.0, float(np.max(np.abs(np.nan_to_num(r)), initial=0.0)))
                assert_close(g, r, rtol=rtol, atol=atol * scale, case=f"{case} out[{i}]")
        else:
            _assert_same_mask(g, r, f"{case} out[{i}]")


# =========================================================================== table-driven

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,spec,variant,offset", [c[:4] for c in CASES],
                         ids=[c[4] for c in CASES])
def test_forward_matches_reference(op, spec, variant, dtype, offset, rng):
    d = op.make(rng, spec, dtype, variant)
    before = _snapshot(d)
    case = f"{op.name} fwd {np.dtype(dtype).name} {spec} {variant} offset={offset}"
    g_ref, g_out, g_fresh = gen(offset), gen(offset), gen(offset)
    ref = op.forward(d, "reference", g_ref)
    out = op.out_like(ref, _poison)
    got = op.forward(d, "cpu", g_out, out)
    fresh = op.forward(d, "cpu", g_fresh)
    given = [o for o in out if o is not None]
    returned = [g for g in got if isinstance(g, np.ndarray)]
    assert all(any(r is o for r in returned) or (hasattr(got[-1], "bits") and got[-1].bits is o)
               for o in given), f"{case}: out= arrays not returned"
    _compare(got, ref, op.bitwise, "out", dtype, f"{case} (out=)")
    _compare(fresh, ref, op.bitwise, "out", dtype, f"{case} (fresh)")
    assert g_out.offset == g_fresh.offset == g_ref.offset, f"{case}: generators differ"
    _assert_unchanged(before, d, case)


BACKWARD_CASES = [c for c in CASES if c[0].backward is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,spec,variant,offset", [c[:4] for c in BACKWARD_CASES],
                         ids=[c[4] for c in BACKWARD_CASES])
def test_backward_matches_reference(op, spec, variant, dtype, offset, rng):
    d = op.make(rng, spec, dtype, variant)
    saved = op.forward(d, "reference", gen(offset))
    dy = np.empty_like(saved[0])
    dy[...] = rng.standard_normal(dy.shape)
    before = _snapshot(d)
    saved_before = [s.copy() if isinstance(s, np.ndarray) else s for s in saved]
    case = f"{op.name} bwd {np.dtype(dtype).name} {spec} {variant} offset={offset}"
    ref = op.backward(d, saved, dy, "reference")
    out = tuple(None if r is None else _poison(r) for r in ref)
    got = op.backward(d, saved, dy, "cpu", out if len(out) > 1 else out[0])
    fresh = op.backward(d, saved, dy, "cpu")
    for g, o in zip(got, out):
        assert g is o, f"{case}: out= arrays not returned"
    _compare(got, ref, op.grad_bitwise, "grad", dtype, f"{case} (out=)")
    _compare(fresh, ref, op.grad_bitwise, "grad", dtype, f"{case} (fresh)")
    _assert_unchanged(before, d, case)
    for s0, s1 in zip(saved_before, saved):
        if isinstance(s0, np.ndarray):
            assert np.array_equal(s0, s1, equal_nan=True), f"{case}: saved output modified"


# =========================================================================== dropout properties

def _stream_keep(seed, offset, shape, p):
    """The contract written out: element i keeps iff word i % 4 of the block at counter
    offset + i // 4 (words (n & 0xFFFFFFFF, n >> 32, 0, 0)) is >= floor(p * 2**32)."""
    size = math.prod(shape)
    n = [(offset + i // 4) % 2**64 for i in range((size + 3) // 4 * 4)][::4]
    counter = np.array([[c & 0xFFFFFFFF, c >> 32, 0, 0] for c in n], np.uint32).reshape(-1, 4)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    words = np.empty_like(counter)
    ref_random.philox4x32(counter, key, words)
    w = words.reshape(-1)[:size].astype(np.int64)
    return (w >= math.floor(p * 2**32)).reshape(shape)


@pytest.mark.parametrize("offset", [0, 7, 2**32 - 1, 2**64 - 2])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_mask_is_the_stream_definition(backend, offset, rng):
    x = rng.standard_normal((3, 11)).astype(np.float32)
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    y, mask = fastreg.dropout(x, 0.4, rng=Generator(seed, offset), backend=backend)
    keep = _stream_keep(seed, offset, x.shape, 0.4)
    assert np.array_equal(mask.to_bool(), keep)
    assert_bitwise(y, x * np.where(keep, np.float32(1 / 0.6), np.float32(0)), case="y")
    assert (mask.seed, mask.offset) == (seed, offset)


@pytest.mark.parametrize("layout", ["strided", "channels_last", "transposed"])
def test_dropout_mask_index_is_c_order_of_the_logical_tensor(layout, rng):
    base = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
    if layout == "strided":
        x = base[:, ::2]
    elif layout == "channels_last":
        x = np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:
        x = base.T
    assert not x.flags.c_contiguous
    for backend in ("cpu", "reference"):
        y, m = fastreg.dropout(x, 0.5, rng=99, backend=backend)
        yc, mc = fastreg.dropout(np.ascontiguousarray(x), 0.5, rng=99, backend=backend)
        assert_bitwise(y, yc, case=f"{layout} {backend}")
        assert np.array_equal(m.to_bool(), mc.to_bool())
        assert_bitwise(m.bits, mc.bits, case=f"{layout} {backend} bits")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", [(1,), (33,), (2049,), (7, 301)])
def test_dropout_bits_and_seed_masks_give_the_same_dx(shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for backend in ("cpu", "reference"):
        yb, mb = fastreg.dropout(x, 0.25, rng=Generator(3, 5), mask="bits", backend=backend)
        ys, ms = fastreg.dropout(x, 0.25, rng=Generator(3, 5), mask="seed", backend=backend)
        assert_bitwise(yb, ys, case="y")
        assert mb.nbytes == 4 * ((x.size + 31) // 32) and ms.nbytes == 0 and ms.bits is None
        assert np.array_equal(mb.to_bool(), ms.to_bool())
        assert_bitwise(fastreg.dropout_backward(dy, mb, backend=backend),
                       fastreg.dropout_backward(dy, ms, backend=backend), case=f"dx {backend}")
        # dx is dy through the same mask and scale as the forward
        assert_bitwise(fastreg.dropout_backward(x, ms, backend=backend), yb, case="dx = mask(x)")


def test_dropout_bit_layout_is_lsb_first_little_endian_words(rng):
    x = rng.standard_normal(77).astype(np.float32)
    _, m = fastreg.dropout(x, 0.5, rng=4)
    keep = m.to_bool()
    packed = np.packbits(keep, bitorder="little")
    raw = m.bits.astype("<u4").view(np.uint8)
    assert m.bits.dtype == np.uint32 and m.bits.shape == (3,)
    assert np.array_equal(raw[:packed.size], packed)
    assert not raw[packed.size:].any(), "bits past the end must be 0"
    for i in (0, 1, 31, 32, 76):
        assert bool((m.bits[i // 32] >> (i % 32)) & 1) == keep[i]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_within_binomial_bounds(p, rng):
    n = 1_000_003
    x = np.ones(n, np.float32)
    seed = int(rng.integers(0, 2**63))
    y, m = fastreg.dropout(x, p, rng=seed)
    kept = int(np.count_nonzero(y))
    q = 1 - math.floor(p * 2**32) / 2**32          # the exact keep probability
    assert abs(kept - n * q) < 6 * math.sqrt(n * q * (1 - q)), (kept, n * q)
    assert kept == int(m.to_bool().sum())
    # kept values are exactly x * float32(1 / (1 - p))
    assert np.all(y[y != 0] == np.float32(1 / (1 - p)))
    # no structure by position in the block: each word index keeps at the same rate
    keep = m.to_bool()[: n - n % 4].reshape(-1, 4).mean(axis=0)
    sd = math.sqrt(q * (1 - q) / (n // 4))
    assert np.all(np.abs(keep - q) < 6 * sd), keep


def test_dropout_p_zero_keeps_everything_and_p_one_drops_everything(rng):
    x = rng.standard_normal((5, 67)).astype(np.float32)
    for backend in ("cpu", "reference"):
        y, m = fastreg.dropout(x, 0.0, rng=1, backend=backend)
        assert_bitwise(y, x, case="p=0")
        assert m.to_bool().all() and m.bits.tolist() == [0xFFFFFFFF] * 10 + [0x7FFF]  # 335 bits
        y, m = fastreg.dropout(x, 1.0, rng=1, backend=backend)
        assert not y.any() and not m.to_bool().any() and not m.bits.any()
        assert not fastreg.dropout_backward(x, m, backend=backend).any()


def test_dropout_dropped_nan_stays_nan_as_pytorch(rng):
    """A dropped element is x * 0: NaN and Inf inputs give NaN (PyTorch multiplies too)."""
    x = np.array([np.nan, np.inf, -np.inf, 1.0] * 8, np.float32)
    y, m = fastreg.dropout(x, 0.5, rng=12)
    keep = m.to_bool()
    assert np.isnan(y[~keep & ~np.isfinite(x)]).all()
    assert (y[~keep & np.isfinite(x)] == 0).all()
    assert_bitwise(y, fastreg.dropout(x, 0.5, rng=12, backend="reference")[0], case="nan")


@pytest.mark.parametrize("mode,factor", [("inverted", 1.0), ("weight_scaling", 0.75)])
def test_dropout_inference_draws_nothing_and_scales(mode, factor, rng):
    x = rng.standard_normal((4, 9)).astype(np.float64)
    g = Generator(8, 100)
    y, m = fastreg.dropout(x, 0.25, rng=g, training=False, mode=mode)
    assert g.offset == 100
    assert np.array_equal(y, x * factor) and m.kind == "none" and m.nbytes == 0
    assert m.to_bool().all()
    dy = rng.standard_normal(x.shape)
    assert np.array_equal(fastreg.dropout_backward(dy, m), dy * factor)
    # no rng needed at inference
    assert np.array_equal(fastreg.dropout(x, 0.25, training=False, mode=mode)[0], y)


def test_dropout_weight_scaling_training_is_unscaled(rng):
    x = rng.standard_normal(1000)
    y, m = fastreg.dropout(x, 0.3, rng=2, mode="weight_scaling")
    assert np.array_equal(y, x * m.to_bool()) and m.scale == 1.0


def test_generator_hands_out_consecutive_stream_positions(rng):
    x = rng.standard_normal(10).astype(np.float32)          # 3 blocks per call
    g = Generator(77)
    y1, m1 = fastreg.dropout(x, 0.5, rng=g)
    y2, m2 = fastreg.dropout(x, 0.5, rng=g)
    assert (m1.offset, m2.offset, g.offset) == (0, 3, 6)
    assert_bitwise(y2, fastreg.dropout(x, 0.5, rng=Generator(77, 3))[0], case="second call")
    # the second call continues the stream of one call over both
    both = fastreg.random.random_bits(24, rng=Generator(77))
    assert np.array_equal(m2.to_bool().ravel(), both[12:22] >= math.floor(0.5 * 2**32))
    # an int seed is Generator(seed, 0) afresh: the same mask every call
    a, ma = fastreg.dropout(x, 0.5, rng=77)
    b, mb = fastreg.dropout(x, 0.5, rng=77)
    assert ma.offset == mb.offset == 0
    assert_bitwise(a, y1, case="int seed")
    assert_bitwise(b, y1, case="int seed again")
    # an empty call draws nothing
    fastreg.dropout(np.empty(0, np.float32), 0.5, rng=g)
    assert g.offset == 6


def test_dropout_reuses_the_mask_buffer(rng):
    x = rng.standard_normal(100).astype(np.float32)
    y, bits = np.empty_like(x), np.empty(4, np.uint32)
    y2, m = fastreg.dropout(x, 0.5, rng=3, out=(y, bits))
    assert y2 is y and m.bits is bits
    assert_bitwise(bits, fastreg.dropout(x, 0.5, rng=3)[1].bits, case="bits")


# =========================================================================== Gaussian

def test_gaussian_noise_adds_std_times_the_stream_normals(rng):
    x = rng.standard_normal((300, 101))
    g = Generator(5, 9)
    y = fastreg.gaussian_noise(x, 0.7, rng=g)
    z = fastreg.random.normal(x.shape, rng=Generator(5, 9), dtype=np.float64)
    assert_close(y, x + 0.7 * z, rtol=1e-14, atol=1e-14, case="noise")
    n = (y - x) / 0.7
    assert abs(n.mean()) < 6 / math.sqrt(n.size) and abs(n.var() - 1) < 6 * math.sqrt(2 / n.size)
    assert g.offset == 9 + (x.size + 3) // 4
    y0 = fastreg.gaussian_noise(x, 0.7, rng=g, training=False)
    assert np.array_equal(y0, x) and y0 is not x


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gaussian_dropout_has_mean_one_variance_p_over_1_minus_p(p, rng):
    x = np.ones(400_000)
    y, m = fastreg.gaussian_dropout(x, p, rng=int(rng.integers(2**63)))
    var = p / (1 - p)
    assert m.std == pytest.approx(math.sqrt(var)) and m.nbytes == 0
    assert abs(y.mean() - 1) < 6 * math.sqrt(var / y.size)
    assert abs(y.var() - var) < 6 * var * math.sqrt(2 / y.size)
    dy = rng.standard_normal(x.shape)
    assert_close(fastreg.gaussian_dropout_backward(dy, m), dy * m.to_factor(), rtol=1e-14,
                 atol=1e-14, case="dx = dy * factor")
    assert_bitwise(fastreg.gaussian_dropout_backward(x, m), y, case="dx regenerates y's factor")


# =========================================================================== DropConnect

def _masked_weights_by_hand(weight, mask):
    """N (or 1) explicitly materialized masked weight matrices, from the stream contract."""
    keep = _stream_keep(mask.seed, mask.offset, mask.shape, mask.p)
    return np.where(keep, mask.scale, 0.0) * weight.astype(np.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [(5,), (2, 3), (1,)])
def test_drop_connect_per_example_equals_n_masked_matrices(batch, backend, rng):
    K, O = 13, 6
    x = rng.standard_normal((*batch, K))
    w, b = rng.standard_normal((O, K)), rng.standard_normal(O)
    y, m = fastreg.drop_connect(x, w, b, 0.4, rng=Generator(21, 2**32 - 7), per_example=True,
                                backend=backend)
    assert m.shape == (*batch, O, K) and m.per_example and m.nbytes == 0
    wm = _masked_weights_by_hand(w, m).reshape(-1, O, K)
    x2 = x.reshape(-1, K)
    expected = np.stack([wm[s] @ x2[s] + b for s in range(x2.shape[0])]).reshape(*batch, O)
    assert_close(y, expected, rtol=1e-12, atol=1e-12, case=f"per example {batch}")
    # samples really get different masks
    if wm.shape[0] > 1:
        assert not np.array_equal(wm[0], wm[1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_drop_connect_per_batch_is_one_masked_weight(backend, rng):
    x = rng.standard_normal((7, 10))
    w, b = rng.standard_normal((4, 10)), rng.standard_normal(4)
    g = Generator(3)
    y, m = fastreg.drop_connect(x, w, b, 0.5, rng=g, backend=backend)
    assert m.shape == (4, 10) and not m.per_example and g.offset == 10
    assert_close(y, x @ _masked_weights_by_hand(w, m).T + b, rtol=1e-12, atol=1e-12, case="y")
    # the per-batch mask is the dropout mask of the weight at the same stream position
    _, dm = fastreg.dropout(w, 0.5, rng=Generator(3), backend=backend)
    assert np.array_equal(m.to_bool(), dm.to_bool())
    # p = 1 leaves the bias; p = 0 is the plain linear layer
    y1, _ = fastreg.drop_connect(x, w, b, 1.0, rng=g, backend=backend)
    assert np.array_equal(y1, np.broadcast_to(b, y1.shape))
    y0, _ = fastreg.drop_connect(x, w, b, 0.0, rng=g, backend=backend)
    assert_close(y0, x @ w.T + b, rtol=1e-12, atol=1e-12, case="p=0")


def _fd_check(f, arrays, grads, rtol, atol, case, h=1e-6):
    """Central differences of the scalar f(**arrays) against grads, element by element."""
    for name, grad in grads.items():
        base = arrays[name]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = dict(arrays), dict(arrays)
            plus[name], minus[name] = base.copy(), base.copy()
            plus[name][idx] += h
            minus[name][idx] -= h
            fd[idx] = (f(**plus) - f(**minus)) / (2 * h)
        assert_close(grad, fd, rtol=rtol, atol=atol, case=f"{case} d{name} vs finite differences")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("per_example", [False, True])
def test_drop_connect_gradients_match_finite_differences(per_example, backend, rng):
    x = rng.standard_normal((3, 2, 5))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    cot = rng.standard_normal((3, 2, 4))

    def loss(x, weight, bias):        # an int rng: the same mask every call
        y, _ = fastreg.drop_connect(x, weight, bias, 0.5, rng=31, per_example=per_example,
                                    backend=backend)
        return float(np.sum(y * cot))

    _, m = fastreg.drop_connect(x, w, b, 0.5, rng=31, per_example=per_example, backend=backend)
    dx, dw, db = fastreg.drop_connect_backward(cot, x, w, m, backend=backend)
    _fd_check(loss, dict(x=x, weight=w, bias=b), dict(x=dx, weight=dw, bias=db), 1e-6, 1e-8,
              f"drop_connect per_example={per_example} {backend}")


def test_drop_connect_inference_mode_uses_the_mean_weight(rng):
    x, w, b = rng.standard_normal((3, 8)), rng.standard_normal((2, 8)), rng.standard_normal(2)
    g = Generator(1)
    y, m = fastreg.drop_connect(x, w, b, 0.3, training=False, mode="weight_scaling", rng=g)
    assert_close(y, x @ (0.7 * w).T + b, rtol=1e-12, atol=1e-12, case="weight scaling")
    y, m = fastreg.drop_connect(x, w, b, 0.3, training=False)
    assert_close(y, x @ w.T + b, rtol=1e-12, atol=1e-12, case="inverted")
    assert g.offset == 0 and m.kind == "none"


# =========================================================================== moment matching

def _norm_cdf(t):
    return 0.5 * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0)))


def _relu_gaussian_mean(mu, var):
    """E[max(u, 0)] for u ~ N(mu, var): mu * Phi(mu / sd) + sd * phi(mu / sd)."""
    sd = np.sqrt(var)
    t = mu / sd
    return mu * _norm_cdf(t) + sd * np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("mode", ["inverted", "weight_scaling"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_drop_connect_inference_matches_the_gaussian_closed_form(backend, mode, rng):
    """With ReLU the moment-matched expectation has a closed form; the sampler converges
    to it (the paper's p is our 1 - p)."""
    p, S = 0.4, 20000
    x = rng.standard_normal((3, 50))
    w, b = rng.standard_normal((5, 50)) / 7, rng.standard_normal(5)
    q = 1 - p
    ms, vs = (1.0, p / q) if mode == "inverted" else (q, p * q)
    mu = ms * x @ w.T + b
    var = vs * (x * x) @ (w * w).T
    y = fastreg.drop_connect_inference(x, w, b, p, activation="relu", n_samples=S,
                                       rng=int(rng.integers(2**63)), mode=mode, backend=backend)
    expected = _relu_gaussian_mean(mu, var)
    assert np.all(np.abs(y - expected) < 6 * np.sqrt(var / S)), (y, expected)
    yid = fastreg.drop_connect_inference(x, w, b, p, activation=None, n_samples=S, rng=5,
                                         mode=mode, backend=backend)
    assert np.all(np.abs(yid - mu) < 6 * np.sqrt(var / S))


def test_drop_connect_inference_approximates_monte_carlo_of_real_drop_connect(rng):
    """The paper's claim, checked: averaging relu over many real DropConnect masks is close
    to the moment-matched Gaussian (fan-in 400, so the CLT holds well)."""
    p, K, T = 0.5, 400, 3000
    x = np.abs(rng.standard_normal((2, K)))
    w, b = rng.standard_normal((3, K)) / math.sqrt(K), 0.1 * rng.standard_normal(3)
    g = Generator(int(rng.integers(2**63)))
    acts = np.stack([np.maximum(fastreg.drop_connect(x, w, b, p, rng=g)[0], 0.0)
                     for _ in range(T)])
    mc, mc_se = acts.mean(axis=0), acts.std(axis=0) / math.sqrt(T)
    y = fastreg.drop_connect_inference(x, w, b, p, activation="relu", n_samples=50000,
                                       rng=g)
    sd = np.sqrt(p / (1 - p) * (x * x) @ (w * w).T)
    # Monte Carlo error plus the Gaussian approximation's own (a few % of the spread)
    assert np.all(np.abs(y - mc) < 5 * mc_se + 0.03 * sd), (y, mc, mc_se)


# ====================================================================== fused dropout + add + LN

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_add_layer_norm_equals_dropout_then_add_then_layer_norm(backend, dtype, rng):
    x = rng.standard_normal((6, 3, 40)).astype(dtype)
    r, dy, dr = (rng.standard_normal(x.shape).astype(dtype) for _ in range(3))
    w, b = rng.standard_normal(40).astype(dtype), rng.standard_normal(40).astype(dtype)
    g = Generator(11, 2**32 - 9)
    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(x, r, w, b, 0.3, rng=g,
                                                            backend=backend)
    assert mask.kind == "seed" and mask.nbytes == 0 and g.offset == 2**32 - 9 + x.size // 4
    # the separate ops, each on the reference
    y1, m1 = fastreg.dropout(x, 0.3, rng=Generator(11, 2**32 - 9), backend="reference")
    s1 = y1 + r
    y2, mean2, rstd2 = fastreg.layer_norm(s1, w, b, 1e-5, backend="reference")
    assert np.array_equal(mask.to_bool(), m1.to_bool())
    assert_bitwise(s, s1, case="residual_sum")
    rt, at = tol(dtype)
    for got, exp, name in ((y, y2, "y"), (mean, mean2, "mean"), (rstd, rstd2, "rstd")):
        assert_close(got, exp, rtol=rt, atol=at, case=name)
    dx, dres, dw, db = fastreg.dropout_add_layer_norm_backward(
        dy, s, mean, rstd, w, b, mask, dresidual_sum=dr, backend=backend)
    ds, dw2, db2 = fastreg.layer_norm_backward(dy, s1, mean2, rstd2, w, b, backend="reference")
    ds = ds + dr
    rt, at = tol(dtype, "grad")
    assert_close(dres, ds, rtol=rt, atol=at, case="dresidual")
    assert_close(dx, fastreg.dropout_backward(ds, m1, backend="reference"), rtol=rt, atol=at,
                 case="dx")
    assert_close(dw, dw2, rtol=rt, atol=at * 10, case="dweight")
    assert_close(db, db2, rtol=rt, atol=at * 10, case="dbias")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_add_layer_norm_gradients_match_finite_differences(backend, rng):
    x, r = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    cot_y, cot_s = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))

    def loss(x, residual, weight, bias):
        y, s, *_ = fastreg.dropout_add_layer_norm(x, residual, weight, bias, 0.4, rng=8,
                                                  backend=backend)
        return float(np.sum(y * cot_y) + np.sum(s * cot_s))

    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(x, r, w, b, 0.4, rng=8,
                                                            backend=backend)
    assert 0 < mask.to_bool().sum() < x.size
    dx, dres, dw, db = fastreg.dropout_add_layer_norm_backward(
        cot_y, s, mean, rstd, w, b, mask, dresidual_sum=cot_s, backend=backend)
    _fd_check(loss, dict(x=x, residual=r, weight=w, bias=b),
              dict(x=dx, residual=dres, weight=dw, bias=db), 1e-5, 1e-7,
              f"dropout_add_layer_norm {backend}")


@pytest.mark.parametrize("shape", [(300, 37), (5, 64), (17, 1)])
def test_dropout_add_layer_norm_bits_mask_gives_the_seed_mask_and_the_same_gradients(shape, rng):
    x, r, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    fs = fastreg.dropout_add_layer_norm(x, r, w, None, 0.3, rng=Generator(4, 2**32 - 2))
    fb = fastreg.dropout_add_layer_norm(x, r, w, None, 0.3, rng=Generator(4, 2**32 - 2),
                                        mask="bits")
    for a, b in zip(fs[:4], fb[:4]):
        assert_bitwise(a, b, case="forward")
    seed_mask, bits_mask = fs[4], fb[4]
    assert bits_mask.kind == "bits" and bits_mask.nbytes == 4 * ((x.size + 31) // 32)
    assert np.array_equal(bits_mask.to_bool(), seed_mask.to_bool())
    # the same bits as dropout's at that stream position
    _, dm = fastreg.dropout(x, 0.3, rng=Generator(4, 2**32 - 2))
    assert_bitwise(bits_mask.bits, dm.bits, case="bits")
    gs = fastreg.dropout_add_layer_norm_backward(dy, *fs[1:4], w, None, seed_mask)
    gb = fastreg.dropout_add_layer_norm_backward(dy, *fb[1:4], w, None, bits_mask)
    for a, b in zip(gs, gb):
        if a is not None:
            assert_bitwise(a, b, case="backward: bits vs regenerated")


def test_dropout_add_layer_norm_backward_accepts_a_stored_bits_mask(rng):
    """The backward regenerates from (seed, offset): a dropout mask of the same
    stream position works too."""
    x, r, dy = (rng.standard_normal((4, 9)) for _ in range(3))
    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(x, r, None, None, 0.5, rng=3)
    _, bits_mask = fastreg.dropout(x, 0.5, rng=3)
    a = fastreg.dropout_add_layer_norm_backward(dy, s, mean, rstd, None, None, mask)
    b = fastreg.dropout_add_layer_norm_backward(dy, s, mean, rstd, None, None, bits_mask)
    for u, v in zip(a[:2], b[:2]):
        assert_bitwise(u, v, case="seed vs bits mask")
    assert a[2] is None and a[3] is None


# =========================================================================== determinism

def test_results_identical_at_1_and_2_threads_and_run_to_run():
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run_dropout_ops.run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _run_dropout_ops.run()
        again = _run_dropout_ops.run()
    finally:
        numba.set_num_threads(threads)
    for k in one:
        assert_bitwise(two[k], one[k], case=f"{k}: 2 threads vs 1")
        assert_bitwise(again[k], two[k], case=f"{k}: run to run")


def _subprocess(tmp_path, name, threads, cache_dir):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), NUMBA_CACHE_DIR=str(cache_dir),
               FASTREG_NUMBA_CACHE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(HERE / "_run_dropout_ops.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    print(f"{name} (NUMBA_NUM_THREADS={threads}): {proc.stdout.strip()}")
    return dict(np.load(out))


@pytest.mark.slow
def test_cached_kernels_load_in_a_fresh_process_at_another_thread_count(tmp_path):
    """The parallel kernels are cached: a second process must compile nothing and give
    the same bits at 1 thread as the first, compiling, at 2."""
    cache = tmp_path / "numba-cache"
    cold = _subprocess(tmp_path, "cold-2-threads", 2, cache)
    files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert any(str(f).endswith(".nbi") and "_philox" in str(f) for f in files), files
    warm = _subprocess(tmp_path, "cached-1-thread", 1, cache)
    assert sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file()) == files, \
        "the second process compiled kernels again"
    assert cold.keys() == warm.keys()
    for k in cold:
        assert_bitwise(warm[k], cold[k], case=f"{k}: 1 thread from cache vs 2 threads cold")


# =========================================================================== validation

def _x():
    return np.ones((3, 4), np.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastreg.dropout(_x(), 1.5, rng=1), ValueError, r"dropout: 'p' must be .*<= 1"),
    (lambda: fastreg.dropout(_x(), -0.1, rng=1), ValueError, r"dropout: 'p'"),
    (lambda: fastreg.dropout(_x(), float("nan"), rng=1), ValueError, r"dropout: 'p'"),
    (lambda: fastreg.dropout(_x(), "a", rng=1), TypeError, r"dropout: 'p' must be a real"),
    (lambda: fastreg.dropout(_x(), 0.5), TypeError, r"dropout: 'rng' must be a fastreg"),
    (lambda: fastreg.dropout(_x(), 0.5, rng="s"), TypeError, r"dropout: 'rng'"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=-1), ValueError, r"dropout: 'rng' must be an "
                                                             r"integer in \[0, 2\*\*64\)"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=2**64), ValueError, r"dropout: 'rng'"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=True), TypeError, r"dropout: 'rng'"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, mode="x"), ValueError, r"dropout: 'mode' must"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, mask="byte"), ValueError, r"dropout: 'mask'"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, training=1), TypeError, r"dropout: 'training'"),
    (lambda: fastreg.dropout(_x().astype(int), 0.5, rng=1), TypeError, r"dropout: 'x' must be "
                                                                        r"a floating"),
    (lambda: fastreg.dropout([1.0], 0.5, rng=1), TypeError, r"dropout: 'x' must be a NumPy"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, out=(np.empty((3, 4), np.float32),
                                                      np.empty(2, np.uint32))),
     ValueError, r"dropout: 'out\[1\] \(mask\)' must be an array of shape \(1,\)"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, mask="seed",
                             out=(np.empty((3, 4), np.float32), np.empty(1, np.uint32))),
     ValueError, r"dropout: 'out\[1\] \(mask\)' must be None"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, out=(np.empty((3, 4)), None)),
     TypeError, r"dropout: 'out\[0\] \(y\)' must be of dtype float32"),
    (lambda: fastreg.dropout_backward(_x(), "m"), TypeError,
     r"dropout_backward: 'mask' must be a fastreg.dropout.DropoutMask"),
    (lambda: fastreg.dropout_backward(np.ones((4, 3), np.float32),
                                      fastreg.dropout(_x(), 0.5, rng=1)[1]),
     ValueError, r"dropout_backward: 'mask' covers shape \(3, 4\), but dy has shape \(4, 3\)"),
    (lambda: fastreg.gaussian_noise(_x(), -1.0, rng=1), ValueError,
     r"gaussian_noise: 'std' must be a finite number >= 0"),
    (lambda: fastreg.gaussian_dropout(_x(), 1.0, rng=1), ValueError,
     r"gaussian_dropout: 'p' must be a finite number >= 0 and < 1"),
    (lambda: fastreg.gaussian_dropout_backward(_x(), fastreg.dropout(_x(), 0.5, rng=1)[1]),
     TypeError, r"gaussian_dropout_backward: 'mask' must be a fastreg.dropout.GaussianMask"),
    (lambda: fastreg.drop_connect(_x(), np.ones((2, 5), np.float32), None, 0.5, rng=1),
     ValueError, r"drop_connect: 'x' must have shape \(\.\.\., 5\)"),
    (lambda: fastreg.drop_connect(_x(), np.ones(4, np.float32), None, 0.5, rng=1),
     ValueError, r"drop_connect: 'weight' must be a 2-D array"),
    (lambda: fastreg.drop_connect(_x(), None, None, 0.5, rng=1),
     TypeError, r"drop_connect: 'weight' must be a NumPy or CuPy array"),
    (lambda: fastreg.drop_connect(_x(), np.ones((2, 4)), None, 0.5, rng=1),
     TypeError, r"drop_connect: 'weight' must be of dtype float32"),
    (lambda: fastreg.drop_connect(_x(), np.ones((2, 4), np.float32), np.ones(3, np.float32),
                                  0.5, rng=1),
     ValueError, r"drop_connect: 'bias' must be an array of shape \(2,\)"),
    (lambda: fastreg.drop_connect(_x(), np.ones((2, 4), np.float32), None, 0.5, rng=1,
                                  per_example=0), TypeError, r"drop_connect: 'per_example'"),
    (lambda: fastreg.drop_connect_backward(
        np.ones((3, 2), np.float32), _x(), np.ones((2, 4), np.float32),
        fastreg.dropout(_x(), 0.5, rng=1)[1]),
     TypeError, r"drop_connect_backward: 'mask' must be a fastreg.dropout.DropConnectMask"),
    (lambda: fastreg.drop_connect_backward(
        np.ones((3, 3), np.float32), _x(), np.ones((2, 4), np.float32),
        fastreg.drop_connect(_x(), np.ones((2, 4), np.float32), None, 0.5, rng=1)[1]),
     ValueError, r"drop_connect_backward: 'dy' must be an array of shape \(3, 2\)"),
    (lambda: fastreg.drop_connect_backward(
        np.ones((2, 2), np.float32), _x()[:2], np.ones((2, 4), np.float32),
        fastreg.drop_connect(_x(), np.ones((2, 4), np.float32), None, 0.5, rng=1,
                             per_example=True)[1]),
     ValueError, r"drop_connect_backward: 'mask' covers shape \(3, 2, 4\), but the layer"),
    (lambda: fastreg.drop_connect_inference(_x(), np.ones((2, 4), np.float32), None, 1.0,
                                            activation="relu", n_samples=3, rng=1),
     ValueError, r"drop_connect_inference: 'p' must be a finite number >= 0 and < 1"),
    (lambda: fastreg.drop_connect_inference(_x(), np.ones((2, 4), np.float32), None, 0.5,
                                            activation="gelu", n_samples=3, rng=1),
     ValueError, r"drop_connect_inference: 'activation' must be one of None, 'relu'"),
    (lambda: fastreg.drop_connect_inference(_x(), np.ones((2, 4), np.float32), None, 0.5,
                                            activation="relu", n_samples=0, rng=1),
     ValueError, r"drop_connect_inference: 'n_samples' must be an integer >= 1"),
    (lambda: fastreg.drop_connect_inference(_x(), np.ones((2, 4), np.float32), None, 0.5,
                                            activation="relu", n_samples=3, rng=None),
     TypeError, r"drop_connect_inference: 'rng'"),
    (lambda: fastreg.dropout_add_layer_norm(_x(), np.ones((3, 5), np.float32), None, None, 0.5,
                                            rng=1),
     ValueError, r"dropout_add_layer_norm: 'residual' must be an array of shape \(3, 4\)"),
    (lambda: fastreg.dropout_add_layer_norm(_x(), _x(), None, None, 0.5, rng=1, eps=0),
     ValueError, r"dropout_add_layer_norm: 'eps' must be a finite number > 0"),
    (lambda: fastreg.dropout_add_layer_norm(_x(), _x(), np.ones(3, np.float32), None, 0.5,
                                            rng=1),
     ValueError, r"dropout_add_layer_norm: 'weight' must be an array of shape \(4,\)"),
    (lambda: fastreg.dropout_add_layer_norm(_x(), _x(), None, None, 0.5, rng=1,
                                            normalized_ndim=3),
     ValueError, r"dropout_add_layer_norm: 'normalized_ndim' must be <= x.ndim = 2"),
    (lambda: fastreg.dropout_add_layer_norm_backward(
        _x(), _x(), np.ones(3, np.float32), np.ones(3, np.float32), None, None, "m"),
     TypeError, r"dropout_add_layer_norm_backward: 'mask' must be a fastreg.dropout"),
    (lambda: fastreg.dropout_add_layer_norm_backward(
        _x(), _x(), np.ones(3, np.float32), np.ones(4, np.float32), None, None,
        fastreg.dropout(_x(), 0.5, rng=1)[1]),
     ValueError, r"dropout_add_layer_norm_backward: 'rstd' must be an array of shape \(3,\)"),
    (lambda: fastreg.dropout_add_layer_norm_backward(
        _x(), _x(), np.ones(3, np.float32), np.ones(3, np.float32), None, None,
        fastreg.dropout(_x(), 0.5, rng=1)[1], dresidual_sum=np.ones((3, 4))),
     TypeError, r"dropout_add_layer_norm_backward: 'dresidual_sum' must be of dtype float32"),
    (lambda: fastreg.dropout(_x(), 0.5, rng=1, backend="gpu"), ValueError,
     r"dropout: 'backend' must be one of"),
])
def test_bad_arguments_raise_naming_the_function_and_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_failed_call_does_not_advance_the_generator():
    g = Generator(1, 5)
    with pytest.raises(ValueError):
        fastreg.dropout(_x(), 0.5, rng=g, out=(np.empty((2, 2), np.float32), None))
    with pytest.raises(TypeError):
        fastreg.dropout_add_layer_norm(_x(), _x(), None, None, 0.5, rng=g, eps="a")
    assert g.offset == 5


def test_output_overlapping_the_input_is_rejected():
    x = _x()
    with pytest.raises(ValueError, match=r"dropout: 'out\[0\] \(y\)' must be memory separate"):
        fastreg.dropout(x, 0.5, rng=1, out=(x, None))
