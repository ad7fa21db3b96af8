"""The random and dropout families on the CUDA kernels, against the reference and the CPU.

The kernels run on a GPU (backend "cuda", CuPy arrays) when CuPy and a
device are present, and always under the host emulation (backend
"cuda_emulator", NumPy arrays), so CI runs every path.

What must hold bit for bit: the stream (words, uniforms), every dropout
mask (reference = CPU = CUDA, for odd sizes, size 1, empty and
non-contiguous tensors, offsets whose counter carries past 2**32 and wraps
past 2**64, at several launch geometries), dropout's y and the fused op's
residual sum in every dtype (they round as the reference does, in the
dtype), "bits" and "seed" backwards. Everything else is compared with the
reference within per-dtype tolerances: float32/float64 as the CPU tests,
float16/bfloat16 by flash-attention's rule (tests/_cuda_targets.py) with
the reference run on the 16-bit inputs as the low-precision peer (it forms
the exact result and rounds it once to the dtype; for dropout and the
residual sum it is the contract itself).

The table-driven tests run a slice of tests/dropout_cases.py (every op and
variant; shapes and stream offsets spread over the dtypes) to keep the
emulated run short; the mask tests run every shape in every dtype.
"""

import math

import numpy as np
import pytest

import fastreg
from _assert import assert_bitwise, assert_close
from _cuda_targets import BF16, DTYPES, GPU, LOW, TARGETS, _check, _host, _xp, needs_emulator
from dropout_cases import OPS, gen
from fastreg import reference
from fastreg._backend import array_kind
from fastreg.cuda import _emulator
from fastreg.cuda import dropout as cuda_dropout
from fastreg.cuda import random as cuda_random
from fastreg.random import Generator
from test_random import KAT10

pytestmark = pytest.mark.gpu

dtype_ids = lambda t: np.dtype(t).name  # noqa: E731
OFFSETS = [0, 2**32 - 3, 2**64 - 5]      # the start; the low word carries; the counter wraps
SEED = 0x9E3779B97F4A7C15


@pytest.fixture
def ref16(monkeypatch):
    """The reference accepts float16/bfloat16 inputs (its formulas are dtype-generic)."""
    monkeypatch.setattr(reference, "DTYPES", fastreg.cuda.DTYPES)


def _to(target, a):
    """A host array on the target; CuPy gets a device buffer with the same strides."""
    if target != "cuda" or not isinstance(a, np.ndarray):
        return a
    import cupy
    if a.flags.c_contiguous or a.size == 0:
        return cupy.asarray(a)
    base = a.base if a.base is not None else a
    while base.base is not None:
        base = base.base
    dev = cupy.asarray(np.ascontiguousarray(base))
    offset = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    view = cupy.ndarray(a.shape, a.dtype, dev.data + offset, a.strides)
    assert np.array_equal(view.get(), a, equal_nan=True)
    return view


def _poison(target, like):
    out = _xp(target).empty(like.shape, dtype=like.dtype)
    if np.issubdtype(like.dtype, np.integer):
        out[...] = np.iinfo(like.dtype).max
    elif like.dtype == np.bool_:
        out[...] = True
    else:
        out[...] = np.nan
    return out


def _array(rng, shape, dtype, layout="contig"):
    """Random data in ``dtype`` viewed with ``layout``: contig, strided, channels_last, transposed."""
    if layout == "strided":
        a = rng.standard_normal((*shape[:-1], 2 * shape[-1]))[..., ::2]
    elif layout == "channels_last":
        a = rng.standard_normal((shape[0], *shape[2:], shape[1])).transpose(0, 3, 1, 2)
    elif layout == "transposed":
        a = rng.standard_normal(shape[::-1]).T
    else:
        a = rng.standard_normal(shape)
    out = np.empty_like(a, dtype=dtype, order="K")
    out[...] = a
    assert out.shape == tuple(shape)
    return out


# =========================================================================== the stream

@pytest.mark.parametrize("target", TARGETS)
def test_philox4x32_10_matches_random123_known_answers(target):
    counter = np.array([k[1] for k in KAT10], np.uint32)
    key = np.array([k[2] for k in KAT10], np.uint32)
    out = _poison(target, counter)
    got = fastreg.random.philox4x32(_to(target, counter), _to(target, key), out=out,
                                    backend=target)
    assert got is out
    for row, (_, c, k, want) in zip(_host(got), KAT10):
        assert row.tolist() == want, f"counter {c} key {k}: got {[hex(v) for v in row]}"
    # one key for many counters, counters in any layout
    many = np.random.default_rng(1).integers(0, 2**32, (3, 5, 4), dtype=np.uint32)
    got = fastreg.random.philox4x32(_to(target, many[:, ::2]), _to(target, key[0]),
                                    backend=target)
    assert_bitwise(_host(got), fastreg.random.philox4x32(many[:, ::2], key[0],
                                                         backend="reference"), case="broadcast")


STREAM_SIZES = [0, 1, 3, 8, 31, 257, 2053, (3, 5, 7)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", STREAM_SIZES, ids=str)
def test_stream_is_bitwise_the_reference_and_the_cpu(size, offset, target, rng, ref16):
    shape = size if isinstance(size, tuple) else (size,)
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    case = f"size={size} offset={offset} on {target}"
    g = Generator(seed, offset)
    bits = _host(fastreg.random.random_bits(shape, rng=g, out=_poison(target, np.empty(
        shape, np.uint32)), backend=target))
    assert g.offset == (offset + (math.prod(shape) + 3) // 4) % 2**64
    assert_bitwise(bits, fastreg.random.random_bits(shape, rng=Generator(seed, offset),
                                                    backend="reference"), case=case)
    assert_bitwise(bits, fastreg.random.random_bits(shape, rng=Generator(seed, offset)), case=case)
    for dtype in DTYPES:
        dt = np.dtype(dtype)
        u = _host(fastreg.random.uniform(shape, rng=Generator(seed, offset), dtype=dt,
                                         out=_poison(target, np.empty(shape, dt)),
                                         backend=target))
        assert_bitwise(u, fastreg.random.uniform(shape, rng=Generator(seed, offset), dtype=dt,
                                                 backend="reference"), case=f"uniform {dt} {case}")
        z = _host(fastreg.random.normal(shape, rng=Generator(seed, offset), dtype=dt,
                                        out=_poison(target, np.empty(shape, dt)),
                                        backend=target))
        zr = fastreg.random.normal(shape, rng=Generator(seed, offset), dtype=np.float64,
                                   backend="reference")
        assert np.all(np.abs(zr) <= 5.78)
        if dt == np.float64:   # log, sqrt, sin, cos of two libraries: a few ulps apart
            assert_close(z, zr, rtol=1e-14, atol=1e-14, case=f"normal {dt} {case}")
            continue
        # one rounding of a double that is a few float64 ulps from the reference's: the
        # reference's value in the dtype, or (next to a tie) its neighbour
        near = zr.astype(dt)
        err = np.abs(z.astype(np.float64) - near.astype(np.float64))
        mantissa = {np.dtype(np.float32): 24, np.dtype(np.float16): 11, BF16: 8}[dt]
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(zr), 2.0**-14))) - (mantissa - 1))
        assert np.all(err <= ulp), f"normal {dt} {case}: more than one ulp from the reference"
        assert np.count_nonzero(err) <= max(1, z.size // 100), f"normal {dt} {case}"


@pytest.mark.parametrize("target", TARGETS)
def test_stream_index_is_the_c_order_index_of_any_output_layout(target):
    out = _xp(target).zeros((6, 10), np.uint32)
    view = out[:, ::2]
    fastreg.random.random_bits(view.shape, rng=9, out=view, backend=target)
    assert np.array_equal(_host(view), fastreg.random.random_bits((6, 5), rng=9))
    assert not _host(out)[:, 1::2].any()


# =========================================================================== dropout masks

MASK_SHAPES = [((0,), "contig"), ((1,), "contig"), ((3,), "contig"), ((31,), "contig"),
               ((32,), "contig"), ((33,), "contig"), ((255,), "contig"), ((257,), "contig"),
               ((7, 13), "contig"), ((3, 2051), "contig"), ((2, 3, 5, 7), "channels_last"),
               ((5, 37), "strided"), ((4, 0, 3), "contig"), ((11, 7), "transposed")]
MASK_CASES = [(s, lay, dt, OFFSETS[(i + j) % len(OFFSETS)])
              for i, (s, lay) in enumerate(MASK_SHAPES) for j, dt in enumerate(DTYPES)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape,layout,dtype,offset", MASK_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}-{dtype_ids(d)}-offset{o}"
                              for s, lay, d, o in MASK_CASES])
def test_dropout_mask_identical_across_backends(shape, layout, dtype, offset, target, rng,
                                                ref16):
    x = _array(rng, shape, dtype, layout)
    x0 = x.copy()
    xd = _to(target, x)
    for p in (0.3, 0.0, 1.0, 0.9):
        case = f"{shape} {layout} {np.dtype(dtype).name} p={p} offset={offset} on {target}"
        g = Generator(SEED, offset)
        nwords = (x.size + 31) // 32
        out = (_poison(target, x), _poison(target, np.empty(nwords, np.uint32)))
        y, m = fastreg.dropout(xd, p, rng=g, out=out, backend=target)
        assert y is out[0] and m.bits is out[1] and g.offset == (offset + (x.size + 3) // 4) % 2**64
        yr, mr = fastreg.dropout(x, p, rng=Generator(SEED, offset), backend="reference")
        assert_bitwise(_host(m.bits), mr.bits, case=f"{case} bits vs reference")
        assert_bitwise(_host(y), yr, case=f"{case} y vs the reference in the dtype")
    # the CPU (float32/float64 only: masks do not depend on the dtype)
    _, mc = fastreg.dropout(x.astype(np.float32), p, rng=Generator(SEED, offset), backend="cpu")
    assert_bitwise(_host(m.bits), mc.bits, case=f"{case} bits vs cpu")
    # a "seed" mask: the same y, nothing stored, the same mask expanded on the target
    ys, ms = fastreg.dropout(xd, p, rng=Generator(SEED, offset), mask="seed", backend=target)
    assert ms.bits is None and ms.nbytes == 0
    assert_bitwise(_host(ys), yr, case=f"{case} seed y")
    keep = _poison(target, np.empty(shape, bool))
    cuda_dropout.keep_mask(None, SEED, offset, ms.threshold, keep)
    assert np.array_equal(_host(keep), mr.to_bool(backend="reference")), f"{case}: expansion"
    keep = _poison(target, np.empty(shape, bool))
    cuda_dropout.keep_mask(m.bits, SEED, offset, ms.threshold, keep)
    assert np.array_equal(_host(keep), mr.to_bool(backend="reference")), f"{case}: bits expanded"
    assert np.array_equal(x, x0), "x was modified"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_dropout_backward_bits_and_seed_give_the_same_dx(dtype, target, rng, ref16):
    x, dy = _array(rng, (5, 301), dtype), _array(rng, (5, 301), dtype, "strided")
    xd, dyd = _to(target, x), _to(target, dy)
    for p, mode in ((0.25, "inverted"), (0.6, "weight_scaling"), (0.0, "inverted")):
        case = f"{np.dtype(dtype).name} p={p} {mode} on {target}"
        yb, mb = fastreg.dropout(xd, p, rng=Generator(3, 2**32 - 40), mask="bits", mode=mode,
                                 backend=target)
        _, ms = fastreg.dropout(xd, p, rng=Generator(3, 2**32 - 40), mask="seed", mode=mode,
                                backend=target)
        out = _poison(target, dy)
        dxb = fastreg.dropout_backward(dyd, mb, out=out, backend=target)
        assert dxb is out
        dxs = fastreg.dropout_backward(dyd, ms, backend=target)
        _, mr = fastreg.dropout(x, p, rng=Generator(3, 2**32 - 40), mode=mode, backend="reference")
        ref = fastreg.dropout_backward(dy, mr, backend="reference")
        assert_bitwise(_host(dxb), ref, case=f"{case} dx from bits")
        assert_bitwise(_host(dxs), ref, case=f"{case} dx from the seed")
        assert_bitwise(_host(fastreg.dropout_backward(xd, ms, backend=target)), _host(yb),
                       case=f"{case} dx = mask(x)")
    # inference: nothing drawn, y = x (inverted) or x * (1 - p)
    g = Generator(3, 7)
    for mode in ("inverted", "weight_scaling"):
        y, m = fastreg.dropout(xd, 0.25, rng=g, training=False, mode=mode, backend=target)
        yr, _ = fastreg.dropout(x, 0.25, training=False, mode=mode, backend="reference")
        assert_bitwise(_host(y), yr, case=f"inference {mode}")
        assert_bitwise(_host(fastreg.dropout_backward(dyd, m, backend=target)),
                       fastreg.dropout_backward(dy, m, backend="reference"), case="inference dx")
    assert g.offset == 7


@pytest.mark.parametrize("target", TARGETS)
def test_dropout_of_nan_and_inf_is_bitwise_the_reference(target):
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1.0, -2.5] * 11, np.float32)
    y, m = fastreg.dropout(_to(target, x), 0.5, rng=12, backend=target)
    assert_bitwise(_host(y), fastreg.dropout(x, 0.5, rng=12, backend="reference")[0], case="nan")
    keep = _host(m.to_bool())
    assert keep.any() and not keep.all() and np.isnan(_host(y)[~keep & ~np.isfinite(x)]).all()


# =========================================================================== launch geometry

GEOMETRIES = [(32, 1), (64, 3), (1024, 2), (256, 4224)]


def _elementwise_results(target, x, dy):
    g = Generator(SEED, 2**32 - 9)
    y, m = fastreg.dropout(x, 0.35, rng=g, backend=target)
    return {"y": y, "bits": m.bits, "dx": fastreg.dropout_backward(dy, m, backend=target),
            "noise": fastreg.gaussian_noise(x, 0.5, rng=g, backend=target),
            "gdrop": fastreg.gaussian_dropout(x, 0.2, rng=g, backend=target)[0],
            "words": fastreg.random.random_bits(x.shape, rng=g, out=_xp(target).empty(
                x.shape, np.uint32), backend=target),
            "normal": fastreg.random.normal(x.shape, rng=g, dtype=np.float64, out=_xp(target).empty(
                x.shape, np.float64), backend=target)}


@pytest.mark.parametrize("target", TARGETS)
def test_random_numbers_do_not_depend_on_the_launch_geometry(target, monkeypatch, rng):
    """Blocks of 32 to 1024 threads, grids of 1 block (every thread loops) to many."""
    x = _to(target, _array(rng, (5003,), np.float32))
    dy = _to(target, _array(rng, (5003,), np.float32))
    results = []
    for threads, blocks in GEOMETRIES:
        monkeypatch.setattr(cuda_random, "THREADS", threads)
        monkeypatch.setattr(cuda_random, "MAX_BLOCKS", blocks)
        assert cuda_random.grid(x.size) == min(blocks, -(-x.size // (8 * threads)))
        results.append({k: _host(v) for k, v in _elementwise_results(target, x, dy).items()})
    for r, (threads, blocks) in zip(results[1:], GEOMETRIES[1:]):
        for k, v in r.items():
            assert_bitwise(v, results[0][k], case=f"{k}: {threads} threads x {blocks} blocks")
    _, mr = fastreg.dropout(_host(x), 0.35, rng=Generator(SEED, 2**32 - 9), backend="reference")
    assert_bitwise(results[0]["bits"], mr.bits, case="bits vs reference")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=dtype_ids)
def test_fused_mask_and_residual_sum_do_not_depend_on_the_row_plan(dtype, target, monkeypatch,
                                                                   rng):
    """4 or 32 rows per block (each block writes the mask words that start in its
    rows), one row per block (the loop path): the residual sum and the mask bits
    are the same bits; the other outputs agree."""
    M, D = 37, 52                             # rows straddle mask words
    x, r = (_to(target, _array(rng, (M, D), dtype)) for _ in range(2))
    w, b = (_to(target, _array(rng, (D,), dtype)) for _ in range(2))
    dy = _to(target, _array(rng, (M, D), dtype))
    tag = fastreg.cuda.TAGS[np.dtype(dtype)]
    plans = {"4 rows per block": ({}, 128), "32 rows per block": ({}, 1024),
             "loop": ({"fwd": (), "bwd": ()}, 128)}
    results = {}
    for name, (kernels, min_threads) in plans.items():
        table = {d: dict(cuda_dropout.ROW_KERNELS[d]) for d in ("fwd", "bwd")}
        for d, k in kernels.items():
            table[d][tag] = k
        monkeypatch.setattr(cuda_dropout, "ROW_KERNELS", table)
        monkeypatch.setattr(cuda_dropout, "MIN_THREADS", {"fwd": min_threads, "bwd": 256})
        y, s, mean, rstd, m = fastreg.dropout_add_layer_norm(
            x, r, w, b, 0.3, rng=Generator(SEED, 2**32 - 2), mask="bits", backend=target)
        grads = fastreg.dropout_add_layer_norm_backward(dy, s, mean, rstd, w, b, m,
                                                        backend=target)
        results[name] = [_host(a) for a in (s, m.bits, y, mean, rstd, *grads)]
    first = next(iter(results.values()))
    for name, res in results.items():
        assert_bitwise(res[0], first[0], case=f"{name}: residual sum")
        assert_bitwise(res[1], first[1], case=f"{name}: bits")
        for i, (a, e) in enumerate(zip(res[2:], first[2:])):
            assert_close(a.astype(np.float64), e.astype(np.float64), rtol=1e-2, atol=1e-2,
                         case=f"{name}: output {i + 2}")
    _, mr = fastreg.dropout(_host(x).astype(np.float32), 0.3, rng=Generator(SEED, 2**32 - 2),
                            backend="cpu")
    assert_bitwise(first[1], mr.bits, case="the fused op's bits are dropout's")


# =========================================================================== table-driven

DTYPE_LIST = [np.dtype(d) for d in DTYPES]


# Cases past the small shapes of the table, in every dtype: rows beyond the registers
# (loop paths; 16411: odd, scalar loads), DropConnect over several 16 x 16 tiles and
# K tiles.
LONG = [("dropout_add_layer_norm", ((3, 9000), 1, "contig"), {"p": 0.3, "mask": "bits",
                                                               "dres": True}),
        ("dropout_add_layer_norm", ((2, 16411), 1, "contig"), {"p": 0.3}),
        ("drop_connect", ((37, 70), 19, "contig"), {"p": 0.3, "per_example": True}),
        ("drop_connect", ((37, 70), 19, "contig"), {"p": 0.3, "per_example": False})]


def _table():
    """(op, spec, variant, dtype, offset, id): every op and variant, a third of the
    shapes per variant (half for the fused op), the dtype and the two stream offsets
    cycling along the table; then the LONG cases in every dtype."""
    ops = {op.name: op for op in OPS}
    picked = [(op, spec, variant) for op in OPS for j, variant in enumerate(op.variants)
              for k, spec in enumerate(op.shapes)
              if (k + j) % (2 if op.name == "dropout_add_layer_norm" else 3) == 0]
    picked = [(op, spec, variant, DTYPE_LIST[i % 4]) for i, (op, spec, variant)
              in enumerate(picked)]
    picked += [(ops[name], spec, variant, dt) for name, spec, variant in LONG
               for dt in DTYPE_LIST]
    rows = []
    for i, (op, spec, variant, dtype) in enumerate(picked):
        offset = OFFSETS[(i // 4) % 2]
        vid = ",".join(f"{k}={v}" for k, v in variant.items())
        sid = "x".join(map(str, spec[0])) + "-" + "-".join(map(str, spec[1:]))
        rows.append((op, spec, variant, dtype, offset,
                     f"{op.name}-{sid}-{vid}-{dtype.name}-offset{offset}"))
    return rows


TABLE = _table()


def _on(target, d):
    return {k: _to(target, v) for k, v in d.items()}


def _f64(d):
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind in "fV"
                and v.dtype != np.bool_ else v) for k, v in d.items()}


def _same_mask(got, ref, case):
    assert type(got) is type(ref), case
    for attr in ("kind", "shape", "p", "seed", "offset"):
        assert getattr(got, attr) == getattr(ref, attr), f"{case}: mask.{attr}"
    if getattr(ref, "bits", None) is not None:
        assert_bitwise(_host(got.bits), ref.bits, case=f"{case}: mask bits")


def _compare_all(got, ref64, low, bitwise, kind, dtype, case):
    for i, (g, r64, lo) in enumerate(zip(got, ref64, low)):
        if isinstance(lo, np.ndarray) or lo is None:
            g = _host(g)
            if lo is None:
                assert g is None, f"{case}: out[{i}] should be None"
                continue
            assert g.shape == lo.shape and g.dtype == lo.dtype, f"{case}: out[{i}] {g.dtype}"
            if i in bitwise:
                assert_bitwise(g, lo, case=f"{case} out[{i}]")
            elif lo.dtype in LOW:
                _check(f"out[{i}]", g, r64, lo, dtype, kind, case)
            else:      # float32/float64 (and the float32 statistics of 16-bit inputs):
                # the reference on the same inputs, at the CPU tests' tolerances
                _check(f"out[{i}]", g, lo, None, lo.dtype, kind, case)
        else:
            _same_mask(g, lo, f"{case} out[{i}]")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op,spec,variant,dtype,offset", [c[:5] for c in TABLE],
                         ids=[c[5] for c in TABLE])
def test_forward_matches_reference(op, spec, variant, dtype, offset, target, rng, ref16):
    d = op.make(rng, spec, dtype, variant)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    case = f"{op.name} fwd {dtype.name} {spec} {variant} offset={offset} on {target}"
    g_ref = gen(offset)
    low = op.forward(d, "reference", g_ref)                 # in the dtype
    ref64 = op.forward(_f64(d), "reference", gen(offset))
    dd = _on(target, d)
    g_out, g_fresh = gen(offset), gen(offset)
    out = op.out_like(low, lambda a: _poison(target, a))
    got = op.forward(dd, target, g_out, out)
    fresh = op.forward(dd, target, g_fresh)
    for o in out:
        if o is not None:
            assert any(g is o for g in got) or (hasattr(got[-1], "bits") and got[-1].bits is o), \
                f"{case}: out= arrays not returned"
    _compare_all(got, ref64, low, op.bitwise, "out", dtype, f"{case} (out=)")
    _compare_all(fresh, ref64, low, op.bitwise, "out", dtype, f"{case} (fresh)")
    assert g_out.offset == g_fresh.offset == g_ref.offset, f"{case}: generators differ"
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input '{k}' modified"


BACKWARD_TABLE = [c for c in TABLE if c[0].backward is not None]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op,spec,variant,dtype,offset", [c[:5] for c in BACKWARD_TABLE],
                         ids=[c[5] for c in BACKWARD_TABLE])
def test_backward_matches_reference(op, spec, variant, dtype, offset, target, rng, ref16):
    d = op.make(rng, spec, dtype, variant)
    saved = op.forward(d, "reference", gen(offset))
    dy = np.empty_like(saved[0])
    dy[...] = rng.standard_normal(dy.shape)
    case = f"{op.name} bwd {dtype.name} {spec} {variant} offset={offset} on {target}"
    low = op.backward(d, saved, dy, "reference")
    saved64 = tuple(s.astype(np.float64) if isinstance(s, np.ndarray) else s for s in saved)
    ref64 = op.backward(_f64(d), saved64, dy.astype(np.float64), "reference")
    saved_t = tuple(_to(target, s) if isinstance(s, np.ndarray) else s for s in saved)
    if any(hasattr(s, "bits") and s.bits is not None for s in saved):   # bits on the target
        saved_t = tuple(_with_bits(target, s) for s in saved_t)
    dd, dyd = _on(target, d), _to(target, dy)
    before = [np.copy(_host(a)) for a in (*dd.values(), dyd, *saved_t)
              if array_kind(a) is not None]
    out = tuple(None if r is None else _poison(target, r) for r in low)
    got = op.backward(dd, saved_t, dyd, target, out if len(out) > 1 else out[0])
    fresh = op.backward(dd, saved_t, dyd, target)
    for g, o in zip(got, out):
        assert g is o, f"{case}: out= arrays not returned"
    _compare_all(got, ref64, low, op.grad_bitwise, "grad", dtype, f"{case} (out=)")
    _compare_all(fresh, ref64, low, op.grad_bitwise, "grad", dtype, f"{case} (fresh)")
    after = [np.copy(_host(a)) for a in (*dd.values(), dyd, *saved_t)
             if array_kind(a) is not None]
    for a, b in zip(before, after):
        assert np.array_equal(a, b, equal_nan=True), f"{case}: an input was modified"


def _with_bits(target, mask):
    if getattr(mask, "bits", None) is None or target != "cuda":
        return mask
    m = type(mask).__new__(type(mask))
    for k in type(mask).__slots__:
        setattr(m, k, getattr(mask, k))
    m.bits = _to(target, mask.bits)
    return m


# =========================================================================== other properties

@pytest.mark.parametrize("target", TARGETS)
def test_fused_backward_blocks_walk_several_row_groups(target, monkeypatch, rng):
    """A grid smaller than the row groups (as at large M on a GPU): each block walks
    several groups and keeps their dweight/dbias in registers."""
    monkeypatch.setattr(cuda_dropout, "H100_SMS", 3)
    x, r, dy = (_array(rng, (300, 37), np.float32) for _ in range(3))
    w, b = _array(rng, (37,), np.float32), _array(rng, (37,), np.float32)
    assert cuda_dropout.backward_blocks(-(-300 // 8), 256) == 6
    for mask in ("bits", "seed"):
        outs = fastreg.dropout_add_layer_norm(*(_to(target, a) for a in (x, r, w, b)), 0.4,
                                              rng=Generator(2, 2**32 - 1), mask=mask,
                                              backend=target)
        ref = fastreg.dropout_add_layer_norm(x, r, w, b, 0.4, rng=Generator(2, 2**32 - 1),
                                             mask=mask, backend="reference")
        got = fastreg.dropout_add_layer_norm_backward(_to(target, dy), *outs[1:4], _to(target, w),
                                                      _to(target, b), outs[4], backend=target)
        want = fastreg.dropout_add_layer_norm_backward(dy, *ref[1:4], w, b, ref[4],
                                                       backend="reference")
        for name, g, e in zip(("dx", "dresidual", "dweight", "dbias"), got, want):
            scale = max(1.0, float(np.abs(e).max()))
            assert_close(_host(g), e, rtol=1e-4, atol=1e-4 * scale, case=f"{mask} {name}")


@pytest.mark.parametrize("target", TARGETS)
def test_drop_connect_per_example_equals_n_masked_matrices(target, rng):
    N, K, O = 5, 13, 6
    x, w, b = rng.standard_normal((N, K)), rng.standard_normal((O, K)), rng.standard_normal(O)
    y, m = fastreg.drop_connect(_to(target, x), _to(target, w), _to(target, b), 0.4,
                                rng=Generator(21, 2**32 - 7), per_example=True, backend=target)
    keep = m.to_bool()                       # regenerated on the CPU: the same stream
    assert keep.shape == (N, O, K)
    masked = np.where(keep, m.scale, 0.0) * w
    assert_close(_host(y), np.einsum("noi,ni->no", masked, x) + b, rtol=1e-12, atol=1e-12,
                 case="per example")
    dy = rng.standard_normal((N, O))
    dx, dw, db = fastreg.drop_connect_backward(_to(target, dy), _to(target, x), _to(target, w), m,
                                               backend=target)
    assert_close(_host(dx), np.einsum("no,noi->ni", dy, masked), rtol=1e-12, atol=1e-12,
                 case="dx")
    assert_close(_host(dw), np.einsum("no,ni,noi->oi", dy, x, np.where(keep, m.scale, 0.0)),
                 rtol=1e-12, atol=1e-12, case="dw")
    assert_close(_host(db), dy.sum(0), rtol=1e-12, atol=1e-12, case="db")


@pytest.mark.parametrize("target", TARGETS)
def test_results_are_identical_run_to_run_and_under_real_threads(target, rng):
    """Every op twice, and (emulation) once more with the block's threads as OS threads."""
    x = rng.standard_normal((67, 40)).astype(np.float32)
    r, dy = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(x.shape)
    w, b = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    W = rng.standard_normal((5, 40)).astype(np.float32)
    xd, rd, dyd, wd, bd, Wd = (_to(target, a) for a in (x, r, dy.astype(np.float32), w, b, W))

    def run():
        g = Generator(11, 2**64 - 100)
        out = list(fastreg.dropout(xd, 0.2, rng=g, backend=target))
        out[1] = out[1].bits
        out.append(fastreg.gaussian_dropout(xd, 0.2, rng=g, backend=target)[0])
        y, s, mean, rstd, m = fastreg.dropout_add_layer_norm(xd, rd, wd, bd, 0.1, rng=g,
                                                             backend=target)
        out += [y, s, mean, rstd,
                *fastreg.dropout_add_layer_norm_backward(dyd, s, mean, rstd, wd, bd, m,
                                                         backend=target)]
        yc, mc = fastreg.drop_connect(xd, Wd, None, 0.3, rng=g, per_example=True, backend=target)
        out += [yc, *fastreg.drop_connect_backward(_xp(target).ones_like(yc), xd, Wd, mc,
                                                   backend=target)]
        out.append(fastreg.drop_connect_inference(xd, Wd, None, 0.3, activation="tanh",
                                                  n_samples=9, rng=g, backend=target))
        return [_host(a) for a in out]

    first, second = run(), run()
    runs = [second]
    if target == "cuda_emulator":
        try:
            _emulator.set_mode("threads")
            runs.append(run())
        finally:
            _emulator.set_mode("fibers")
    for other in runs:
        for i, (a, b_) in enumerate(zip(first, other)):
            assert_bitwise(a, b_, case=f"output {i}")


@pytest.mark.parametrize("target", TARGETS)
def test_sixteen_bit_inputs_only_on_the_gpu_backends(target, rng):
    x = rng.standard_normal(10).astype(np.float16)
    y, m = fastreg.dropout(_to(target, x), 0.5, rng=1, backend=target)
    assert _host(y).dtype == np.float16
    with pytest.raises(TypeError, match=r"dropout: 'x' must be a floating array \(float32, "
                                        r"float64\), got dtype float16"):
        fastreg.dropout(x, 0.5, rng=1)


@needs_emulator
def test_the_kernels_run_every_elementwise_path_under_the_emulation(rng):
    """16-byte and scalar paths: an unaligned view (x[1:]) runs the scalar loads."""
    base = rng.standard_normal(1001).astype(np.float32)
    for x in (base[:1000], base[1:]):
        y, m = fastreg.dropout(x, 0.5, rng=5, backend="cuda_emulator")
        assert_bitwise(y, fastreg.dropout(np.ascontiguousarray(x), 0.5, rng=5,
                                          backend="reference")[0], case="aligned/unaligned")


@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
def test_the_same_seed_gives_the_same_mask_on_numpy_and_cupy():
    import cupy
    x = np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32)
    y_cpu, m_cpu = fastreg.dropout(x, 0.1, rng=fastreg.random.Generator(1234))
    y_gpu, m_gpu = fastreg.dropout(cupy.asarray(x), 0.1, rng=fastreg.random.Generator(1234))
    assert isinstance(y_gpu, cupy.ndarray) and isinstance(m_gpu.bits, cupy.ndarray)
    assert np.array_equal(m_cpu.bits, m_gpu.bits.get())
    assert np.array_equal(y_cpu, y_gpu.get())
    assert np.array_equal(m_cpu.to_bool(), m_gpu.to_bool().get())
